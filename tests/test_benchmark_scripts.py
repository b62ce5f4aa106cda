"""The benchmark scripts' reports, on synthetic unit results (no model run)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def auto_vs_fixed():
    spec = importlib.util.spec_from_file_location("auto_vs_fixed", ROOT / "benchmarks" / "auto_vs_fixed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_auto_vs_fixed_report_names_each_familys_own_scale_and_compares_the_defaults_with_the_reference(
        auto_vs_fixed, tmp_path):
    concepts = ["red", "night"]
    for k, (family, label) in enumerate(auto_vs_fixed.all_units()):
        for j, concept in enumerate(concepts):
            strength = abs(float(label)) if label not in ("auto", "preset", "rewrite") else 3.0
            unit = {"concept": concept, "residual": 1 / (1 + strength), "fidelity_vs_plain": 0.8,
                    "as_plain_or_prompted": 0.5 + 0.01 * k + 0.1 * j, "specificity": 0.9 - 0.01 * k,
                    "psnr_median": 30.0, "n_shown": 10, "n_negative": 6,
                    "mean_scale": -5.0 if label == "auto" else None}
            path = auto_vs_fixed.unit_path(tmp_path, family, label, concept)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(unit))
    result = auto_vs_fixed.report(tmp_path, concepts, [5000, 5001])
    text = (tmp_path / "report.md").read_text()
    for family, (_, _, _, own) in auto_vs_fixed.FAMILIES.items():
        section = text.split(f"## {family}\n")[1].split("\n## ")[0]
        assert f"`{own}` against the fixed-scale curve" in section, family
    reference = text.split(f"## {auto_vs_fixed.REFERENCE[0]}\n")[1].split("\n## ")[0]
    assert "| rewrite |" in reference and "against the fixed-scale curve" not in reference
    rows = {(r["family"], r["label"]): r for r in result["rows"]}
    ref, defaults = rows[auto_vs_fixed.REFERENCE], rows[("defaults", "preset")]
    table = text.split("## fidelity per concept")[1]
    assert (f"| defaults (presets) | {defaults['per_concept']['red']['as_plain_or_prompted']:.1%} | "
            f"{defaults['per_concept']['night']['as_plain_or_prompted']:.1%} |") in table
    assert f"| prompts rewritten without it | {ref['per_concept']['red']['as_plain_or_prompted']:.1%} |" in table
    assert set(result["verdicts"]) == set(auto_vs_fixed.FAMILIES)  # the reference is no family with a curve
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
