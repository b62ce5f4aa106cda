"""Prompt probes (eiup.probe): the fit, the file, and the gate they give the anchored projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eiup import EraseConfigError
from eiup.probe import (PROBE_DIR, PromptProbe, cross_validated_accuracy, find_probe, fit_gate, fit_probe, probe_path,
                        prompt_features, select_probe)
from eiup.testing import ModelCalls

KW = dict(num_inference_steps=3, output_type="np")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(dim)
    direction[3] = 1.0
    x = torch.randn(n, dim, generator=g) * 2 + 5  # offset and scale: standardisation is folded back correctly
    y = (x @ direction > 5).double()
    return x, y


def test_fit_probe_learns_a_linear_concept_and_generalises():
    x, y = linear_data(400, 8, seed=0)
    probe = fit_probe("red", x, y)
    x_test, y_test = linear_data(400, 8, seed=1)
    logits = x_test @ probe.weight + probe.bias
    assert float(((logits > 0).double() == y_test).double().mean()) > 0.95
    assert probe.info["n_prompts"] == 400 and probe.info["train_accuracy"] > 0.95


def test_fit_probe_takes_soft_labels_and_refuses_bad_ones():
    x, y = linear_data(200, 4, seed=0)
    soft = fit_probe("red", x, y * 0.5 + 0.25)  # shares of seeds, not only 0/1
    assert float((((x @ soft.weight + soft.bias) > 0).double() == y).double().mean()) > 0.9
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fit_probe("red", x, y * 2)
    with pytest.raises(ValueError, match="features"):
        fit_probe("red", x, y[:10])


def test_balanced_fit_misses_fewer_rare_positives():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 2, generator=g)
    y = ((x[:, 0] + 0.7 * torch.randn(2000, generator=g)) > 1.8).double()  # about 6% positives, overlapping
    recall = {}
    for balanced in (False, True):
        probe = fit_probe("red", x, y, balanced=balanced)
        recall[balanced] = float(((x @ probe.weight + probe.bias) > 0)[y == 1].double().mean())
    assert recall[True] > 0.8 > recall[False]


def test_probe_logits_read_the_mean_token_after_bos_and_the_last_token():
    embeds = torch.randn(3, 7, 5)
    probe = PromptProbe("red", torch.randn(10), 0.3)
    features = torch.cat([embeds[:, 1:].mean(1), embeds[:, 6]], dim=1)
    assert torch.allclose(prompt_features(embeds), features)
    assert torch.allclose(probe.logits(embeds), features @ probe.weight + 0.3, atol=1e-6)
    with pytest.raises(ValueError, match="eiup fit-gate"):
        probe.logits(torch.randn(1, 7, 4))


def test_probe_file_round_trip(tmp_path):
    probe = PromptProbe("Red", torch.randn(6), -1.25, {"seeds": 2})
    path = probe.save(probe_path(tmp_path, "Red"))
    assert path.name == "red.safetensors" and [p.name for p in tmp_path.iterdir()] == ["red.safetensors"]
    back = PromptProbe.load(path)
    assert back.concept == "Red" and back.bias == -1.25 and torch.equal(back.weight, probe.weight)
    assert back.info == {"seeds": 2}
    assert find_probe("red", tmp_path.parent) is None  # no eiup_prompt_probes/ there
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="eiup fit-gate"):
        PromptProbe.load(tmp_path / "garbage.safetensors")



def band_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A concept no hyperplane separates: present where one feature is near zero (|x_3| < 0.7)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g) * 3 + 2
    return x, ((x[:, 3] - 2).abs() < 2.1).double()


def test_mlp_probe_learns_what_a_linear_one_cannot_and_cross_validation_picks_it():
    x, y = band_data(600, seed=0)
    x_test, y_test = band_data(600, seed=1)
    mlp, linear = fit_probe("red", x, y, hidden=16), fit_probe("red", x, y)
    accuracy = {name: float(((p.logits_from_features(x_test) > 0).double() == y_test).double().mean())
                for name, p in (("mlp", mlp), ("linear", linear))}
    assert accuracy["mlp"] > 0.9 and accuracy["linear"] < 0.7
    assert mlp.hidden[0].shape == (5 * 16, 6) and mlp.weight.shape == (5 * 16,)  # 5 members, one wider layer
    assert torch.equal(fit_probe("red", x, y, hidden=16).weight, mlp.weight)  # seeded
    chosen = select_probe("red", x, y)
    assert chosen.hidden is not None and chosen.info["cv_accuracy_mlp16"] > chosen.info["cv_accuracy_logistic"] + 0.2
    x, y = linear_data(400, 8, seed=0)
    assert select_probe("red", x, y).hidden is None  # no better: the regression is kept
    assert cross_validated_accuracy(x, y) > 0.95
    assert select_probe("red", x[:20], y[:20]).info.get("cv_folds") is None  # too few prompts to cross-validate
    with pytest.raises(ValueError, match="hidden"):
        fit_probe("red", x, y, hidden=-1)


def test_mlp_probe_file_round_trip_and_refusal_of_bad_shapes(tmp_path):
    x, y = band_data(200, seed=0)
    probe = fit_probe("red", x, y, hidden=4, members=2)
    back = PromptProbe.load(probe.save(tmp_path / "red.safetensors"))
    assert torch.equal(back.logits_from_features(x), probe.logits_from_features(x)) and back.in_features == 6
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3), "bias": torch.zeros(1), "hidden.weight": torch.zeros(8, 6),
               "hidden.bias": torch.zeros(8)}, str(tmp_path / "bad.safetensors"), metadata={"concept": "red"})
    with pytest.raises(ValueError, match="refit it with `eiup fit-gate`"):
        PromptProbe.load(tmp_path / "bad.safetensors")


def write_probe(folder, concept: str, bias: float, dim: int) -> None:
    PromptProbe(concept, torch.zeros(2 * dim), bias).save(probe_path(folder / PROBE_DIR, concept))


def test_model_probe_decides_which_prompts_are_projected(sd1, model_folder):
    """A probe that says yes projects a prompt the nearest-anchor rule leaves alone; one that says no
    leaves it bit-identical, and a prompt naming the concept is projected either way."""
    dim = sd1.text_encoder.config.hidden_size
    prompts, anchors = ["a red star", "a tree in the fog"], ["blue", "green", "yellow"]  # the tree leans towards red
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchor_strength=2.0, prompt_gate=False, **KW)

    def run(**extra):
        return sd1(prompts, generator=[gen(0), gen(1)], **{"anchors": anchors, **kw, **extra}).images

    ungated, without = run(anchor_gate=False), run(anchors=[])
    nearest = run()
    assert np.array_equal(nearest[1], without[1])  # the nearest-anchor rule leaves the tree alone
    write_probe(model_folder, "red", 50.0, dim)
    yes = run()
    assert np.array_equal(yes, ungated) and not np.array_equal(yes[1], without[1])
    write_probe(model_folder, "red", -50.0, dim)
    no = run()
    assert np.array_equal(no[0], ungated[0]) and np.array_equal(no[1], without[1])
    assert np.array_equal(run(anchor_gate=False), ungated)  # the probe is the gate's, nothing else's
    hidden = (torch.randn(8, 2 * dim), torch.zeros(8))
    PromptProbe("red", torch.zeros(8), 50.0, hidden=hidden).save(probe_path(model_folder / PROBE_DIR, "red"))
    assert np.array_equal(run(), ungated)  # an MLP probe gates the same way
    PromptProbe("red", torch.zeros(8), -50.0, hidden=hidden).save(probe_path(model_folder / PROBE_DIR, "red"))
    mlp_no = run()
    assert np.array_equal(mlp_no[0], ungated[0]) and np.array_equal(mlp_no[1], without[1])


def test_a_probe_for_another_model_or_a_broken_file_is_refused_before_model_work(sd1, model_folder):
    dim = sd1.text_encoder.config.hidden_size
    write_probe(model_folder, "red", 1.0, dim + 1)
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match="refit it with `eiup fit-gate`"):
        sd1("a red star", erase="red", anchors=["blue"], generator=gen(), **KW)
    probe_path(model_folder / PROBE_DIR, "red").write_bytes(b"{}")
    with pytest.raises(EraseConfigError, match="eiup fit-gate"):
        sd1("a red star", erase="red", anchors=["blue"], generator=gen(), **KW)
    assert model.calls == []
    sd1("a red star", erase="red", anchors=["blue"], anchor_gate=False, prompt_gate=False, generator=gen(), **KW)  # no gate: not read


def test_fit_gate_labels_each_prompt_by_the_judge_and_saves_one_probe_per_concept(sd1, tmp_path):
    prompts = ["a red star", "a blue circle", "a red square", "a green heart", "a red cross", "a yellow star"]
    calls = []

    def judge(images):  # the concept is "present" in the images of even prompts (one seed: one image each)
        calls.append(len(images))
        return [i % 2 == 0 for i in range(len(images))]

    star = lambda images: [i in (0, 5) for i in range(len(images))]  # noqa: E731
    fitted = fit_gate(sd1, {"red": judge, "star": star}, prompts, seeds=[0], steps=2, out=tmp_path)
    assert calls == [6]
    (red, red_path), (star, _) = fitted
    assert red_path == tmp_path / "red.safetensors" and red.info["positive_share"] == 0.5
    assert star.info["positive_share"] == pytest.approx(2 / 6)
    assert torch.equal(PromptProbe.load(red_path).weight, red.weight)
    with pytest.raises(ValueError, match="saw it in every prompt"):
        fit_gate(sd1, {"red": lambda images: [True] * len(images)}, prompts, seeds=[0], steps=2, out=tmp_path)
    with pytest.raises(ValueError, match="needs prompts with and without"):
        fit_gate(sd1, {"red": judge}, prompts[:3], seeds=[0], steps=2, out=tmp_path)
    with pytest.raises(ValueError, match="probe: 'svm'"):
        fit_gate(sd1, {"red": judge}, prompts, seeds=[0], steps=2, out=tmp_path, probe="svm")


def test_default_toy_gate_prompts_are_in_no_benchmark_or_calibration_set():
    from eiup.bench.suites import calibration_negatives, calibration_prompts, gate_prompts, toy_suite
    from eiup.toy.world import CONCEPTS, parse_caption

    prompts = gate_prompts(300)
    assert len(prompts) == len(set(prompts)) == 300 and prompts == gate_prompts(300)
    held = {p.text for c in CONCEPTS for p in toy_suite(c, [0]).prompts}
    held |= {p for c in CONCEPTS for p in calibration_prompts(c) + calibration_negatives(c)}
    assert not held & set(prompts)
    long = [p for p in prompts if "," in p]
    assert 0.1 < len(long) / len(prompts) < 0.3 and any(p.count(",") >= 8 for p in long)
    scenes = [parse_caption(p.split(",")[0]) for p in prompts]
    assert any(len(s.objects) == 2 for s in scenes) and any(s.background == "black" for s in scenes)


@pytest.mark.parametrize("args,hint", [
    (["--concept", " "], "--concept"),
    (["--concept", "red", "--prompts", "/no/such/file.txt"], "--prompts"),
    (["--concept", "nudity", "--detector", "nudenet"], "--prompts"),
    (["--concept", "red", "--detector", "no_such_module:judge", "--prompts", "PROMPTS"], "--detector"),
    (["--concept", "red", "--probe", "svm"], "--probe"),
])
def test_fit_gate_cli_refuses_bad_arguments_before_loading_a_model(args, hint, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from eiup import models
    from eiup.cli import app

    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "prompts.txt").write_text("a tomato\na lime\n")
    args = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else a for a in args]
    result = CliRunner().invoke(app, ["fit-gate", *args], env={"TERMINAL_WIDTH": "400"})
    assert result.exit_code == 2 and hint in result.output


def test_prompt_gate_drops_the_concept_term_for_prompts_the_probe_and_the_text_leave_out(sd1, model_folder):
    dim = sd1.text_encoder.config.hidden_size
    prompts = ["a red star", "a tree in the fog"]
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchors=[], **KW)

    def run(p=prompts, **extra):
        return sd1(p, generator=[gen(0), gen(1)][:len(p) if isinstance(p, list) else 1], **kw, **extra).images

    erased = run()  # no probe in the folder: every prompt is erased
    plain = sd1(prompts, generator=[gen(0), gen(1)], **KW).images
    assert not np.allclose(erased[1], plain[1], atol=1e-4)
    write_probe(model_folder, "red", -50.0, dim)  # implies red nowhere: only prompts naming it are erased
    gated = run()
    assert np.allclose(gated[0], erased[0], atol=1e-6) and np.allclose(gated[1], plain[1], atol=1e-6)
    assert np.array_equal(run("a tree in the fog"), sd1("a tree in the fog", generator=gen(0), **KW).images)  # bit for bit
    assert np.array_equal(run(prompt_gate=False), erased)
    write_probe(model_folder, "red", 50.0, dim)  # implies red everywhere
    assert np.allclose(run(), erased, atol=1e-6)
    pe = sd1.encode_prompt(prompts, "cpu", 1, False)[0]  # prompt_embeds: the probe alone decides
    write_probe(model_folder, "red", -50.0, dim)
    out = sd1(prompt_embeds=pe, generator=[gen(0), gen(1)], **kw).images
    assert np.allclose(out, plain, atol=1e-6)


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_prompt_gate_with_auto_scale_and_dual_mode_keeps_gated_out_images_plain(sd1, model_folder, mode):
    from eiup.calibrate import ConstantScale

    write_probe(model_folder, "red", -50.0, sd1.text_encoder.config.hidden_size)
    prompts = ["a red star", "a tree in the fog"]
    kw = dict(erase="red", concept_context="separate", anchors=[], erase_mode=mode, **KW)
    auto = dict(erase_scale="auto", scale_predictors=[ConstantScale("red", -2.0)], generator=[gen(0), gen(1)], **kw)
    ungated = sd1(prompts, **dict(auto, generator=[gen(0), gen(1)]), prompt_gate=False).images
    auto = sd1(prompts, return_original=True, **auto)
    plain = sd1(prompts, generator=[gen(0), gen(1)], **KW).images
    assert np.allclose(auto.images[0], ungated[0], atol=1e-5) and not np.allclose(auto.images[0], plain[0], atol=1e-4)
    assert np.allclose(auto.images[1], plain[1], atol=1e-5)
    assert np.allclose(auto.original_images, plain, atol=1e-5)


def test_a_concept_its_probe_gates_out_everywhere_costs_no_anchor_encoding(sd1, model_folder):
    """The words of a projection that no row gets (anchors, protected words) are not even encoded."""
    dim = sd1.text_encoder.config.hidden_size
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchor_strength=2.0, **KW)
    write_probe(model_folder, "red", -50.0, dim)  # "a tree in the fog" implies no red

    def encoder_calls(**extra):
        with ModelCalls(sd1) as model:
            images = sd1("a tree in the fog", generator=gen(), **kw, **extra).images
        return model.calls.count("text_encoder"), images

    alone, without = encoder_calls(anchors=[])
    gated, images = encoder_calls(anchors=["blue", "green"], anchor_protect=["circle", "square"])
    assert gated == alone and np.array_equal(images, without)
    ungated, _ = encoder_calls(anchors=["blue", "green"], anchor_protect=["circle", "square"], anchor_gate=False)
    assert ungated > alone  # projected without the gate: its words are encoded
