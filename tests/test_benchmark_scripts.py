"""The benchmark scripts' reports, on synthetic unit results (no model run)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str, monkeypatch=None):
    """benchmarks/NAME.py as a module (the scripts are no package); registered in sys.modules with `monkeypatch`."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def auto_vs_fixed():
    return load_script("auto_vs_fixed")


def test_auto_vs_fixed_units_key_on_the_erasure_files_only_where_they_are_read(auto_vs_fixed):
    spec = {"seeds": [1], "weights": "w", "erasure_files": "e", "erasure_files_but_guard": "b", "detector": "d"}
    assert auto_vs_fixed.unit_kwargs("anchor strength", "1.25") == {"anchor_strength": 1.25}
    assert auto_vs_fixed.unit_kwargs("anchor strength", "guard") == {}  # the library defaults
    assert auto_vs_fixed.unit_kwargs("concept term", "auto")["erase_scale"] == "auto"
    for family, label, reads in (("concept term", "-4", None), ("concept term", "auto", "b"),
                                 ("presets", "-4", "b"), ("anchor strength", "auto", "b"),
                                 ("anchor strength", "1.5", "b"), ("anchor strength", "guard", "e"),
                                 (*auto_vs_fixed.REFERENCE, None)):
        made = auto_vs_fixed.unit_spec(spec, family, label)
        assert made["erasure_files"] == reads and "erasure_files_but_guard" not in made, (family, label)


def test_auto_vs_fixed_report_names_each_familys_own_scale_and_compares_the_defaults_with_the_reference(
        auto_vs_fixed, tmp_path):
    concepts = ["red", "night"]
    for k, (family, label) in enumerate(auto_vs_fixed.all_units()):
        for j, concept in enumerate(concepts):
            strength = abs(float(label)) if label not in ("auto", "preset", "rewrite", "guard") else 3.0
            unit = {"concept": concept, "residual": 1 / (1 + strength), "fidelity_vs_plain": 0.8,
                    "as_plain_or_prompted": 0.5 + 0.01 * k + 0.1 * j, "specificity": 0.9 - 0.01 * k,
                    "psnr_median": 30.0, "n_shown": 10, "n_negative": 6,
                    "mean_scale": -5.0 if label == "auto" else None}
            path = auto_vs_fixed.unit_path(tmp_path, family, label, concept)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(unit))
    result = auto_vs_fixed.report(tmp_path, concepts, [5000, 5001])
    text = (tmp_path / "report.md").read_text()
    for family, (_, _, _, owns, knob) in auto_vs_fixed.FAMILIES.items():
        section = text.split(f"## {family}\n")[1].split("\n## ")[0]
        for own in owns:
            assert f"`{own}` against the fixed-{knob} curve" in section and f"| {knob} |" in section, family
        assert section.count("Per concept, against that concept's own fixed curve") == len(owns)
    reference = text.split(f"## {auto_vs_fixed.REFERENCE[0]}\n")[1].split("\n## ")[0]
    assert "| rewrite |" in reference and "against the fixed-" not in reference
    rows = {(r["family"], r["label"]): r for r in result["rows"]}
    ref, defaults = rows[auto_vs_fixed.REFERENCE], rows[("anchor strength", "guard")]
    presets = rows[("presets", "preset")]
    table = text.split("## fidelity per concept")[1]
    assert (f"| defaults (the guard) | {defaults['per_concept']['red']['as_plain_or_prompted']:.1%} | "
            f"{defaults['per_concept']['night']['as_plain_or_prompted']:.1%} |") in table
    assert f"| presets (no guard) | {presets['per_concept']['red']['as_plain_or_prompted']:.1%} |" in table
    assert f"| prompts rewritten without it | {ref['per_concept']['red']['as_plain_or_prompted']:.1%} |" in table
    assert set(result["verdicts"]) == {f"{f} @{o}" for f, v in auto_vs_fixed.FAMILIES.items() for o in v[3]}
    per = result["verdicts"]["anchor strength @auto"]["per_concept"]
    from eiup.bench.heldout import above_curve

    fixed = auto_vs_fixed.FAMILIES["anchor strength"][2]
    own = lambda label: rows[("anchor strength", label)]["per_concept"]["night"]  # noqa: E731
    expected = above_curve((own("auto")["residual"], own("auto")["as_plain_or_prompted"]),
                           [(own(f"{v:g}")["residual"], own(f"{v:g}")["as_plain_or_prompted"]) for v in fixed])
    assert set(per) == set(concepts) and per["night"]["as_plain_or_prompted"] == expected
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


@pytest.fixture()
def judge_audit(monkeypatch):
    return load_script("judge_audit", monkeypatch)


def test_judge_audit_make_refuses_a_guidance_scale_that_is_not_a_finite_non_negative_number(judge_audit):
    import argparse

    assert judge_audit.guidance_scale("3") == 3.0 and judge_audit.guidance_scale("0") == 0.0
    for bad in ("nan", "inf", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="guidance"):
            judge_audit.guidance_scale(bad)


def test_judge_audit_make_takes_a_pipeline_folder_only(judge_audit, tmp_path):
    import argparse

    from eiup.models import default_model_path

    assert judge_audit.model_folder(str(default_model_path())) == default_model_path()
    with pytest.raises(argparse.ArgumentTypeError, match="no model_index.json"):
        judge_audit.model_folder(str(tmp_path))


def test_judge_audit_counts_pattern_agreement_and_rescores_groups_with_the_eyes_pattern(judge_audit):
    from eiup.toy.detect import DetectedObject, Detection

    def seen(*objects):
        return Detection([DetectedObject(c, s, p, 0.1, (0.25 + 0.5 * k, 0.5)) for k, (c, s, p) in enumerate(objects)],
                         "white", 1.0)

    prompts = ["a red circle and a blue square", "a red circle and a blue square", "a striped blue circle",
               "a striped blue circle", "a dotted green square"]
    detections = [seen(("red", "circle", "dotted"), ("blue", "square", "plain")),  # the judge over-reads a dot
                  seen(("red", "circle", "plain"), ("blue", "square", "plain")),
                  seen(("blue", "circle", "striped")),
                  seen(("blue", "circle", "striped"), ("red", "star", "plain")),  # another count: left out
                  seen(("green", "square", "dotted"))]
    eye = [["plain", "plain"], ["plain", "plain"], ["striped"], ["striped"], ["?"]]
    group_of = {prompts[0]: "two objects", prompts[2]: "patterned", prompts[4]: "patterned"}
    result = judge_audit.audit(detections, prompts, eye, group_of)
    assert result.confusion == {("plain", "dotted"): 1, ("plain", "plain"): 3, ("striped", "striped"): 1}
    assert result.agreement() == (4, 5) and result.miscounted == 1 and result.unsure == 1
    assert result.read_ok == {"two objects": 1, "patterned": 2} and result.eye_ok == {"two objects": 2, "patterned": 2}
    assert result.shown == {"two objects": 2, "patterned": 3}


@pytest.fixture(scope="module")
def mark_contrast():
    return load_script("mark_contrast")


def test_mark_contrast_finds_the_rendered_marks_and_reads_none_on_the_plain_render(mark_contrast):
    from eiup.toy.render import render
    from eiup.toy.world import Obj, Scene

    for pattern in ("dotted", "striped"):
        drawn = render(Scene((Obj("yellow", "square", pattern),), "white", 7))
        plain = render(Scene((Obj("yellow", "square", "plain"),), "white", 7))
        marks, bare = mark_contrast.pattern_marks(drawn.image, plain.image, drawn.masks[0])
        inside = drawn.masks[0] > 0.99
        assert marks.sum() > 20 and bare.sum() > 20 and not (marks & bare).any() and not (marks & ~inside).any()
        assert 0.4 < mark_contrast.mark_contrast(drawn.image, marks, bare) < 0.61  # marks are 40% of the colour
        assert abs(mark_contrast.mark_contrast(plain.image, marks, bare)) < 0.02  # the same places, no marks


def test_mark_contrast_summary_bins_dotted_objects_by_area_and_reports_each_stages_share(mark_contrast):
    stages = {"render": 0.5, "x0 t=20": 0.2}
    rows = [{"pattern": "dotted", "area": a, "round trip": t, "SDEdit 0.3": s, **stages}
            for a, t, s in ((0.03, 0.0, 0.0), (0.2, 0.3, 0.1), (0.3, 0.1, 0.1))]
    rows.append({"pattern": "striped", "area": 0.1, "round trip": 0.4, "SDEdit 0.3": 0.5, **stages})
    summary = mark_contrast.summarise(rows)
    assert list(summary) == ["dotted 0%-6%", "dotted 12%-100%", "dotted all", "striped all"]  # no empty bin
    big = summary["dotted 12%-100%"]
    assert big["n"] == 2 and big["round trip"]["contrast"] == pytest.approx(0.2)
    assert big["round trip"]["kept"] == pytest.approx(0.4) and big["render"]["kept"] == 1
    assert summary["dotted all"]["SDEdit 0.3"]["kept"] == pytest.approx(0.2 / 3 / 0.5)
    assert "x0 t=100" not in big  # stages the rows lack are left out, not counted as zero
    text = mark_contrast.markdown(summary, {})
    assert "| stage | dotted 0%-6% (1) | dotted 12%-100% (2) | dotted all (3) | striped all (1) |" in text
    assert "| round trip | 0.00 (0%) | 0.20 (40%) | 0.13 (27%) | 0.40 (80%) |" in text
    assert "| x0 t=100 |  |  |  |  |" in text
