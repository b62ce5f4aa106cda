"""Toy VAE round trips through two decoders: fresh renders (top row), then each VAE's reconstruction
from the same latent means, with PSNR. Made for `eiup toy finetune-decoder` (docs/experiments/decoder.md):

    cp -r src/eiup/toy/weights/pipeline /tmp/ft && eiup toy finetune-decoder --model /tmp/ft
    python benchmarks/decoder_grid.py --before src/eiup/toy/weights/pipeline/vae --after /tmp/ft/vae \
        --out docs/experiments/decoder-renders.png
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="VAE folder to compare with")
    ap.add_argument("--after", type=Path, default=None, help="VAE folder (default: the bundled model's)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/decoder.png"))
    ap.add_argument("--scenes", type=int, default=12)
    ap.add_argument("--first-seed", type=int, default=50_000)
    args = ap.parse_args()

    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from eiup.io import save_png_atomic
    from eiup.models import default_model_path
    from eiup.toy.render import render
    from eiup.toy.world import random_scene

    scenes = [random_scene(random.Random(args.first_seed + i)) for i in range(args.scenes)]
    raw = np.stack([render(s, 64).image for s in scenes])
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 127.5 - 1
    rows = [raw]
    for path in (args.before, args.after or default_model_path() / "vae"):
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32, use_safetensors=True)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        rows.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
        psnr = 10 * np.log10(255**2 / ((rows[-1].astype(float) - raw) ** 2).mean())
        print(f"{path}: PSNR {psnr:.2f} dB over {len(scenes)} renders")
    grid = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_png_atomic(args.out, Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST))


if __name__ == "__main__":
    main()
