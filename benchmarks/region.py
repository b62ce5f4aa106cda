"""Where the anchored projection acts (``anchor_region``): the rules side by side on the toy model.

For each concept, its benchmark prompts (two-object, implicit, explicit; at most ``--per-role`` of each) and
its implicit and two-object prompts padded with style phrases (", highly detailed, sharp focus, 4k"), one call per image as
the benchmark makes them, judged by the toy detector against the plain image of the same seed: residual
(the concept still shows), kept (the concept's object keeps its other attributes), other (two-object
prompts: the other object keeps its attributes). Rules: ``default`` (the model's preset), ``off`` (the
projection everywhere), ``map`` and ``phrases`` (:data:`eiup.config.REGION_RULES`).

    python benchmarks/region.py --rules off map phrases --json region.json   # the README's figures (20 seeds)
    python benchmarks/region.py --concepts red --rules off phrases --seeds 4 --json region.json
"""

from __future__ import annotations

import argparse
import json

STYLE = ", highly detailed, sharp focus, 4k"


def prompts_for(concept: str, per_role: int) -> list[tuple[str, str]]:
    """(text, role) of the concept's benchmark prompts and its style-padded implicit prompts."""
    from eiup.bench.suites import toy_suite

    suite = toy_suite(concept, [0], size=per_role)
    chosen = [(p.text, p.role) for role in ("two-object", "implicit", "explicit") for p in suite.prompts if p.role == role]
    return chosen + [(text + STYLE, role) for kind in ("implicit", "two-object")
                     for text, role in [c for c in chosen if c[1] == kind][:per_role]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=["red", "heart", "star"])
    ap.add_argument("--rules", nargs="+", default=["off", "map", "phrases", "default"],
                    choices=["off", "map", "phrases", "default"])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--per-role", type=int, default=4, help="at most this many prompts of each role")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import numpy as np
    import torch
    from tqdm import tqdm

    from eiup.bench.metrics import judge_toy
    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector

    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    detector = ConceptDetector.load()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    kwargs = {"off": {"anchor_region": False}, "map": {"anchor_region": "map"},
              "phrases": {"anchor_region": "phrases"}, "default": {}}
    rows = []
    work = [(c, t, r) for c in args.concepts for t, r in prompts_for(c, args.per_role)]
    for concept, text, role in tqdm(work, desc="prompts"):
        def draw(**kw):
            return [pipe(text, num_inference_steps=25, generator=torch.Generator().manual_seed(s), **kw).images[0]
                    for s in seeds]

        plain = detector.detect(draw())
        row = {"concept": concept, "prompt": text, "role": role}
        for rule in args.rules:
            judged = [judge_toy(text.removesuffix(STYLE), role, s, concept, d, p, 0, 0)  # style words draw nothing
                      for s, d, p in zip(seeds, detector.detect(draw(erase=concept, **kwargs[rule])), plain)]
            rate = lambda values: float(np.mean(values)) if values else None  # noqa: E731
            row[rule] = {"residual": rate([j.residual for j in judged if j.residual is not None]),
                         "kept": rate([j.kept for j in judged if j.kept is not None]),
                         "other": rate([j.specific for j in judged if j.specific is not None])}
        rows.append(row)
        cells = " | ".join(f"{rule}: " + " ".join(f"{k} {v:.0%}" for k, v in row[rule].items() if v is not None)
                           for rule in args.rules)
        tqdm.write(f"{concept:6s} {role:10s} {text[:48]:48s} | {cells}")
    print("\nper concept: implicit residual / two-object other object kept")
    for concept in args.concepts:
        mine = [r for r in rows if r["concept"] == concept]
        line = f"{concept:6s}"
        for rule in args.rules:
            residual = np.mean([r[rule]["residual"] for r in mine if r["role"] == "implicit"])
            other = [r[rule]["other"] for r in mine if r["role"] == "two-object"]
            line += f" | {rule}: {residual:.1%} / {np.mean(other):.1%}" if other else f" | {rule}: {residual:.1%} / -"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": seeds, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
