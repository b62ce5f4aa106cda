"""Stable Diffusion pipelines that erase concepts at inference time (EIUP, arXiv 2408.01014).

:class:`EIUPPipeline` and :class:`EIUPXLPipeline` are drop-in subclasses of diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``: every argument of the parent's
``__call__`` works unchanged, and a few keyword arguments add the erasure::

    pipe = EIUPPipeline.from_pretrained(...)            # or eiup.from_pipe(existing_pipe)
    out = pipe("a tomato", erase=["red"], erase_scale=-1.0, erase_mode="dual", return_original=True)
    out.images, out.original_images

For each call the pipeline encodes the concepts with its own ``encode_prompt`` (so SD 2.x,
SDXL's two encoders, ``clip_skip`` and LoRA are treated exactly like the prompt), installs
EIUP attention processors around the user's processors, advances the step index from
``callback_on_step_end`` and restores the user's processors in ``finally``. The maths lives in
:mod:`eiup.attention`.

Modes:
    ``"single"``: one branch; the concept term is added to its conditional cross-attention
        rows. Cost: one extra attention over the 77 concept positions per cross-attention layer.
    ``"dual"`` (the paper's setting): the batch holds the original and the erased branch,
        started from identical initial latents. For the first ``cross_attn_fraction`` of the
        steps the erased conditional rows take the original branch's cross-attention output
        plus their own concept term; for the first ``self_attn_fraction`` of the steps, in
        self-attention layers of at most ``self_attn_max_tokens`` tokens, they use the
        original branch's self-attention maps. After the cross window the erased branch uses
        its own M_P plus the concept term (``tail="suppress"``, default). ``tail="reference"``
        imitates the authors' code, which after the window attends normally to "P + concepts",
        i.e. lets the concepts act with a positive weight; we approximate it by the concept
        term with weight +1 on every concept token (separate softmax). Cost: about twice a
        plain generation; the original images come for free. The original branch equals the
        plain pipeline up to batch-size numerics for deterministic schedulers (DDIM eta=0,
        PNDM, Euler, DPM-Solver...); stochastic samplers draw different per-step noise because
        the batch is twice as large. Step callbacks see both branches: tensors hold
        ``[original..., erased...]`` along the batch (inside each CFG half for ``prompt_embeds``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import (ConceptAttentionRecorder, EraseContext, RegionGate, attention_layers, build_processors,
                        token_scale_vector)
from .config import (ANCHOR_FILE, AUTO, CONCEPT_CONTEXTS, DEFAULT_ANCHOR_STRENGTH, DEFAULT_CONCEPT_CONTEXT,
                     DEFAULT_ERASE_MODE, DEFAULT_ERASE_SCALE, DEFAULT_GUARD, ERASE_MODES, MAX_ABS_SCALE,
                     MAX_ANCHOR_STRENGTH, PHRASE_PROBE_LOGIT, REGION_RULES, REGION_THRESHOLDS, TAILS, AnchorPlan,
                     EraseConfig, EraseConfigError, RowStrengths, _anchor_strength, _finite_number, _protect_words,
                     _region_rule)

__all__ = [
    "CONCEPT_CONTEXTS",
    "DEFAULT_CONCEPT_CONTEXT",
    "DEFAULT_ERASE_MODE",
    "DEFAULT_ERASE_SCALE",
    "EIUPPipeline",
    "EIUPPipelineOutput",
    "EIUPXLPipeline",
    "ERASE_MODES",
    "EraseConfig",
    "EraseConfigError",
    "TAILS",
    "from_pipe",
]

@dataclass
class EIUPPipelineOutput(BaseOutput):
    """Output of :class:`EIUPPipeline` / :class:`EIUPXLPipeline`.

    Attributes:
        images: The (erased) images, in the requested ``output_type``.
        nsfw_content_detected: The safety checker's flags for ``images`` (SD 1.x/2.x only).
        original_images: The un-erased images when ``return_original=True``.
        heatmaps: ``{concept: float32 array (images, H, W) in [0, 1]}`` when ``return_heatmaps=True``.
        erase_scales: ``{concept: float32 array (images,)}``, the scales predicted with
            ``erase_scale="auto"``.
        anchor_strengths: ``{concept: float32 array (images,)}``, the anchored projection's strength per
            image (the preset, ``named_strength`` for prompts naming the concept, the prediction of
            ``anchor_strength="auto"``, the given one, or the guard's choice; NaN where the gate left the
            prompt alone).
        guard_flagged: With ``guard=``: per image, whether the guard still sees a concept in it (at the
            ladder's top, or where the gate left the prompt alone): what a product should withhold.
        guard_attempts: With ``guard=``: per image, how many times it was generated (int array).
        guard_negative_prompt: With ``guard=``: per image, whether it is the guard's last resort, drawn
            without the erasure and with the concepts as negative prompt (its anchor strength NaN).
    """

    images: Any
    nsfw_content_detected: list[bool] | None = None
    original_images: Any = None
    heatmaps: dict[str, np.ndarray] | None = None
    erase_scales: dict[str, np.ndarray] | None = None
    anchor_strengths: dict[str, np.ndarray] | None = None
    guard_flagged: list[bool] | None = None
    guard_attempts: np.ndarray | None = None
    guard_negative_prompt: list[bool] | None = None


@contextlib.contextmanager
def _quiet_truncation(pipe: Any):
    """Hold back the text encoder's "input was truncated" warning (for texts eiup derives from a prompt
    whose own encoding has already warned the user)."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "truncated" not in record.getMessage()

    loggers = [logging.getLogger(cls.__module__) for cls in type(pipe).__mro__ if cls.__module__.startswith("diffusers.")]
    quiet = _Filter()
    for log in loggers:
        log.addFilter(quiet)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(quiet)


def _row_prompts(call: dict[str, Any]) -> list[str] | None:
    """The prompt text of every image of the call, or None when the call gives ``prompt_embeds``."""
    prompt = call.get("prompt")
    if prompt is None or (not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt)):
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [p for p in prompts for _ in range(int(call.get("num_images_per_prompt") or 1))]


def _image_count(call: dict[str, Any], row_prompts: list[str] | None) -> int:
    """How many images the call makes."""
    if row_prompts is not None:
        return len(row_prompts)
    return int(call["prompt_embeds"].shape[0]) * int(call.get("num_images_per_prompt") or 1)


@functools.lru_cache(maxsize=256)
def _word_pattern(*words: str) -> re.Pattern:
    """Any of ``words`` as whole words, any case (the longest first, so "black background" wins over "black")."""
    choices = "|".join(re.escape(w.strip()) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{choices})(?!\w)", re.IGNORECASE)


def _concepts_named(rows: list[str] | None, concepts: Sequence[str],
                    aliases: Sequence[Sequence[str]] | None = None) -> list[list[bool]] | None:
    """Per concept, per image: whether the image's prompt text (``rows``, see :func:`_row_prompts`)
    names the concept or one of its ``aliases`` (whole words, any case); None without prompt text."""
    if rows is None:
        return None  # prompt_embeds: the probe or the similarity gate alone
    aliases = aliases or [()] * len(concepts)
    return [[_word_pattern(c, *a).search(p) is not None for p in rows] for c, a in zip(concepts, aliases)]


def _term_mask(implied: list[torch.Tensor | None], spans: Sequence[Sequence[int]], length: int) -> torch.Tensor | None:
    """(images, T) 0/1 weights that switch the concept term off for images whose prompt neither names
    nor implies the concept (``prompt_gate``); None when every image keeps every term."""
    rows = next(g for g in implied if g is not None).shape[0]
    mask = torch.ones(rows, length)
    for span, gate in zip(spans, implied):
        if gate is not None:
            mask[:, list(span)] = gate.float().cpu()[:, None]
    return None if bool((mask == 1).all()) else mask


def _split(x: Any, m: int) -> tuple[Any, Any]:
    return (None, None) if x is None else (x[:m], x[m:])


def _rng_snapshot(generator: Any, device: torch.device) -> Callable[[], None]:
    """Return a function restoring the state of the generator(s) (or the global RNG) as of now."""
    if generator is None:
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if device.type == "cuda" and torch.cuda.is_available() else None

        def restore() -> None:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)

        return restore
    gens = generator if isinstance(generator, list) else [generator]
    states = [g.get_state() for g in gens]

    def restore_gens() -> None:
        for g, s in zip(gens, states):
            g.set_state(s)

    return restore_gens


def _double(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.cat([x, x], dim=0)


class EIUPMixin:
    """Erasure logic shared by :class:`EIUPPipeline` and :class:`EIUPXLPipeline`."""

    _eiup_tuple_fields: tuple[str, ...] = ("images",)
    _erase_context: EraseContext | None = None

    @property
    def erase_context(self) -> EraseContext | None:
        """The :class:`~eiup.attention.EraseContext` of the running erasing call, else ``None``.

        A ``callback_on_step_end`` can read it (``pipe.erase_context.step``) and change
        ``token_scales`` between steps.
        """
        return self._erase_context

    @torch.no_grad()
    def __call__(
        self,
        *args: Any,
        erase: str | Sequence[str] | None = None,
        erase_scale: float | Sequence[float] | None = None,
        erase_mode: str | None = None,
        cross_attn_fraction: float | None = None,
        self_attn_fraction: float | None = None,
        self_attn_max_tokens: int | None = None,
        tail: str | None = None,
        allow_amplify: bool | None = None,
        erase_config: EraseConfig | None = None,
        return_original: bool = False,
        return_heatmaps: bool = False,
        concept_recorder: ConceptAttentionRecorder | None = None,
        gate: str | None = None,
        gate_threshold: float | None = None,
        concept_context: str | None = None,
        anchors: str | Sequence[str] | None = None,
        anchor_strength: float | str | None = None,
        anchor_protect: Sequence[str] | None = None,
        anchor_in_context: bool | None = None,
        anchor_gate: bool | None = None,
        anchor_region: bool | None = None,
        prompt_gate: bool | None = None,
        scale_predictors: Any = None,
        guard: Callable[[Any], Sequence[bool]] | str | bool | None = None,
        guard_ladder: Sequence[float] | None = None,
        guard_negative_prompt: bool = True,
        **kwargs: Any,
    ) -> EIUPPipelineOutput | tuple:
        """Generate images with the concepts in ``erase`` suppressed.

        All positional and keyword arguments of the parent pipeline's ``__call__`` are accepted
        unchanged. Without concepts (``erase=None`` or ``[]``) the call is the parent's call.

        Args:
            erase: Concept(s) to erase, e.g. ``"nudity"`` or ``["red", "star"]``.
            erase_scale: Suppression scale w (< 0), one float or one per concept. Default: the
                model's preset for the concept (see ``anchors``), else :data:`DEFAULT_ERASE_SCALE`.
            erase_mode: ``"single"`` (fast) or ``"dual"`` (paper). Default :data:`DEFAULT_ERASE_MODE`.
            cross_attn_fraction: Dual mode cross-attention window (default 0.8).
            self_attn_fraction: Dual mode self-attention window (default 0.4).
            self_attn_max_tokens: Dual mode: largest swapped self-attention layer (default
                latent_h * latent_w / 16).
            tail: Dual mode behaviour after the cross window: ``"suppress"`` (default) or ``"reference"``.
            allow_amplify: Accept positive scales.
            erase_config: An :class:`EraseConfig`; the explicit arguments above override its fields.
            return_original: Also return the un-erased images. Dual mode gets them from its
                original branch; single mode runs one extra plain pass first, with the same
                arguments and generator state (the user's step callback runs in both passes;
                ``erase_context`` is ``None`` during the plain pass).
            return_heatmaps: Return per-concept attention heatmaps of the erased images: the
                concept tokens' attention, mean over heads, cross-attention layers and steps,
                upsampled to the image size and min-max scaled to [0, 1] per image and concept
                (uses an explicit softmax, so slower).
            concept_recorder: Records mean concept-token attention per layer (GIE features).
            gate: ``"presence"`` weights the concept term per pixel by the pixel's relative
                concept attention (:func:`eiup.scale.presence_gate`); ``None`` (default) does not.
            gate_threshold: Presence gate threshold (default 0.4).
            concept_context: ``"prompt"`` (default) or ``"separate"``: how E_C is encoded (:class:`EraseConfig`).
            anchors: Concepts of the erased one's kind (e.g. the other colours for "red"): also
                project the concept out of the prompt's tokens (:mod:`eiup.anchors`).
            anchor_strength: Strength of that projection (default :data:`DEFAULT_ANCHOR_STRENGTH`).
            anchor_protect: Words of another attribute the projection must keep (:class:`EraseConfig`).
            anchor_in_context: Also project implying prompts along in-context anchors (:class:`EraseConfig`).
            anchor_gate: Project only prompts that name or imply the concept (default True).
            anchor_region: Project only where the image attends to the word that names or implies the
                concept (:class:`EraseConfig`).
            scale_predictors: With ``erase_scale="auto"``: a folder of calibrated predictors
                (``CONCEPT.safetensors``), one predictor file, or a list of
                :class:`eiup.scale.ScalePredictor`; default ``<model folder>/eiup_scale_predictors``.
            guard: Closed-loop erasure (:mod:`eiup.guard`): a callable ``images -> list[bool]`` (True: an
                erased concept is still shown), optionally with ``harmed(images, originals) -> list[bool]``.
                Every image is drawn as without a guard (the model's preset strength), then, where the
                projection acts on it, again from the same starting noise one rung of ``guard_ladder``
                stronger while the guard sees the concept, or milder while the image is clean but
                harmed. The output reports each image's strength, its number of generations and whether
                the guard still flags it. Needs prompt text and anchors (the projection's strength is what
                moves); replaces ``anchor_strength``.
                ``"auto"`` (:data:`DEFAULT_GUARD`, used for ``None``): the model folder's guard
                (``eiup_guard.safetensors``, the toy model ships one) for the concepts it knows, when the
                call leaves ``anchor_strength`` unset, has prompt text and anchors and asks for images (not
                latents); otherwise no guard. A callable gets the images in the call's ``output_type``.
                ``False``: off.
            guard_ladder: The strengths the guard climbs (default :data:`eiup.guard.DEFAULT_LADDER`).
            guard_negative_prompt: The guard's last resort (default on): an image it still flags (or, with a
                guard that checks the rest, finds harmed) at the end of its walk is drawn again from the same
                noise without the erasure, with the concepts as negative prompt, at 1, 1.5 and 2 times the
                call's guidance scale in turn (:data:`eiup.guard.NEGATIVE_PROMPT_GUIDANCE`), then once with the
                negative prompt and the erasure together (at the image's first strength), until a draw is clean
                and unharmed; a draw replaces the kept one where it ranks better (on the toy model the
                projection alone does not take red off an object on a black background without harming it).
            *args: Positional arguments of the parent ``__call__``.
            **kwargs: Keyword arguments of the parent ``__call__``. In dual mode the step
                callback's tensors hold both branches (``[original..., erased...]``).

        Returns:
            :class:`EIUPPipelineOutput`, or with ``return_dict=False`` the parent's tuple followed
            by ``original_images`` and ``heatmaps`` when requested.

        Raises:
            EraseConfigError: Invalid erasure arguments (raised before any model runs).
        """
        explicit = dict(
            erase=erase,
            erase_scale=erase_scale,
            erase_mode=erase_mode,
            cross_attn_fraction=cross_attn_fraction,
            self_attn_fraction=self_attn_fraction,
            self_attn_max_tokens=self_attn_max_tokens,
            tail=tail,
            allow_amplify=allow_amplify,
            gate=gate,
            gate_threshold=gate_threshold,
            concept_context=concept_context,
            anchors=anchors,
            anchor_strength=anchor_strength,
            anchor_protect=anchor_protect,
            anchor_in_context=anchor_in_context,
            anchor_gate=anchor_gate,
            anchor_region=anchor_region,
            prompt_gate=prompt_gate,
        )
        explicit = {k: v for k, v in explicit.items() if v is not None}
        if erase_config is not None and not isinstance(erase_config, EraseConfig):
            raise EraseConfigError(f"erase_config must be an EraseConfig, got {type(erase_config).__name__}")
        config = dataclasses.replace(erase_config, **explicit) if erase_config is not None else EraseConfig(**explicit)
        call = self._bind_call(args, kwargs)
        if concept_context is None and erase_config is None and call.get("prompt") is None:
            config = dataclasses.replace(config, concept_context="separate")  # the default needs the prompt text
        guard = self._resolve_guard(call, config, DEFAULT_GUARD if guard is None else guard, guard_ladder)
        if guard is not None:
            return self._guarded(call, config, guard, guard_ladder, return_original=return_original,
                                 negative_prompt_fallback=guard_negative_prompt,
                                 return_heatmaps=return_heatmaps, concept_recorder=concept_recorder,
                                 scale_predictors=scale_predictors)
        return_dict = call.get("return_dict", True)
        call["return_dict"] = True

        if not config.concepts:
            out = self._parent_call(call)
            heat = {} if return_heatmaps else None
            return self._finish(out.images, getattr(out, "nsfw_content_detected", None), out.images if return_original else None, heat, return_dict, return_original)

        # ---- validation: everything before any model runs --------------------------------
        layers = self._check_unet()
        predictors = self._scale_predictors(config, scale_predictors) if config.auto else None
        spans = self._concept_spans(config.concepts)
        context_texts = None
        if config.concept_context == "prompt":
            context_texts, spans = self._contextual_concepts(call, config.concepts, spans)
        anchor_plans = self._anchor_plans(config) if config.anchor_spec else None
        projecting = anchor_plans is not None and any(plan.anchors for plan in anchor_plans)
        if config.anchor_region and not projecting:
            raise EraseConfigError("anchor_region=True confines the anchored projection, which this call does not make: "
                                   "give anchors (e.g. anchors='auto' with a model folder that lists the concept, SD "
                                   "1.x/2.x) or drop anchor_region")
        probes = self._prompt_probes(config, projecting)
        row_prompts = _row_prompts(call)
        if isinstance(config.anchor_strength, tuple) and len(config.anchor_strength) != _image_count(call, row_prompts):
            raise EraseConfigError(f"anchor_strength has {len(config.anchor_strength)} values but the call makes "
                                   f"{_image_count(call, row_prompts)} images; give one per image or one number")
        named = (_concepts_named(row_prompts, config.concepts, [plan.aliases for plan in anchor_plans or []])
                 if projecting or any(probes) else None)
        height, width = self._resolve_hw(call)
        vsf = self.vae_scale_factor
        latent_size = (int(height) // vsf, int(width) // vsf)
        max_tokens = config.self_attn_max_tokens
        if max_tokens is None:
            max_tokens = latent_size[0] * latent_size[1] // 16
        user_cb = call.get("callback_on_step_end")
        if isinstance(user_cb, (PipelineCallback, MultiPipelineCallbacks)):
            call["callback_on_step_end_tensor_inputs"] = user_cb.tensor_inputs
        dual = config.erase_mode == "dual"
        self._check_call_inputs(call, height, width)

        device = self._execution_device
        self._guidance_scale = call["guidance_scale"]
        cfg = bool(self.do_classifier_free_guidance)
        lora_scale = (call.get("cross_attention_kwargs") or {}).get("scale")

        original_images = None
        if return_original and not dual:
            restore_rng = _rng_snapshot(call.get("generator"), device)
            original_images = self._parent_call(call, device).images
            restore_rng()

        # ---- per-call state ---------------------------------------------------------------
        if context_texts is None:
            concept_embeds = self._encode_concepts(" ".join(config.concepts), device, lora_scale, call.get("clip_skip"))
        else:  # one encoding per distinct text, then one row per image
            encoded = {t: self._encode_concepts(t, device, lora_scale, call.get("clip_skip")) for t in dict.fromkeys(context_texts)}
            concept_embeds = torch.cat([encoded[t] for t in context_texts]) if len(encoded) > 1 else encoded[context_texts[0]]
        scales = config.scales
        if config.erase_scale is None and anchor_plans:  # the model's measured preset, where it has one
            scales = tuple(s if plan.scale is None else plan.scale for s, plan in zip(scales, anchor_plans))
        token_scales = token_scale_vector(spans, scales, concept_embeds.shape[1], device=concept_embeds.device)
        ctx = EraseContext(
            concepts=config.concepts,
            spans=spans,
            concept_embeds=concept_embeds,
            token_scales=token_scales,
            mode=config.erase_mode,
            cfg=cfg,
            cross_attn_fraction=config.cross_attn_fraction,
            self_attn_fraction=config.self_attn_fraction,
            self_attn_max_tokens=max_tokens,
            tail=config.tail,
            latent_size=latent_size,
            image_size=(int(height), int(width)),
            num_steps=lambda: self._num_timesteps,
            return_heatmaps=return_heatmaps,
            recorder=concept_recorder,
            gate=config.gate,
            gate_threshold=config.gate_threshold,
        )
        auto_recorder = None
        if predictors is not None:
            auto_recorder = concept_recorder if concept_recorder is not None and 0 in concept_recorder.steps else ConceptAttentionRecorder((0,))
            ctx.recorder = auto_recorder
            auto_recorder.reset(ctx.concepts, ctx.spans)

        def step_end(pipe: Any, i: int, t: Any, cb_kwargs: dict[str, Any]) -> dict[str, Any]:
            result = user_cb(pipe, i, t, cb_kwargs) if user_cb is not None else cb_kwargs
            if i == 0 and predictors is not None:
                ctx.token_scales = self._predicted_token_scales(ctx, auto_recorder, predictors)
                if term_mask is not None:
                    ctx.token_scales = ctx.token_scales * term_mask.to(ctx.token_scales.device)
            ctx.step = i + 1
            if ctx.step >= ctx.num_steps:
                ctx.release_caches()  # denoising done: the VAE decode runs without the concept K/V
            return result

        call["callback_on_step_end"] = step_end
        m = None
        if dual:
            m = self._dual_call(call, device, cfg, lora_scale, height, width)
        term_mask, anchor_strengths = None, {}
        if projecting or any(probes):
            implied, ctx.region, anchor_strengths = self._gate_and_project(
                call, config, anchor_plans if projecting else None, probes, named, row_prompts, device, cfg, lora_scale, m)
            ctx.own_prompt_values = dual and projecting
            if config.prompt_gate and any(probes):
                term_mask = _term_mask(implied, spans, concept_embeds.shape[1])
                if term_mask is not None:
                    ctx.token_scales = ctx.token_scales * term_mask.to(ctx.token_scales.device)

        # ---- run with EIUP processors, always restoring the user's ---------------------------
        # (set on the layers directly: unet.set_attn_processor walks the whole module tree twice)
        originals = {name: module.processor for name, (module, _) in layers.items()}
        procs = build_processors(self.unet, ctx, originals, layers)
        replaced = [name for name in procs if procs[name] is not originals[name]]
        previous_ctx = self._erase_context
        for name in replaced:
            layers[name][0].set_processor(procs[name])
        self._erase_context = ctx
        try:
            out = self._parent_call(call, device)
        finally:
            for name in replaced:
                layers[name][0].set_processor(originals[name])
            self._erase_context = previous_ctx

        images, nsfw = out.images, getattr(out, "nsfw_content_detected", None)
        if dual:
            original_images, images = _split(images, m)
            _, nsfw = _split(nsfw, m)
            if not return_original:
                original_images = None
        heat = ctx.heatmaps() if return_heatmaps else None
        result = self._finish(images, nsfw, original_images, heat, return_dict, return_original)
        if predictors is not None and return_dict:
            result.erase_scales = ctx.predicted_scales
        if return_dict and anchor_strengths:
            result.anchor_strengths = anchor_strengths
        return result

    def _resolve_guard(self, call: dict[str, Any], config: EraseConfig, guard: Any, ladder: Any) -> Any:
        """The guard of this call, or None, checked before any model work: ``"auto"`` resolves to the model
        folder's guard where the call can use it (quietly to None elsewhere); a callable must find a call it
        can act on (an error naming the fix otherwise)."""
        auto = isinstance(guard, str) and guard.strip().lower() == AUTO
        if guard is False or (isinstance(guard, str) and guard.strip().lower() == "none"):
            guard = None
        elif auto:
            from .guard import model_guard

            usable = (config.concepts and config.anchor_strength is None and _row_prompts(call) is not None
                      and call.get("negative_prompt_embeds") is None
                      and isinstance(self, StableDiffusionPipeline)
                      and call.get("output_type") != "latent")  # the model's guard reads images
            guard = model_guard(getattr(self.config, "_name_or_path", None), config.concepts) if usable else None
        elif not callable(guard):
            raise EraseConfigError(f"guard={guard!r} must be a callable images -> list[bool] (True: the concept is "
                                   "still shown), 'auto' (the model folder's guard) or False")
        elif config.anchor_strength is not None:
            raise EraseConfigError("guard= chooses each image's anchor_strength from guard_ladder; drop anchor_strength")
        elif not config.concepts:
            raise EraseConfigError("guard= needs concepts to erase: pass erase=[...]")
        elif _row_prompts(call) is None:
            raise EraseConfigError("guard= needs the prompt text, not prompt_embeds: pass prompt=...")
        elif call.get("negative_prompt_embeds") is not None:
            raise EraseConfigError("guard= redraws single images and may add the concepts to the negative prompt, "
                                   "which it needs as text: pass negative_prompt=... instead of negative_prompt_embeds")
        if guard is not None and not (config.anchor_spec and any(plan.anchors for plan in self._anchor_plans(config))):
            if auto:
                guard = None  # nothing to climb
            else:
                raise EraseConfigError("guard= climbs the anchored projection's strength, which this call does not "
                                       "make: give anchors (anchors='auto' with a model folder that lists the concept, "
                                       "or a list)")
        if guard is None and ladder is not None:
            raise EraseConfigError("guard_ladder is the strengths a guard climbs, and this call has none: pass guard=... "
                                   "(or drop guard_ladder)")
        return guard

    def _guarded(self, call: dict[str, Any], config: EraseConfig, guard: Any, ladder: Any, **erase_kwargs: Any) -> Any:
        """``guard=`` (resolved by :meth:`_resolve_guard`): the ladder checked, then :func:`eiup.guard.guarded_call`."""
        from .guard import DEFAULT_LADDER, check_ladder, guarded_call

        try:
            ladder = check_ladder(DEFAULT_LADDER if ladder is None else ladder, MAX_ANCHOR_STRENGTH)
        except ValueError as e:
            raise EraseConfigError(str(e)) from None
        return guarded_call(self, guard, ladder, call, config, **erase_kwargs)

    @torch.no_grad()
    def prompt_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, 2D) features of the prompts' text embeddings (:func:`eiup.probe.prompt_features`), the input
        of prompt probes and strength predictors (SD 1.x/2.x)."""
        from .probe import prompt_features

        embeds, _ = self.encode_prompt(list(prompts), self._execution_device, 1, False)
        return prompt_features(embeds).cpu()

    @torch.no_grad()
    def projection_gate(self, prompts: Sequence[str], concept: str, **erase_kwargs: Any) -> list[bool]:
        """Per prompt: whether a call erasing ``concept`` (with ``erase_kwargs``, else the defaults) makes
        the anchored projection edit it: the prompt names the concept or its probe says it implies it
        (``anchor_gate``; without a probe, the prompt's tokens are nearer the concept's than every anchor's);
        every prompt with ``anchor_gate=False``, none without anchors."""
        from .probe import find_probe

        config = EraseConfig(erase=[concept], **erase_kwargs)
        plans = self._anchor_plans(config) if config.anchor_spec else None
        if not plans or not plans[0].anchors:
            return [False] * len(prompts)
        if not config.anchor_gate:
            return [True] * len(prompts)
        device = self._execution_device
        embeds = self.encode_prompt(list(prompts), device, 1, False)[0].float()
        probe = find_probe(concept.strip().lower(), getattr(self.config, "_name_or_path", None))
        if probe is not None:
            implied = self._probe_gate(probe, embeds, list(prompts), {}, lambda texts: self._encode_concepts(texts, device, None, None))
        else:  # the similarity gate of _gate_and_project
            from .anchors import aligned_concept_and_anchors, nearest_to_concept

            anchors = plans[0].anchors
            encoded = self._encode_concepts([concept, *anchors], device, None, None).float()
            lengths = torch.tensor([len(ids) for ids in self.tokenizer(list(anchors)).input_ids], device=device)
            c, a = aligned_concept_and_anchors(encoded[0], len(self.tokenizer(concept).input_ids), encoded[1:], lengths)
            implied = nearest_to_concept(embeds, c, a)
        named = _concepts_named(list(prompts), [concept], [plans[0].aliases])[0]
        return [bool(i) or n for i, n in zip(implied.tolist(), named)]

    # ---- helpers ---------------------------------------------------------------------------
    def _scale_predictors(self, config: EraseConfig, source: Any) -> list:
        from .scale import find_predictors

        if isinstance(source, (list, tuple)) and all(hasattr(p, "predict") and hasattr(p, "concept") for p in source):
            if [p.concept for p in source] != list(config.concepts):
                raise EraseConfigError("scale_predictors must hold one ScalePredictor per concept, in the order of erase")
            return list(source)
        try:
            found = find_predictors(config.concepts, getattr(self.config, "_name_or_path", None), source)
        except FileNotFoundError as e:
            raise EraseConfigError(str(e)) from e
        spec = config.anchor_spec
        if spec == AUTO and not self._model_anchor_table()[1]:
            spec = ()  # "auto" on a model without an anchor file: no anchors
        for pred in found:
            info = pred.info or {}
            calibrated = {"erase_mode": info.get("mode", "single"), "gate": info.get("gate"),
                          "concept_context": info.get("concept_context", "separate"), "anchors": info.get("anchors", [])}
            used = {"erase_mode": config.erase_mode, "gate": config.gate, "concept_context": config.concept_context,
                    "anchors": spec if isinstance(spec, str) else list(spec)}
            if calibrated != used:
                fmt = ", ".join
                warnings.warn(
                    f"scale predictor for {pred.concept!r} was calibrated with "
                    f"{fmt(f'{k}={v!r}' for k, v in calibrated.items())}; this call uses "
                    f"{fmt(f'{k}={v!r}' for k, v in used.items())}: its scales may be off "
                    "(recalibrate with `eiup calibrate --mode ... --gate/--no-gate --concept-context ... --anchor ...`)",
                    stacklevel=3)
        return found

    @staticmethod
    def _predicted_token_scales(ctx: EraseContext, recorder: ConceptAttentionRecorder, predictors: list) -> torch.Tensor:
        """Per-image token scales (images, T) from the first step's concept attention."""
        feats = recorder.concept_features(0)  # (images, concepts, layers)
        scales = torch.stack([p.predict(feats[:, k]) for k, p in enumerate(predictors)], dim=1)  # (images, K)
        ctx.predicted_scales = {c: scales[:, k].numpy().astype(np.float32) for k, c in enumerate(ctx.concepts)}
        w = torch.zeros(scales.shape[0], ctx.concept_embeds.shape[1], dtype=torch.float32)
        for k, span in enumerate(ctx.spans):
            w[:, span] = scales[:, k:k + 1]
        return w.to(ctx.token_scales.device)

    def _parent_call(self, call: dict[str, Any], device: torch.device | None = None) -> Any:
        """The parent's ``__call__``; with ``device``, :attr:`_execution_device` returns it during the call."""
        if device is None:
            return super().__call__(**call)  # type: ignore[misc]
        previous = self.__dict__.get("_eiup_execution_device")
        self._eiup_execution_device = device
        try:
            return super().__call__(**call)  # type: ignore[misc]
        finally:
            self._eiup_execution_device = previous

    @property
    def _execution_device(self) -> torch.device:
        """diffusers' execution device, memoised during an erasing call (diffusers finds it by walking
        every module of every component, which costs as much as a denoising step of a small model)."""
        device = self.__dict__.get("_eiup_execution_device")
        return device if device is not None else super()._execution_device  # type: ignore[misc]

    def _bind_call(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """All arguments of the parent ``__call__`` by name, defaults filled in."""
        sig = inspect.signature(super().__call__)  # type: ignore[misc]
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        call: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(f"unexpected positional arguments {value!r}")
            else:
                call[name] = value
        return call

    def _finish(self, images, nsfw, original_images, heatmaps, return_dict: bool, return_original: bool):
        out = EIUPPipelineOutput(
            images=images, nsfw_content_detected=nsfw, original_images=original_images, heatmaps=heatmaps
        )
        if return_dict:
            return out
        result = tuple(getattr(out, f) for f in self._eiup_tuple_fields)
        if return_original:
            result += (original_images,)
        if heatmaps is not None:
            result += (heatmaps,)
        return result

    def _check_unet(self) -> dict[str, tuple[Any, bool]]:
        """Checks that the UNet can be erased; returns its :func:`~eiup.attention.attention_layers`."""
        layers = attention_layers(self.unet)
        cross = [name for name, (_, is_cross) in layers.items() if is_cross]
        if not cross:
            raise EraseConfigError(
                "erase: the UNet has no cross-attention layers, so the concepts cannot be attached; "
                "use a text-conditioned UNet2DConditionModel (cross_attention_dim set) or call without erase"
            )
        for name in cross:
            attn = layers[name][0]
            if getattr(attn, "added_kv_proj_dim", None) is not None or not hasattr(attn, "to_out"):
                raise EraseConfigError(f"erase: cross-attention layer {name} ({type(attn).__name__}) is not supported")
        return layers

    def _concept_spans(self, concepts: Sequence[str]) -> list[list[int]]:
        """Token positions of each concept in the joint encoding of ``" ".join(concepts)`` (BOS at 0)."""
        tok = self.tokenizer if getattr(self, "tokenizer", None) is not None else getattr(self, "tokenizer_2", None)
        if tok is None:
            raise EraseConfigError("erase: the pipeline has no tokenizer to encode the concepts; load one")
        texts = [self.maybe_convert_prompt(c, tok) if isinstance(self, TextualInversionLoaderMixin) else c for c in concepts]
        limit = tok.model_max_length - 2
        counts = []
        for c, text in zip(concepts, texts):
            n = len(tok(text, add_special_tokens=False).input_ids)
            if n == 0:
                raise EraseConfigError(f"erase: concept {c!r} gives no tokens; use a word the tokenizer knows")
            if n > limit:
                raise EraseConfigError(
                    f"erase: concept {c!r} is {n} tokens long, more than the {limit} the text encoder holds "
                    f"(model_max_length {tok.model_max_length} minus BOS/EOS); shorten it"
                )
            counts.append(n)
        joined = " ".join(texts)
        total = len(tok(joined, add_special_tokens=False).input_ids)
        if total > limit:
            raise EraseConfigError(
                f"erase: the concepts together are {total} tokens, more than the {limit} the text encoder holds "
                f"(model_max_length {tok.model_max_length} minus BOS/EOS); erase fewer or shorter concepts per call"
            )
        spans: list[list[int]] | None = None
        try:
            offsets = tok(joined, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            lo, spans = 0, []
            for text in texts:
                hi = lo + len(text)
                spans.append([1 + j for j, (s, e) in enumerate(offsets) if e > s and s >= lo and e <= hi])
                lo = hi + 1
            if any(not s for s in spans) or sum(map(len, spans)) != total:
                spans = None
        except (NotImplementedError, TypeError, KeyError, ValueError):
            spans = None
        if spans is None:  # slow tokenizers: concepts tokenise independently (CLIP splits on spaces)
            starts = np.cumsum([1] + counts[:-1])
            spans = [list(range(int(s), int(s) + n)) for s, n in zip(starts, counts)]
        return spans

    def _contextual_concepts(self, call: dict[str, Any], concepts: Sequence[str],
                             spans: list[list[int]]) -> tuple[list[str], list[list[int]]]:
        """``concept_context="prompt"``: the text ``prompt + " " + concepts`` of every image and the
        concepts' positions in it (the same for all images of the call).

        A prompt that leaves no room for the concepts in the encoder's window is shortened (in this
        encoding only), so the concepts are always encoded whole.
        """
        prompt = call.get("prompt")
        if prompt is None or (not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt)):
            raise EraseConfigError("concept_context='prompt' needs the prompt as text (prompt=...), not prompt_embeds; "
                                   "or use concept_context='separate'")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tok = self.tokenizer if getattr(self, "tokenizer", None) is not None else self.tokenizer_2
        joined = " ".join(concepts)
        concept_ids = tok(joined, add_special_tokens=False).input_ids
        room = tok.model_max_length - 2 - len(concept_ids)  # prompt tokens between BOS and the concepts + EOS
        texts, offsets = [], []
        for text in prompts:
            ids = original = tok(text, add_special_tokens=False).input_ids
            cut = room + 1
            while len(ids) > room:  # decode/encode may not round-trip exactly: shorten until it fits
                cut -= 1
                text = tok.decode(original[:cut]) if cut > 0 else ""
                ids = tok(text, add_special_tokens=False).input_ids
            full = f"{text} {joined}" if ids else joined
            full_ids = tok(full, add_special_tokens=False).input_ids
            if full_ids[len(full_ids) - len(concept_ids):] != concept_ids:
                raise EraseConfigError(f"concept_context='prompt': the tokenizer merges the concepts {joined!r} with the "
                                       f"end of the prompt {text!r}; end the prompt with a space or punctuation")
            texts.append(full)
            offsets.append(len(full_ids) - len(concept_ids))
        if len(set(offsets)) > 1:
            raise EraseConfigError(
                "concept_context='prompt': the prompts of one call must have the same number of tokens "
                f"(got {sorted(set(offsets))}), since the concept positions are shared; call once per prompt, "
                "or use concept_context='separate'")
        per_image = int(call.get("num_images_per_prompt") or 1)
        texts = [t for t in texts for _ in range(per_image)]
        return texts, [[p + offsets[0] for p in span] for span in spans]

    def _anchor_plans(self, config: EraseConfig) -> list[AnchorPlan]:
        """Each concept's anchors (explicit, or ``"auto"`` from the model folder), checked to fit the encoder."""
        if not isinstance(self, StableDiffusionPipeline):
            if config.anchors is None:  # the default on SDXL: the concept term alone
                return [AnchorPlan((), DEFAULT_ANCHOR_STRENGTH)] * len(config.concepts)
            raise EraseConfigError("anchors are supported on SD 1.x/2.x pipelines (one CLIP text encoder); drop anchors here")
        spec = config.anchor_spec
        strength = None if config.strength_per_image else config.anchor_strength
        if spec == AUTO:  # quiet about a model without an anchor file only when "auto" is just the default
            plans = self._model_anchor_plans(config.concepts, strength, quiet_without_file=config.anchors is None)
        else:
            plans = [AnchorPlan(tuple(spec), DEFAULT_ANCHOR_STRENGTH if strength is None else strength)] * len(config.concepts)
        if config.anchor_protect is not None:  # the call's words replace the presets'
            plans = [dataclasses.replace(plan, protect=tuple(config.anchor_protect)) for plan in plans]
        if config.anchor_in_context is not None:
            plans = [dataclasses.replace(plan, in_context=config.anchor_in_context) for plan in plans]
        if config.anchor_region is not None:
            plans = [dataclasses.replace(plan, region=_region_rule(config.anchor_region, plan.region)) for plan in plans]
        if config.anchor_strength == AUTO:
            plans = [dataclasses.replace(plan, strength_predictor=self._strength_predictor(concept)) if plan.anchors
                     else plan for concept, plan in zip(config.concepts, plans)]
        elif isinstance(config.anchor_strength, tuple):
            given = RowStrengths(config.anchor_strength)
            plans = [dataclasses.replace(plan, strength_predictor=given) if plan.anchors else plan for plan in plans]
        limit = self.tokenizer.model_max_length
        for name, words in (("anchors", (a for plan in plans for a in (*plan.anchors, *plan.for_one_thing().anchors))),
                            ("anchor_protect", (a for plan in plans for a in plan.protect))):
            for i, word in enumerate(dict.fromkeys(words)):
                n = len(self.tokenizer(word).input_ids)
                if n > limit:
                    raise EraseConfigError(f"{name}[{i}]={word[:30]!r}... is {n - 2} tokens long, more than the "
                                           f"{limit - 2} the text encoder holds; shorten it")
        return plans

    def _strength_predictor(self, concept: str):
        """``anchor_strength="auto"``: the model folder's strength predictor for ``concept``, checked to fit the encoder."""
        from .strength import find_strength_predictor

        try:
            pred = find_strength_predictor(concept, getattr(self.config, "_name_or_path", None))
        except (FileNotFoundError, ValueError) as e:
            raise EraseConfigError(str(e)) from e
        width = self.text_encoder.config.hidden_size
        if pred.in_features != 2 * width:
            raise EraseConfigError(f"anchor_strength='auto': the strength predictor for {concept!r} expects "
                                   f"{pred.in_features // 2}-dim text embeddings, this model's are {width}-dim; "
                                   "recalibrate it with `eiup calibrate --target strength`")
        return pred

    def _prompt_probes(self, config: EraseConfig, projecting: bool) -> list:
        """Per concept, the model folder's prompt probe (:mod:`eiup.probe`) or None; read only when a gate
        uses it (``prompt_gate``, or ``anchor_gate`` with anchors), on SD 1.x/2.x."""
        from .probe import find_probe

        if not (config.prompt_gate or (projecting and config.anchor_gate)) or not isinstance(self, StableDiffusionPipeline):
            return [None] * len(config.concepts)
        width = self.text_encoder.config.hidden_size
        probes = []
        for concept in config.concepts:
            try:
                probe = find_probe(concept.strip().lower(), getattr(self.config, "_name_or_path", None))
            except ValueError as e:
                raise EraseConfigError(f"prompt_gate / anchor_gate: {e}") from e
            if probe is not None and probe.in_features != 2 * width:
                raise EraseConfigError(f"prompt_gate / anchor_gate: the prompt probe for {concept!r} expects "
                                       f"{probe.in_features // 2}-dim text embeddings, this model's are {width}-dim; "
                                       "refit it with `eiup fit-gate`")
            probes.append(probe)
        return probes

    def _model_anchor_table(self) -> tuple[Any, dict]:
        """``<model folder>/eiup_anchors.json`` as {concept (lower case): anchors}; ``{}`` when there is none."""
        import json
        from pathlib import Path

        folder = getattr(self.config, "_name_or_path", None)
        path = Path(folder) / ANCHOR_FILE if folder else None
        if path is None or not path.is_file():
            return path, {}
        try:
            return path, {str(k).strip().lower(): v for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise EraseConfigError(f"anchors='auto': {path} is not a JSON object of concept -> [anchors]: {e}") from e

    def _model_anchor_plans(self, concepts: Sequence[str], strength: float | None,
                            quiet_without_file: bool = False) -> list[AnchorPlan]:
        """``anchors="auto"``: ``<model folder>/eiup_anchors.json``, per concept: ``[anchor, ...]`` or
        ``{"anchors": [...], "strength": s, "named_strength": s2, "scale": w, "aliases": [...], "protect": [...],
        "in_context": bool, "region": false | "map" | "phrases"}``
        (presets measured for that model; ``named_strength`` for prompts that name the concept, default
        ``strength``; ``aliases``: other words that name it, replaced by the anchors like the concept;
        ``protect``: values of another attribute that the projection of implying prompts must keep)."""
        path, table = self._model_anchor_table()
        plans = []
        for concept in concepts:
            entry = table.get(concept.strip().lower(), [])
            preset = entry if isinstance(entry, dict) else {"anchors": entry}
            anchors = preset.get("anchors", [])
            if not isinstance(anchors, list) or not all(isinstance(a, str) and a.strip() for a in anchors):
                raise EraseConfigError(f"anchors='auto': {path} lists {entry!r} for {concept!r}; give a list of words "
                                       'or {"anchors": [...], "strength": s, "scale": w}')
            try:
                own = _anchor_strength(preset["strength"], f"{path}: {concept!r} strength") if "strength" in preset else None
                named = (_anchor_strength(preset["named_strength"], f"{path}: {concept!r} named_strength")
                         if "named_strength" in preset else None)
                scale = _finite_number(preset["scale"], f"{path}: {concept!r} scale") if "scale" in preset else None
                aliases = preset.get("aliases", [])
                if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
                    raise EraseConfigError(f"{path}: {concept!r} aliases={aliases!r}: give a list of words that name "
                                           "the concept")
                protect = _protect_words(preset.get("protect", []), f"{path}: {concept!r} protect")
                in_context, region = preset.get("in_context", False), preset.get("region", False)
                if not isinstance(in_context, bool):
                    raise EraseConfigError(f"{path}: {concept!r} in_context={in_context!r} must be true or false")
                if not isinstance(region, bool) and region not in REGION_RULES:
                    raise EraseConfigError(f"{path}: {concept!r} region={region!r} must be false, true (\"map\") "
                                           f"or a rule of {REGION_RULES}")
                region = _region_rule(region, None)
                one_thing = self._one_thing_preset(preset.get("one_thing"), f"{path}: {concept!r} one_thing", strength)
            except EraseConfigError as e:
                raise EraseConfigError(f"anchors='auto': {e}") from e
            if scale is not None and not -MAX_ABS_SCALE <= scale < 0:
                raise EraseConfigError(f"anchors='auto': {path}: {concept!r} scale={scale} must be negative and "
                                       f">= -{MAX_ABS_SCALE:g}")
            chosen = strength if strength is not None else (own if own is not None else DEFAULT_ANCHOR_STRENGTH)
            named = None if strength is not None else named  # the call's strength is for every prompt
            plans.append(AnchorPlan(tuple(a.strip() for a in anchors), chosen, scale, named,
                                    tuple(a.strip() for a in aliases), protect, in_context, region, one_thing=one_thing))
        missing = [c for c, plan in zip(concepts, plans) if not plan.anchors]
        if missing and not (quiet_without_file and not table):
            where = path if path is not None else "(no model folder known)"
            warnings.warn(f"anchors='auto': {where} lists no anchors for {missing}; these concepts are erased by "
                          "the concept term alone (pass anchors=[...] to project them too)", stacklevel=4)
        return plans

    @staticmethod
    def _probe_gate(probe: Any, embeds: torch.Tensor, prompts: list[str] | None, encoded: dict[str, torch.Tensor],
                    encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """(B,) whether the probe says each prompt implies its concept: the prompt as a whole (logit > 0), or, for a
        prompt of several things, one of its thing phrases alone with logit > :data:`PHRASE_PROBE_LOGIT`
        (:func:`eiup.anchors.thing_phrases`; in "a starfish and a lime" the lime dilutes the prompt's mean token:
        the toy model's star probe scored it -0.1, "a starfish" 7.0, and the model drew the star in 18 of 20
        seeds). ``encoded`` caches phrase encodings between calls (``encode``)."""
        from .anchors import thing_phrases

        gate = probe.logits(embeds) > 0
        split = {r: ts for r, ts in enumerate(map(thing_phrases, prompts or [])) if len(ts) > 1 and not bool(gate[r])}
        asked = list(dict.fromkeys(t for ts in split.values() for t in ts))  # each phrase scored once
        if not asked:
            return gate
        todo = [t for t in asked if t not in encoded]
        if todo:
            encoded.update(zip(todo, encode(todo).float()))
        passes = dict(zip(asked, (probe.logits(torch.stack([encoded[t] for t in asked]).to(embeds.device))
                                  > PHRASE_PROBE_LOGIT).tolist()))
        for r, ts in split.items():
            gate[r] = any(passes[t] for t in ts)
        return gate

    @staticmethod
    def _one_thing_preset(entry: Any, where: str, strength: float | None
                          ) -> tuple[tuple[str, ...], float, float | None] | None:
        """A preset's ``"one_thing": {"anchors": [...], "strength": s, "named_strength": s2}`` as
        :attr:`AnchorPlan.one_thing` (the call's ``strength``, when it gives one, for every prompt); None without one."""
        if entry is None:
            return None
        if not isinstance(entry, dict) or set(entry) - {"anchors", "strength", "named_strength"}:
            raise EraseConfigError(f"{where}={entry!r}: give {{\"anchors\": [...], \"strength\": s, \"named_strength\": s2}}")
        anchors = entry.get("anchors")
        if not isinstance(anchors, list) or not anchors or not all(isinstance(a, str) and a.strip() for a in anchors):
            raise EraseConfigError(f"{where} anchors={anchors!r}: give a list of one or more words")
        own = _anchor_strength(entry.get("strength", DEFAULT_ANCHOR_STRENGTH), f"{where} strength")
        named = _anchor_strength(entry["named_strength"], f"{where} named_strength") if "named_strength" in entry else None
        if strength is not None:
            own, named = strength, None
        return tuple(a.strip() for a in anchors), own, named

    def _gate_and_project(self, call: dict[str, Any], config: EraseConfig, plans: list[AnchorPlan] | None,
                          probes: list, named: list[list[bool]] | None, row_prompts: list[str] | None, device,
                          cfg: bool, lora_scale, m: int | None
                          ) -> tuple[list[torch.Tensor | None], RegionGate | None, dict[str, np.ndarray]]:
        """Which images' prompts name or imply each concept (by its probe; None without one), and, with
        anchors, the erased branch's prompt embeddings replaced by their projection (:mod:`eiup.anchors`):
        prompts that name the concept move away from their own counterfactuals (the concept word
        replaced by each anchor), the others along the concept's direction from the anchors. With
        ``region`` plans, also the :class:`RegionGate` that confines the projection (else None), and with
        strength predictors, per concept the strength each row was projected with (NaN: not projected)."""
        from .anchors import (aligned_concept_and_anchors, away_from_counterfactuals, concept_directions,
                              counterfactual_positions, names_one_thing, nearest_to_concept, project_tokens,
                              protect_directions, word_positions)

        clip_skip = call.get("clip_skip")
        if m is None:  # single branch: encode the prompt here and hand the parent the edited embeddings
            pe, ne = self.encode_prompt(call["prompt"], device, call["num_images_per_prompt"], cfg, call["negative_prompt"],
                                        prompt_embeds=call.get("prompt_embeds"),
                                        negative_prompt_embeds=call.get("negative_prompt_embeds"),
                                        lora_scale=lora_scale, clip_skip=clip_skip)
            call.update(prompt=None, negative_prompt=None, negative_prompt_embeds=ne if cfg else None,
                        num_images_per_prompt=1)
        else:  # dual: the batch is [original..., erased...]; only the erased half changes
            pe = call["prompt_embeds"]
        rows = slice(0, pe.shape[0]) if m is None else slice(m, pe.shape[0])
        original = edited = pe[rows].float()
        said = ([torch.tensor(n, device=original.device) for n in named] if named is not None
                else [None] * len(config.concepts))  # per concept: which images name it
        implied: list[torch.Tensor | None] = []
        phrases: dict[str, torch.Tensor] = {}  # the thing phrases' encodings, shared by the concepts' probes
        for probe, names in zip(probes, said):
            gate = None if probe is None else self._probe_gate(
                probe, original, row_prompts, phrases, lambda texts: self._encode_concepts(texts, device, lora_scale, clip_skip))
            implied.append(gate if gate is None or names is None else gate | names)
        if plans is None:
            call["prompt_embeds"] = pe
            return implied, None, {}
        tok = self.tokenizer
        carriers = torch.zeros(original.shape[:2], device=original.device) if any(p.region for p in plans) else None
        row_rules: list[set[str]] = [set() for _ in range(original.shape[0])]  # region rules asked per row

        def token_ids(text: str) -> list[int]:  # as the encoder reads it (truncated to its window)
            return tok(text, truncation=True, max_length=tok.model_max_length).input_ids

        # concepts to project: with anchors, and (gated by a probe) implied or named by at least one row;
        # the others would leave every row as it is, so their words are not even encoded
        active = [bool(plan.anchors) and not (config.anchor_gate and gate is not None and not bool(gate.any()))
                  for plan, gate in zip(plans, implied)]
        one_thing = [row_prompts is not None and names_one_thing(row_prompts[r])
                     for r in range(edited.shape[0])] if any(p.one_thing for p in plans) else [False] * edited.shape[0]
        row_plans = [[alt if one_thing[r] else plan for r in range(edited.shape[0])]
                     for plan, alt in zip(plans, [plan.for_one_thing() for plan in plans])]
        counterfactuals: dict[tuple[int, int], list[str]] = {}  # (concept, row) -> the concept replaced by each anchor
        for k, (concept, plan) in enumerate(zip(config.concepts, plans)):
            for r in range(edited.shape[0]) if active[k] and named is not None and row_prompts is not None else ():
                if named[k][r]:
                    counterfactuals[k, r] = [_word_pattern(concept, *plan.aliases).sub(a, row_prompts[r])
                                             for a in row_plans[k][r].anchors]
        needed = [c for c, on in zip(config.concepts, active) if on]
        needed += [a for k, on in enumerate(active) if on  # the concept's own anchors too: the gate without a probe reads them
                   for p in dict.fromkeys([plans[k], *row_plans[k]]) for a in (*p.anchors, *p.protect)]
        needed += [t for ts in counterfactuals.values() for t in ts]
        needed = list(dict.fromkeys(needed))
        encoded: dict[str, torch.Tensor] = {}
        if needed:  # one batched text-encoder pass for everything below
            encoded = dict(zip(needed, self._encode_concepts(needed, device, lora_scale, clip_skip).float()))

        def aligned(concept: str, words: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
            """The concept's and the words' encodings with their padding aligned position by position."""
            lengths = torch.tensor([len(ids) for ids in tok(list(words)).input_ids], device=device)
            return aligned_concept_and_anchors(encoded[concept], len(tok(concept).input_ids),
                                               torch.stack([encoded[w] for w in words]), lengths)

        strengths: dict[str, np.ndarray] = {}  # the strength each row was projected with (NaN: not projected)
        for k, (concept, plan) in enumerate(zip(config.concepts, plans)):
            if not active[k]:
                if plan.anchors:
                    strengths[concept] = np.full(edited.shape[0], np.nan, dtype=np.float32)
                continue
            if plan.strength_predictor is not None:
                predicted = plan.strength_predictor.predict(original).to(original.device)
                base, when_named = predicted, predicted.tolist()
            else:
                base = torch.tensor([p.strength for p in row_plans[k]], device=original.device)
                when_named = [p.strength_when_named for p in row_plans[k]]
            strengths[concept] = np.array([when_named[r] if (k, r) in counterfactuals else float(base[r])
                                           for r in range(edited.shape[0])], dtype=np.float32)
            projected = edited.clone()
            in_context: dict[str, tuple[torch.Tensor, torch.Tensor, list[int]] | None] = {}
            for own in dict.fromkeys(row_plans[k]):  # the concept's plan, and its plan for prompts naming one thing
                c, anchors = aligned(concept, own.anchors)
                mean, direction = concept_directions(c, anchors)
                if own.protect:
                    direction = protect_directions(direction, mean, c, aligned(concept, own.protect)[1])
                mine = [r for r in range(edited.shape[0]) if row_plans[k][r] == own]
                projected[mine] = project_tokens(edited[mine], mean, direction, base[mine, None, None])
                for r in mine:  # rows naming the concept: e -= s (e0 - mean of counterfactuals)
                    if (k, r) in counterfactuals:
                        prompt_ids = token_ids(row_prompts[r])
                        cf = torch.stack([encoded[t][counterfactual_positions(prompt_ids, token_ids(t), edited.shape[1]).to(device)]
                                          for t in counterfactuals[k, r]]).mean(0)
                        projected[r] = away_from_counterfactuals(edited[r], original[r], cf, when_named[r])
                        if own.region:
                            carriers[r, word_positions(prompt_ids, [tok(w, add_special_tokens=False).input_ids
                                                                    for w in (concept, *own.aliases)])] = 1
                            row_rules[r].add(own.region)
                    elif ((own.in_context or own.region) and row_prompts is not None and implied[k] is not None
                          and bool(implied[k][r])):
                        if row_prompts[r] not in in_context:  # rows repeating a prompt share its variants' encoding
                            in_context[row_prompts[r]] = self._in_context_direction(
                                original[r], row_prompts[r], concept, own, token_ids, device, lora_scale, clip_skip)
                        found = in_context[row_prompts[r]]
                        if found is not None and own.in_context:
                            projected[r] = project_tokens(projected[r][None], *found[:2], when_named[r])[0]
                        if found is not None and own.region:
                            carriers[r, found[2]] = 1
                            row_rules[r].add(own.region)
            if config.anchor_gate:  # projected: prompts that imply the concept (the model's probe) or name it
                gate = implied[k]
                if gate is None:
                    gate = nearest_to_concept(original, *aligned(concept, plan.anchors))
                    gate = gate if said[k] is None else gate | said[k]
                projected[~gate] = edited[~gate]
                if concept in strengths:
                    strengths[concept][~gate.cpu().numpy()] = np.nan
            edited = projected
        pe = pe.clone()
        pe[rows] = edited.to(pe.dtype)
        call["prompt_embeds"] = pe
        region = None
        if carriers is not None and bool(carriers.any()):
            region = self._region_gate(original.to(pe.dtype), carriers, row_rules, row_prompts, token_ids)
        return implied, region, strengths

    def _region_gate(self, embeds: torch.Tensor, carriers: torch.Tensor, row_rules: list[set[str]],
                     row_prompts: list[str] | None, token_ids: Callable[[str], list[int]]) -> RegionGate:
        """The :class:`RegionGate` of the rows' carriers: rows whose concepts all ask for the ``"phrases"`` rule
        get their carriers' phrases as carriers and the other phrases' content words as rivals."""
        from .anchors import phrase_positions

        by_phrase = torch.tensor(["map" not in rules and "phrases" in rules for rules in row_rules], device=carriers.device)
        if not bool(by_phrase.any()):
            return RegionGate(embeds, carriers, *REGION_THRESHOLDS["map"])
        carriers, rivals = carriers.clone(), torch.zeros_like(carriers)
        length = carriers.shape[1]
        for r in by_phrase.nonzero()[:, 0].tolist():
            tokens = self.tokenizer.convert_ids_to_tokens(token_ids(row_prompts[r]))
            own, others = phrase_positions(tokens, carriers[r].nonzero()[:, 0].tolist())
            carriers[r, [p for p in own if p < length]] = 1
            rivals[r, [p for p in others if p < length]] = 1
        rivals *= 1 - carriers
        return RegionGate(embeds, carriers, *REGION_THRESHOLDS["map"], rivals=rivals, by_phrase=by_phrase,
                          phrase_thresholds=REGION_THRESHOLDS["phrases"])

    def _in_context_direction(self, original: torch.Tensor, prompt: str, concept: str, plan: AnchorPlan,
                              token_ids: Callable[[str], list[int]], device, lora_scale,
                              clip_skip) -> tuple[torch.Tensor, torch.Tensor, list[int]] | None:
        """The anchors' mean and the concept's direction (L, D) from the prompt's own variants, its implying
        word replaced by the concept and by each anchor (:mod:`eiup.anchors`), and the implying word's token
        positions in the prompt; None for an empty prompt."""
        from .anchors import concept_directions, counterfactual_positions, implying_word, protect_directions, word_substitutions

        words = [concept, *plan.anchors, *plan.protect]
        split = prompt.split()
        lengths = [len(ids) for ids in self.tokenizer(split, add_special_tokens=False).input_ids] if split else []
        in_window = int(np.searchsorted(np.cumsum(lengths), self.tokenizer.model_max_length - 2, side="right"))
        texts = word_substitutions(prompt, words)[:in_window * len(words)]  # words the encoder reads
        if not texts:
            return None
        with _quiet_truncation(self):  # the variants of a long prompt are as long; the user was told once
            variants = self._encode_concepts(texts, device, lora_scale, clip_skip).float()
        prompt_ids, length = token_ids(prompt), original.shape[0]
        aligned = torch.stack([v[counterfactual_positions(prompt_ids, token_ids(t), length).to(v.device)]
                               for v, t in zip(variants, texts)]).view(-1, len(words), *original.shape)
        k = 1 + len(plan.anchors)
        j = implying_word(original, aligned[:, :k])
        c, anchors, protected = aligned[j, 0], aligned[j, 1:k], aligned[j, k:]
        mean, direction = concept_directions(c, anchors)
        if plan.protect:
            direction = protect_directions(direction, mean, c, protected)
        start = 1 + sum(lengths[:j])
        return mean, direction, [p for p in range(start, start + lengths[j]) if p < length]

    def _check_call_inputs(self, call: dict[str, Any], height: int, width: int) -> None:
        """Run the parent's ``check_inputs`` on the user's arguments before any model work."""
        values = {**call, "height": height, "width": width, "callback_steps": call.get("callback_steps")}
        params = inspect.signature(self.check_inputs).parameters  # type: ignore[attr-defined]
        self.check_inputs(**{name: values.get(name) for name in params})  # type: ignore[attr-defined]

    def _prepare_dual_latents(self, call: dict[str, Any], m: int, device, dtype, height, width) -> None:
        """Initial noise drawn once as the plain pipeline would, duplicated for both branches."""
        generator = call.get("generator")
        latents = call.get("latents")
        if latents is None:
            if isinstance(generator, list) and len(generator) != m:
                raise ValueError(
                    f"You have passed a list of generators of length {len(generator)}, but requested an effective batch"
                    f" size of {m}. Make sure the batch size matches the length of the generators."
                )
            shape = (m, self.unet.config.in_channels, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        call["latents"] = _double(latents.to(device))
        if isinstance(generator, list):
            call["generator"] = generator + generator

    # ---- per-family hooks ------------------------------------------------------------------
    def _resolve_hw(self, call: dict[str, Any]) -> tuple[int, int]:
        raise NotImplementedError

    def _encode_concepts(self, text: str, device, lora_scale, clip_skip) -> torch.Tensor:
        raise NotImplementedError

    def _dual_call(self, call: dict[str, Any], device, cfg: bool, lora_scale, height, width) -> int:
        raise NotImplementedError


class EIUPPipeline(EIUPMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x) with inference-time concept erasure.

    See :meth:`EIUPMixin.__call__` for the erasure arguments; everything else is the parent's.
    """

    _eiup_tuple_fields = ("images", "nsfw_content_detected")

    def _resolve_hw(self, call):
        height, width = call.get("height"), call.get("width")
        if not height or not width:
            size = self.unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
            height, width = h * self.vae_scale_factor, w * self.vae_scale_factor
        return height, width

    def _encode_concepts(self, text, device, lora_scale, clip_skip):
        embeds, _ = self.encode_prompt(text, device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip)
        return embeds

    def _dual_call(self, call, device, cfg, lora_scale, height, width):
        pe, ne = self.encode_prompt(
            call["prompt"],
            device,
            call["num_images_per_prompt"],
            cfg,
            call["negative_prompt"],
            prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"],
            lora_scale=lora_scale,
            clip_skip=call["clip_skip"],
        )
        call.update(
            prompt=None,
            negative_prompt=None,
            prompt_embeds=_double(pe),
            negative_prompt_embeds=_double(ne) if cfg else None,
            num_images_per_prompt=1,
        )
        self._prepare_dual_latents(call, pe.shape[0], device, pe.dtype, height, width)
        return pe.shape[0]


class EIUPXLPipeline(EIUPMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with inference-time concept erasure.

    E_C is the concatenation of both text encoders' hidden states, exactly like the prompt's.
    See :meth:`EIUPMixin.__call__` for the erasure arguments; everything else is the parent's.
    """

    _eiup_tuple_fields = ("images",)

    def _resolve_hw(self, call):
        height = call.get("height") or self.default_sample_size * self.vae_scale_factor
        width = call.get("width") or self.default_sample_size * self.vae_scale_factor
        return height, width

    def _encode_concepts(self, text, device, lora_scale, clip_skip):
        return self.encode_prompt(
            prompt=text,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )[0]

    def _dual_call(self, call, device, cfg, lora_scale, height, width):
        pe, ne, ppe, nppe = self.encode_prompt(
            prompt=call["prompt"],
            prompt_2=call["prompt_2"],
            device=device,
            num_images_per_prompt=call["num_images_per_prompt"],
            do_classifier_free_guidance=cfg,
            negative_prompt=call["negative_prompt"],
            negative_prompt_2=call["negative_prompt_2"],
            prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            negative_pooled_prompt_embeds=call["negative_pooled_prompt_embeds"],
            lora_scale=lora_scale,
            clip_skip=call["clip_skip"],
        )
        call.update(
            prompt=None,
            prompt_2=None,
            negative_prompt=None,
            negative_prompt_2=None,
            prompt_embeds=_double(pe),
            pooled_prompt_embeds=_double(ppe),
            negative_prompt_embeds=_double(ne) if cfg else None,
            negative_pooled_prompt_embeds=_double(nppe) if cfg else None,
            num_images_per_prompt=1,
        )
        self._prepare_dual_latents(call, pe.shape[0], device, pe.dtype, height, width)
        return pe.shape[0]


def from_pipe(pipe: Any, **kwargs: Any) -> EIUPPipeline | EIUPXLPipeline:
    """Wrap an existing SD / SDXL pipeline's components (shared, not copied) in the EIUP class.

    Args:
        pipe: A diffusers Stable Diffusion (1.x/2.x) or SDXL pipeline.
        **kwargs: Passed to diffusers' ``DiffusionPipeline.from_pipe`` (e.g. a replacement scheduler).

    Returns:
        An :class:`EIUPXLPipeline` for SDXL pipelines, else an :class:`EIUPPipeline`.
    """
    components = getattr(pipe, "components", {})
    is_xl = isinstance(pipe, StableDiffusionXLPipeline) or "text_encoder_2" in components
    cls = EIUPXLPipeline if is_xl else EIUPPipeline
    if "torch_dtype" not in kwargs and "dtype" not in kwargs:
        kwargs["dtype"] = pipe.dtype  # diffusers' from_pipe otherwise casts shared modules to float32
    return cls.from_pipe(pipe, **kwargs)
