"""Reliability checks of issue #6 not already in test_pipeline / test_models / test_cli.

(a) prompts over the encoder limit: truncated as diffusers does (its warning), concept term intact;
(b) bad input fails before any model work: the erase arguments in dual mode and with
    return_original (the single-mode path without it is test_pipeline's BAD list), a pipeline
    without cross-attention, unusable model folders and pickled weights (no loader is called);
(c) isolation: two pipelines erasing different concepts, interleaved step by step, and a
    pipeline used with erasure then without equals a fresh plain pipeline bit for bit;
(d) an exception or interruption inside a user callback restores the processors and leaves
    the pipeline usable.

All on tiny random models at 16x16 px, 2-3 steps.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from eiup import models
from eiup.attention import EIUPCrossAttnProcessor, EIUPSelfAttnProcessor
from eiup.pipeline import EIUPPipeline, EraseConfigError
from eiup.testing import ModelCalls, tiny_pipeline
from eiup.toy.world import words

KW = dict(num_inference_steps=2, height=16, width=16, output_type="np")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def same_processors(pipe, before: dict) -> bool:
    after = pipe.unet.attn_processors
    return after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A tiny SD 1.x pipeline this module may modify (user processors, failed calls)."""
    return tiny_pipeline("sd1", seed=2, tmpdir=tmp_path_factory.mktemp("own"))


# --------------------------------------------------------------------------------------------
# (a) prompts longer than the text encoder holds
# --------------------------------------------------------------------------------------------

SINGLE = sorted(words())  # the toy vocabulary: one token per word
KEPT = [SINGLE[(5 * i) % len(SINGLE)] for i in range(74)] + ["red"]  # 75 tokens: BOS + 75 + EOS = 77
TAIL = ["tiger", "on", "a", "night", "background"] * 4  # cut off


class DiffusersWarnings(logging.Handler):
    """Collects the records of diffusers' Stable Diffusion pipeline logger (it does not propagate)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.logger = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> DiffusersWarnings:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


@pytest.mark.parametrize("context", ["separate", "prompt"])
@pytest.mark.parametrize("mode", ["single", "dual"])
def test_long_prompt_truncated_like_diffusers_and_concept_fully_applied(sd1, sd1_plain, mode, context):
    tok = sd1.tokenizer
    long_prompt, short_prompt = " ".join(KEPT + TAIL), " ".join(KEPT)
    long_neg, short_neg = " ".join(KEPT[::-1] + TAIL), " ".join(KEPT[::-1])
    assert len(tok(long_prompt).input_ids) > tok.model_max_length
    # truncating by hand gives exactly the 77 tokens diffusers keeps
    assert tok(long_prompt, truncation=True, max_length=77).input_ids == tok(short_prompt).input_ids
    assert tok(long_neg, truncation=True, max_length=77).input_ids == tok(short_neg).input_ids

    seen = []

    def spy(pipe, i, t, kw):
        ctx = pipe.erase_context  # None in single mode's plain pass for return_original
        if ctx is not None:
            seen.append((ctx.concepts, ctx.spans, int((ctx.token_scales != 0).sum())))
        return kw

    args = dict(erase=["red", "tiger"], erase_scale=[-2.0, -3.0], erase_mode=mode, return_original=True,
                concept_context=context, **KW)
    with DiffusersWarnings() as warned:
        long = sd1(long_prompt, negative_prompt=long_neg, generator=gen(), callback_on_step_end=spy, **args)
    truncation = [m for m in warned.messages if "truncated" in m and "77" in m]
    assert truncation and any("tiger" in m for m in truncation), warned.messages
    # the concepts are never truncated, every concept token weighted: encoded on their own, or
    # after the prompt shortened to leave room for them (73 prompt tokens + 2 concept tokens + BOS/EOS)
    spans = [[1], [2]] if context == "separate" else [[74], [75]]
    assert seen == [(("red", "tiger"), spans, 2)] * KW["num_inference_steps"]

    with DiffusersWarnings() as warned:
        short = sd1(short_prompt, negative_prompt=short_neg, generator=gen(), **args)
    assert not [m for m in warned.messages if "truncated" in m]
    assert np.array_equal(long.images, short.images)
    assert np.array_equal(long.original_images, short.original_images)

    plain = sd1_plain(long_prompt, negative_prompt=long_neg, generator=gen(), **KW).images
    assert np.abs(long.original_images - plain).max() < 1e-4
    assert np.abs(long.images - plain).max() > 1e-4
    # "tiger" appears only in the cut-off part of the prompt and is still erased
    only_tiger = sd1(long_prompt, negative_prompt=long_neg, erase="tiger", erase_mode=mode, concept_context=context,
                     generator=gen(), **KW).images
    assert np.abs(only_tiger - plain).max() > 1e-4


# --------------------------------------------------------------------------------------------
# (b) bad input: refused before any model work
# --------------------------------------------------------------------------------------------

BAD_ERASE = [
    (dict(erase=""), r"erase\b"),
    (dict(erase=["red", " \t\u3000"]), r"erase\[1\]"),
    (dict(erase="red " * 80), r"erase\b.*tokens"),
    (dict(erase=["red " * 40, "star " * 40]), r"erase\b.*together"),
    (dict(erase="red", erase_scale=math.nan), "erase_scale"),
    (dict(erase="red", erase_scale=math.inf), "erase_scale"),
    (dict(erase="red", erase_scale=-math.inf), "erase_scale"),
    (dict(erase=["red", "star"], erase_scale=[-1.0, math.nan]), r"erase_scale\[1\]"),
    (dict(erase="red", erase_scale="-1"), "erase_scale"),
    (dict(erase="red", erase_scale=0.5), "allow_amplify"),
    (dict(erase=["red", "star"], erase_scale=[-1.0, 2.0]), "allow_amplify"),
    (dict(erase="red", erase_scale=2.0, allow_amplify=False), "allow_amplify"),
    (dict(erase="red", erase_mode="triple"), "erase_mode"),
    (dict(erase="red", erase_mode="Dual"), "erase_mode"),
    (dict(erase="red", erase_mode=""), "erase_mode"),
    (dict(erase="red", cross_attn_fraction=1.01), "cross_attn_fraction"),
    (dict(erase="red", cross_attn_fraction=math.nan), "cross_attn_fraction"),
    (dict(erase="red", self_attn_fraction=-0.5), "self_attn_fraction"),
    (dict(erase="red", self_attn_fraction=math.inf), "self_attn_fraction"),
    (dict(erase="red", erase_config={"erase": "red"}), "erase_config"),
]


@pytest.mark.parametrize("mode,return_original", [("dual", False), ("dual", True), ("single", True)])
@pytest.mark.parametrize("kwargs,name", BAD_ERASE, ids=[f"bad{i}" for i in range(len(BAD_ERASE))])
def test_bad_erase_input_refused_before_model_work(sd1, kwargs, name, mode, return_original):
    before = dict(sd1.unet.attn_processors)
    kwargs = {"erase_mode": mode, **kwargs}
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match=name):
        sd1("a red star", return_original=return_original, generator=gen(), **KW, **kwargs)
    assert model.calls == []
    assert same_processors(sd1, before) and sd1.erase_context is None


@pytest.mark.parametrize("mode", ["single", "dual"])
@pytest.mark.parametrize("scale", [-1e39, -1e30], ids=["over-float32-max", "float32-but-overflows"])
def test_huge_scale_refused_or_finite(sd1, scale, mode):
    with ModelCalls(sd1) as model:
        try:
            out = sd1("a red star", erase="red", erase_scale=scale, erase_mode=mode, return_original=True,
                      generator=gen(), **KW)
        except ValueError as e:
            assert "erase_scale" in str(e) and model.calls == []
        else:
            assert np.isfinite(out.images).all()


def _no_cross_attention(sd1) -> EIUPPipeline:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32,
    )
    pipe = EIUPPipeline(**{**sd1.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode,return_original", [("single", False), ("single", True), ("dual", True)])
def test_pipeline_without_cross_attention_refused_before_model_work(sd1, mode, return_original):
    pipe = _no_cross_attention(sd1)
    with ModelCalls(pipe) as model, pytest.raises(EraseConfigError, match=r"erase\b.*no cross-attention"):
        pipe("a red star", erase="red", erase_mode=mode, return_original=return_original, generator=gen(), **KW)
    assert model.calls == []
    assert np.isfinite(pipe("a red star", generator=gen(), **KW).images).all()  # still a working plain pipeline


class Boom:
    """Unpickling this object creates ``marker``: proof that pickled code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plant(path: Path, marker: Path) -> None:
    Boom.marker = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Boom()))


SD_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
}


def _unusable(kind: str, root: Path, marker: Path) -> Path:
    """A model path that must be refused; built from JSON and dummy files (weights never read)."""
    folder = root / kind
    folder.mkdir()
    if kind == "empty-folder":
        return folder
    if kind == "unet-only-folder":  # a diffusers *model* folder, not a pipeline
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
        return folder
    if kind == "transformers-folder":
        (folder / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"]}))
        (folder / "model.safetensors").write_bytes(b"\0" * 16)
        return folder
    if kind in ("single-safetensors", "single-pt", "single-pth", "single-pkl"):
        ext = {"single-safetensors": ".safetensors", "single-pt": ".pt", "single-pth": ".pth", "single-pkl": ".pkl"}[kind]
        path = folder / f"model{ext}"
        _plant(path, marker)
        return path
    if kind == "index-is-a-list":
        (folder / "model_index.json").write_text("[1, 2]")
        return folder
    if kind == "controlnet-pipeline":
        (folder / "model_index.json").write_text(json.dumps({**SD_INDEX, "_class_name": "StableDiffusionControlNetPipeline"}))
        return folder
    if kind == "unknown-library-component":
        (folder / "model_index.json").write_text(json.dumps({**SD_INDEX, "unet": ["mylib", "UNet"]}))
        return folder
    if kind == "pickled-text-encoder":
        (folder / "model_index.json").write_text(json.dumps(SD_INDEX))
        for comp in ("unet", "vae"):
            (folder / comp).mkdir()
            (folder / comp / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
            (folder / comp / "config.json").write_text("{}")
        _plant(folder / "text_encoder" / "pytorch_model.bin", marker)
        return folder
    raise AssertionError(kind)


UNUSABLE = [
    ("empty-folder", models.NotAPipelineError, "no model_index.json"),
    ("unet-only-folder", models.NotAPipelineError, "no model_index.json"),
    ("transformers-folder", models.NotAPipelineError, "no model_index.json"),
    ("single-safetensors", models.NotAPipelineError, "single file"),
    ("single-pt", models.UnsafeWeightsError, "pickled"),
    ("single-pth", models.UnsafeWeightsError, "pickled"),
    ("single-pkl", models.UnsafeWeightsError, "pickled"),
    ("index-is-a-list", models.NotAPipelineError, "not a JSON object"),
    ("controlnet-pipeline", models.UnsupportedModelError, "not supported"),
    ("unknown-library-component", models.UnsafeWeightsError, "custom code"),
    ("pickled-text-encoder", models.UnsafeWeightsError, "pickled.*arbitrary code"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight loading fails the test."""
    from diffusers import DiffusionPipeline, ModelMixin
    from transformers import PreTrainedModel

    def forbidden(*a, **k):
        raise AssertionError("weights must not be loaded for an unusable model")

    for cls in (DiffusionPipeline, ModelMixin, PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("kind,error,match", UNUSABLE, ids=[u[0] for u in UNUSABLE])
def test_unusable_model_refused_without_loading(tmp_path, no_loading, kind, error, match):
    marker = tmp_path / "pwned"
    path = _unusable(kind, tmp_path, marker)
    with pytest.raises(error, match=match):
        models.load_pipeline(path, device="cpu")
    with pytest.raises(error, match=match):
        models.inspect_model(str(path))
    assert not marker.exists()


def test_pickled_files_beside_safetensors_are_never_unpickled(sd1, tmp_path):
    folder = tmp_path / "sd1"
    sd1.save_pretrained(folder, safe_serialization=True)
    marker = tmp_path / "pwned"
    for path in ("unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                 "model.ckpt", "unet/diffusion_pytorch_model.ckpt"):
        _plant(folder / path, marker)
    pipe = models.load_pipeline(folder, device="cpu")
    assert not marker.exists()
    assert isinstance(pipe, EIUPPipeline)
    for a, b in zip(pipe.unet.state_dict().values(), sd1.unet.state_dict().values()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# (c) isolation
# --------------------------------------------------------------------------------------------


def test_two_pipelines_interleaved_step_by_step_do_not_interfere(sd1, sd1_other):
    """A and B (separate models) run in two threads taking strict turns: A0 B0 A1 B1 A2 B2."""
    steps = dict(KW, num_inference_steps=3)
    jobs = {
        "a": (sd1, dict(prompt="a red star", erase=["red"], erase_scale=-2.0, erase_mode="single", seed=0)),
        "b": (sd1_other, dict(prompt="a blue heart", erase=["heart", "blue"], erase_mode="dual", seed=1,
                              return_original=True)),
    }

    def call(name, callback=None):
        pipe, job = jobs[name]
        args = {k: v for k, v in job.items() if k != "seed"}
        return pipe(**args, generator=gen(job["seed"]), callback_on_step_end=callback, **steps)

    alone = {name: call(name) for name in jobs}

    cond = threading.Condition()
    state = {"turn": "a", "done": set()}
    order, problems, results = [], [], {}

    def check_own_processors(name):
        pipe, job = jobs[name]
        ctx = pipe.erase_context
        if ctx is None or ctx.concepts != tuple(job["erase"]):
            problems.append(f"{name}: context {ctx and ctx.concepts}")
        wanted = EIUPSelfAttnProcessor if job["erase_mode"] == "dual" else type(None)
        for proc_name, proc in pipe.unet.attn_processors.items():
            if "attn2" in proc_name and not (isinstance(proc, EIUPCrossAttnProcessor) and proc.context is ctx):
                problems.append(f"{name}: {proc_name} has {proc!r}")
            if "attn1" in proc_name and wanted is EIUPSelfAttnProcessor and not (
                    isinstance(proc, wanted) and proc.context is ctx):
                problems.append(f"{name}: {proc_name} has {proc!r}")

    def wait_turn(me):
        with cond:
            if not cond.wait_for(lambda: state["turn"] == me or state["done"] >= set(jobs) - {me}, timeout=60):
                problems.append(f"{me}: timed out")

    def pass_turn(me):
        other = "b" if me == "a" else "a"
        with cond:
            state["turn"] = other
            cond.notify_all()

    def worker(me):
        def cb(pipe, i, t, kw):
            order.append((me, i))
            check_own_processors(me)
            pass_turn(me)
            wait_turn(me)
            return kw

        try:
            wait_turn(me)
            results[me] = call(me, cb)
        except BaseException as e:  # noqa: BLE001 - reported below
            problems.append(f"{me}: {type(e).__name__}: {e}")
        finally:
            with cond:
                state["done"].add(me)
                pass_turn(me)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert problems == []
    assert order == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for name in jobs:
        assert np.array_equal(results[name].images, alone[name].images), name
    assert np.array_equal(results["b"].original_images, alone["b"].original_images)
    assert sd1.erase_context is None and sd1_other.erase_context is None


def test_used_with_erasure_then_without_equals_fresh_plain_pipeline(tmp_path):
    used = tiny_pipeline("sd1", seed=3, tmpdir=tmp_path)
    fresh = tiny_pipeline("sd1", seed=3, tmpdir=tmp_path, plain=True)
    processors = dict(used.unet.attn_processors)
    weights = {k: v.clone() for k, v in used.unet.state_dict().items()}

    from eiup.attention import ConceptAttentionRecorder

    used("a red star", erase="red", erase_mode="single", return_original=True, return_heatmaps=True,
         concept_recorder=ConceptAttentionRecorder(), generator=gen(), **KW)
    used(["a red star", "a blue heart"], erase=["red", "heart"], erase_scale=[-1.0, -4.0], erase_mode="dual",
         tail="reference", generator=[gen(1), gen(2)], **KW)
    used("a red star", erase="star", erase_scale=0.7, allow_amplify=True, guidance_scale=1.0, generator=gen(), **KW)
    with pytest.raises(ValueError):
        used("a red star", erase="red", erase_mode="nope", **KW)
    with pytest.raises(RuntimeError):
        used("a red star", erase="red", erase_mode="dual",
             callback_on_step_end=lambda *a: (_ for _ in ()).throw(RuntimeError("x")), **KW)

    assert same_processors(used, processors) and used.erase_context is None
    assert all(torch.equal(v, weights[k]) for k, v in used.unet.state_dict().items())
    cases = [
        lambda: dict(prompt="a red star", generator=gen(7)),
        lambda: dict(prompt=["a blue heart"] * 2, negative_prompt=["red"] * 2, generator=[gen(8), gen(9)]),
    ]
    for extra in ({}, {"erase": None}, {"erase": []}):
        for case in cases:
            mine, theirs = used(**case(), **KW, **extra).images, fresh(**case(), **KW).images
            assert mine.shape == theirs.shape and np.array_equal(mine, theirs), (extra, case()["prompt"])


# --------------------------------------------------------------------------------------------
# (d) exceptions and interruption inside a user callback
# --------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


FAILURES = [  # (mode, return_original, exception, index of the failing callback call)
    ("single", False, Stop, 1),
    ("single", True, Stop, 2),  # return_original: the callback also runs in the plain pass (steps 0-2 first)
    ("single", True, KeyboardInterrupt, 4),  # erasing pass, step 1
    ("dual", True, Stop, 1),
    ("dual", False, KeyboardInterrupt, 2),  # last step
]


@pytest.mark.parametrize("mode,return_original,exc,at", FAILURES)
def test_exception_in_user_callback_restores_processors(own, mode, return_original, exc, at):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    steps = dict(KW, num_inference_steps=3)
    # user processors of two kinds, which must come back as the very same objects
    custom = {name: (AttnProcessor() if i % 2 else AttnProcessor2_0()) for i, name in enumerate(own.unet.attn_processors)}
    own.unet.set_attn_processor(dict(custom))
    before = dict(own.unet.attn_processors)
    args = dict(prompt="a red star", erase=["red", "star"], erase_scale=[-2.0, -1.0], erase_mode=mode,
                return_original=return_original, **steps)
    baseline = own(**args, generator=gen(5))
    plain = own("a red star", generator=gen(5), **steps).images

    calls = []

    def failing(pipe, i, t, kw):
        calls.append(i)
        if len(calls) - 1 == at:
            raise exc("user callback failed")
        return kw

    with pytest.raises(exc, match="user callback failed"):
        own(**args, generator=gen(5), callback_on_step_end=failing)
    assert len(calls) == at + 1
    assert same_processors(own, before) and own.erase_context is None
    assert {type(p) for p in own.unet.attn_processors.values()} == {AttnProcessor, AttnProcessor2_0}

    again = own(**args, generator=gen(5))
    assert np.array_equal(again.images, baseline.images)
    if return_original:
        assert np.array_equal(again.original_images, baseline.original_images)
    assert np.array_equal(own("a red star", generator=gen(5), **steps).images, plain)
    assert same_processors(own, before)


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_interrupt_flag_from_callback_returns_image_and_restores(own, mode):
    """diffusers' own interruption (``pipe._interrupt = True``) skips the remaining steps."""
    steps = dict(KW, num_inference_steps=3)
    before = dict(own.unet.attn_processors)
    full = own("a red star", erase="red", erase_mode=mode, generator=gen(), **steps).images

    def stop(pipe, i, t, kw):
        pipe._interrupt = True
        return kw

    cut = own("a red star", erase="red", erase_mode=mode, generator=gen(), callback_on_step_end=stop, **steps).images
    assert np.isfinite(cut).all() and not np.array_equal(cut, full)
    assert same_processors(own, before) and own.erase_context is None
    assert np.array_equal(own("a red star", erase="red", erase_mode=mode, generator=gen(), **steps).images, full)


def test_failure_of_a_nested_call_on_a_shared_unet_leaves_the_outer_call_intact(sd1):
    """A pipeline sharing sd1's UNet fails inside sd1's callback: sd1's own erasure goes on unchanged."""
    from eiup import from_pipe

    shared = from_pipe(sd1)
    steps = dict(KW, num_inference_steps=3)
    alone = sd1("a red star", erase="red", erase_mode="dual", generator=gen(), **steps).images
    caught = []

    def boom(pipe, i, t, kw):
        raise Stop("inner")

    def outer_cb(pipe, i, t, kw):
        if i == 1:
            inside = dict(sd1.unet.attn_processors)
            try:
                shared("a blue heart", erase="heart", generator=gen(1), callback_on_step_end=boom, **steps)
            except Stop as e:
                caught.append(e)
            assert same_processors(sd1, inside)  # sd1's EIUP processors are back for its remaining steps
        return kw

    out = sd1("a red star", erase="red", erase_mode="dual", generator=gen(), callback_on_step_end=outer_cb, **steps)
    assert len(caught) == 1 and np.array_equal(out.images, alone)
    assert sd1.erase_context is None and shared.erase_context is None
