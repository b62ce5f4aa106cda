"""Does the toy detector read the colours a model's images show? A check without a learned judge (issue #3).

The detector is trained on renders passed through the model's VAE, so it can learn that VAE's traces
of a colour instead of the colour. This script reads each object's colour a second way, from its
pixels (:func:`eiup.toy.detect.palette_color`: the world colour nearest to the brighter half of the
pixels under the detector's cells) and compares, on

1. fresh renders through the VAE: how often each reader gives the rendered colour (how far the
   pixel reader can be trusted through this VAE);
2. generated images of the quality report's one- and two-object prompts: how often each reader gives
   the colour the prompt asks for, and how often the two agree.

Optionally writes a picture of generated objects the two readers disagree on, labelled
"detector / pixels".
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled toy model)")
    ap.add_argument("--detector", default=None, help="detector weights (default: the bundled detector)")
    ap.add_argument("--renders", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=6, help="generated images per prompt (seeds 900..)")
    ap.add_argument("--picture", default=None, help="PNG of generated images the readers disagree on (a row per prompt)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    import torch
    from PIL import Image
    from tqdm import tqdm

    from eiup.models import load_pipeline
    from eiup.toy.detect import (ConceptDetector, cover_center, palette_color, render_detector_scenes,
                                 vae_round_trip)
    from eiup.toy.quality import image_grid, quality_prompts
    from eiup.toy.world import parse_caption

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    detector = ConceptDetector.load(args.detector)
    report: dict = {"model": args.model or "bundled", "detector": args.detector or "bundled"}

    renders, covers, scenes = render_detector_scenes(args.renders, seed=4242, processes=1)
    trips = vae_round_trip(pipe.vae, renders, sample=False)
    n = pixels_right = detector_right = 0
    for image, found, cover, scene in zip(trips, detector.detect(trips), covers, scenes):
        centers = [cover_center(c) for c in cover[:len(scene.objects)]]
        for obj in found.objects:  # judged against the rendered object whose coverage centre is nearest
            k = min(range(len(centers)), key=lambda i: (centers[i][0] - obj.center[0]) ** 2 + (centers[i][1] - obj.center[1]) ** 2)
            truth = scene.objects[k].color
            n += 1
            pixels_right += palette_color(image, obj.mask, found.background) == truth
            detector_right += obj.color == truth
    report["round_trips"] = {"objects": n, "pixels_right": pixels_right / n, "detector_right": detector_right / n}
    print(f"renders through the VAE ({n} objects): colour right by the pixels {pixels_right / n:.1%}, "
          f"by the detector {detector_right / n:.1%}")

    prompts = [p for group in ("implicit", "explicit", "two objects") for p in quality_prompts()[group]]
    counts = {"objects": 0, "agree": 0, "detector_as_asked": 0, "pixels_as_asked": 0}
    disagreements = []
    for prompt in tqdm(prompts, desc="generated"):
        asked = {o.color for o in parse_caption(prompt).objects}
        images = pipe([prompt] * args.seeds, num_inference_steps=25,
                      generator=[torch.Generator().manual_seed(900 + s) for s in range(args.seeds)], output_type="np").images
        images = (images * 255).round().astype(np.uint8)
        for image, found in zip(images, detector.detect(images)):
            for obj in found.objects:
                try:
                    by_pixels = palette_color(image, obj.mask, found.background)
                except ValueError:
                    by_pixels = None
                counts["objects"] += 1
                counts["agree"] += by_pixels == obj.color
                counts["detector_as_asked"] += obj.color in asked
                counts["pixels_as_asked"] += by_pixels in asked
                if by_pixels != obj.color:
                    disagreements.append((prompt, obj.color, by_pixels, Image.fromarray(image)))
    total = counts["objects"]
    report["generated"] = {"prompts": len(prompts), "seeds": args.seeds, "objects": total,
                           **{k: v / total for k, v in counts.items() if k != "objects"}}
    print(f"generated ({len(prompts)} prompts x {args.seeds} seeds, {total} objects): the readers agree on "
          f"{counts['agree'] / total:.1%}; colour as asked by the detector {counts['detector_as_asked'] / total:.1%}, "
          f"by the pixels {counts['pixels_as_asked'] / total:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.picture and disagreements:
        rows: dict[tuple, list] = {}  # one row per prompt and pair of readings: the 10 most frequent, 4 images each
        for prompt, by_detector, by_pixels, image in disagreements:
            rows.setdefault((prompt, by_detector, by_pixels), []).append(image)
        top = sorted(rows, key=lambda k: -len(rows[k]))[:10]
        grid = image_grid([rows[k][:4] for k in top], [f"{p}: detector {d} / pixels {x} ({len(rows[(p, d, x)])})"
                                                      for p, d, x in top])
        grid.quantize(256).save(args.picture, optimize=True)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
