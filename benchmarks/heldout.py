"""Erasure settings on held-out prompts and seeds (toy model): a check that settings chosen on the
benchmark's prompts (the toy model's anchor presets) carry over.

Prompts: per concept, the calibration prompts (templated implicit nouns such as "a photo of a
tomato", explicit prompts with backgrounds) and the calibration negatives, none of them in the
benchmark suites; seeds 3000.. (the benchmark uses 0..19). The measures are those of
:mod:`eiup.bench.heldout` (residual, fidelity vs plain, as plain or as prompted, specificity, PSNR).

    python benchmarks/heldout.py                                          # the library defaults
    python benchmarks/heldout.py --kwargs '{"anchors": [], "erase_scale": -4}'   # EIUP in context alone
    python benchmarks/heldout.py --rewrite       # the reference: each prompt rewritten without the concept
    python benchmarks/heldout.py --kwargs '{"guard": false}'               # the presets, without the guard
    python benchmarks/heldout.py --guard src/eiup/toy/weights/detector.safetensors \
        --judge src/eiup/toy/weights/pipeline/eiup_guard.safetensors     # the two detectors' roles swapped

``--prompts heldout`` takes the auto-scale check's prompts instead (:func:`eiup.bench.suites.heldout_prompts`,
other templates; ``benchmarks/auto_vs_fixed.py`` uses seeds 5000..); ``--prompts confirmation`` a third
set (:func:`eiup.bench.suites.confirmation_prompts`, seeds 7000.. by convention), kept for confirming a
design once it was chosen on the first two; ``--prompts reserve`` a fourth (:func:`eiup.bench.suites.reserve_prompts`,
seeds 8000.. by convention), for the design the confirmation set led to; ``--prompt-file FILE`` a file's prompts
(one per line; ``benchmarks/prompts/red-dark-development.txt``: red on dark backgrounds, seeds 4000..). ``--rewrite`` judges no erasure
setting: each prompt with the concept is rewritten by hand-made rules to comply (the concept's attribute
set to another value, round robin over the seeds: "a photo of a tomato" -> "a photo of an orange circle",
:func:`eiup.toy.world.rewrite_without`) and generated without erasure. It is what a perfect prompt-level
erasure would draw: how well the model draws the prompt without the concept, a reference for fidelity
(not a bound: an erasure that keeps the plain image's layout can do better).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kwargs", default="{}", help="erasure keyword arguments as JSON (default: the library defaults)")
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled toy model)")
    ap.add_argument("--concepts", nargs="+", default=["red", "star", "heart", "night"])
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=3000, help="seeds first..first+seeds-1 (benchmark: 0..19)")
    ap.add_argument("--prompts", choices=["calibration", "heldout", "confirmation", "reserve"], default="calibration",
                    help="calibration prompts (default), the auto-scale check's held-out templates, the "
                         "confirmation set (a third, for confirming a design chosen on the other two) or the "
                         "reserve set (a fourth, dark backgrounds among them)")
    ap.add_argument("--prompt-file", default=None, metavar="FILE",
                    help="judge these prompts with the concept instead (one per line, '#' comments; one --concepts); "
                         "the negatives stay --prompts' set's")
    ap.add_argument("--rewrite", action="store_true",
                    help="judge the prompts rewritten without the concept (a reference) instead of an erasure setting")
    ap.add_argument("--guard", default=None, metavar="DETECTOR",
                    help="closed-loop erasure (guard=, eiup.guard) with these toy detector weights checking each image "
                         "instead of the model folder's guard (e.g. the judging detector itself, for a bound)")
    ap.add_argument("--guard-threshold", type=float, default=None,
                    help="with --guard: flag where the concept's probability reaches this (default: the detector's reading)")
    ap.add_argument("--guard-milder-threshold", type=float, default=None,
                    help="with --guard: a draw milder than the preset counts as seen where the probability reaches this")
    ap.add_argument("--guard-keep-threshold", type=float, default=None,
                    help="with --guard: an image is also harmed where a kept colour or shape is read under this probability")
    ap.add_argument("--guard-no-keep", action="store_true",
                    help="with --guard: climb only while the concept is seen (not also while the rest of the image changed)")
    ap.add_argument("--judge", default=None, metavar="DETECTOR",
                    help="toy detector weights that judge the images (default: the bundled detector)")
    ap.add_argument("--oracle-strengths", default=None, metavar="S,S,...",
                    help="instead, per prompt the mildest of these anchor strengths that erases every seed: the room a "
                         "per-prompt strength predictor has (e.g. 0.5,0.75,1,1.25,1.5,2)")
    args = ap.parse_args()

    from eiup.bench.heldout import PlainImages, judge_setting, rewrite_reference, strength_oracle
    from eiup.bench import suites
    from eiup.guard import ToyGuard
    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector

    kwargs = json.loads(args.kwargs)
    from_file = None
    if args.prompt_file:
        if len(args.concepts) != 1:
            ap.error("--prompt-file holds one concept's prompts: give one --concepts")
        if not Path(args.prompt_file).is_file():
            ap.error(f"--prompt-file {args.prompt_file}: no such file")
        lines = (line.split("#", 1)[0].strip() for line in Path(args.prompt_file).read_text().splitlines())
        from_file = [line for line in lines if line]
        if not from_file:
            ap.error(f"--prompt-file {args.prompt_file}: no prompts in it (one per line)")
    guard = None
    if args.guard:
        guard = ConceptDetector.load(args.guard)
    if args.rewrite and kwargs:
        ap.error("--rewrite judges rewritten prompts without erasure: leave out --kwargs")
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    plain = PlainImages(pipe, ConceptDetector.load(args.judge), range(args.first_seed, args.first_seed + args.seeds))
    if args.oracle_strengths:
        grid = [float(v) for v in args.oracle_strengths.split(",") if v.strip()]
        print(f"| concept | prompts | residual | as plain or as prompted | chosen strength per prompt |  settings: {json.dumps(kwargs)}")
        print("|---|---|---|---|---|")
        for concept in args.concepts:
            positives = from_file or getattr(suites, f"{args.prompts}_prompts")(concept)
            r = strength_oracle(plain, concept, positives, grid, kwargs)
            chosen = "; ".join(f"{p}: {s:g}" for p, s in r.chosen.items())
            print(f"| {concept} | {len(r.chosen)} | {r.residual:.1%} (n={r.n_shown}) | {r.as_plain_or_prompted:.1%} | {chosen} |",
                  flush=True)
        return
    print(f"| concept | held-out prompts (+ negatives) | residual | fidelity vs plain | as plain or as prompted |"
          f" specificity | median PSNR |  settings: {'rewritten prompts' if args.rewrite else json.dumps(kwargs)}")
    print("|---|---|---|---|---|---|---|")
    for concept in args.concepts:
        positives = from_file or getattr(suites, f"{args.prompts}_prompts")(concept)
        negatives = getattr(suites, f"{args.prompts}_negatives")(concept)
        setting = kwargs
        if guard is not None:
            setting = dict(kwargs, guard=ToyGuard(guard, [concept], args.guard_threshold, keep=not args.guard_no_keep,
                                                  milder_threshold=args.guard_milder_threshold,
                                                  keep_threshold=args.guard_keep_threshold))
        r = judge_setting(plain, concept, positives, negatives, setting,
                          rewrite=rewrite_reference(concept) if args.rewrite else None)
        extra = (f" mean strength {r.mean_strength:.2f}, {r.mean_generations:.2f} generations per image, "
                 f"{r.negative_prompt:.1%} by negative prompt, {r.flagged:.1%} flagged |"
                 if r.mean_generations is not None and r.flagged is not None else "")
        print(f"| {concept} | {len(positives)} (+{len(negatives)}) | {r.residual:.1%} (n={r.n_shown}) | "
              f"{r.fidelity_vs_plain:.1%} | {r.as_plain_or_prompted:.1%} | {r.specificity:.1%} (n={r.n_negative}) | "
              f"{r.psnr_median:.1f} dB |{extra}", flush=True)


if __name__ == "__main__":
    main()
