"""Unit tests of the EIUP attention maths and processors against naive explicit-softmax references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from eiup.attention import (
    ConceptAttentionRecorder,
    EIUPCrossAttnProcessor,
    EIUPSelfAttnProcessor,
    EraseContext,
    _layer_grid,
    concept_attention_probs,
    concept_term,
    concept_term_from_probs,
    merge_heads,
    scale_concept_values,
    split_heads,
    token_scale_vector,
)

T, D_TEXT = 10, 12
SPANS = [[1, 2], [3], [5, 6, 7]]
SCALES = [-1.0, -2.5, 0.7]


def naive_term(q, k_c, v_c, spans, scales, scale=None, per_image=None):
    """w * softmax(q k^T)[:, J_C] v[J_C], summed token by token (eq. 1), in float64."""
    q, k_c, v_c = q.double(), k_c.double(), v_c.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.softmax(q @ k_c.transpose(-1, -2) * scale, dim=-1)  # over all T positions
    out = torch.zeros_like(q)
    for k, (span, w) in enumerate(zip(spans, scales if scales is not None else [None] * len(spans))):
        for j in span:
            wj = w if per_image is None else per_image[:, k].double()[:, None, None, None]
            out = out + wj * probs[..., j : j + 1] * v_c[..., j : j + 1, :]
    return out


@pytest.mark.parametrize("shape", [(1, 1, 4, 8), (2, 4, 16, 8), (3, 2, 64, 16)])
def test_concept_term_matches_naive(shape):
    torch.manual_seed(0)
    b, h, length, d = shape
    q = torch.randn(b, h, length, d)
    k_c, v_c = torch.randn(1, h, T, d), torch.randn(1, h, T, d)
    w = token_scale_vector(SPANS, SCALES, T)
    got = concept_term(q, k_c, scale_concept_values(v_c, w), scale=0.3)
    want = naive_term(q, k_c, v_c, SPANS, SCALES, scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    probs = concept_attention_probs(q, k_c, 0.3)
    torch.testing.assert_close(concept_term_from_probs(probs, scale_concept_values(v_c, w)).double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, length))


def test_concept_term_per_image_scales():
    torch.manual_seed(1)
    q = torch.randn(3, 2, 8, 4)
    k_c, v_c = torch.randn(1, 2, T, 4), torch.randn(1, 2, T, 4)
    per = torch.tensor([[-1.0, 0.0, -3.0], [0.0, 0.0, 0.0], [-0.5, -2.0, 1.0]])
    w = torch.stack([token_scale_vector(SPANS, row.tolist(), T) for row in per])  # (3, T)
    got = concept_term(q, k_c, scale_concept_values(v_c, w))
    torch.testing.assert_close(got.double(), naive_term(q, k_c, v_c, SPANS, None, per_image=per), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_token_scale_vector_and_heads():
    w = token_scale_vector(SPANS, SCALES, T)
    assert torch.equal(w, torch.tensor([0, -1, -1, -2.5, 0, 0.7, 0.7, 0.7, 0, 0]))
    x = torch.randn(2, 5, 12)
    assert torch.equal(merge_heads(split_heads(x, 3)), x)


@pytest.mark.parametrize("length,latent,grid", [(64, (16, 16), (8, 8)), (60, (12, 20), (6, 10)), (64, (15, 15), (8, 8)), (7, (16, 16), None)])
def test_layer_grid(length, latent, grid):
    assert _layer_grid(length, latent) == grid


# ---------------------------------------------------------------------------------------------
# Processors on a real diffusers Attention layer
# ---------------------------------------------------------------------------------------------


def make_ctx(mode="single", cfg=True, scales=SCALES, **kw):
    torch.manual_seed(2)
    args = dict(
        concepts=("a", "b", "c"),
        spans=SPANS,
        concept_embeds=torch.randn(1, T, D_TEXT),
        token_scales=token_scale_vector(SPANS, scales, T),
        mode=mode,
        cfg=cfg,
        cross_attn_fraction=0.5,
        self_attn_fraction=0.5,
        self_attn_max_tokens=16,
        tail="suppress",
        latent_size=(4, 4),
        image_size=(8, 8),
        num_steps=lambda: 4,
    )
    args.update(kw)
    return EraseContext(**args)


def cross_layer(**kw):
    torch.manual_seed(3)
    return Attention(query_dim=16, cross_attention_dim=D_TEXT, heads=2, dim_head=8, **kw).eval()


def expected_delta(attn, ctx, hs_rows, weights=None):
    """Naive reference of the projected concept term for 3-D inputs."""
    q = split_heads(attn.to_q(hs_rows), attn.heads)
    k = split_heads(attn.to_k(ctx.concept_embeds), attn.heads)
    v = split_heads(attn.to_v(ctx.concept_embeds), attn.heads)
    scales = SCALES if weights is None else weights
    term = naive_term(q, k, v, SPANS, scales).float()
    return F.linear(merge_heads(term), attn.to_out[0].weight) / attn.rescale_output_factor


class SubclassedProcessor(AttnProcessor2_0):
    """Same maths as AttnProcessor2_0 but not that exact type: the wrapper must take its delegate path."""


ORIGINALS = [AttnProcessor2_0, SubclassedProcessor]


def wrap(attn, ctx, original):
    proc = EIUPCrossAttnProcessor(original(), "layer", ctx)
    assert proc.fused == (original is AttnProcessor2_0)
    attn.set_processor(proc)


@torch.no_grad()
@pytest.mark.parametrize("original", ORIGINALS)
@pytest.mark.parametrize("cfg", [True, False])
def test_cross_processor_single(cfg, original):
    attn, ctx = cross_layer(), make_ctx(cfg=cfg)
    hs, ehs = torch.randn(4, 16, 16), torch.randn(4, 7, D_TEXT)
    base = AttnProcessor2_0()(attn, hs, ehs)
    wrap(attn, ctx, original)
    out = attn(hs, encoder_hidden_states=ehs)
    cond = slice(2, 4) if cfg else slice(0, 4)
    if cfg:
        assert torch.equal(out[:2], base[:2])  # unconditional rows untouched
    torch.testing.assert_close(out[cond] - base[cond], expected_delta(attn, ctx, hs[cond]), atol=1e-5, rtol=1e-4)
    out2 = attn(hs, encoder_hidden_states=ehs)
    assert torch.equal(out, out2) and ctx.kv_computations == 1  # K/V of E_C cached per call
    ctx.token_scales = torch.zeros(T)  # zero scale: exactly the original processor
    assert torch.equal(attn(hs, encoder_hidden_states=ehs), base)


@torch.no_grad()
@pytest.mark.parametrize("original", ORIGINALS)
def test_cross_processor_dual_windows_and_tail(original):
    attn, ctx = cross_layer(), make_ctx(mode="dual")
    hs, ehs = torch.randn(4, 16, 16), torch.randn(4, 7, D_TEXT)
    ehs[3] = ehs[2]  # both branches share the prompt
    base = AttnProcessor2_0()(attn, hs, ehs)
    wrap(attn, ctx, original)
    # rows: [uncond orig, uncond erased, cond orig, cond erased]
    out = attn(hs, encoder_hidden_states=ehs)  # step 0: inside the cross window
    assert torch.equal(out[:3], base[:3])
    torch.testing.assert_close(out[3:] - base[2:3], expected_delta(attn, ctx, hs[3:]), atol=1e-5, rtol=1e-4)
    ctx.step = 2  # floor(0.5 * 4) = 2: window over, erased rows use their own M_P
    out = attn(hs, encoder_hidden_states=ehs)
    assert torch.equal(out[:3], base[:3])
    torch.testing.assert_close(out[3:] - base[3:], expected_delta(attn, ctx, hs[3:]), atol=1e-5, rtol=1e-4)
    ctx.tail = "reference"  # reference tail: concept tokens with weight +1
    out = attn(hs, encoder_hidden_states=ehs)
    torch.testing.assert_close(out[3:] - base[3:], expected_delta(attn, ctx, hs[3:], [1.0, 1.0, 1.0]), atol=1e-5, rtol=1e-4)


def source_maps_on_own_values(attn, hs_src, text_src, text_own):
    """Reference: softmax(Q_o K_o^T / sqrt(d)) V_e through to_out (plain 3D layer)."""
    q = split_heads(attn.to_q(hs_src), attn.heads)
    k = split_heads(attn.to_k(text_src), attn.heads)
    v = split_heads(attn.to_v(text_own), attn.heads)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    return attn.to_out[0](merge_heads(probs @ v)) / attn.rescale_output_factor


@torch.no_grad()
@pytest.mark.parametrize("original", ORIGINALS)
def test_dual_window_uses_the_originals_maps_on_the_erased_branchs_own_prompt(original):
    """With anchors the erased branch's prompt embeddings differ: its window output is M_P(orig) V(own)."""
    attn, ctx = cross_layer(), make_ctx(mode="dual")
    ctx.own_prompt_values = True
    hs, ehs = torch.randn(4, 16, 16), torch.randn(4, 7, D_TEXT)  # ehs[3] != ehs[2]
    base = AttnProcessor2_0()(attn, hs, ehs)
    wrap(attn, ctx, original)
    out = attn(hs, encoder_hidden_states=ehs)  # step 0: inside the cross window
    assert torch.equal(out[:3], base[:3])
    want = source_maps_on_own_values(attn, hs[2:3], ehs[2:3], ehs[3:]) + expected_delta(attn, ctx, hs[3:])
    torch.testing.assert_close(out[3:], want, atol=1e-5, rtol=1e-4)
    ehs[3] = ehs[2]  # same prompt in both branches: exactly the plain swap
    ctx.own_prompt_values = False
    plain_swap = attn(hs, encoder_hidden_states=ehs)
    ctx.own_prompt_values = True
    torch.testing.assert_close(attn(hs, encoder_hidden_states=ehs), plain_swap, atol=1e-6, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("original", ORIGINALS)
@pytest.mark.parametrize("mode", ["single", "dual"])
def test_cross_processor_residual_4d(mode, original):
    torch.manual_seed(4)
    attn = Attention(
        query_dim=8, cross_attention_dim=D_TEXT, heads=2, dim_head=4, norm_num_groups=2,
        residual_connection=True, rescale_output_factor=2.0,
    ).eval()
    ctx = make_ctx(mode=mode)
    hs, ehs = torch.randn(4, 8, 4, 4), torch.randn(4, 7, D_TEXT)
    ehs[3] = ehs[2]
    base = AttnProcessor2_0()(attn, hs, ehs)
    wrap(attn, ctx, original)
    out = attn(hs, encoder_hidden_states=ehs)
    x = attn.group_norm(hs[3:].flatten(2)).transpose(1, 2)
    delta = expected_delta(attn, ctx, x).transpose(1, 2).reshape(1, 8, 4, 4)
    if mode == "dual":  # base of the original branch, with the erased rows' own residual
        want = base[2:3] + (hs[3:] - hs[2:3]) / 2.0 + delta
    else:
        want = base[3:] + delta
    torch.testing.assert_close(out[3:], want, atol=1e-5, rtol=1e-4)
    assert torch.equal(out[:2], base[:2])
    if mode == "dual":  # same prompts: the own-values swap is the plain swap, residual and 4D layout included
        ctx.own_prompt_values = True
        torch.testing.assert_close(attn(hs, encoder_hidden_states=ehs), out, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_self_processor_swaps_maps_in_window_only():
    torch.manual_seed(5)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    ctx = make_ctx(mode="dual")
    hs = torch.randn(4, 16, 16)
    base = AttnProcessor2_0()(attn, hs)
    attn.set_processor(EIUPSelfAttnProcessor(AttnProcessor2_0(), "self", ctx))
    out = attn(hs)
    q, k = (split_heads(f(hs[2:3]), 2) for f in (attn.to_q, attn.to_k))
    v = split_heads(attn.to_v(hs[3:]), 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)  # original branch's maps
    want = attn.to_out[0](merge_heads(probs @ v))
    assert torch.equal(out[:3], base[:3])
    torch.testing.assert_close(out[3:], want, atol=1e-5, rtol=1e-4)
    big = torch.randn(4, 25, 16)  # more tokens than self_attn_max_tokens: untouched
    assert torch.equal(attn(big), AttnProcessor2_0()(attn, big))
    ctx.step = 2  # window over
    assert torch.equal(attn(hs), base)


@torch.no_grad()
def test_processor_forwards_exactly_the_kwargs_the_original_accepts():
    seen = {}

    class Custom:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, foo=None):
            seen["foo"] = foo
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)

    attn, ctx = cross_layer(), make_ctx()
    attn.set_processor(EIUPCrossAttnProcessor(Custom(), "layer", ctx))
    attn(torch.randn(2, 4, 16), encoder_hidden_states=torch.randn(2, 7, D_TEXT), foo=3, bar=4)
    assert seen == {"foo": 3}


@torch.no_grad()
def test_recorder_and_heatmaps():
    rec = ConceptAttentionRecorder()
    attn, ctx = cross_layer(), make_ctx(recorder=rec, return_heatmaps=True)
    hs, ehs = torch.randn(4, 16, 16), torch.randn(4, 7, D_TEXT)
    attn.set_processor(EIUPCrossAttnProcessor(AttnProcessor2_0(), "layer", ctx))
    out = attn(hs, encoder_hidden_states=ehs)
    q = split_heads(attn.to_q(hs[2:]), 2)
    probs = torch.softmax(q @ split_heads(attn.to_k(ctx.concept_embeds), 2).transpose(-1, -2) / 8**0.5, -1)
    positions = [1, 2, 3, 5, 6, 7]
    torch.testing.assert_close(rec.token_features(0)[..., 0], probs[..., positions].mean(dim=(1, 2)))
    assert rec.token_features().shape == (2, 6, 1) and rec.concept_features().shape == (2, 3, 1)
    ctx.step = 1
    attn(hs, encoder_hidden_states=ehs)
    assert list(rec.records) == [0]  # step 0 only
    maps = ctx.heatmaps()
    assert list(maps) == ["a", "b", "c"]
    for m in maps.values():
        assert m.shape == (2, 8, 8) and m.min() >= 0 and m.max() <= 1 and abs(m.max() - 1) < 1e-6
    # the explicit-softmax path gives the same term as the fused one
    torch.testing.assert_close(out[2:] - AttnProcessor2_0()(attn, hs, ehs)[2:], expected_delta(attn, ctx, hs[2:]), atol=1e-5, rtol=1e-4)


def test_rows_layout_and_bad_batch():
    assert make_ctx(mode="single", cfg=True).rows(6) == (None, slice(3, 6))
    assert make_ctx(mode="single", cfg=False).rows(3) == (None, slice(0, 3))
    assert make_ctx(mode="dual", cfg=True).rows(8) == (slice(4, 6), slice(6, 8))
    assert make_ctx(mode="dual", cfg=False).rows(4) == (slice(0, 2), slice(2, 4))
    with pytest.raises(RuntimeError, match="cannot hold"):
        make_ctx(mode="dual").rows(6)
