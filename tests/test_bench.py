"""Benchmark: suites, method names, judgements, resumable runs and the report files."""

import json

import numpy as np
import pytest

from eiup.bench.baselines import Method, MethodRunner, default_methods, parse_method
from eiup.bench.metrics import aggregate, judge_toy
from eiup.bench.suites import ROLES, calibration_negatives, calibration_prompts, toy_suite
from eiup.toy.detect import DetectedObject, Detection
from eiup.toy.world import CONCEPTS


def det(*objects, background="white"):
    return Detection([DetectedObject(c, s, p, 0.2, (0.5, 0.5)) for c, s, p in objects], background, 1.0)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_suites_have_every_role_and_calibration_prompts_are_held_out(concept):
    suite = toy_suite(concept, list(range(20)))
    roles = {p.role for p in suite.prompts}
    assert {"implicit", "explicit", "specificity"} <= roles <= set(ROLES)
    held_out = set(calibration_prompts(concept)) | set(calibration_negatives(concept))
    assert not held_out & {p.text for p in suite.prompts}


def test_method_names_round_trip():
    for m in default_methods([-1.0, -2.5]) + [Method("eiup", scale="auto", mode="single", options=(("gate", "presence"),))]:
        assert parse_method(m.name) == m, m.name
    with pytest.raises(ValueError, match="method"):
        parse_method("eiup-triple")


def test_judgements_follow_the_definitions():
    plain = det(("red", "circle", "plain"))
    # erased and the rest kept: no residual, fidelity
    j = judge_toy("a tomato", "implicit", 0, "red", det(("orange", "circle", "plain")), plain, 30.0, 0.9)
    assert j.residual is False and j.fidelity is True and j.specific is None
    # still red: residual
    assert judge_toy("a tomato", "implicit", 0, "red", plain, plain, 99, 1).residual is True
    # erased but the shape broke: no fidelity
    assert judge_toy("a tomato", "implicit", 0, "red", det(("blue", "square", "plain")), plain, 9, 0).fidelity is False
    # two objects: the other one must keep its attributes
    two = det(("green", "circle", "plain"), ("orange", "circle", "plain"))
    j = judge_toy("a tomato and a lime", "two-object", 0, "red", two, two, 30, 1)
    assert j.residual is False and j.fidelity is True and j.specific is True
    j = judge_toy("a tomato and a lime", "two-object", 0, "red", det(("blue", "circle", "plain"), ("orange", "circle", "plain")), two, 30, 1)
    assert j.specific is False
    # specificity is judged against the plain image of the same seed, not the prompt
    lime = det(("green", "circle", "plain"))
    assert judge_toy("a lime", "specificity", 0, "red", lime, lime, 40, 1).specific is True
    assert judge_toy("a lime", "specificity", 0, "red", det(("blue", "circle", "plain")), lime, 40, 1).specific is False
    # night: background is the concept
    j = judge_toy("a lemon at night", "implicit", 0, "night", det(("yellow", "circle", "plain"), background="gray"), plain, 1, 1)
    assert j.residual is False and j.fidelity is True
    m = aggregate([judge_toy("a tomato", "implicit", 0, "red", plain, plain, 99, 1),
                   judge_toy("a tomato", "implicit", 1, "red", det(("orange", "circle", "plain")), plain, 20, 1)])
    assert m["residual_implicit"] == 0.5 and m["fidelity"] == 1.0  # fidelity ignores the erased attribute


class ColourDetector:
    """A stand-in detector: one object, red when the image's red channel dominates."""

    def detect(self, images):
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float32)
            out.append(det(("red" if a[..., 0].mean() > a[..., 2].mean() else "blue", "circle", "plain")))
        return out


def test_run_resumes_and_writes_the_report(tmp_path, monkeypatch):
    from eiup.bench import run_benchmark
    from eiup.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    suite = toy_suite("red", [0, 1])
    suite.prompts = [p for p in suite.prompts if p.role in ("implicit", "specificity")][:2] + suite.by_role("specificity")[:1]
    methods = [Method("plain"), Method("negative"), Method("eiup", scale=-2.0), Method("sld", preset="MAX")]
    calls = []
    original = MethodRunner.generate
    monkeypatch.setattr(MethodRunner, "generate", lambda self, m, *a: calls.append(m.name) or original(self, m, *a))
    index = run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    n_units = len(methods) * len(suite.prompts)
    assert len(calls) == n_units
    for name in ("index.html", "report.md", "metrics.json", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert list((tmp_path / "grids").glob("*.png"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["summary"]) == {m.name for m in methods}
    plain = metrics["per_suite"]["toy-red"]["plain"]
    assert plain["specificity"] == 1.0 and plain["specificity_psnr"] == 100.0  # plain vs itself
    # a rerun after an interruption redoes only what has no record
    record = next((tmp_path / "records").rglob("*.json"))
    record.unlink()
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == n_units + 1
    assert index.exists()
