"""The demo's preference set: pairs judged by the shapes checker among the demo model's own samples.

For each of the 180 canonical captions, the checkpoint draws `per_prompt` images (seeds from 300000 on, apart
from the live grids' and evaluate_demo's), and `shapes_check` judges each against its caption. Every image
that gets an attribute wrong is a rejected image; it is paired with a right image of the same caption
(round-robin), or, where none was right, with the caption's own rendering. Pairs from the model's own
mistakes teach it what it gets wrong (measured in docs/dpo.md: rendered pairs with one attribute changed
did not move the score). The folder is the "pairs" source's layout: img/*.png and pairs.jsonl.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from .data.pairs import PAIRS_FILE
from .data.shapes import all_prompts, render
from .models import load_trained
from .sampling import generate
from .schedule import NoiseSchedule
from .shapes_check import ATTRIBUTES, check_image

FIRST_SEED = 300_000  # live grids use sample.seed (1234) on, evaluate_demo.py 100000 on


def make_demo_pairs(checkpoint: str, out_dir: str, per_prompt: int = 8, weights: str = "ema",
                    steps: int | None = None) -> dict:
    """Sample, judge and write the pairs folder; -> {"images", "right", "pairs", "rendered"} counts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, unet, frozen = load_trained(checkpoint, weights, device)
    d, s = cfg.diffusion, cfg.sample
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    targets = [t for t in all_prompts() for _ in range(per_prompt)]
    images = generate(unet, frozen, schedule, [t["caption"] for t in targets],
                      [FIRST_SEED + i for i in range(len(targets))], steps or s.steps, s.cfg_scale,
                      s.guidance_rescale, s.spacing, autocast=device.type == "cuda", batch_size=180)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    right: dict[str, list[str]] = {}
    wrong: dict[str, list[str]] = {}
    for i, (target, image) in enumerate(zip(targets, pixels)):
        name = f"img/{i:05d}.png"
        Image.fromarray(image).save(out / name)
        seen = check_image(image)
        judged = right if all(seen[a] == target[a] for a in ATTRIBUTES) else wrong
        judged.setdefault(target["caption"], []).append(name)
    rows, rendered = [], 0
    for target in all_prompts():
        caption = target["caption"]
        winners = right.get(caption)
        if not winners and caption in wrong:
            winners = [f"img/rendered_{len(rows):05d}.png"]
            render(target, cfg.data.resolution).save(out / winners[0])
            rendered += 1
        rows += [{"caption": caption, "preferred": winners[j % len(winners)], "rejected": loser}
                 for j, loser in enumerate(wrong.get(caption, []))]
    tmp = out / f".{PAIRS_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, out / PAIRS_FILE)  # the folder is a source only once its listing is complete
    return {"images": len(targets), "right": sum(map(len, right.values())), "pairs": len(rows),
            "rendered": rendered}
