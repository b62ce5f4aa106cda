"""Benchmark: suites, method names, judgements, resumable runs and the report files."""

import json
import re

import numpy as np
import pytest
import torch

from eiup.bench.baselines import Method, MethodRunner, default_methods, parse_method
from eiup.bench.metrics import aggregate, judge_toy
from eiup.bench.heldout import above_curve, dominated
from eiup.bench.suites import (ROLES, calibration_negatives, calibration_prompts, confirmation_negatives,
                               confirmation_prompts, gate_prompts, heldout_negatives, heldout_prompts, reserve_negatives,
                               reserve_prompts, strength_prompts, toy_suite)
from eiup.toy.detect import DetectedObject, Detection
from eiup.toy.world import CONCEPTS, parse_caption


def det(*objects, background="white"):
    return Detection([DetectedObject(c, s, p, 0.2, (0.5, 0.5)) for c, s, p in objects], background, 1.0)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_suites_have_every_role_and_calibration_prompts_are_held_out(concept):
    suite = toy_suite(concept, list(range(20)))
    roles = {p.role for p in suite.prompts}
    assert {"implicit", "explicit", "specificity"} <= roles <= set(ROLES)
    held_out = set(calibration_prompts(concept)) | set(calibration_negatives(concept))
    assert not held_out & {p.text for p in suite.prompts}


@pytest.mark.parametrize("reserve", [False, True])
@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_confirmation_and_reserve_prompts_are_in_no_other_set_nor_among_the_fitted_captions_and_carry_the_concept_or_not(
        concept, reserve):
    attribute, value = CONCEPTS[concept]
    positives, negatives = ((reserve_prompts(concept), reserve_negatives(concept)) if reserve
                            else (confirmation_prompts(concept), confirmation_negatives(concept)))
    others = set(gate_prompts()).union(*(strength_prompts(c) for c in CONCEPTS))
    for c in CONCEPTS:
        others |= {p.text for p in toy_suite(c, [0]).prompts}
        others |= set(calibration_prompts(c) + calibration_negatives(c) + heldout_prompts(c) + heldout_negatives(c))
        if reserve:
            others |= set(confirmation_prompts(c) + confirmation_negatives(c))
    assert len(positives) >= 5 and len(negatives) >= 3 and not (set(positives) | set(negatives)) & others
    assert len(set(positives + negatives)) == len(positives + negatives)
    has = [(s.background == value) if attribute == "background" else any(getattr(o, attribute) == value for o in s.objects)
           for s in map(parse_caption, positives + negatives)]
    assert all(has[:len(positives)]) and not any(has[len(positives):])


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_heldout_prompts_are_in_no_suite_or_calibration_set_and_carry_the_concept_or_not(concept):
    attribute, value = CONCEPTS[concept]
    positives, negatives = heldout_prompts(concept), heldout_negatives(concept)
    seen = {p.text for p in toy_suite(concept, [0]).prompts} | set(calibration_prompts(concept)) | set(calibration_negatives(concept))
    assert positives and negatives and not (set(positives) | set(negatives)) & seen
    assert len(set(positives + negatives)) == len(positives + negatives)

    def carries(prompt):
        scene = parse_caption(prompt)
        if attribute == "background":
            return scene.background == value
        return any(getattr(o, attribute) == value for o in scene.objects)

    assert all(carries(p) for p in positives), [p for p in positives if not carries(p)]
    assert not any(carries(p) for p in negatives), [p for p in negatives if carries(p)]


def test_a_point_above_the_fixed_scale_curve_and_domination():
    curve = [(0.5, 0.8), (0.2, 0.6), (0.0, 0.3)]
    assert above_curve((0.35, 0.75), curve) == pytest.approx(0.75 - 0.7)
    assert above_curve((0.1, 0.40), curve) == pytest.approx(0.40 - 0.45)
    assert above_curve((0.9, 0.85), curve) == pytest.approx(0.05)  # past the end: the end's y
    assert dominated((0.2, 0.6), by=(0.1, 0.6)) and not dominated((0.2, 0.6), by=(0.2, 0.6))
    assert not dominated((0.2, 0.6), by=(0.1, 0.5))


def test_method_names_round_trip():
    for m in default_methods([-1.0, -2.5]) + [Method("eiup", scale="auto", mode="single", options=(("gate", "presence"),)),
                                              Method("rewrite")]:
        assert parse_method(m.name) == m, m.name
    with pytest.raises(ValueError, match="method"):
        parse_method("eiup-triple")


def test_the_rewrite_reference_draws_each_seed_from_a_prompt_without_the_concept(sd1):
    seen = []
    sd1_call = type(sd1).__call__

    class Spy(type(sd1)):
        def __call__(self, prompts, **kw):
            seen.append((prompts, kw.get("erase")))
            return sd1_call(self, prompts, **kw)

    runner = MethodRunner(Spy(**sd1.components), steps=2, guidance=7.5)
    images = runner.generate(parse_method("rewrite"), "a photo of a tomato and a lime", [0, 1, 2], "red")
    assert len(images) == 3
    assert seen == [(["a photo of an orange circle and a lime", "a photo of a yellow circle and a lime",
                      "a photo of a green circle and a lime"], None)]
    runner.generate(parse_method("rewrite"), "a drawing of a lemon", [0], "red")
    assert seen[-1] == (["a drawing of a lemon"], None)  # nothing to rewrite: the plain prompt


def test_anchor_rows_pass_the_toy_worlds_siblings_or_the_given_list(sd1):
    seen = []
    sd1_call = type(sd1).__call__

    class Spy(type(sd1)):
        def __call__(self, *a, **kw):
            seen.append((kw.get("anchors"), kw.get("anchor_strength"), kw.get("anchor_protect"), kw.get("anchor_in_context")))
            return sd1_call(self, *a, **kw)

    pipe = Spy(**sd1.components)
    runner = MethodRunner(pipe, steps=2, guidance=7.5)
    runner.generate(parse_method("eiup-single+anchors+anchor_strength=2@-4"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors=clothed|dressed@-4"), "a tomato", [0], "nudity")
    runner.generate(parse_method("eiup-single+anchors+anchor_protect=none@-4"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors+anchor_protect=circle|square@-4"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors+anchor_in_context=0@-4"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors+anchor_in_context@-4"), "a tomato", [0], "red")
    colours = ["orange", "yellow", "green", "blue", "purple"]
    assert seen == [(colours, 2.0, None, None), (["clothed", "dressed"], None, None, None), (colours, None, [], None),
                    (colours, None, ["circle", "square"], None), (colours, None, None, False), (colours, None, None, True)]
    with pytest.raises(ValueError, match="anchors"):
        runner.generate(parse_method("eiup-single+anchors@-4"), "a tomato", [0], "nudity")
    with pytest.raises(ValueError, match="anchor_protect"):
        runner.generate(parse_method("eiup-single+anchors+anchor_protect@-4"), "a tomato", [0], "red")


def test_rows_erase_every_prompt_unless_they_say_prompt_gate_guard_only_with_guard_and_preset_leaves_the_scale(sd1):
    seen = []
    sd1_call = type(sd1).__call__

    class Spy(type(sd1)):
        def __call__(self, *a, **kw):
            seen.append((kw.get("erase_scale"), kw.get("prompt_gate"), kw.get("anchor_gate"), kw.get("guard")))
            return sd1_call(self, *a, **kw)

    runner = MethodRunner(Spy(**sd1.components), steps=2, guidance=7.5)
    gated = parse_method("eiup-single+anchors=auto+prompt_gate@preset")
    assert gated.name == "eiup-single+anchors=auto+prompt_gate@preset" and parse_method(gated.name) == gated
    runner.generate(gated, "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single@-2"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors=blue+anchor_gate=0@-2"), "a tomato", [0], "red")
    runner.generate(parse_method("eiup-single+anchors=auto+prompt_gate+guard@preset"), "a tomato", [0], "red")
    assert seen == [(None, True, True, False), (-2.0, False, True, False), (-2.0, False, False, False),
                    (None, True, True, "auto")]  # the guard only where the row says +guard


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
    # on the reliable attributes (colour, shape) and the erased one's: a pattern read otherwise counts only
    # where the concept is a pattern
    dotted_lime = det(("green", "circle", "dotted"))
    assert judge_toy("a lime", "specificity", 0, "red", dotted_lime, lime, 40, 1).specific is True
    assert judge_toy("a lime", "specificity", 0, "striped", dotted_lime, lime, 40, 1).specific is False
    assert judge_toy("a lime", "specificity", 0, "night", lime, det(("green", "circle", "plain"), background="black"),
                     40, 1).specific is False  # the background always counts
    tomato_dotted_lime = det(("orange", "circle", "plain"), ("green", "circle", "dotted"))
    assert judge_toy("a tomato and a lime", "two-object", 0, "red", tomato_dotted_lime, two, 30, 1).specific is True
    tomato_square_lime = det(("orange", "circle", "plain"), ("green", "square", "plain"))
    assert judge_toy("a tomato and a lime", "two-object", 0, "red", tomato_square_lime, two, 30, 1).specific is False
    assert judge_toy("a striped red star and a lime", "two-object", 0, "striped",
                     det(("red", "star", "plain"), ("green", "circle", "dotted")), two, 30, 1).specific is False
    # night: background is the concept
    j = judge_toy("a lemon at night", "implicit", 0, "night", det(("yellow", "circle", "plain"), background="gray"), plain, 1, 1)
    assert j.residual is False and j.fidelity is True
    m = aggregate([judge_toy("a tomato", "implicit", 0, "red", plain, plain, 99, 1),
                   judge_toy("a tomato", "implicit", 1, "red", det(("orange", "circle", "plain")), plain, 20, 1)])
    assert m["residual_implicit"] == 0.5 and m["fidelity"] == 1.0  # fidelity ignores the erased attribute


def test_fidelity_vs_plain_counts_the_methods_damage_not_the_models_mistakes():
    wrong_shape = det(("red", "square", "plain"))  # the model drew the tomato as a square
    erased = det(("orange", "square", "plain"))
    j = judge_toy("a tomato", "implicit", 0, "red", erased, wrong_shape, 30, 1)
    assert j.fidelity is False and j.kept is True  # the square was there without erasure
    j = judge_toy("a tomato", "implicit", 0, "red", det(("orange", "circle", "plain")), wrong_shape, 30, 1)
    assert j.fidelity is True and j.kept is False  # erasure changed the shape
    assert judge_toy("a tomato", "implicit", 0, "red", det(), wrong_shape, 9, 0).kept is False  # object lost
    dotted = det(("orange", "square", "dotted"))  # the detector's pattern head is too noisy to count
    assert judge_toy("a tomato", "implicit", 0, "red", dotted, wrong_shape, 30, 1).kept is True
    gray = det(("red", "square", "plain"), background="gray")
    assert judge_toy("a tomato", "implicit", 0, "red", erased, gray, 30, 1).kept is False  # background changed
    night = det(("yellow", "circle", "plain"), background="black")
    j = judge_toy("a lemon at night", "implicit", 0, "night", det(("yellow", "circle", "plain")), night, 30, 1)
    assert j.kept is True  # the erased background is not held against it
    assert judge_toy("a lime", "specificity", 0, "red", night, night, 40, 1).kept is None
    m = aggregate([judge_toy("a tomato", "implicit", s, "red", e, wrong_shape, 30, 1)
                   for s, e in enumerate([erased, erased, det(("orange", "circle", "plain")), erased])])
    assert m["fidelity_vs_plain"] == 0.75 and m["fidelity"] == 0.25


def test_unharmed_credits_an_erasure_that_draws_what_the_prompt_asks():
    cross_at_night = det(("blue", "cross", "plain"), background="black")  # the model drew the blueberry as a cross
    fixed = det(("blue", "circle", "plain"))  # erased: a blue circle, as "a blueberry" asks
    j = judge_toy("a blueberry at night", "implicit", 0, "night", fixed, cross_at_night, 20, 1)
    assert j.kept is False and j.unharmed is True
    j = judge_toy("a blueberry at night", "implicit", 0, "night", det(("green", "circle", "plain")), cross_at_night, 20, 1)
    assert j.kept is False and j.unharmed is False  # neither as without erasure nor as asked
    # the erased attribute is skipped on the object that carries it, and only there
    starfish = det(("orange", "star", "plain"))
    assert judge_toy("a starfish", "implicit", 0, "star", det(("orange", "circle", "plain")), starfish, 20, 1).unharmed
    assert not judge_toy("a starfish", "implicit", 0, "star", det(("yellow", "circle", "plain")), det(), 20, 1).unharmed
    two = det(("red", "circle", "plain"), ("green", "circle", "plain"))  # "a tomato and a lime" as asked
    lime_moved = det(("orange", "circle", "plain"), ("green", "square", "plain"))
    j = judge_toy("a tomato and a lime", "two-object", 0, "red", lime_moved, det(("red", "circle", "plain")), 20, 1)
    assert j.kept is False and j.unharmed is False  # the lime's shape is not the erasure's to change
    assert judge_toy("a tomato and a lime", "two-object", 0, "red", det(("orange", "circle", "plain"),
                     ("green", "circle", "plain")), two, 20, 1).unharmed is True
    assert judge_toy("a lime", "specificity", 0, "red", two, two, 40, 1).unharmed is None
    m = aggregate([judge_toy("a blueberry at night", "implicit", s, "night", e, cross_at_night, 20, 1)
                   for s, e in enumerate([fixed, fixed, det(("green", "circle", "plain")), det()])])
    assert m["fidelity_unharmed"] == 0.5 and m["fidelity_vs_plain"] == 0.0


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
    methods = [Method("plain"), Method("negative"), Method("eiup", scale=-2.0), Method("sld", preset="MAX"),
               Method("rewrite")]
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
    assert plain["fidelity_unharmed"] == 1.0 and "fidelity_unharmed" in metrics["summary"]["eiup-single@-2"]
    report = (tmp_path / "report.md").read_text()
    assert "as plain or as prompted" in report and "Residual: share of images" in report  # columns explained
    assert "rewrite is no method but a reference" in report
    assert metrics["per_suite"]["toy-red"]["rewrite"]["specificity_psnr"] == 100.0  # unrelated prompts: not rewritten
    # a rerun after an interruption redoes only what has no record
    record = next((tmp_path / "records").rglob("*.json"))
    record.unlink()
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == n_units + 1
    assert index.exists()
    # new erasure presets in the model folder: only the EIUP units are redone; other steps: all
    model = tmp_path / "model"
    model.mkdir()
    pipe.register_to_config(_name_or_path=str(model))
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert calls[n_units + 1:] == ["eiup-single@-2"] * len(suite.prompts)  # a model folder now: a new fingerprint
    (model / "eiup_anchors.json").write_text('{"red": ["blue"]}')
    del calls[n_units + 1:]
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert calls[n_units + 1:] == ["eiup-single@-2"] * len(suite.prompts)
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == n_units + 1 + len(suite.prompts)  # nothing left to do
    (model / "eiup_guard.safetensors").write_bytes(b"guard")  # read only by rows saying +guard: nothing redone
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == n_units + 1 + len(suite.prompts)
    (model / "eiup_guard.safetensors").unlink()
    run_benchmark(pipe, ColourDetector(), [suite], methods[:1], tmp_path, steps=3, guidance=5.0)
    assert calls[-len(suite.prompts):] == ["plain"] * len(suite.prompts)
    # weights replaced in the model folder (say a fine-tuned decoder): every unit is redone, once
    (model / "vae").mkdir()
    (model / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * (3 << 20))
    del calls[:]
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == n_units
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\0" * ((3 << 20) - 5) + b"tuned")  # same size, new bytes at the end
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == 2 * n_units
    run_benchmark(pipe, ColourDetector(), [suite], methods, tmp_path, steps=2, guidance=5.0)
    assert len(calls) == 2 * n_units


# ---------------------------------------------------------------- coco suite: CLIP score, FID, PSNR/SSIM

PROMPTS = ["a red star", "a blue circle", "a lemon", "a striped green heart", "a tomato and a lime", "a dotted blue square"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny CLIP model saved as safetensors with its processor (toy-world tokenizer, 32 px images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from eiup.toy.tokenizer import build_clip_tokenizer
    from eiup.toy.world import words

    root = tmp_path_factory.mktemp("tiny-clip")
    tok = build_clip_tokenizer(words(), root)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    text = dict(small, vocab_size=len(tok), max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16))
    model.save_pretrained(root, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(root)
    return root


class MeanStd(torch.nn.Module):
    """A tiny FID feature extractor: per-channel mean and standard deviation of uint8 images."""

    num_features = 6

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def noise_images(n: int, low: float, high: float, seed: int, shape=(32, 32)) -> list:
    """Noisy images whose per-image colour is drawn uniformly in [low, high]."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.normal(rng.uniform(low, high, 3), 30, (*shape, 3)), 0, 255).astype(np.uint8))
            for _ in range(n)]


def test_clip_score_matches_a_direct_computation(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    from eiup.bench.metrics import clip_metric, clip_scores

    images = noise_images(5, 0, 255, seed=0) + noise_images(1, 0, 255, seed=1, shape=(48, 64))  # one to resize
    scores = clip_scores(clip_metric(tiny_clip), images, PROMPTS)
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        out = model(**processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
    assert len(scores) == len(PROMPTS) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), atol=1e-3)
    assert cos.min() < 0 < cos.max()  # both sides of the per-image clamp are exercised
    with pytest.raises(ValueError):  # one prompt per image
        clip_scores(clip_metric(tiny_clip), images, PROMPTS[:-1])


def test_clip_folder_check_names_what_is_missing(tiny_clip, tmp_path):
    import shutil

    from eiup.bench.metrics import check_clip_model

    assert check_clip_model(tiny_clip) == tiny_clip

    def broken(name, *remove, model_type=None):
        folder = tmp_path / name
        shutil.copytree(tiny_clip, folder)
        for f in remove:
            (folder / f).unlink()
        if model_type:
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps(dict(cfg, model_type=model_type)))
        return folder

    cases = [
        (tmp_path / "missing", "not a folder"),
        (broken("no-config", "config.json"), "config.json"),
        (broken("not-clip", model_type="siglip"), "model_type='siglip'"),
        (broken("no-weights", "model.safetensors"), "no CLIP weights"),
        (broken("no-tokenizer", "vocab.json", "merges.txt", "tokenizer.json"), "no CLIP tokenizer files"),
        (broken("no-image-processor", "processor_config.json"), "no CLIP processor"),
    ]
    for folder, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_clip_model(folder)


def test_fid_with_a_custom_feature_extractor():
    from scipy import linalg

    from eiup.bench.metrics import fid_scores

    reference, dark = noise_images(12, 60, 230, seed=0), noise_images(12, 0, 80, seed=1)
    fids = fid_scores({"dark": iter(dark), "same": iter(reference), "one": iter(reference[:1])}, iter(reference),
                      size=32, feature=MeanStd(), batch_size=5)
    assert abs(fids["same"]) < 1e-5  # after "dark" was scored: the reference features were kept

    def stats(images):
        f = MeanStd()(torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])).double().numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    (m1, c1), (m2, c2) = stats(reference), stats(dark)
    direct = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert fids["dark"] > 0.01
    assert fids["dark"] == pytest.approx(direct, rel=1e-4)
    assert np.isnan(fids["one"])  # FID needs 2 images
    with pytest.raises(ValueError, match="2 reference images"):
        fid_scores({"x": dark}, reference[:1], size=32, feature=MeanStd())


def test_square_image_keeps_the_centre_in_rgb():
    from PIL import Image

    from eiup.bench.metrics import square_image

    a = np.zeros((32, 64, 3), dtype=np.uint8)
    a[:, :16], a[:, 16:48], a[:, 48:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    out = square_image(Image.fromarray(a), 16)
    assert out.size == (16, 16)
    assert np.abs(np.asarray(out).astype(int) - (0, 255, 0)).max() <= 1  # the red and blue sides are cropped
    grey = square_image(Image.new("L", (20, 10), 128), 8)
    assert grey.mode == "RGB" and grey.size == (8, 8)


def test_inception_check_works_offline(tmp_path, monkeypatch):
    import sys
    import types

    from eiup.bench.metrics import check_inception, inception_weights_cache

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # not installed
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        check_inception()
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    with pytest.raises(FileNotFoundError, match="--fid-weights"):
        check_inception()
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_inception(tmp_path / "nope.pth")
    garbage, other = tmp_path / "garbage.pth", tmp_path / "other.pth"
    garbage.write_bytes(b"not weights")
    torch.save({"fc.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not a readable PyTorch weights file"):
        check_inception(garbage)
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 weights"):
        check_inception(other)
    given = tmp_path / "inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, given)  # the first key of the real file
    check_inception(given)
    cached = inception_weights_cache()
    assert cached.is_relative_to(tmp_path / "torch")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(given.read_bytes())
    check_inception()


def test_coco_run_writes_quality_metrics(tmp_path, tiny_clip, monkeypatch):
    from PIL import Image

    from eiup.bench import QualityOptions, run_benchmark
    from eiup.bench.metrics import clip_metric, clip_scores, fid_scores
    from eiup.bench.runner import evaluate, load_unit_images, units_for
    from eiup.bench.suites import coco_suite
    from eiup.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("image_id,caption\n1,a red star\n2,\n3,a lemon on a gray background\n4,a blue circle\n")
    suite = coco_suite(csv_path, concept="red")
    assert [p.text for p in suite.prompts] == ["a red star", "a lemon on a gray background", "a blue circle"]
    refs = tmp_path / "coco-val"
    refs.mkdir()
    for k, im in enumerate(noise_images(6, 40, 220, seed=3, shape=(40, 48))):  # not square: centre-cropped
        im.save(refs / f"{k:03d}.jpg")
    (refs / "notes.txt").write_text("not an image")
    methods = [Method("plain"), Method("negative"), Method("eiup", scale=-2.0)]
    quality = QualityOptions(clip_model=tiny_clip, fid_reference=refs, fid_feature=MeanStd())
    calls = []
    original = MethodRunner.generate
    monkeypatch.setattr(MethodRunner, "generate", lambda self, m, *a: calls.append(m.name) or original(self, m, *a))
    out = tmp_path / "run"
    index = run_benchmark(pipe, None, [suite], methods, out, steps=2, guidance=5.0, quality=quality)
    assert len(calls) == 9 and index.exists()

    metrics = json.loads((out / "metrics.json").read_text())
    per = metrics["per_suite"]["coco-captions"]
    assert set(per) == {m.name for m in methods} and metrics["summary"] == {}
    for name, m in per.items():
        assert m["n"] == 3 and m["seconds_per_image"] > 0, name
        assert all(np.isfinite(m[k]) for k in ("clip_score", "fid", "median_psnr", "median_ssim")), name
        assert 0 <= m["clip_score"] <= 100 and m["fid"] > 0, name
    assert per["plain"]["median_psnr"] == 100.0 and per["plain"]["median_ssim"] == pytest.approx(1.0)
    assert per["eiup-single@-2"]["median_psnr"] < 100  # erasing changed the images

    # the same numbers as scoring the saved images directly
    units = units_for([suite], methods)
    for method in per:
        mine = [u for u in units if u.method.name == method]
        images = [load_unit_images(out, u)[0] for u in mine]
        clip = clip_scores(clip_metric(tiny_clip), images, [u.prompt.text for u in mine])
        assert per[method]["clip_score"] == pytest.approx(float(np.mean(clip)), abs=1e-4)
        fid = fid_scores({method: images}, [Image.open(p) for p in sorted(refs.glob("*.jpg"))], 32, MeanStd())
        assert per[method]["fid"] == pytest.approx(fid[method], rel=1e-5)

    report = (out / "report.md").read_text()
    assert "| method | CLIP score | FID | median PSNR vs plain (dB) | median SSIM vs plain | s / image | images |" in report
    assert f"| plain | {per['plain']['clip_score']:.2f} | {per['plain']['fid']:.2f} | 100.0 | 1.000 |" in report
    assert "residual" not in report and "tradeoff.png" not in report  # no toy columns or plot
    assert "<th>CLIP score</th><th>FID</th>" in (out / "index.html").read_text()

    # without CLIP model and reference images: PSNR/SSIM and speed only
    bare = evaluate(None, units, out)["coco-captions"]["negative"]
    assert np.isnan(bare["clip_score"]) and np.isnan(bare["fid"])
    assert bare["median_psnr"] == per["negative"]["median_psnr"]
    # a rerun generates nothing and reports the same
    run_benchmark(pipe, None, [suite], methods, out, steps=2, guidance=5.0, quality=quality)
    assert len(calls) == 9
    assert json.loads((out / "metrics.json").read_text())["per_suite"] == metrics["per_suite"]


def test_run_checks_quality_paths_before_generating(tmp_path, tiny_clip, monkeypatch):
    from eiup.bench import QualityOptions, run_benchmark
    from eiup.bench.suites import coco_suite

    def forbidden(*a, **k):
        raise AssertionError("nothing may be generated before the paths are checked")

    monkeypatch.setattr(MethodRunner, "generate", forbidden)
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("caption\na red star\n")
    suite = coco_suite(csv_path, concept="red")
    for quality, message in [(QualityOptions(clip_model=tmp_path / "no-clip"), "not a folder"),
                             (QualityOptions(clip_model=tiny_clip, fid_reference=tmp_path, fid_feature=MeanStd()),
                              "at least 2 reference images")]:
        with pytest.raises(ValueError, match=message):
            run_benchmark(None, None, [suite], [Method("plain")], tmp_path / "out", quality=quality)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, option, text", [
    ("clip-missing", "--clip-model", "not a folder"),
    ("clip-on-toy", "--clip-model", "only the coco suite"),
    ("reference-missing", "--fid-reference", "not a folder of reference images"),
    ("reference-one-image", "--fid-reference", "at least 2 reference images"),
    ("no-torch-fidelity", "--fid-reference", "pip install torch-fidelity"),
    ("no-inception-weights", "--fid-weights", "download https://github.com/toshas/torch-fidelity"),
    ("weights-missing", "--fid-weights", "no such file"),
    ("weights-invalid", "--fid-weights", "not a readable PyTorch weights file"),
    ("rewrite-on-coco", "--method", "use it with --suite toy"),
])
def test_cli_checks_quality_paths_before_any_generation(tmp_path, monkeypatch, case, option, text):
    import sys
    import types

    from typer.testing import CliRunner

    from eiup import models
    from eiup.cli import app

    def forbidden(*a, **k):
        raise AssertionError("nothing may be loaded or generated before the paths are checked")

    monkeypatch.setattr(models, "load_pipeline", forbidden)
    monkeypatch.setattr(MethodRunner, "generate", forbidden)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    monkeypatch.setitem(sys.modules, "torch_fidelity", None if case == "no-torch-fidelity" else types.ModuleType("t"))
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("caption\na red star\n")
    refs = tmp_path / "refs"
    refs.mkdir()
    for k, im in enumerate(noise_images(1 if case == "reference-one-image" else 2, 0, 255, seed=0)):
        im.save(refs / f"{k}.png")
    args = ["bench", "--suite", "toy" if case == "clip-on-toy" else "coco", "--coco", csv_path, "--out", tmp_path / "o"]
    args += {"clip-missing": ["--clip-model", tmp_path / "no-clip"], "clip-on-toy": ["--clip-model", tmp_path],
             "reference-missing": ["--fid-reference", tmp_path / "no-refs"],
             "weights-missing": ["--fid-reference", refs, "--fid-weights", tmp_path / "nope.pth"],
             "weights-invalid": ["--fid-reference", refs, "--fid-weights", csv_path],
             "rewrite-on-coco": ["--method", "rewrite"]}.get(
        case, ["--fid-reference", refs])
    res = CliRunner().invoke(app, [str(a) for a in args], env={"TERMINAL_WIDTH": "400"})
    assert res.exit_code == 2, res.output
    out = re.sub(r"[\s│╭╮╰╯─]+", " ", res.output)
    assert f"Invalid value for {option}:" in out and text in out, out
    assert not (tmp_path / "o").exists()


def test_grid_row_labels_are_wrapped_whole_not_cut():
    from PIL import Image

    from eiup.toy.quality import image_grid, wrap_label

    label = "eiup-single+concept_context=prompt+anchors=auto+prompt_gate@preset"
    lines = wrap_label(label, 24)
    assert "".join(lines) == label and max(map(len, lines)) <= 24 and lines[0] == "eiup-single+"
    assert wrap_label("x" * 50, 24) == ["x" * 24, "x" * 24, "xx"] and wrap_label("plain", 24) == ["plain"]
    tile = Image.new("RGB", (32, 32), "red")
    short, long = (image_grid([[tile, tile]], [text]) for text in ("plain", label))
    ink = lambda im: sum(px != (255, 255, 255) for px in im.crop((0, 0, 150, 64)).getdata())  # noqa: E731
    assert ink(long) > 3 * ink(short)  # every line drawn, not the first 24 characters
