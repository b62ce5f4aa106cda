"""Erasure settings on held-out prompts and seeds (toy model): a check that settings chosen on the
benchmark's prompts (the toy model's anchor presets) carry over.

Prompts: per concept, the calibration prompts (templated implicit nouns such as "a photo of a
tomato", explicit prompts with backgrounds) and the calibration negatives, none of them in the
benchmark suites; seeds 3000.. (the benchmark uses 0..19). Residual: share of erased images that
still show the concept, among those whose plain image shows it; fidelity vs plain: share of those
whose other attributes (background included, unless it is the concept) are as in the plain image;
as plain or as prompted: ... or as the prompt asks (an erasure that corrects the model's mistake).
Specificity: share of negative images whose detected attributes are unchanged by the erasure, and
their median PSNR against the plain image.

    python benchmarks/heldout.py                                          # the library defaults
    python benchmarks/heldout.py --kwargs '{"anchors": [], "erase_scale": -4}'   # EIUP in context alone
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tqdm.auto import tqdm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kwargs", default="{}", help="erasure keyword arguments as JSON (default: the library defaults)")
    ap.add_argument("--concepts", nargs="+", default=["red", "star", "heart", "night"])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=3000, help="seeds first..first+seeds-1 (benchmark: 0..19)")
    args = ap.parse_args()

    from eiup.bench.metrics import as_prompted, kept_from_plain, psnr_ssim
    from eiup.bench.suites import calibration_negatives, calibration_prompts
    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector
    from eiup.toy.world import CONCEPTS, parse_caption

    kwargs = json.loads(args.kwargs)
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    detector = ConceptDetector.load()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))

    def attributes(d):
        return sorted(tuple(sorted(o.attributes().items())) for o in d.objects)

    print(f"| concept | held-out prompts (+ negatives) | residual | fidelity vs plain | as plain or as prompted |"
          f" specificity | median PSNR |  settings: {json.dumps(kwargs)}")
    print("|---|---|---|---|---|---|---|")
    for concept in args.concepts:
        attribute, value = CONCEPTS[concept]
        positives, negatives = calibration_prompts(concept), calibration_negatives(concept)
        residual, kept, unharmed, same, psnr = [], [], [], [], []
        skip = attribute if attribute != "background" else None
        for prompt in tqdm(positives + negatives, desc=concept, leave=False):
            out = pipe([prompt] * len(seeds), num_inference_steps=25, erase=[concept], return_original=True,
                       generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
            plain, erased = detector.detect(out.original_images), detector.detect(out.images)
            if prompt in positives:
                shown = [(e, p) for e, p in zip(erased, plain) if p.has(attribute, value)]
                residual += [e.has(attribute, value) for e, p in shown]
                kept += [kept_from_plain(e, p, skip, skip is None) for e, p in shown]
                unharmed += [k or as_prompted(e, parse_caption(prompt), concept)
                             for k, (e, _) in zip(kept[len(kept) - len(shown):], shown)]
            else:
                same += [attributes(p) == attributes(e) for p, e in zip(plain, erased)]
                psnr += psnr_ssim(out.images, out.original_images)[0]
        print(f"| {concept} | {len(positives)} (+{len(negatives)}) | {np.mean(residual):.0%} (n={len(residual)}) | "
              f"{np.mean(kept):.0%} | {np.mean(unharmed):.0%} | {np.mean(same):.0%} (n={len(same)}) | {np.median(psnr):.1f} dB |", flush=True)


if __name__ == "__main__":
    main()
