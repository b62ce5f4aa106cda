"""Presence gating and the automatic scale: maths, predictor files, calibration logic, pipeline hooks."""

import warnings

import numpy as np
import pytest
import torch

from eiup.attention import attention_layers
from eiup.calibrate import ConstantScale, mildest_scale
from eiup.scale import ScalePredictor, find_predictors, fit_predictor, predictor_path, presence_gate, token_gate


def test_presence_gate_keeps_strong_pixels_and_drops_weak_ones():
    mass = torch.tensor([[[0.9], [0.45], [0.1], [0.0]]])  # (B=1, L=4, K=1)
    g = presence_gate(mass, threshold=0.4)[0, :, 0]
    assert g[0] == 1.0 and g[2] == 0.0 and g[3] == 0.0
    assert 0 < g[1] < 1
    # relative to the image's maximum: scaling the map does not change the gate
    assert torch.allclose(presence_gate(mass * 7, 0.4), presence_gate(mass, 0.4))


def test_token_gate_spreads_each_concept_on_its_tokens_only():
    gate = torch.tensor([[[0.2, 1.0], [0.5, 0.0]]])  # (1, L=2, K=2)
    out = token_gate(gate, [[1], [2, 3]], 6)
    assert out.shape == (1, 2, 6)
    assert torch.equal(out[0, :, 1], gate[0, :, 0])
    assert torch.equal(out[0, :, 3], gate[0, :, 1])
    assert out[0, :, [0, 4, 5]].abs().sum() == 0


def test_predictor_learns_a_monotone_mapping_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    means = torch.rand(200, 5, generator=g) * 0.3 + 0.01
    targets = -10 * means[:, 2]  # stronger concept attention needs stronger suppression
    pred = fit_predictor("red", means, targets, margin=1.0, epochs=800)
    corr = np.corrcoef(pred.predict(means).numpy(), targets.numpy())[0, 1]
    assert corr > 0.9
    assert (pred.predict(means) <= 0).all()
    path = pred.save(predictor_path(tmp_path, "red"))
    again = ScalePredictor.load(path)
    assert torch.allclose(again.predict(means), pred.predict(means))
    assert find_predictors(["red"], None, tmp_path)[0].concept == "red"
    with pytest.raises(FileNotFoundError, match="eiup calibrate"):
        find_predictors(["star"], None, tmp_path)


def test_mildest_scale_picks_the_first_stable_erasing_scale():
    present = {0.0: [True, False, True, True, True], -1.0: [True, False, False, True, False],
               -2.0: [False, False, False, True, True], -4.0: [False, False, False, True, False]}
    # the last sample is erased at -1 but back at -2: only -4 erases it stably
    assert mildest_scale(present, unerasable="strongest") == [-2.0, 0.0, -1.0, -4.0, -4.0]
    # a sample that no scale erases is spared by default: suppressing it changes the image for nothing
    assert mildest_scale(present) == [-2.0, 0.0, -1.0, 0.0, -4.0]
    with pytest.raises(ValueError, match="unerasable"):
        mildest_scale(present, unerasable="max")


@pytest.fixture(scope="module")
def tiny():
    from eiup.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def _run(pipe, **kw):
    return pipe(["a red circle", "a blue star"], num_inference_steps=3, output_type="np",
                generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)], **kw)


def test_auto_scale_applies_predicted_scales_from_the_second_step(tiny):
    plain = _run(tiny).images
    zero = _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=[ConstantScale("red", 0.0)])
    assert np.array_equal(zero.images, plain)  # predicted 0 -> exactly the plain pipeline
    assert np.allclose(zero.erase_scales["red"], 0.0)
    strong = _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=[ConstantScale("red", -3.0)])
    assert np.allclose(strong.erase_scales["red"], -3.0)
    assert not np.allclose(strong.images, plain)


def test_auto_scale_uses_the_first_step_features(tiny):
    n_layers = sum(1 for _, (_, cross) in attention_layers(tiny.unet).items() if cross)
    seen = []

    class Spy:
        concept = "red"

        def predict(self, means):
            seen.append(means.clone())
            return torch.full(means.shape[:-1], -1.0)

    _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=[Spy()])
    assert len(seen) == 1 and seen[0].shape == (2, n_layers) and (seen[0] > 0).all()


def test_gate_changes_the_erasure_but_not_a_zero_scale(tiny):
    plain = _run(tiny).images
    assert np.array_equal(_run(tiny, erase=["red"], erase_scale=0.0, gate="presence").images, plain)
    gated = _run(tiny, erase=["red"], erase_scale=-4.0, gate="presence").images
    ungated = _run(tiny, erase=["red"], erase_scale=-4.0).images
    assert not np.allclose(gated, plain) and not np.allclose(gated, ungated)
    # everything below the threshold is left alone: a threshold close to 1 erases (almost) nothing
    nearly_off = _run(tiny, erase=["red"], erase_scale=-4.0, gate="presence", gate_threshold=0.999).images
    assert np.abs(nearly_off - plain).mean() < np.abs(gated - plain).mean()


@pytest.mark.parametrize("bad, match", [
    (dict(erase_scale="strong"), "erase_scale"),
    (dict(gate="everywhere"), "gate"),
    (dict(gate="presence", gate_threshold=1.5), "gate_threshold"),
    (dict(erase_scale="auto"), "eiup calibrate"),
])
def test_bad_gate_and_auto_arguments_fail_early(tiny, bad, match):
    with pytest.raises(ValueError, match=match):
        _run(tiny, erase=["red"], **bad)


def test_calibrate_fits_and_saves_a_predictor_that_auto_mode_loads(tiny, tmp_path):
    from eiup.calibrate import calibrate

    calls = []

    def judge(images):  # stand-in detector: the concept is "present" in bright images
        calls.append(len(images))
        return [float(np.asarray(im, dtype=np.float32).mean()) > 120 for im in images]

    pred, path = calibrate(tiny, "red", ["a red circle", "a blue star"], judge, seeds=[0, 1], steps=2,
                           grid=(0.0, -2.0, -4.0), out=tmp_path / "red.safetensors", margin=1.0)
    assert path.is_file() and calls == [2] * 6  # 2 prompts x 3 scales, a batch of 2 seeds each
    assert pred.info["grid"] == [0.0, -2.0, -4.0] and pred.info["n_samples"] == 4
    out = _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=str(path))
    assert out.erase_scales["red"].shape == (2,) and (out.erase_scales["red"] <= 0).all()
    with pytest.raises(ValueError, match="grid"):
        calibrate(tiny, "red", ["a red circle"], judge, seeds=[0], grid=(-1.0, -2.0), out=tmp_path / "x.safetensors")


@pytest.mark.parametrize("unerasable, expected", [("spare", 0.0), ("strongest", -4.0)])
def test_calibration_spares_what_no_scale_erases_unless_asked(tiny, tmp_path, unerasable, expected):
    from eiup.calibrate import calibrate

    def judge(images):  # the concept never goes, at any scale
        return [True] * len(images)

    pred, _ = calibrate(tiny, "red", ["a red circle", "a red star"], judge, seeds=[0], steps=2, grid=(0.0, -2.0, -4.0),
                        out=tmp_path / "red.safetensors", margin=1.0, unerasable=unerasable)
    assert pred.info["unerasable"] == 2 and pred.info["unerasable_target"] == unerasable
    out = _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=str(tmp_path / "red.safetensors"))
    assert np.allclose(out.erase_scales["red"], expected, atol=1e-3)
    with pytest.raises(ValueError, match="unerasable"):
        calibrate(tiny, "red", ["a red circle"], judge, seeds=[0], steps=2, out=tmp_path / "x.safetensors",
                  unerasable="always")


def test_calibration_records_its_mode_and_auto_warns_on_another(tiny, tmp_path, monkeypatch):
    from eiup.calibrate import calibrate

    def judge(images):
        return [float(np.asarray(im, dtype=np.float32).mean()) > 120 for im in images]

    seen = []
    real = tiny.__class__.__call__

    def spy(self, *a, **k):
        seen.append(k.get("erase_mode"))
        return real(self, *a, **k)

    monkeypatch.setattr(type(tiny), "__call__", spy)
    pred, path = calibrate(tiny, "red", ["a red circle"], judge, seeds=[0], steps=2, grid=(0.0, -2.0),
                           out=tmp_path / "red.safetensors", mode="dual")
    monkeypatch.undo()
    assert seen == ["dual", "dual"] and pred.info["mode"] == "dual"
    with pytest.warns(UserWarning, match="calibrated with erase_mode='dual'"):
        _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=str(path), erase_mode="single")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(tiny, erase=["red"], erase_scale="auto", scale_predictors=str(path), erase_mode="dual")


def test_predictor_falls_back_to_a_constant_when_features_do_not_predict():
    g = torch.Generator().manual_seed(1)
    means = torch.rand(40, 16, generator=g) * 0.3 + 0.01
    targets = -torch.randint(0, 5, (40,), generator=g).float() * 2  # unrelated to the features
    pred = fit_predictor("heart", means, targets, margin=1.0, epochs=300)
    assert pred.info["kind"] == "constant"
    new = torch.rand(10, 16, generator=g) * 0.3 + 0.01
    out = pred.predict(new)
    assert torch.allclose(out, out[0].expand_as(out)) and out[0] < -1.0  # one firm scale, not ~0
    informative = fit_predictor("red", means, -10 * means[:, 2], margin=1.0, epochs=300)
    assert informative.info["kind"] == "mlp"


def test_predictor_cross_validation_holds_out_whole_prompts():
    g = torch.Generator().manual_seed(2)
    # each "prompt" has its own feature signature and its own target: memorisable, not predictable
    sig = torch.rand(8, 16, generator=g) * 0.3 + 0.01
    means = sig.repeat_interleave(5, 0) + torch.rand(40, 16, generator=g) * 1e-3
    targets = (-torch.randint(0, 5, (8,), generator=g).float() * 2).repeat_interleave(5)
    prompts = [f"p{i}" for i in range(8) for _ in range(5)]
    by_prompt = fit_predictor("heart", means, targets, margin=1.0, epochs=300, groups=prompts)
    assert by_prompt.info["kind"] == "constant"
