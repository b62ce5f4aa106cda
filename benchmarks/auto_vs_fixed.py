"""Automatic scale and strength against fixed ones, on held-out prompts and seeds (toy model).

Per concept, the held-out prompts of :func:`eiup.bench.suites.heldout_prompts` (other templates
than the benchmark's and the calibration prompts', so the scale predictors never saw them) and
:func:`~eiup.bench.suites.heldout_negatives`, seeds 5000.. (benchmark 0..19, calibration 0..2).
Each family of settings is run at fixed values of its knob (the concept term's ``erase_scale``, or the
anchored projection's ``anchor_strength``) and at its own choice ("auto": the shipped calibrated
predictors; "preset": the model's per-concept presets); the measures are those of
:mod:`eiup.bench.heldout`. Writes ``results.json``, ``report.md`` and ``tradeoff.png`` (residual
against specificity and against fidelity, mean over concepts) to ``--out``; every (setting,
concept) is cached under ``--out/units`` (with the seeds, model weights, detector and, for the settings
that read them, the model's erasure files it was made with: a unit made with others is redone) so an
interrupted run resumes and several processes can share the work (``--concepts``), e.g.:

    python benchmarks/auto_vs_fixed.py --concepts red star & python benchmarks/auto_vs_fixed.py --concepts heart night; wait
    python benchmarks/auto_vs_fixed.py      # all units cached: only writes the report
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CONCEPTS = ["red", "star", "heart", "night"]
# name -> (description, base erasure kwargs, fixed values, the family's own choices, the knob they set)
FAMILIES = {
    "concept term": ("EIUP's concept term alone (the paper's dual mode, concepts encoded after the prompt; "
                     "no anchors, every prompt erased)",
                     {"erase_mode": "dual", "concept_context": "prompt", "anchors": [], "prompt_gate": False},
                     [-2.0, -4.0, -8.0, -16.0], ("auto",), "erase_scale"),
    "concept term + presence gate": ("the same with the per-pixel presence gate (gate=\"presence\")",
                                     {"erase_mode": "dual", "concept_context": "prompt", "anchors": [],
                                      "prompt_gate": False, "gate": "presence"}, [-4.0, -8.0, -16.0], ("auto",),
                                     "erase_scale"),
    "presets": ("the library defaults without the guard: anchored projection at the model's per-concept preset "
                "strengths, prompt gate, concept term in single mode", {"guard": False},
                [0.0, -0.25, -0.5, -1.0, -4.0], ("preset",), "erase_scale"),
    "anchor strength": ("the anchored projection's strength fixed for every prompt (the concept term at the preset "
                        "scale), against anchor_strength=\"auto\" (predicted per prompt from its text embedding by the "
                        "shipped strength predictors) and the guard (the library defaults: each image walks the "
                        "strengths 0.5, 0.75, ..., 2 from the preset, up while the model's guard, a second detector, "
                        "still sees the concept or sees the rest of the image changed against the one drawn without "
                        "erasure, down from a harmed first draw; an image still flagged at the end is drawn once more "
                        "without the erasure, with the concept as negative prompt)", {},
                        [0.5, 0.75, 1.0, 1.25, 1.5, 2.0], ("auto", "guard"), "anchor_strength"),
    "presets, no gates": ("the presets with both prompt-level gates off (anchor_gate=False: every prompt leaning "
                          "towards the concept is projected; prompt_gate=False: the concept term acts on every prompt)",
                          {"anchor_gate": False, "prompt_gate": False, "guard": False}, [0.0, -1.0], ("preset",),
                          "erase_scale"),
}
GUARD = "guard"  # the label of the library defaults in the anchor strength family: strength chosen by the guard
DEFAULTS = ("anchor strength", GUARD)
# Not an erasure setting: each prompt with the concept rewritten without it (eiup.toy.world.rewrite_without)
# and drawn plainly; what a perfect prompt-level erasure would draw, a reference for fidelity (not a bound).
REFERENCE = ("rewritten prompts", "rewrite")


def labels(fixed: list[float], own: tuple[str, ...]) -> list[str]:
    return [f"{s:g}" for s in fixed] + list(own)


def unit_path(out: Path, family: str, label: str, concept: str) -> Path:
    return out / "units" / f"{family.replace(' ', '_')}@{label}@{concept}.json"


def made_with(pipe, seeds: list[int]) -> dict:
    """What a unit's figures depend on: seeds, the model's weights and erasure files, the detector."""
    import hashlib

    from eiup.bench.runner import erasure_fingerprint, weights_fingerprint
    from eiup.guard import GUARD_FILE
    from eiup.toy.detect import default_detector_path

    return {"seeds": seeds, "weights": weights_fingerprint(pipe), "erasure_files": erasure_fingerprint(pipe),
            "erasure_files_but_guard": erasure_fingerprint(pipe, skip=(GUARD_FILE,)),
            "detector": hashlib.sha1(default_detector_path().read_bytes()).hexdigest()}


def is_current(path: Path, spec: dict) -> bool:
    return path.exists() and json.loads(path.read_text()).get("made_with") == spec


def unit_kwargs(family: str, label: str) -> dict:
    """The erasure keyword arguments of one unit ({} for the reference, which erases nothing)."""
    if (family, label) == REFERENCE:
        return {}
    _, base, _, _, knob = FAMILIES[family]
    return dict(base, **({} if label in ("preset", GUARD) else {knob: label if label == "auto" else float(label)}))


def uses_guard(family: str, label: str) -> bool:
    """Whether a unit runs the model's guard: the library default, off where the strength is given or anchors are off."""
    kwargs = unit_kwargs(family, label)
    return ((family, label) != REFERENCE and kwargs.get("guard", True) is not False and "anchor_strength" not in kwargs
            and kwargs.get("anchors") != [])


def reads_erasure_files(family: str, label: str) -> bool:
    """Whether a unit reads the model folder's erasure files (anchors, probes, predictors): not the reference,
    and not EIUP's concept term at a fixed scale without anchors and prompt gate."""
    kwargs = unit_kwargs(family, label)
    return (family, label) != REFERENCE and not (kwargs.get("anchors") == [] and kwargs.get("prompt_gate") is False
                                                 and kwargs.get("erase_scale") != "auto")


def unit_spec(spec: dict, family: str, label: str) -> dict:
    """``spec`` (:func:`made_with`) with the erasure files a unit reads: all, all but the guard, or none."""
    spec = dict(spec)
    but_guard = spec.pop("erasure_files_but_guard")
    if not reads_erasure_files(family, label):
        return dict(spec, erasure_files=None)
    return spec if uses_guard(family, label) else dict(spec, erasure_files=but_guard)


def all_units() -> list[tuple[str, str]]:
    """Every (family, label) of the report: each family's fixed scales and own choice, then the reference."""
    return [(f, label) for f, (_, _, fixed, own, _) in FAMILIES.items() for label in labels(fixed, own)] + [REFERENCE]


def run_units(out: Path, concepts: list[str], seeds: list[int]) -> dict:
    """Judge every (family, scale, concept) unit without a current cached result; returns the spec."""
    from eiup.bench.heldout import PlainImages, judge_setting, rewrite_reference
    from eiup.io import write_json_atomic
    from eiup.bench.suites import heldout_negatives, heldout_prompts
    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector

    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    spec = made_with(pipe, seeds)
    todo = [(f, label, c) for c in concepts for f, label in all_units()
            if not is_current(unit_path(out, f, label, c), unit_spec(spec, f, label))]
    if not todo:
        return spec
    plain = PlainImages(pipe, ConceptDetector.load(), seeds)
    for family, label, concept in todo:
        kwargs = unit_kwargs(family, label)
        rewrite = rewrite_reference(concept) if (family, label) == REFERENCE else None
        r = judge_setting(plain, concept, heldout_prompts(concept), heldout_negatives(concept), kwargs,
                          desc=f"{concept} {family} @{label}", rewrite=rewrite)
        write_json_atomic(unit_path(out, family, label, concept), dict(r.to_dict(), family=family, label=label,
                                                                         kwargs=kwargs, seeds=seeds,
                                                                         made_with=unit_spec(spec, family, label)))
    return spec


def report(out: Path, concepts: list[str], seeds: list[int]) -> dict:
    from eiup.bench.heldout import above_curve, dominated
    from eiup.io import atomic_write_text, write_json_atomic

    rows = {}
    for family, label in all_units():
        units = [json.loads(unit_path(out, family, label, c).read_text()) for c in concepts]
        mean = {k: float(np.mean([u[k] for u in units])) for k in
                ("residual", "fidelity_vs_plain", "as_plain_or_prompted", "specificity", "psnr_median")}
        rows[(family, label)] = dict(mean, per_concept={u["concept"]: u for u in units})
    verdicts = {}
    for family, own in ((f, o) for f, (_, _, _, owns, _) in FAMILIES.items() for o in owns):
        fixed = FAMILIES[family][2]
        curve = [rows[(family, f"{s:g}")] for s in fixed]
        me = rows[(family, own)]
        verdicts[f"{family} @{own}"] = v = {
            measure: {"above_fixed_curve": above_curve((me["residual"], me[measure]),
                                                       [(c["residual"], c[measure]) for c in curve]),
                      "dominates": [f"{s:g}" for s, c in zip(fixed, curve)
                                    if dominated((c["residual"], c[measure]), (me["residual"], me[measure]))]}
            for measure in ("specificity", "as_plain_or_prompted")}
        v["per_concept"] = {  # each concept against its own fixed curve: the pooled one mixes levels
            c: {measure: above_curve((me["per_concept"][c]["residual"], me["per_concept"][c][measure]),
                                     [(p["per_concept"][c]["residual"], p["per_concept"][c][measure]) for p in curve])
                for measure in ("specificity", "as_plain_or_prompted")} for c in concepts}
    result = {"seeds": seeds, "concepts": concepts,
              "rows": [dict(family=f, label=lab, **v) for (f, lab), v in rows.items()], "verdicts": verdicts}
    write_json_atomic(out / "results.json", result)
    plot(out / "tradeoff.png", rows)
    lines = ["# Automatic scale and strength vs fixed ones (held-out prompts and seeds)", "",
             f"Seeds {seeds[0]}..{seeds[-1]} per prompt; prompts: `eiup.bench.suites.heldout_prompts` / "
             "`heldout_negatives` (in no benchmark suite and no calibration set). Mean over "
             f"{', '.join(concepts)}. Reproduce: `python benchmarks/auto_vs_fixed.py`.", ""]
    sections = [(family, f"{desc}; kwargs `{json.dumps(base)}`.") for family, (desc, base, _, _, _) in FAMILIES.items()]
    sections.append((REFERENCE[0], "Not an erasure setting: each prompt with the concept rewritten without it "
                     "(`eiup.toy.world.rewrite_without`: the concept's attribute set to another value, round robin over the "
                     "seeds, e.g. \"a drawing of a tomato\" -> \"a drawing of an orange circle\") and drawn without erasure. "
                     "It is what a perfect prompt-level erasure would draw: how well the model draws the prompt without the "
                     "concept, a reference for fidelity (not a bound: an erasure that keeps the plain image's layout can do better)."))
    for family, desc in sections:
        knob = FAMILIES[family][4] if family in FAMILIES else "setting"
        lines += [f"## {family}", "", desc, "",
                  f"| {knob} | residual | fidelity vs plain | as plain or as prompted | specificity | median PSNR (dB) | "
                  + " | ".join(f"residual {c}" for c in concepts) + " |",
                  "|---" * (6 + len(concepts)) + "|"]
        for (f, label), r in rows.items():
            if f != family:
                continue
            per = r["per_concept"]
            extra = [f"{per[c]['residual']:.0%}" + (f" (w={per[c]['mean_scale']:.1f})" if per[c]["mean_scale"] is not None else "")
                     + (f" (s={per[c]['mean_strength']:.2f})" if per[c].get("mean_strength") is not None else "")
                     + (f" ({per[c]['mean_generations']:.2f} generations)" if per[c].get("mean_generations") else "")
                     for c in concepts]
            lines.append(f"| {label} | {r['residual']:.1%} | {r['fidelity_vs_plain']:.1%} | {r['as_plain_or_prompted']:.1%} | "
                         f"{r['specificity']:.1%} | {r['psnr_median']:.1f} | " + " | ".join(extra) + " |")
        if family not in FAMILIES:
            lines.append("")
            continue
        lines.append("")
        for own in FAMILIES[family][3]:
            v = verdicts[f"{family} @{own}"]
            lines += [f"`{own}` against the fixed-{knob} curve at its residual: specificity "
                      f"{v['specificity']['above_fixed_curve']:+.1%}, fidelity (as plain or as prompted) "
                      f"{v['as_plain_or_prompted']['above_fixed_curve']:+.1%}; it dominates (lower or equal residual and "
                      f"higher or equal specificity) the fixed values {v['specificity']['dominates'] or 'none'}; on "
                      f"residual and fidelity it dominates {v['as_plain_or_prompted']['dominates'] or 'none'}. Per concept, "
                      "against that concept's own fixed curve (specificity / fidelity, points): "
                      + ", ".join(f"{c} {v['per_concept'][c]['specificity']:+.1%} / "
                                  f"{v['per_concept'][c]['as_plain_or_prompted']:+.1%}" for c in concepts) + ".", ""]
    defaults, presets = rows[DEFAULTS]["per_concept"], rows[("presets", "preset")]["per_concept"]
    ref = rows[REFERENCE]["per_concept"]
    lines += ["## fidelity per concept: the defaults against the reference", "",
              "As plain or as prompted, on the images whose plain image shows the concept.", "",
              "| | " + " | ".join(concepts) + " |", "|---" * (1 + len(concepts)) + "|",
              "| defaults (the guard) | " + " | ".join(f"{defaults[c]['as_plain_or_prompted']:.1%}" for c in concepts) + " |",
              "| presets (no guard) | " + " | ".join(f"{presets[c]['as_plain_or_prompted']:.1%}" for c in concepts) + " |",
              "| prompts rewritten without it | " + " | ".join(f"{ref[c]['as_plain_or_prompted']:.1%}" for c in concepts) + " |",
              ""]
    lines += ["![trade-off](tradeoff.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return result


def plot(path: Path, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, measure, name in ((axes[0], "specificity", "specificity (negatives unchanged)"),
                              (axes[1], "as_plain_or_prompted", "fidelity (as plain or as prompted)")):
        for i, (family, (_, _, fixed, own, knob)) in enumerate(FAMILIES.items()):
            colour = f"C{i}"
            pts = [rows[(family, f"{s:g}")] for s in fixed]
            ax.plot([100 * p["residual"] for p in pts], [100 * p[measure] for p in pts], "o-", color=colour,
                    label=f"{family}: fixed {knob}")
            for s, p in zip(fixed, pts):
                ax.annotate(f"{s:g}", (100 * p["residual"], 100 * p[measure]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8, color=colour)
            for own, marker in zip(own, "*P"):
                me = rows[(family, own)]
                ax.plot([100 * me["residual"]], [100 * me[measure]], marker, ms=15, color=colour, label=f"{family}: {own}")
        ref = rows[REFERENCE]
        ax.plot([100 * ref["residual"]], [100 * ref[measure]], "kX", ms=10, label="reference: prompts rewritten without it")
        ax.set_xlabel("residual concept (% of images, lower is better)")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out prompts: each family's own choice (star) against its fixed values")
    fig.tight_layout()
    import io

    from eiup.io import atomic_write_bytes

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    atomic_write_bytes(path, png.getvalue())
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=CONCEPTS, help="run only these concepts' units (report needs all)")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=5000)
    ap.add_argument("--out", type=Path, default=Path("bench-out/auto-vs-fixed"))
    args = ap.parse_args()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    spec = run_units(args.out, args.concepts, seeds)
    if all(is_current(unit_path(args.out, f, lab, c), unit_spec(spec, f, lab)) for c in CONCEPTS for f, lab in all_units()):
        report(args.out, CONCEPTS, seeds)
        print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
