"""Where the toy detector misreads patterns: renders vs their VAE round trip, by object size (issue #3).

Fresh renders (the detector's evaluation scenes) are judged three ways: as rendered, with the VAE's
latent means decoded, and with sampled latents decoded (what `evaluate_detector` does). Prints the
pattern confusion counts of each and the pattern accuracy by the object's share of the image, and
writes a picture of dotted objects: renders (top row) and their round trips (bottom row).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder whose VAE is used (default: the bundled toy model)")
    ap.add_argument("--detector", default=None, help="detector weights (default: the bundled detector)")
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--picture", default=None, help="PNG of 12 scenes with dotted objects, renders over round trips")
    args = ap.parse_args()

    from PIL import Image

    from eiup.models import load_pipeline
    from eiup.toy.detect import GRID, ConceptDetector, nearest_detection, render_detector_scenes, vae_round_trip
    from eiup.toy.quality import image_grid

    vae = load_pipeline(args.model).vae
    detector = ConceptDetector.load(args.detector)
    renders, covers, scenes = render_detector_scenes(args.scenes, seed=12345, processes=1)  # evaluate_detector's
    decoded = {"renders": renders, "latent means": vae_round_trip(vae, renders, sample=False),
               "sampled latents": vae_round_trip(vae, renders, sample=True)}
    for name, images in decoded.items():
        confusion, by_size = Counter(), defaultdict(lambda: [0, 0])
        for scene, cover, found in zip(scenes, covers, detector.detect(images)):
            for k, obj in enumerate(scene.objects):
                near = nearest_detection(found.objects, cover[k])
                read = near.pattern if near else "nothing"
                confusion[(obj.pattern, read)] += 1
                share = cover[k].sum() / GRID**2
                size = "under 3%" if share < 0.03 else "3-6%" if share < 0.06 else "6-12%" if share < 0.12 else "12% and more"
                by_size[size][0] += obj.pattern == read
                by_size[size][1] += 1
        total, right = sum(confusion.values()), sum(v for (a, b), v in confusion.items() if a == b)
        print(f"{name}: pattern right on {right / total:.1%} of {total} objects")
        print("  asked -> read: " + ", ".join(f"{a} -> {b}: {v}" for (a, b), v in sorted(confusion.items())))
        print("  by the object's share of the image: " + ", ".join(
            f"{s} {by_size[s][0] / by_size[s][1]:.1%} (n={by_size[s][1]})"
            for s in ("under 3%", "3-6%", "6-12%", "12% and more") if by_size[s][1]))
    if args.picture:
        dotted = [i for i, s in enumerate(scenes) if any(o.pattern == "dotted" for o in s.objects)][:12]
        random.Random(0).shuffle(dotted)
        grid = image_grid([[Image.fromarray(decoded[k][i]) for i in dotted] for k in ("renders", "latent means")])
        grid.quantize(256).save(args.picture, optimize=True)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
