"""The automatic anchor strength (eiup.strength): the maths, calibration, and its place in the pipeline call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eiup import EraseConfigError
from eiup.strength import (STRENGTH_DIR, StrengthPredictor, calibrate_strength, fit_strength_predictor,
                           mildest_strength, strength_predictor_path)

KW = dict(num_inference_steps=3, output_type="np")
ANCHORS = '{"red": {"anchors": ["blue", "green"], "strength": 1.0}}'


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def predictor_through(pipe, prompts: list[str], strengths: list[float], concept: str = "red") -> StrengthPredictor:
    """A linear predictor giving exactly ``strengths`` to two ``prompts`` (features a -> s0, b -> s1)."""
    a, b = pipe.prompt_features(prompts)
    d = b - a
    w = d / (d @ d) * (strengths[1] - strengths[0])
    f = a.numel()
    return StrengthPredictor(concept, w, float(strengths[0] - w @ a), torch.zeros(f), torch.ones(f), 0.1, 8.0)


def test_mildest_strength_is_the_first_that_erases_and_stays_erased_one_step_stronger():
    present = {0.5: [True, False, True, True], 1.0: [False, True, False, True], 2.0: [False, False, False, True]}
    # sample 1 is erased at 0.5 but back at 1.0: its first stable strength is 2.0; sample 3 is never erased
    assert mildest_strength(present) == [1.0, 2.0, 1.0, 2.0]


def test_fit_lifts_a_linear_strength_to_the_asked_coverage_and_prefers_a_constant_on_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (1.0 + 0.4 * x[:, 0] + 0.05 * torch.randn(200, generator=g)).clamp(0.25, 2.0)
    pred = fit_strength_predictor("red", x, y, groups=list(range(200)), coverage=0.9, low=0.25, high=2.0)
    assert pred.info["kind"] != "constant"
    s = pred.predict_from_features(x)
    assert 0.85 <= float((s >= y - 1e-6).float().mean()) <= 0.97  # ~coverage of the samples get their target
    assert float(s.mean()) < float(torch.quantile(y, 0.9))  # milder on average than the constant with that coverage
    noise = torch.randn(200, 6, generator=g)
    y_noise = torch.where(torch.rand(200, generator=g) < 0.5, 0.5, 1.5)
    const = fit_strength_predictor("red", noise, y_noise, groups=list(range(200)), coverage=0.9)
    assert const.info["kind"] == "constant" and bool((const.weight == 0).all()) and const.bias == 1.5


def test_samples_no_strength_erases_are_left_out_of_the_fit():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    y = torch.full((40,), 0.5)
    y[:10] = 2.0  # never erased: the strongest grid value
    erasable = torch.arange(40) >= 10
    pred = fit_strength_predictor("red", x, y, list(range(40)), erasable, coverage=0.9, low=0.5, high=2.0)
    assert pred.info["n_erasable"] == 30 and float(pred.predict_from_features(x).max()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="coverage"):
        fit_strength_predictor("red", x, y, list(range(40)), coverage=1.0)


def test_predictor_round_trips_and_a_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    pred = StrengthPredictor("red", torch.randn(6), 0.3, torch.randn(6), torch.rand(6) + 0.5, 0.5, 2.0, {"n": 3})
    back = StrengthPredictor.load(pred.save(tmp_path / "red.safetensors"))
    x = torch.randn(4, 6)
    assert torch.equal(back.predict_from_features(x), pred.predict_from_features(x)) and back.info == {"n": 3}
    assert bool(((pred.predict_from_features(10 * x) >= 0.5) & (pred.predict_from_features(10 * x) <= 2.0)).all())
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an eiup strength predictor"):
        StrengthPredictor.load(tmp_path / "other.safetensors")


def test_auto_projects_each_prompt_with_its_own_predicted_strength(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    prompts = ["a tree in the fog", "a house in the fog"]
    predictor_through(sd1, prompts, [0.5, 1.5]).save(strength_predictor_path(model_folder / STRENGTH_DIR, "red"))
    kw = dict(erase="red", anchor_gate=False, prompt_gate=False, concept_context="separate", **KW)
    out = sd1(prompts, anchor_strength="auto", generator=[gen(), gen()], **kw)
    np.testing.assert_allclose(out.anchor_strengths["red"], [0.5, 1.5], atol=1e-4)
    for prompt, image, s in zip(prompts, out.images, (0.5, 1.5)):
        fixed = sd1(prompt, anchor_strength=s, generator=gen(), **kw).images[0]
        assert np.allclose(image, fixed, atol=1e-5)
    other = sd1(prompts[0], anchor_strength=1.5, generator=gen(), **kw).images[0]
    assert not np.allclose(out.images[0], other, atol=1e-4)  # the strength matters on this prompt


def test_auto_strength_is_nan_where_the_gate_leaves_the_prompt_alone(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    f = sd1.prompt_features(["x"]).shape[1]
    StrengthPredictor("red", torch.zeros(f), 1.25, torch.zeros(f), torch.ones(f)).save(
        strength_predictor_path(model_folder / STRENGTH_DIR, "red"))
    prompts = ["a red tree", "a tree house"]
    gate = sd1.projection_gate(prompts, "red")
    assert gate[0] and not gate[1]  # named; nearer an anchor than the concept (the similarity gate, no probe)
    out = sd1(prompts, erase="red", anchor_strength="auto", concept_context="separate", generator=[gen(), gen()], **KW)
    s = out.anchor_strengths["red"]
    assert s[0] == pytest.approx(1.25) and np.isnan(s[1])
    fixed = sd1(prompts, erase="red", anchor_strength=1.25, concept_context="separate", generator=[gen(), gen()], **KW)
    assert np.array_equal(out.images, fixed.images)  # a constant predictor is that fixed strength
    alone = sd1(prompts[1], erase="red", anchor_strength="auto", concept_context="separate", generator=gen(), **KW)
    assert np.isnan(alone.anchor_strengths["red"]).all()  # no prompt gated in: nothing projected, still reported


@pytest.mark.parametrize("value, match", [("fast", "anchor_strength='fast'"), ("auto", "eiup calibrate --target strength")])
def test_bad_or_uncalibrated_auto_strength_is_refused_before_model_work(sd1, model_folder, value, match):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    with pytest.raises(EraseConfigError, match=match):
        sd1("a red tree", erase="red", anchor_strength=value, **KW)


def test_a_predictor_for_another_text_encoder_is_refused(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    StrengthPredictor("red", torch.zeros(6), 1.0, torch.zeros(6), torch.ones(6)).save(
        strength_predictor_path(model_folder / STRENGTH_DIR, "red"))
    with pytest.raises(EraseConfigError, match="3-dim text embeddings"):
        sd1("a red tree", erase="red", anchor_strength="auto", **KW)


def test_calibration_targets_the_mildest_strength_per_shown_sample_and_saves_what_auto_loads(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(ANCHORS)
    prompts = ["a red tree", "a red house"]  # name the concept: gated in
    calls = []

    def judge(images):  # per prompt: plain (both seeds show it), strength 0.5 (seed 0 keeps it), 2.0 (gone)
        calls.append(len(images))
        return [[True, True], [True, False], [False, False]][(len(calls) - 1) % 3]

    pred, path, data = calibrate_strength(sd1, "red", prompts, judge, seeds=[0, 1], steps=2, grid=(0.5, 2.0))
    assert calls == [2] * 6 and path == strength_predictor_path(model_folder / STRENGTH_DIR, "red")
    assert data.prompts == ["a red tree"] * 2 + ["a red house"] * 2 and data.seeds == [0, 1, 0, 1]
    assert data.targets.tolist() == [2.0, 0.5, 2.0, 0.5] and data.features.shape[0] == 4
    assert pred.info["grid"] == [0.5, 2.0] and pred.low == 0.5 and pred.high == 2.0
    out = sd1("a red tree", erase="red", anchor_strength="auto", generator=gen(), **KW)
    assert 0.5 <= float(out.anchor_strengths["red"][0]) <= 2.0
    with pytest.raises(ValueError, match="positive strengths"):
        calibrate_strength(sd1, "red", prompts, judge, seeds=[0], grid=(0.0, 1.0))


def test_strength_prompts_carry_the_concept_and_avoid_every_judged_set():
    from eiup.bench import suites
    from eiup.toy.world import CONCEPTS

    judged = {p.text for c in CONCEPTS for p in suites.toy_suite(c, [0]).prompts}
    judged |= {p for c in CONCEPTS for p in suites.heldout_prompts(c) + suites.heldout_negatives(c)
               + suites.calibration_prompts(c) + suites.calibration_negatives(c)}
    for concept in ("red", "star", "night"):
        prompts = suites.strength_prompts(concept, n=30)
        assert len(prompts) == 30 == len(set(prompts)) and not set(prompts) & judged
        assert prompts == suites.strength_prompts(concept, n=30)  # seeded
    assert all(" red " in f" {p} " or any(n in p for n in ("tomato", "ladybug", "strawberry", "valentine", "first aid kit"))
               for p in suites.strength_prompts("red", n=30))
