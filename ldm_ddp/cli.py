"""The command line of the training entry points (scripts/train.py, scripts/train_autoencoder.py)."""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from . import dist, faults
from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .data.stream import DataFailure
from .launch import record_exit
from .resume import run_folder_lock


def run_training(doc: str, default_preset: str, train: Callable[[Config], object]) -> int:
    """`_run_training`, its exit code recorded for scripts/launch.py (launch.record_exit)."""
    code = _run_training(doc, default_preset, train)
    record_exit(code)
    return code


def _run_training(doc: str, default_preset: str, train: Callable[[Config], object]) -> int:
    """Parse `--preset/--config/--dry-run` and `--section.key=value`, then run `train(cfg)`; -> exit code.

    A bad config, a refused resume or an unreadable checkpoint asked for by path is one line on stderr,
    exit 2.
    A run that stops on purpose (preemption, non-finite steps, a failed save) or because another rank died or
    hung says why in one line and exits with its code (faults.py lists them); rank 0 prints the planned stops.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=default_preset, help=f"named recipe in ldm_ddp/presets "
                                                                   f"(default: {default_preset})")
    parser.add_argument("--config", help="TOML file applied over the preset")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args()
    faults.end_with_launcher()  # from here on a launcher killed with kill -9 ends this rank too
    if not faulthandler.is_enabled():  # a crash in native code (SIGSEGV, SIGABRT)
        # prints each thread's Python stack
        faulthandler.enable(sys.__stderr__)
    try:
        cfg = load_config(args.config, overrides, preset=args.preset)
        if args.dry_run:
            print(cfg.to_toml())
            return 0
        is_rank0 = os.environ.get("RANK", "0") == "0"  # torchrun's global rank,
        # known before the process group
        with run_folder_lock(Path(cfg.train.out_dir)) if is_rank0 else contextlib.nullcontext():
            train(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except faults.Stop as err:
        if dist.is_main():
            print(err, file=sys.stderr, flush=True)
        return err.exit_code
    except DataFailure as err:  # on whichever rank met it; the others stop as after a peer's failure
        print(f"error: {err.one_line()}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        line = dist.peer_failure(err)
        if line is None:
            # An unexpected error: its traceback and exit 1, as an uncaught exception would; printed here, not
            # re-raised, so that the exception and the run's frames it holds are gone before the
            # teardown below.
            traceback.print_exc()
            return 1
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # The process group is broken: tearing it down can wait forever on a collective that will never end
        # (NCCL), so leave at once; DataLoader workers notice their parent is gone and end too.
        record_exit(faults.EXIT_PEER_FAILURE)
        os._exit(faults.EXIT_PEER_FAILURE)
    except KeyboardInterrupt:  # Ctrl-C (SIGINT): nothing is saved, as a kill would; 128 + SIGINT
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        # A run that stops raises from inside train(): its frame (the DDP module, the loader and its workers,
        # the process group's other users) is held by a reference cycle through the exception (the frame holds
        # the exception, whose traceback holds the frame). Free it here, while the interpreter is whole, so
        # that the process group below is really torn down; left to the interpreter's shutdown, threads of
        # gloo and of the loader can die half-way (SIGABRT, "terminate called without an active exception",
        # once in CI).
        gc.collect()
        dist.shutdown()
    return 0
