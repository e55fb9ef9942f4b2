"""Convert a dataset into ldm_ddp's indexed shard format (train with --data.source=shards --data.path=OUT).

    python scripts/make_shards.py --source folder --path /data/images OUT [--resize 512 | --resize-area 512]
        [--min-size 256] [--replace]
        [--workers 8] [--shard-size 2000] [--no-shuffle] [--no-verify]
    python scripts/make_shards.py --source webdataset --path '/data/wds/shards-{000000..000099}.tar' OUT
    python scripts/make_shards.py --source hf --path /data/saved_dataset --image-column image
        --caption-column text OUT

Input: any random-access source of the trainer (folder, webdataset, parquet, hf, or another shard set),
local or fsspec URL, configured as with --data.*. Output (a local folder): shard-NNNNNN.tar (WebDataset-
compatible), shard-NNNNNN.json (its byte-offset index), skipped.jsonl (left-out samples and why) and
index.json (written last). Samples are shuffled across shards with --shuffle-seed (default 0), so a
folder sorted by class or date does not become shards of one class; the trainer shuffles again, in two
levels, every epoch.
"""
import argparse
import re
import sys
from pathlib import Path

import _path  # noqa: F401

from ldm_ddp.config import ConfigError, DataConfig

SHARD_SET_FILES = re.compile(r"(shard-\d{6}\.(tar|json)|index\.json|skipped\.jsonl)(\.tmp)?")


def clear_output(out: Path, replace: bool) -> str:
    """An empty (or new) OUT is used as it is. A shard set there is removed whole with --replace (its files
    only: a folder with anything else in it is refused either way); -> why OUT is refused, or ""."""
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not present:
        return ""
    others = [name for name in present if not SHARD_SET_FILES.fullmatch(name)]
    if others:
        return f"{out} holds files that are not a shard set's ({others[0]}, ...); choose an empty folder"
    if not replace:
        return f"{out} holds a shard set already ({len(present)} files); pass --replace to replace it whole"
    for name in present:
        (out / name).unlink()
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (local)")
    parser.add_argument("--source", required=True,
                        choices=["folder", "webdataset", "parquet", "hf", "shards"])
    parser.add_argument("--path", required=True, help="the input, as data.path (path, pattern or URL)")
    parser.add_argument("--caption-column", default="text")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--shard-size", type=int, default=2000, help="samples per shard before filtering")
    parser.add_argument("--workers", type=int, default=1, help="processes preparing shards in parallel")
    parser.add_argument("--resize", type=int, default=0,
                        help="px: shrink the shorter side to this (JPEG); 0 = keep")
    parser.add_argument("--resize-area", type=int, default=0,
                        help="px: shrink to at most this squared pixel count, keeping the aspect (for aspect-"
                             "ratio buckets of data.resolution = this); 0 = keep")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of resized images")
    parser.add_argument("--min-size", type=int, default=0,
                        help="px: leave out images whose shorter side is smaller")
    parser.add_argument("--no-verify", action="store_true",
                        help="do not decode images that are kept as they are")
    parser.add_argument("--shuffle-seed", type=int, default=0)
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    parser.add_argument("--replace", action="store_true",
                        help="replace the shard set in OUT whole (else a non-empty OUT is refused)")
    args = parser.parse_args()
    if args.shard_size < 1 or args.workers < 1 or min(args.resize, args.resize_area, args.min_size) < 0:
        print("make_shards: --shard-size and --workers must be >= 1, --resize, --resize-area and --min-size "
              ">= 0", file=sys.stderr)
        return 2
    refused = clear_output(Path(args.out), args.replace)
    if refused:
        print(f"make_shards: {refused}", file=sys.stderr)
        return 2

    from ldm_ddp.data.convert import NothingToWrite, make_shards
    from ldm_ddp.data.sources import build_source

    cfg = DataConfig(source=args.source, path=args.path, caption_column=args.caption_column,
                     image_column=args.image_column, hf_split=args.hf_split)
    try:
        source = build_source(cfg)
        make_shards(source, args.out, args.shard_size, args.workers, args.resize, args.min_size,
                    verify=not args.no_verify, quality=args.quality,
                    shuffle_seed=None if args.no_shuffle else args.shuffle_seed, resize_area=args.resize_area)
    except ConfigError as err:
        print(f"make_shards: {err}", file=sys.stderr)
        return 2
    except NothingToWrite as err:
        print(f"make_shards: nothing written from {args.path}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
