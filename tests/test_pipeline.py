"""End-to-end tests of EIUPPipeline / EIUPXLPipeline on tiny random models (CPU, 2-4 steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import eiup
from eiup import EIUPPipeline, EraseConfig, EraseConfigError, from_pipe
from eiup.attention import ConceptAttentionRecorder, EIUPCrossAttnProcessor
from eiup.testing import ModelCalls

KW = dict(num_inference_steps=3, output_type="np")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cross_layers(pipe):
    return [n for n, p in pipe.unet.attn_processors.items() if "attn2" in n]


def first_cross_attn(pipe):
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2


class Capture:
    """Records the outputs of one module at its first call."""

    def __init__(self, module):
        self.outputs = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.outputs.append(o.detach().clone()))

    def close(self):
        self.handle.remove()
        return self.outputs


# --------------------------------------------------------------------------------------------
# Equivalence with the plain pipeline
# --------------------------------------------------------------------------------------------


def test_no_concept_and_zero_scale_equal_plain(sd1, sd1_plain):
    plain = sd1_plain("a red star", generator=gen(), **KW).images
    assert np.array_equal(sd1("a red star", generator=gen(), **KW).images, plain)
    assert np.array_equal(sd1("a red star", erase=[], generator=gen(), **KW).images, plain)
    zero = sd1("a red star", erase=["red", "star"], erase_scale=0.0, generator=gen(), **KW).images
    assert np.array_equal(zero, plain)


def test_nonzero_scale_changes_only_cond_rows(sd1, sd1_plain):
    layer = first_cross_attn(sd1)
    cap = Capture(layer)
    sd1_plain("a red star", generator=gen(), **KW)
    plain_out = cap.outputs[0]
    cap.outputs.clear()
    out = sd1("a red star", erase="red", erase_scale=-2.0, generator=gen(), **KW)
    erased_out = cap.close()[0]
    # step 0, first layer: identical inputs; uncond rows identical, cond rows changed
    assert torch.equal(erased_out[:1], plain_out[:1])
    assert (erased_out[1:] - plain_out[1:]).abs().max() > 1e-4
    assert np.abs(out.images - sd1_plain("a red star", generator=gen(), **KW).images).max() > 1e-4


def test_dual_original_branch_equals_plain(sd1, sd1_plain):
    plain = sd1_plain("a red star", generator=gen(), **KW).images
    out = sd1("a red star", erase="red", erase_scale=-2.0, erase_mode="dual", return_original=True, generator=gen(), **KW)
    assert np.abs(out.original_images - plain).max() < 1e-4
    assert np.abs(out.images - plain).max() > 1e-4
    # scale 0: the erased branch follows the original exactly (same latents, same maps)
    zero = sd1("a red star", erase="red", erase_scale=0.0, erase_mode="dual", return_original=True, generator=gen(), **KW)
    assert np.abs(zero.images - zero.original_images).max() < 1e-5


def test_dual_batch_prompts_negative_generators(sd1, sd1_plain):
    args = dict(
        prompt=["a red star", "a blue heart"], negative_prompt=["green", "dotted"], num_images_per_prompt=2,
        num_inference_steps=2, output_type="np",
    )
    plain = sd1_plain(**args, generator=[gen(i) for i in range(4)]).images
    out = sd1(**args, erase=["red"], erase_mode="dual", return_original=True, generator=[gen(i) for i in range(4)])
    assert out.images.shape == out.original_images.shape == (4, 32, 32, 3)
    assert np.abs(out.original_images - plain).max() < 1e-4
    single = sd1(**args, erase=["red"], return_original=True, generator=[gen(i) for i in range(4)])
    assert np.array_equal(single.original_images, plain)
    again = sd1(**args, erase=["red"], generator=[gen(i) for i in range(4)]).images
    assert np.array_equal(single.images, again)  # the plain pass did not shift the generators


def test_prompt_embeds_and_output_types(sd1, sd1_plain):
    pe, ne = sd1.encode_prompt("a red star", "cpu", 1, True)
    plain = sd1_plain(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen(), num_inference_steps=2, output_type="pt").images
    out = sd1(prompt_embeds=pe, negative_prompt_embeds=ne, erase="red", erase_mode="dual", return_original=True,
              generator=gen(), num_inference_steps=2, output_type="pt")
    assert isinstance(out.images, torch.Tensor) and (out.original_images - plain).abs().max() < 1e-4
    pil = sd1("a red star", erase="red", generator=gen(), num_inference_steps=2)
    assert len(pil.images) == 1 and pil.images[0].size == (32, 32)
    lat = sd1("a red star", erase="red", erase_mode="dual", generator=gen(), num_inference_steps=2, output_type="latent")
    assert lat.images.shape == (1, 4, 16, 16)
    tup = sd1("a red star", erase="red", generator=gen(), num_inference_steps=2, output_type="np", return_dict=False)
    assert len(tup) == 2 and tup[0].shape == (1, 32, 32, 3)


def test_deterministic(sd1):
    a = sd1("a red star", erase=["red", "star"], erase_scale=[-1.0, -3.0], generator=gen(3), **KW).images
    b = sd1("a red star", erase=["red", "star"], erase_scale=[-1.0, -3.0], generator=gen(3), **KW).images
    assert np.array_equal(a, b)
    c = sd1("a red star", erase=["red", "star"], erase_scale=[-3.0, -1.0], generator=gen(3), **KW).images
    assert not np.array_equal(a, c)  # per-concept scales matter


# --------------------------------------------------------------------------------------------
# Families and schedulers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("mode", ["single", "dual"])
def test_families_end_to_end(family, mode, request):
    pipe = request.getfixturevalue(family)
    out = pipe("a red star", erase="red", erase_mode=mode, erase_scale=-2.0, return_original=True,
               return_heatmaps=True, generator=gen(), num_inference_steps=2, output_type="np")
    assert out.images.shape == out.original_images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.heatmaps["red"].shape == (1, 32, 32)
    assert np.abs(out.images - out.original_images).max() > 1e-5


def test_sdxl_dual_original_equals_plain(sdxl, sdxl_plain):
    plain = sdxl_plain("a red star", negative_prompt="blue", generator=gen(), num_inference_steps=2, output_type="np").images
    out = sdxl("a red star", negative_prompt="blue", erase="red", erase_mode="dual", return_original=True,
               generator=gen(), num_inference_steps=2, output_type="np")
    assert np.abs(out.original_images - plain).max() < 1e-4
    zero = sdxl("a red star", negative_prompt="blue", erase="red", erase_scale=0.0, generator=gen(), num_inference_steps=2, output_type="np")
    assert np.array_equal(zero.images, plain)


def test_other_scheduler_and_no_cfg(sd1):
    from diffusers import EulerDiscreteScheduler

    pipe = from_pipe(sd1, scheduler=EulerDiscreteScheduler.from_config(sd1.scheduler.config))
    assert isinstance(pipe, EIUPPipeline) and pipe.unet is sd1.unet and pipe.unet.dtype == torch.float32
    for guidance in (1.0, 5.0):
        plain = pipe("a red star", guidance_scale=guidance, generator=gen(), **KW).images
        out = pipe("a red star", guidance_scale=guidance, erase="red", erase_mode="dual", return_original=True, generator=gen(), **KW)
        assert np.abs(out.original_images - plain).max() < 1e-4 and np.abs(out.images - plain).max() > 1e-5


# --------------------------------------------------------------------------------------------
# Processor lifecycle, per-call state and isolation
# --------------------------------------------------------------------------------------------


def test_processors_restored_after_success_and_exception(sd1, sd1_plain):
    before = sd1.unet.attn_processors
    sd1("a red star", erase="red", erase_mode="dual", generator=gen(), num_inference_steps=2, output_type="np")
    after = sd1.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    seen = []

    def boom(pipe, i, t, kw):
        seen.append(type(pipe.unet.attn_processors[cross_layers(pipe)[0]]))
        assert pipe.erase_context is not None and pipe.erase_context.step == i
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        sd1("a red star", erase="red", callback_on_step_end=boom, generator=gen(), **KW)
    assert seen == [EIUPCrossAttnProcessor]
    after = sd1.unet.attn_processors
    assert all(after[k] is before[k] for k in before) and sd1.erase_context is None
    assert np.array_equal(sd1("a red star", generator=gen(), **KW).images, sd1_plain("a red star", generator=gen(), **KW).images)


def test_user_callback_chained_and_scales_changeable(sd1):
    calls = []

    def cb(pipe, i, t, kw):
        calls.append(i)
        if i == 0:
            pipe.erase_context.token_scales = torch.zeros_like(pipe.erase_context.token_scales)
        return kw

    full = sd1("a red star", erase="red", erase_scale=-2.0, generator=gen(), **KW).images
    first_only = sd1("a red star", erase="red", erase_scale=-2.0, callback_on_step_end=cb, generator=gen(), **KW).images
    plain = sd1("a red star", generator=gen(), **KW).images
    assert calls == [0, 1, 2]
    assert np.abs(first_only - full).max() > 1e-5 and np.abs(first_only - plain).max() > 1e-5


def test_concept_kv_computed_once_per_call(sd1):
    counts = {"concept": 0, "total": 0}
    handles = []
    for name in cross_layers(sd1):
        module = sd1.unet.get_submodule(name.removesuffix(".processor")).to_k

        def hook(m, inputs):
            counts["total"] += 1
            counts["concept"] += inputs[0].shape[0] == 1  # prompt rows come in a batch of 2 (CFG)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        sd1("a red star", erase=["red", "star"], generator=gen(), num_inference_steps=4, output_type="np")
    finally:
        for h in handles:
            h.remove()
    n = len(cross_layers(sd1))
    assert counts["concept"] == n and counts["total"] == n + 4 * n


def test_long_prompt_keeps_concept(sd1, sd1_plain):
    long_prompt = " ".join(["a red star on a white background and"] * 15)
    assert len(sd1.tokenizer(long_prompt).input_ids) > 77
    layer = first_cross_attn(sd1)
    cap = Capture(layer)
    sd1_plain(long_prompt, generator=gen(), num_inference_steps=1, output_type="np")
    sd1(long_prompt, erase="red", generator=gen(), num_inference_steps=1, output_type="np")
    plain_out, erased_out = cap.close()
    assert (erased_out[1:] - plain_out[1:]).abs().max() > 1e-4


def test_two_pipelines_do_not_interfere(sd1, sd1_other):
    alone_a = sd1("a red star", erase="red", generator=gen(), **KW).images
    alone_b = sd1_other("a red star", erase="star", erase_mode="dual", generator=gen(1), **KW).images
    shared = from_pipe(sd1)  # same UNet object as sd1
    alone_s = shared("a blue heart", erase="heart", erase_scale=-3.0, generator=gen(2), **KW).images
    nested = {}

    def run_others(pipe, i, t, kw):
        if i == 0:
            nested["b"] = sd1_other("a red star", erase="star", erase_mode="dual", generator=gen(1), **KW).images
            nested["s"] = shared("a blue heart", erase="heart", erase_scale=-3.0, generator=gen(2), **KW).images
        return kw

    a = sd1("a red star", erase="red", callback_on_step_end=run_others, generator=gen(), **KW).images
    assert np.array_equal(a, alone_a)
    assert np.array_equal(nested["b"], alone_b)
    assert np.array_equal(nested["s"], alone_s)


def test_heatmaps_and_recorder(sd1):
    rec = ConceptAttentionRecorder()
    out = sd1(["a red star", "a blue heart"], erase=["red", "star"], return_heatmaps=True, concept_recorder=rec,
              generator=[gen(0), gen(1)], **KW)
    assert set(out.heatmaps) == {"red", "star"}
    for m in out.heatmaps.values():
        assert m.shape == (2, 32, 32) and m.dtype == np.float32 and 0 <= m.min() and m.max() <= 1
    n_layers = len(cross_layers(sd1))
    assert rec.token_features().shape == (2, 2, n_layers) and rec.concept_features().shape == (2, 2, n_layers)
    assert list(rec.records) == [0] and sorted(rec.layers) == sorted(cross_layers(sd1))
    assert [n.split(".")[0] for n in rec.layers] == ["down_blocks"] * 2 + ["mid_block"] + ["up_blocks"] * 4  # call order
    f = rec.token_features()
    assert (f > 0).all() and (f < 1).all()


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


BAD = [
    (dict(erase=""), "erase"),
    (dict(erase=["red", "  "]), r"erase\[1\]"),
    (dict(erase=[3]), r"erase\[0\]"),
    (dict(erase=" ".join(["red"] * 80)), "erase"),
    (dict(erase=[" ".join(["red"] * 40), " ".join(["star"] * 40)]), "erase"),
    (dict(erase="red", erase_scale=float("nan")), "erase_scale"),
    (dict(erase="red", erase_scale=float("inf")), "erase_scale"),
    (dict(erase="red", erase_scale=0.5), "allow_amplify"),
    (dict(erase=["red", "star"], erase_scale=[-1.0]), "erase_scale"),
    (dict(erase="red", erase_mode="triple"), "erase_mode"),
    (dict(erase="red", cross_attn_fraction=1.5), "cross_attn_fraction"),
    (dict(erase="red", self_attn_fraction=-0.1), "self_attn_fraction"),
    (dict(erase="red", self_attn_max_tokens=-1), "self_attn_max_tokens"),
    (dict(erase="red", tail="positive"), "tail"),
    (dict(erase="red", concept_context="sentence"), "concept_context"),
    (dict(erase="red", erase_mode="dual", height=33, width=32), "height"),  # the parent's own checks also run first
]


@pytest.mark.parametrize("kwargs,name", BAD)
def test_validation_before_any_model_work(sd1, kwargs, name):
    with ModelCalls(sd1) as model, pytest.raises(ValueError, match=name):
        sd1("a red star", generator=gen(), **KW, **kwargs)
    assert model.calls == []


def test_amplify_allowed_and_config_object(sd1):
    out = sd1("a red star", erase="red", erase_scale=0.5, allow_amplify=True, generator=gen(), num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all()
    cfg = EraseConfig(erase=["red", "star"], erase_scale=[-1.0, -2.0], erase_mode="dual")
    assert cfg.concepts == ("red", "star") and cfg.scales == (-1.0, -2.0)
    a = sd1("a red star", erase_config=cfg, generator=gen(), num_inference_steps=2, output_type="np").images
    b = sd1("a red star", erase=["red", "star"], erase_scale=[-1.0, -2.0], erase_mode="dual", generator=gen(),
            num_inference_steps=2, output_type="np").images
    assert np.array_equal(a, b)
    assert EraseConfig(erase="x").scales == (eiup.DEFAULT_ERASE_SCALE,)
    assert issubclass(EraseConfigError, ValueError)


def test_unet_without_cross_attention_rejected(sd1):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32,
    )
    pipe = EIUPPipeline(**{**sd1.components, "unet": unet})
    with pytest.raises(ValueError, match="no cross-attention"):
        pipe("a red star", erase="red", num_inference_steps=1, output_type="np")


def test_concept_spans(sd1):
    assert sd1._concept_spans(["red", "star"]) == [[1], [2]]
    assert sd1._concept_spans(["zebra", "red star"]) == [[1, 2, 3, 4, 5], [6, 7]]
    assert sd1._encode_concepts("red star", "cpu", None, None).shape == (1, 77, 32)


# --------------------------------------------------------------------------------------------
# Concepts encoded in the prompt's context (concept_context="prompt")
# --------------------------------------------------------------------------------------------


def erase_context_of(pipe, *args, **kwargs):
    """The EraseContext of one call, taken at its first step."""
    seen = {}

    def cb(p, i, t, kw):
        seen.setdefault("ctx", p.erase_context)
        return kw

    out = pipe(*args, callback_on_step_end=cb, generator=gen(), **KW, **kwargs)
    return seen["ctx"], out.images


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_concept_in_prompt_context_is_the_tail_of_prompt_plus_concept(sd1, mode):
    ctx, images = erase_context_of(sd1, "a red star", erase="red", erase_scale=-2.0, erase_mode=mode,
                                   concept_context="prompt")
    want, _ = sd1.encode_prompt("a red star red", "cpu", 1, False)
    torch.testing.assert_close(ctx.concept_embeds, want)
    ids = sd1.tokenizer("a red star red").input_ids
    assert ctx.spans == [[len(ids) - 2]] and sd1.tokenizer.decode([ids[ctx.spans[0][0]]]).strip() == "red"
    separate = sd1("a red star", erase="red", erase_scale=-2.0, erase_mode=mode, concept_context="separate",
                   generator=gen(), **KW).images
    assert np.isfinite(images).all() and np.abs(images - separate).max() > 1e-4


def test_concept_in_context_of_an_empty_prompt_equals_separate(sd1):
    a = sd1("", erase=["red", "star"], erase_scale=-3.0, concept_context="prompt", generator=gen(), **KW).images
    b = sd1("", erase=["red", "star"], erase_scale=-3.0, concept_context="separate", generator=gen(), **KW).images
    assert np.array_equal(a, b)


def test_concept_in_context_one_row_per_image(sd1):
    ctx, _ = erase_context_of(sd1, ["a red star", "a blue star"], erase="red", erase_scale=-1.0,
                              concept_context="prompt", num_images_per_prompt=2)
    assert ctx.concept_embeds.shape[0] == 4
    rows = [sd1.encode_prompt(t, "cpu", 1, False)[0][0] for t in ("a red star red", "a blue star red")]
    for i, row in enumerate([0, 0, 1, 1]):
        torch.testing.assert_close(ctx.concept_embeds[i], rows[row])


def test_concept_in_context_of_a_long_prompt_is_whole(sd1):
    long_prompt = " ".join(["a red star on a white background and"] * 15)
    ctx, images = erase_context_of(sd1, long_prompt, erase=["red", "star"], erase_scale=-1.0, concept_context="prompt")
    positions = [p for span in ctx.spans for p in span]
    assert max(positions) <= sd1.tokenizer.model_max_length - 2  # EOS still fits after the concepts
    ids = sd1.tokenizer(long_prompt, max_length=77, truncation=True).input_ids
    full = ids[1:positions[0]] + sd1.tokenizer("red star", add_special_tokens=False).input_ids
    want, _ = sd1.encode_prompt(sd1.tokenizer.decode(full), "cpu", 1, False)
    torch.testing.assert_close(ctx.concept_embeds, want)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=["a red star", "a red star on a white background"]), "same number of tokens"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32)), "needs the prompt as text"),
])
def test_concept_in_context_refusals_before_model_work(sd1, kwargs, match):
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match=match):
        sd1(erase="red", concept_context="prompt", generator=gen(), **KW, **kwargs)
    assert model.calls == []


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_concept_in_context_sdxl(sdxl, mode):
    out = sdxl("a red star", erase="red", erase_scale=-2.0, erase_mode=mode, concept_context="prompt",
               generator=gen(), **KW).images
    assert np.isfinite(out).all()
