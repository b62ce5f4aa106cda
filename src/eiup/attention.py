"""Attention maths and attention processors of the EIUP erasure.

Notation follows ``shared/design/eiup-mechanism.md``: for one cross-attention layer with image
queries Q, prompt embeddings E_P and concept embeddings E_C (the concepts encoded on their own,
padded to the encoder length T, concept tokens at positions J_C)::

    out = M_P V(E_P) + w * M*_C V(E_C)[J_C],   M*_C = softmax(Q K(E_C)^T / sqrt(d))[:, J_C]   (eq. 1)

The concept term equals attention over *all* of E_C with the value rows outside J_C set to zero
and the rows inside multiplied by their per-token weight w_j (eq. 2), so it runs as one fused
``F.scaled_dot_product_attention`` call; the attention matrix is only materialised when
heatmaps or recorder features are requested.

The processors wrap the user's original processor of each layer: the base attention is
delegated unchanged and the concept term is added afterwards through the (affine) output
projection, so a zero scale reproduces the user's pipeline exactly. When the original is
diffusers' ``AttnProcessor2_0`` the cross-attention wrapper instead runs the same operations
itself and adds the term before the output projection, sharing the query (no second ``to_q`` /
``to_out`` for the erased rows). All per-call state lives in
an :class:`EraseContext` created by the pipeline for one ``__call__``; there is no global state.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

__all__ = [
    "ConceptAttentionRecorder",
    "EIUPCrossAttnProcessor",
    "EIUPSelfAttnProcessor",
    "EraseContext",
    "RegionGate",
    "build_processors",
    "carrier_mass",
    "concept_attention_probs",
    "concept_mass",
    "concept_term",
    "concept_term_from_probs",
    "merge_heads",
    "region_blend",
    "region_share",
    "region_weights",
    "scale_concept_values",
    "split_heads",
    "swapped_self_attention",
    "token_scale_vector",
    "unwrap_processor",
]


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Reshape (B, L, heads*d) to (B, heads, L, d), the layout of Q, K, V in eq. 1."""
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Reshape (B, heads, L, d) back to (B, L, heads*d) (inverse of :func:`split_heads`)."""
    b, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, heads * d)


def token_scale_vector(
    spans: Sequence[Sequence[int]],
    scales: Sequence[float],
    length: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-token weights w_j of eq. 2: ``scales[k]`` on the positions of concept k, 0 elsewhere."""
    w = torch.zeros(length, dtype=dtype, device=device)
    for span, scale in zip(spans, scales, strict=True):
        w[list(span)] = float(scale)
    return w


def scale_concept_values(v_c: torch.Tensor, token_scales: torch.Tensor) -> torch.Tensor:
    """Value rows of E_C times w_j (eq. 2): v_c (1|B, h, T, d), scales (T,) or (B, T)."""
    w = token_scales.to(device=v_c.device, dtype=v_c.dtype)
    if w.dim() == 1:
        return v_c * w[None, None, :, None]
    return v_c * w[:, None, :, None]


def _expand_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[0] == n else x.expand(n, *x.shape[1:])


def concept_term(
    q: torch.Tensor, k_c: torch.Tensor, v_c_scaled: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Concept term w * M*_C V(E_C)[J_C] of eq. 1 as one fused SDPA over all T concept keys (eq. 2).

    Args:
        q: Image queries, (B, heads, L, d).
        k_c: Concept keys K(E_C), (1 or B, heads, T, d).
        v_c_scaled: Concept values already scaled by :func:`scale_concept_values` (zero outside
            J_C), (1 or B, heads, T, d).
        scale: Softmax temperature; ``None`` means 1/sqrt(d).

    Returns:
        The term, (B, heads, L, d).
    """
    n = max(q.shape[0], v_c_scaled.shape[0])
    q = _expand_batch(q, n)
    k = _expand_batch(k_c, n)
    v = _expand_batch(v_c_scaled, n)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def concept_attention_probs(q: torch.Tensor, k_c: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Explicit M_C = softmax(Q K(E_C)^T * scale) of eq. 1, (B, heads, L, T); used only for heatmaps."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.matmul(q, _expand_batch(k_c, q.shape[0]).transpose(-1, -2)) * scale
    return logits.float().softmax(dim=-1).to(q.dtype)


def concept_term_from_probs(probs: torch.Tensor, v_c_scaled: torch.Tensor) -> torch.Tensor:
    """Concept term of eq. 1 from an explicit M_C: M_C @ (w * V(E_C)), (B, heads, L, d)."""
    return torch.matmul(probs, _expand_batch(v_c_scaled, probs.shape[0]))


def concept_mass(probs: torch.Tensor, spans: Sequence[Sequence[int]]) -> torch.Tensor:
    """Attention mass of each concept, sum over its tokens of M*_C, mean over heads: (B, L, K)."""
    return torch.stack([probs[..., list(span)].sum(-1).mean(1) for span in spans], dim=-1)


def carrier_mass(probs: torch.Tensor, carriers: torch.Tensor) -> torch.Tensor:
    """Attention mass on the carrier tokens, mean over heads: (B, L) from M (B, heads, L, T) and carriers (B, T)."""
    return (probs.float().mean(1) * carriers[:, None, :].float()).sum(-1)


def ramp(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """clamp((x - low) / (high - low), 0, 1): 0 up to low, 1 from high, linear in between."""
    return ((x - low) / (high - low)).clamp(0, 1)


def region_weights(region_map: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per-pixel weight of the edited output: ramp(m / max m, low, high) per image, (B, ...)."""
    flat = region_map.flatten(1)
    return ramp(flat / flat.amax(1, keepdim=True).clamp_min(1e-12), low, high).view_as(region_map)


def region_share(concept_map: torch.Tensor, other_map: torch.Tensor) -> torch.Tensor:
    """c / (c + o) per pixel: the concept's share of the attention the named words get (1 where both are 0)."""
    total = concept_map + other_map
    return torch.where(total > 0, concept_map / total.clamp_min(1e-12), torch.ones_like(total))


def region_blend(original: torch.Tensor, edited: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """original + g * (edited - original) per pixel: the edit where g = 1, the original layer output where g = 0."""
    return original + weights.to(original.dtype) * (edited - original)


def swapped_self_attention(
    q_src: torch.Tensor, k_src: torch.Tensor, v_dst: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Self-attention with the source branch's maps on the target's values: SDPA(Q_o, K_o, V_e)."""
    return F.scaled_dot_product_attention(q_src, k_src, v_dst, scale=scale)


# --------------------------------------------------------------------------------------------
# Per-call state
# --------------------------------------------------------------------------------------------


class ConceptAttentionRecorder:
    """Records, at chosen denoising steps, each concept token's mean attention per cross-attention layer.

    At step 0 this is GIE's scale-predictor input: one float per cross-attention layer (16 for
    SD 1.x) for every concept token, mean over heads and pixels of M*_C. Pass an instance as
    ``concept_recorder=`` to the pipeline; it is reset at the start of each call.

    Attributes:
        steps: Steps at which to record.
        records: ``{step: {layer_name: tensor (images, concept_tokens)}}`` in layer call order.
        concepts: The concepts of the last call.
        token_concept: For every recorded concept token, the index of its concept.
    """

    def __init__(self, steps: Sequence[int] = (0,)):
        self.steps = tuple(int(s) for s in steps)
        self.records: dict[int, dict[str, torch.Tensor]] = {}
        self.concepts: tuple[str, ...] = ()
        self.token_concept: list[int] = []

    def reset(self, concepts: Sequence[str], spans: Sequence[Sequence[int]]) -> None:
        """Forget previous records and remember the concepts of the new call."""
        self.records = {}
        self.concepts = tuple(concepts)
        self.token_concept = [k for k, span in enumerate(spans) for _ in span]

    def add(self, step: int, layer: str, token_means: torch.Tensor) -> None:
        """Store one layer's (images, concept_tokens) means for ``step``."""
        self.records.setdefault(step, {})[layer] = token_means.detach().float().cpu()

    @property
    def layers(self) -> list[str]:
        """Names of the recorded layers at the first recorded step, in call order."""
        return list(next(iter(self.records.values()), {}).keys())

    def token_features(self, step: int = 0) -> torch.Tensor:
        """Features per concept token: (images, concept_tokens, layers)."""
        if step not in self.records:
            raise KeyError(f"no record for step {step}; recorded steps: {sorted(self.records)}")
        return torch.stack(list(self.records[step].values()), dim=-1)

    def concept_features(self, step: int = 0) -> torch.Tensor:
        """Features per concept, mean over its tokens: (images, concepts, layers)."""
        tok = self.token_features(step)
        owner = torch.tensor(self.token_concept)
        return torch.stack([tok[:, owner == k].mean(1) for k in range(len(self.concepts))], dim=1)


class RegionGate:
    """Where the anchored projection acts (``anchor_region``): the erased rows' prompt embeddings as given,
    and per row the token positions whose cross-attention map marks the concept's region (the word that
    names or implies the concept, or its phrase; a row without any is not gated).

    Each cross-attention layer computes its output for these embeddings too and keeps the output for the
    projected prompt only where the carriers' attention says so, averaged over the layers of the steps
    before (:meth:`region_map`; at the first step, the layer's own map): a single layer's map of one step is
    too noisy to tell an object from its neighbour. Two rules, per row:

    * the map rule: :func:`region_weights` of the carriers' map relative to the image's maximum;
    * the phrase rule (rows of ``by_phrase``): the carriers' share of the attention they and the
      ``rivals`` (the prompt's other phrases) get (:func:`region_share`), ramped between
      ``phrase_thresholds``: a pixel belongs to the concept unless another phrase claims it, so a row
      without rivals is not confined at all.

    K and V of the embeddings are computed once per layer and call.

    Args:
        embeds: (rows, T, D) prompt embeddings before the projection, one row per erased image.
        carriers: (rows, T) 1 at the carrier tokens, 0 elsewhere.
        low: Map rule: relative attention (to the image's maximum) up to which a pixel keeps the original output.
        high: Map rule: relative attention from which a pixel takes the edited output; linear in between.
        rivals: (rows, T) 1 at the tokens that compete with the carriers (phrase rule), or None.
        by_phrase: (rows,) which rows follow the phrase rule (default: none).
        phrase_thresholds: (low, high) share of the phrase rule.
    """

    def __init__(self, embeds: torch.Tensor, carriers: torch.Tensor, low: float, high: float,
                 rivals: torch.Tensor | None = None, by_phrase: torch.Tensor | None = None,
                 phrase_thresholds: tuple[float, float] = (0.25, 0.5)):
        if embeds.shape[:2] != carriers.shape or (rivals is not None and rivals.shape != carriers.shape):
            raise ValueError(f"embeds {tuple(embeds.shape)}, carriers {tuple(carriers.shape)} and rivals "
                             f"{None if rivals is None else tuple(rivals.shape)} disagree")
        for lo, hi in ((low, high), phrase_thresholds):
            if not 0 <= lo < hi <= 1:
                raise ValueError(f"region thresholds low={lo}, high={hi}: need 0 <= low < high <= 1")
        self.embeds = embeds
        self.carriers = carriers
        self.low, self.high = low, high
        self.by_phrase = None if rivals is None or by_phrase is None or not bool(by_phrase.any()) else by_phrase
        self.rivals = rivals if self.by_phrase is not None else None
        self.phrase_thresholds = phrase_thresholds
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._past: torch.Tensor | None = None  # sum of the layer maps of finished steps, (rows, maps, h, w)
        self._current: torch.Tensor | None = None  # the same for the step in progress
        self._step = 0

    def weights(self, step: int, probs: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Per-pixel weight (rows, L) of the projected prompt's output from one layer's maps (rows, heads, L, T)."""
        carriers = self.carriers.to(probs.device)
        masses = [carrier_mass(probs, carriers)]
        if self.rivals is not None:
            masses.append(carrier_mass(probs, self.rivals.to(probs.device)))
        maps = self.region_map(step, torch.stack(masses, 1), latent_size)
        weights = region_weights(maps[:, 0], self.low, self.high)
        if self.rivals is not None:
            by_share = ramp(region_share(maps[:, 0], maps[:, 1]), *self.phrase_thresholds)
            weights = torch.where(self.by_phrase.to(probs.device)[:, None], by_share, weights)
        return torch.where(carriers.any(-1, keepdim=True), weights, 1.0)

    def region_map(self, step: int, layer_mass: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Record one layer's maps (rows, maps, L) at ``step`` and return the maps that gate it, (rows, maps, L):
        the mean maps of the finished steps, or the layer's own at the first step, at the layer's resolution."""
        grid = _layer_grid(layer_mass.shape[-1], latent_size)
        if grid is None:  # a layer whose grid cannot be placed: its own map
            return layer_mass
        own = layer_mass.view(*layer_mass.shape[:2], *grid)
        full = F.interpolate(own, size=latent_size, mode="bilinear", align_corners=False)
        if step != self._step:
            self._past = self._current if self._past is None else self._past + self._current
            self._current, self._step = None, step
        self._current = full if self._current is None else self._current + full
        if self._past is None:
            return layer_mass
        return F.adaptive_avg_pool2d(self._past, grid).flatten(2)

    def original_kv(self, name: str, attn: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V (rows, heads, T, d) of :attr:`embeds` in layer ``name``."""
        if name not in self.kv:
            e = self.embeds.to(device=like.device, dtype=like.dtype)
            if getattr(attn, "norm_cross", None):
                e = attn.norm_encoder_hidden_states(e)
            k = split_heads(attn.to_k(e), attn.heads)
            if getattr(attn, "norm_k", None) is not None:
                k = attn.norm_k(k)
            self.kv[name] = (k, split_heads(attn.to_v(e), attn.heads))
        return self.kv[name]


class EraseContext:
    """State of one erasing pipeline call, shared by that call's processors.

    The pipeline advances :attr:`step` from ``callback_on_step_end``; a user callback may change
    :attr:`token_scales` between steps (shape (T,) or (images, T)). The context is reachable as
    ``pipe.erase_context`` during the call.

    Args:
        concepts: Concept strings.
        spans: Token positions of each concept in :attr:`concept_embeds`.
        concept_embeds: E_C, (1, T, D) as produced by the pipeline's ``encode_prompt``.
        token_scales: Per-token weights w_j, (T,) or (images, T).
        mode: ``"single"`` or ``"dual"``.
        cfg: Whether the batch holds unconditional rows first (classifier-free guidance).
        cross_attn_fraction: Dual mode: fraction of steps using the original branch's M_P.
        self_attn_fraction: Dual mode: fraction of steps using the original self-attention maps.
        self_attn_max_tokens: Dual mode: largest self-attention layer (in tokens) that is swapped.
        tail: Dual mode, after the cross window: ``"suppress"`` or ``"reference"``.
        latent_size: (h, w) of the latents.
        image_size: (H, W) of the images, for heatmaps.
        num_steps: Callable returning the number of denoising steps (read at the first layer call).
        return_heatmaps: Accumulate per-concept attention heatmaps.
        recorder: Optional :class:`ConceptAttentionRecorder`.
    """

    def __init__(
        self,
        *,
        concepts: Sequence[str],
        spans: Sequence[Sequence[int]],
        concept_embeds: torch.Tensor,
        token_scales: torch.Tensor,
        mode: str,
        cfg: bool,
        cross_attn_fraction: float,
        self_attn_fraction: float,
        self_attn_max_tokens: int,
        tail: str,
        latent_size: tuple[int, int],
        image_size: tuple[int, int],
        num_steps: Any,
        return_heatmaps: bool = False,
        recorder: ConceptAttentionRecorder | None = None,
        gate: str | None = None,
        gate_threshold: float = 0.4,
        own_prompt_values: bool = False,
    ):
        self.concepts = tuple(concepts)
        self.spans = [list(s) for s in spans]
        self.concept_embeds = concept_embeds
        self.token_scales = token_scales
        self.mode = mode
        self.cfg = cfg
        self.cross_attn_fraction = cross_attn_fraction
        self.self_attn_fraction = self_attn_fraction
        self.self_attn_max_tokens = self_attn_max_tokens
        self.tail = tail
        self.latent_size = latent_size
        self.image_size = image_size
        self._num_steps_fn = num_steps
        self._num_steps: int | None = None
        self.return_heatmaps = return_heatmaps
        self.recorder = recorder
        self.gate = gate
        self.gate_threshold = gate_threshold
        # dual cross window when the erased branch's prompt embeddings differ from the original's
        # (anchored projection): the original's maps M_P on the erased branch's own V(E_P)
        self.own_prompt_values = own_prompt_values
        self.predicted_scales: dict[str, np.ndarray] | None = None
        self.region: RegionGate | None = None  # set by the pipeline for anchor_region
        self.step = 0
        self.kv_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.kv_computations = 0
        self._heat_sum: torch.Tensor | None = None
        self._heat_count = 0
        self._positions = sorted(p for s in self.spans for p in s)
        self._weights_key: tuple | None = None
        self._weights_src: torch.Tensor | None = None
        self._weights: tuple[torch.Tensor, bool] | None = None
        self._v_scaled: dict[str, torch.Tensor] = {}
        if recorder is not None:
            recorder.reset(self.concepts, self.spans)

    # ---- schedule --------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Number of denoising steps of the call (read once from the pipeline)."""
        if self._num_steps is None:
            self._num_steps = int(self._num_steps_fn())
        return self._num_steps

    @property
    def dual(self) -> bool:
        """Whether the batch holds an original and an erased branch."""
        return self.mode == "dual"

    @property
    def cross_swap_active(self) -> bool:
        """Dual mode, first ``floor(cross_attn_fraction * steps)`` steps: erased rows use M_P of the original."""
        return self.dual and self.step < int(self.cross_attn_fraction * self.num_steps + 1e-9)

    @property
    def self_swap_active(self) -> bool:
        """Dual mode, first ``floor(self_attn_fraction * steps)`` steps: original self-attention maps."""
        return self.dual and self.step < int(self.self_attn_fraction * self.num_steps + 1e-9)

    def effective_token_scales(self) -> tuple[torch.Tensor, bool]:
        """Weights used at this step and whether any is nonzero.

        The weights are :attr:`token_scales`, or +1 on J_C in the dual-mode reference tail.
        Cached until :attr:`token_scales` is replaced or edited in place (its version counter)
        or the reference tail starts, so the nonzero test syncs the device only when the weights
        change, not once per layer; the scaled concept values of every layer
        (:meth:`scaled_concept_kv`) are cached with them.
        """
        reference_tail = self.dual and self.tail == "reference" and not self.cross_swap_active
        scales = self.token_scales
        key = (reference_tail, scales._version)
        if self._weights_key != key or self._weights_src is not scales:
            if reference_tail:
                w = torch.zeros(self.concept_embeds.shape[1], dtype=torch.float32, device=scales.device)
                w[self._positions] = 1.0
            else:
                w = scales
            self._weights = (w, bool(torch.any(w != 0)))
            self._weights_key = key
            self._weights_src = scales  # held, so a new tensor can never reuse the id of the old one
            self._v_scaled = {}
        return self._weights

    def scaled_concept_kv(self, name: str, attn: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K(E_C) and w * V(E_C) (eq. 2) of layer ``name`` for the current :meth:`effective_token_scales`.

        Cached; only K and w * V are kept: V is dropped once scaled and, if the weights change,
        recomputed alone by :meth:`concept_kv`.
        """
        w = self.effective_token_scales()[0]  # first: a change of the weights empties the cache
        v_scaled = self._v_scaled.get(name)
        if v_scaled is None:
            k, v = self.concept_kv(name, attn, like)
            v_scaled = self._v_scaled[name] = scale_concept_values(v, w)
            self.kv_cache[name] = (k, None)
        return self.kv_cache[name][0], v_scaled

    def rows(self, n: int) -> tuple[slice | None, slice]:
        """(source, target) row slices of a batch of ``n``: original cond rows, erased cond rows.

        Layout (diffusers): ``[uncond..., cond...]`` with CFG; in dual mode each half is
        ``[original..., erased...]``. ``source`` is ``None`` in single mode.
        """
        parts = (2 if self.cfg else 1) * (2 if self.dual else 1)
        if n % parts:
            raise RuntimeError(f"EIUP: batch of {n} rows cannot hold {parts} equal blocks (mode={self.mode}, cfg={self.cfg})")
        m = n // parts
        target = slice(n - m, n)
        source = slice(n - 2 * m, n - m) if self.dual else None
        return source, target

    # ---- concept keys / values -------------------------------------------------------------
    def concept_kv(self, name: str, attn: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K(E_C), V(E_C) of layer ``name`` as (1, heads, T, d), computed once per call.

        V alone is recomputed if :meth:`scaled_concept_kv` has dropped it.
        """
        k, v = self.kv_cache.get(name, (None, None))
        if v is None:
            e = self.concept_embeds.to(device=like.device, dtype=like.dtype)
            if getattr(attn, "norm_cross", None):
                e = attn.norm_encoder_hidden_states(e)
            if k is None:
                k = split_heads(attn.to_k(e), attn.heads)
                if getattr(attn, "norm_k", None) is not None:
                    k = attn.norm_k(k)
                self.kv_computations += 1
            v = split_heads(attn.to_v(e), attn.heads)
            self.kv_cache[name] = (k, v)
        return k, v

    def release_caches(self) -> None:
        """Free the concept K/V caches (called after the last denoising step; they are rebuilt if needed)."""
        self.kv_cache.clear()
        self._v_scaled.clear()
        if self.region is not None:
            self.region.kv.clear()

    # ---- observation (heatmaps, recorder) --------------------------------------------------
    @property
    def wants_probs(self) -> bool:
        """Whether this step needs the explicit concept attention matrix."""
        return self.gate is not None or self.return_heatmaps or (
            self.recorder is not None and self.step in self.recorder.steps)

    def observe(self, name: str, probs: torch.Tensor) -> None:
        """Accumulate heatmaps / recorder features from one layer's M_C (B, heads, L, T)."""
        if self.recorder is not None and self.step in self.recorder.steps:
            self.recorder.add(self.step, name, probs[..., self._positions].float().mean(dim=(1, 2)))
        if not self.return_heatmaps:
            return
        grid = _layer_grid(probs.shape[2], self.latent_size)
        if grid is None:
            return
        mass = concept_mass(probs.float(), self.spans)  # (B, L, K)
        maps = mass.transpose(1, 2).reshape(mass.shape[0], -1, *grid)
        maps = F.interpolate(maps, size=self.latent_size, mode="bilinear", align_corners=False)
        self._heat_sum = maps if self._heat_sum is None else self._heat_sum + maps
        self._heat_count += 1

    def heatmaps(self) -> dict[str, np.ndarray]:
        """Per-concept heatmaps (images, H, W) in [0, 1]: mean over heads, layers and steps, min-max scaled."""
        if self._heat_sum is None:
            return {}
        maps = self._heat_sum / self._heat_count
        maps = F.interpolate(maps, size=self.image_size, mode="bilinear", align_corners=False)
        lo = maps.amin(dim=(-1, -2), keepdim=True)
        hi = maps.amax(dim=(-1, -2), keepdim=True)
        maps = ((maps - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1).cpu().numpy().astype(np.float32)
        return {c: maps[:, k] for k, c in enumerate(self.concepts)}


def _layer_grid(length: int, latent_size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of a layer with ``length`` tokens in a UNet whose latents are ``latent_size``."""
    h0, w0 = latent_size
    for k in range(8):
        f = 2**k
        for h, w in (((h0 + f - 1) // f, (w0 + f - 1) // f), (h0 // f, w0 // f)):
            if h * w == length:
                return h, w
    return None


# --------------------------------------------------------------------------------------------
# Processors
# --------------------------------------------------------------------------------------------


def _tokens(attn: nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """Pre-attention normalisation and flattening as in diffusers' ``AttnProcessor2_0``: (B, L, C)."""
    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def _like_output(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Reshape (B, L, C) to the layout of the layer's output (3-D or 4-D)."""
    if reference.ndim == 4:
        b = x.shape[0]
        return x.transpose(-1, -2).reshape(b, *reference.shape[1:])
    return x


def _project_delta(attn: nn.Module, term: torch.Tensor) -> torch.Tensor:
    """Output-projected contribution of an attention-output increment: W_out term / rescale."""
    proj = attn.to_out[0]
    if type(proj) is nn.Linear:
        out = F.linear(term, proj.weight)
    else:  # LoRA / quantised wrappers: any affine map f gives f(x) - f(0) = W x
        out = proj(term) - proj(torch.zeros_like(term[:1, :1]))
    return out / attn.rescale_output_factor


def _index(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if x is None else x[rows]


def unwrap_processor(processor: Any) -> Any:
    """The user's processor underneath any EIUP wrappers."""
    while isinstance(processor, _EIUPProcessor):
        processor = processor.original
    return processor


class _EIUPProcessor:
    """Base wrapper: delegates to the user's original processor and mirrors its call signature."""

    def __init__(self, original: Any, name: str, context: EraseContext):
        self.original = unwrap_processor(original)
        self.name = name
        self.context = context
        # `Attention.forward` forwards only the cross_attention_kwargs that the processor's
        # signature names; expose the original's signature so the same kwargs reach it.
        try:
            signature = inspect.signature(self.original.__call__)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            this = weakref.ref(self)  # a strong reference would make a cycle that keeps the context
            # (and its concept K/V cache) alive after the call until the cyclic GC runs

            def __call__(*args: Any, **kwargs: Any) -> torch.Tensor:
                return this()._call(*args, **kwargs)

            __call__.__signature__ = signature  # type: ignore[attr-defined]
            self.__call__ = __call__  # instance attribute, read by inspect only

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        raise NotImplementedError

    def _base(self, attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs):
        return self.original(
            attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, original={type(self.original).__name__})"


class EIUPCrossAttnProcessor(_EIUPProcessor):
    """Cross-attention layer: base output of the original processor plus the EIUP concept term.

    Erased conditional rows get ``W_out * concept_term / rescale`` added; in dual mode during the
    cross window their base output is first replaced by the original branch's (same prompt, so
    M_P V(E_P) of the original queries).

    When the original processor is diffusers' ``AttnProcessor2_0`` (the default with torch 2) and
    a term or map is needed, the base attention is computed here with the same operations
    (:meth:`_fused_call`): the concept term shares the query projection and is added before the
    output projection, and in the dual cross window the erased rows' own prompt attention is
    skipped. Any other processor is delegated to. When neither a term nor a map is needed
    (zero scale, no heatmaps) the original processor runs unchanged, bit for bit.
    """

    def __init__(self, original: Any, name: str, context: EraseContext):
        super().__init__(original, name, context)
        self.fused = type(self.original) is AttnProcessor2_0

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self._erased_call(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if self.context.region is None or encoder_hidden_states is None:
            return out
        return self._confine_to_region(attn, hidden_states, out, attention_mask, kwargs.get("temb"))

    def _confine_to_region(self, attn, hidden_states, out: torch.Tensor, attention_mask: torch.Tensor | None,
                           temb: torch.Tensor | None) -> torch.Tensor:
        """The erased rows' output kept only in the concept's region; elsewhere the output for the prompt as given."""
        region = self.context.region
        _, target = self.context.rows(hidden_states.shape[0])
        x = _tokens(attn, hidden_states[target], _index(temb, target))
        q = split_heads(attn.to_q(x), attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        k, v = region.original_kv(self.name, attn, q)
        logits = torch.matmul(q, k.transpose(-1, -2)).mul(attn.scale)
        if attention_mask is not None:  # as the layer's processor applies it
            b = hidden_states.shape[0]
            mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b).view(b, attn.heads, -1, k.shape[2])
            logits = logits + mask[target]
        probs = logits.float().softmax(-1).to(q.dtype)
        original = attn.to_out[1](attn.to_out[0](merge_heads(torch.matmul(probs, v)).to(q.dtype)))
        original = _like_output(original, out)
        if getattr(attn, "residual_connection", False):
            original = original + hidden_states[target]
        original = (original / attn.rescale_output_factor).to(out.dtype)
        weights = region.weights(self.context.step, probs, self.context.latent_size)
        weights = weights[..., None] if out.ndim == 3 else weights.view(weights.shape[0], 1, *out.shape[2:])
        return torch.cat([out[: target.start], region_blend(original, out[target], weights)], dim=0)

    def _erased_call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is None:
            return self._base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        ctx = self.context
        _, need_term = ctx.effective_token_scales()
        need_probs = ctx.wants_probs
        swap = ctx.dual and ctx.cross_swap_active
        if (need_term or need_probs) and self.fused and kwargs.keys() <= {"temb"} and torch.is_tensor(encoder_hidden_states):
            return self._fused_call(attn, hidden_states, encoder_hidden_states, attention_mask, kwargs.get("temb"), swap, need_term)
        out = self._base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        source, target = ctx.rows(hidden_states.shape[0])
        if swap and ctx.own_prompt_values:
            replaced = self._source_maps_own_values(attn, hidden_states, encoder_hidden_states, kwargs.get("temb"), source, target)
            out = torch.cat([out[: target.start], replaced.to(out.dtype)], dim=0)
        elif swap:
            replaced = out[source]
            if getattr(attn, "residual_connection", False):
                replaced = replaced + (hidden_states[target] - hidden_states[source]) / attn.rescale_output_factor
            out = torch.cat([out[: target.start], replaced], dim=0)
        if not (need_term or need_probs):
            return out
        x = _tokens(attn, hidden_states[target], _index(kwargs.get("temb"), target))
        q = split_heads(attn.to_q(x), attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states  # IP-Adapter
        term = self._concept_term(attn, q, text, need_term)
        if term is None:
            return out
        delta = _like_output(_project_delta(attn, merge_heads(term)), out).to(out.dtype)
        return torch.cat([out[: target.start], out[target] + delta], dim=0)

    def _source_maps_own_values(self, attn, hidden_states, encoder_hidden_states, temb, source, target) -> torch.Tensor:
        """Delegate path, dual cross window with ``own_prompt_values``: softmax(Q_o K_o^T) V_e, projected out."""
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        text = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
        x = _tokens(attn, hidden_states[source], _index(temb, source))
        q = split_heads(attn.to_q(x), attn.heads)
        k = split_heads(attn.to_k(text[source]), attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        o = F.scaled_dot_product_attention(q, k, split_heads(attn.to_v(text[target]), attn.heads), scale=attn.scale)
        h = attn.to_out[1](attn.to_out[0](merge_heads(o).to(q.dtype)))
        residual = hidden_states[target]
        if residual.ndim == 4:
            h = h.transpose(-1, -2).reshape(residual.shape)
        if getattr(attn, "residual_connection", False):
            h = h + residual
        return h / attn.rescale_output_factor

    def _concept_term(self, attn, q: torch.Tensor, text: torch.Tensor, need_term: bool) -> torch.Tensor | None:
        """Concept term (B, heads, L, d) for the erased rows' queries ``q``; ``None`` when only observed."""
        ctx = self.context
        k_c, v_scaled = ctx.scaled_concept_kv(self.name, attn, text)
        if ctx.wants_probs:
            probs = concept_attention_probs(q, k_c, attn.scale)
            ctx.observe(self.name, probs)
            if not need_term:
                return None
            if ctx.gate is not None:
                from .scale import presence_gate, token_gate

                gate = presence_gate(concept_mass(probs.float(), ctx.spans), ctx.gate_threshold)
                probs = probs * token_gate(gate, ctx.spans, probs.shape[-1])[:, None].to(probs.dtype)
            return concept_term_from_probs(probs, v_scaled)
        return concept_term(q, k_c, v_scaled, attn.scale)

    def _fused_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, swap: bool, need_term: bool):
        """``AttnProcessor2_0``'s operations, with the concept term added to the erased rows before ``to_out``."""
        ctx = self.context
        residual = hidden_states
        input_ndim = hidden_states.ndim
        x = _tokens(attn, hidden_states, temb)
        b = x.shape[0]
        source, target = ctx.rows(b)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        # dual cross window: the erased rows take the original rows' M_P V(E_P); theirs is not computed
        n = target.start if swap else b
        query = attn.to_q(x)
        text = encoder_hidden_states if n == b else encoder_hidden_states[:n]
        text = attn.norm_encoder_hidden_states(text) if attn.norm_cross else text
        q = split_heads(query, attn.heads)
        k = split_heads(attn.to_k(text), attn.heads)
        v = split_heads(attn.to_v(text), attn.heads)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None if attention_mask is None else attention_mask[:n]
        if (need_term and mask is None and not ctx.wants_probs and k.shape[2] == ctx.concept_embeds.shape[1]
                and math.isclose(attn.scale, q.shape[-1] ** -0.5)):
            # one SDPA for both: the prompt's attention of all rows and the concept term of the erased rows
            k_c, v_scaled = ctx.scaled_concept_kv(self.name, attn, encoder_hidden_states)
            m = target.stop - target.start
            both = F.scaled_dot_product_attention(
                torch.cat([q[:n], q[target]]), torch.cat([k, _expand_batch(k_c, m)]),
                torch.cat([v, _expand_batch(v_scaled, m)]))
            o, term = both[:n], both[n:]
        else:
            o = F.scaled_dot_product_attention(q[:n], k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
            term = self._concept_term(attn, q[target], encoder_hidden_states, need_term)
        if swap:
            base = o[source]
            if ctx.own_prompt_values:  # the original's maps on the erased rows' own prompt values
                own = encoder_hidden_states[target]
                own = attn.norm_encoder_hidden_states(own) if attn.norm_cross else own
                base = F.scaled_dot_product_attention(q[source], k[source], split_heads(attn.to_v(own), attn.heads),
                                                      attn_mask=None if mask is None else mask[source])
            o = torch.cat([o, base if term is None else base + term], dim=0)
        elif term is not None:
            o[target] += term
        h = merge_heads(o).to(query.dtype)
        h = attn.to_out[1](attn.to_out[0](h))
        if input_ndim == 4:
            h = h.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            h = h + residual
        return h / attn.rescale_output_factor


class EIUPSelfAttnProcessor(_EIUPProcessor):
    """Self-attention layer (dual mode): erased cond rows reuse the original branch's attention maps.

    Active for the first ``self_attn_fraction`` of steps in layers of at most
    ``self_attn_max_tokens`` tokens; elsewhere it returns the original processor's output.
    """

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self._base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        ctx = self.context
        if not ctx.self_swap_active or encoder_hidden_states is not None or attention_mask is not None:
            return out
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if tokens > ctx.self_attn_max_tokens:
            return out
        source, target = ctx.rows(hidden_states.shape[0])
        temb = kwargs.get("temb")
        x_src = _tokens(attn, hidden_states[source], _index(temb, source))
        x_dst = _tokens(attn, hidden_states[target], _index(temb, target))
        q = split_heads(attn.to_q(x_src), attn.heads)
        k = split_heads(attn.to_k(x_src), attn.heads)
        v = split_heads(attn.to_v(x_dst), attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        o = merge_heads(swapped_self_attention(q, k, v, attn.scale)).to(q.dtype)
        o = attn.to_out[1](attn.to_out[0](o))
        o = _like_output(o, out)
        if getattr(attn, "residual_connection", False):
            o = o + hidden_states[target]
        o = (o / attn.rescale_output_factor).to(out.dtype)
        return torch.cat([out[: target.start], o], dim=0)


def attention_layers(unet: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """``{processor_name: (attention_module, is_cross_attention)}`` in the order of ``unet.attn_processors``.

    One walk of the module tree (the same pre-order walk ``attn_processors`` makes).
    """
    layers = {}
    for name, module in unet.named_modules(remove_duplicate=False):
        if name and hasattr(module, "get_processor"):
            layers[f"{name}.processor"] = (module, bool(getattr(module, "is_cross_attention", False)))
    return layers


def build_processors(
    unet: nn.Module, context: EraseContext, originals: dict[str, Any], layers: dict[str, tuple[nn.Module, bool]] | None = None
) -> dict[str, Any]:
    """Processor dict for ``unet.set_attn_processor``: EIUP wrappers where the mode needs them.

    Cross-attention layers always get :class:`EIUPCrossAttnProcessor`; self-attention layers
    get :class:`EIUPSelfAttnProcessor` in dual mode and keep their original processor otherwise.
    ``layers`` is :func:`attention_layers` of ``unet`` when the caller has it already.
    """
    procs: dict[str, Any] = {}
    for name, (_, is_cross) in (attention_layers(unet) if layers is None else layers).items():
        orig = unwrap_processor(originals[name])
        if is_cross:
            procs[name] = EIUPCrossAttnProcessor(orig, name, context)
        elif context.dual:
            procs[name] = EIUPSelfAttnProcessor(orig, name, context)
        else:
            procs[name] = orig
    return procs
