"""Toy pipelines side by side: one row per prompt, each model's images for the same seeds in turn.

    python benchmarks/model_grid.py --model src/eiup/toy/weights/pipeline --model runs/lc8w/pipeline \
        --out docs/experiments/unet-transfer-grid.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = ["a ladybug", "a bee", "a strawberry", "a striped blue circle", "a dotted green square",
           "a striped purple heart", "a dotted orange cross", "a green star", "a red circle and a blue square",
           "a tomato and a sapphire"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", required=True, help="pipeline folder (repeat)")
    ap.add_argument("--prompt", action="append", default=None, help=f"(repeat; default: {len(PROMPTS)} prompts)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("bench-out/model-grid.png"))
    args = ap.parse_args()

    import torch
    from PIL import Image

    from eiup.io import save_png_atomic
    from eiup.models import load_pipeline
    from eiup.toy.quality import image_grid

    prompts = args.prompt or PROMPTS
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows: list[list[Image.Image]] = [[] for _ in prompts]
    for k, folder in enumerate(args.model):
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
        for row, prompt in zip(rows, prompts):
            if k:
                row.append(Image.new("RGB", row[0].size, (200, 200, 200)))  # a gray square between models
            row += pipe([prompt] * len(seeds), num_inference_steps=25,
                        generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    grid = image_grid(rows, prompts, scale=2)
    save_png_atomic(args.out, grid)
    print(f"{', '.join(str(m) for m in args.model)} (left to right), seeds {seeds.start}-{seeds.stop - 1}: {args.out}")


if __name__ == "__main__":
    main()
