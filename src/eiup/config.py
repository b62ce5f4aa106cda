"""Validated erasure settings: the defaults, limits and :class:`EraseConfig` that every erasure call builds first.

Nothing here touches a model; construction raises :class:`EraseConfigError` (a ``ValueError``) naming the argument and
the fix, before any model work. :mod:`eiup.pipeline` resolves what depends on the model (anchors, presets, probes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch

DEFAULT_ERASE_SCALE: float = -4.0
"""Suppression scale w used when ``erase_scale`` is not given. Chosen on the toy benchmark
(docs/bench): the strongest scale that keeps unrelated images at >= 90% unchanged attributes and
a median PSNR >= 20 dB against the plain image; -8 erases far more and changes more."""
MAX_ABS_SCALE: float = 100.0
"""Largest |erase_scale| accepted: far beyond any useful value (the image is destroyed long
before), and safe from overflow in float16 attention."""
DEFAULT_ERASE_MODE: str = "single"
"""Mode used when ``erase_mode`` is not given: on the toy benchmark dual erases no better than
single at 1.8x the cost."""
DEFAULT_GATE: str | None = None
"""Gate used by the CLI when ``--gate/--no-gate`` is not given: the presence gate lowered erasure
more than it protected unrelated images on the toy benchmark."""
DEFAULT_CONCEPT_CONTEXT: str = "prompt"
"""How concepts are encoded when ``concept_context`` is not given: in the prompt's context, which
erases implicit prompts where the separately encoded concept does not (toy benchmark)."""
DEFAULT_ANCHORS: str | None = "auto"
"""Anchors used when ``anchors`` is not given: ``"auto"``, the model folder's ``eiup_anchors.json``
(models without one are erased by the concept term alone, quietly). On the toy benchmark the
anchored projection cut the implicit residual from 66% to 16% at the same specificity."""
DEFAULT_ANCHOR_STRENGTH: float = 3.0
"""s of the anchored projection: on the toy benchmark 3 erased backgrounds and colours that 1 did not."""
ANCHOR_FILE = "eiup_anchors.json"
PHRASE_PROBE_LOGIT = 2.0
"""The bar a thing phrase of a prompt of several things must pass alone for the prompt probe's gate (p = 0.88):
an implying noun passes it ("a starfish": 7.0 for star), weak associations do not. On 300 random two-object toy
captions (seed 123; red, star, heart) 17 prompts that name no concept and score under 0 as a whole have a phrase
scoring 0-2; the model drew the concept in 13% of their images (4 seeds, 0-50% per prompt)."""
ERASE_MODES = ("single", "dual")
CONCEPT_CONTEXTS = ("separate", "prompt")
TAILS = ("suppress", "reference")
GATES = ("presence",)
AUTO = "auto"
DEFAULT_GUARD = AUTO  # the model folder's guard (eiup_guard.safetensors) where it has one, for calls it can climb
MAX_ANCHOR_STRENGTH = 8.0
REGION_RULES = ("map", "phrases")
"""How ``anchor_region`` finds the concept's region (:class:`eiup.attention.RegionGate`): ``"map"``, the
carrier word's attention map relative to the image's maximum; ``"phrases"``, the carrier's phrase's share of
the attention the prompt's phrases get (a prompt of one phrase is not confined)."""
REGION_THRESHOLDS = {"map": (0.05, 0.15), "phrases": (0.25, 0.5)}
"""(low, high) of each region rule: weight 0 up to low, 1 from high (relative attention, or share)."""


class EraseConfigError(ValueError):
    """An erasure argument is invalid; the message names the argument and the fix."""


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise EraseConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise EraseConfigError(f"{name}={value} is not finite; pass a finite number such as {name}=-1.0")
    return value


def _protect_words(value: Any, name: str) -> tuple[str, ...]:
    """Words whose differences the anchored projection keeps: a list of two or more, or empty for none."""
    if not isinstance(value, (list, tuple)) or len(value) == 1:
        raise EraseConfigError(f"{name}={value!r}: give a list of two or more values of the attribute to keep (their "
                               "differences span what is protected, e.g. ['red', 'orange', 'yellow']), or [] for none")
    for i, word in enumerate(value):
        if not isinstance(word, str) or not word.strip():
            raise EraseConfigError(f"{name}[{i}]={word!r} is not a word; remove it or give a value of the attribute to keep")
    return tuple(w.strip() for w in value)


def _region_rule(asked: bool | str, preset: str | None) -> str | None:
    """The region rule of one concept: off for False, the preset's rule (else "map") for True, else the rule asked."""
    if asked is False:
        return None
    if asked is True:
        return preset or REGION_RULES[0]
    return asked


def _anchor_strength(value: Any, name: str) -> float:
    strength = _finite_number(value, name)
    if not 0.0 < strength <= MAX_ANCHOR_STRENGTH:
        raise EraseConfigError(f"{name}={strength} is outside (0, {MAX_ANCHOR_STRENGTH:g}]; "
                               "1 removes the concept's component from the prompt tokens, e.g. anchor_strength=1")
    return strength


@dataclass(frozen=True)
class RowStrengths:
    """Per-image projection strengths given by the caller (``anchor_strength=[s0, s1, ...]``), answering like a
    strength predictor."""

    values: tuple[float, ...]

    def predict(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) the given strengths (their count checked against the call's images before any model work)."""
        return torch.tensor(self.values, dtype=torch.float32)


@dataclass(frozen=True)
class AnchorPlan:
    """How one concept is projected: its anchors, the strength (for prompts that name the concept:
    ``named_strength``, default the same), the model's preset scale (or None), and other words that
    name the concept (``aliases``: a prompt saying one names the concept), words of other attributes
    whose differences the projection must not move prompts along (``protect``), and whether prompts that
    imply the concept are also projected along in-context anchors (``in_context``, :mod:`eiup.anchors`), and
    where in the image the projection acts (``region``: None everywhere, else a rule of :data:`REGION_RULES`,
    :class:`eiup.attention.RegionGate`); a model's preset may give prompts that name one thing other anchors
    and strengths (``one_thing``: ``(anchors, strength, named_strength)``, :meth:`for_one_thing`)."""

    anchors: tuple[str, ...]
    strength: float
    scale: float | None = None
    named_strength: float | None = None
    aliases: tuple[str, ...] = ()
    protect: tuple[str, ...] = ()
    in_context: bool = False
    region: str | None = None
    strength_predictor: Any = dataclasses.field(default=None, compare=False)  # anchor_strength="auto"
    one_thing: tuple[tuple[str, ...], float, float | None] | None = None

    @property
    def strength_when_named(self) -> float:
        return self.strength if self.named_strength is None else self.named_strength

    def for_one_thing(self) -> AnchorPlan:
        """The plan for a prompt that names one thing (:func:`eiup.anchors.names_one_thing`): this one with the
        ``one_thing`` anchors and strengths where the preset gives them."""
        if self.one_thing is None:
            return self
        anchors, strength, named = self.one_thing
        return dataclasses.replace(self, anchors=anchors, strength=strength, named_strength=named, one_thing=None)


@dataclass(frozen=True)
class EraseConfig:
    """Validated erasure settings of one call (the erasure keyword arguments of ``__call__``).

    Construction normalises and validates everything and raises :class:`EraseConfigError`
    (a ``ValueError``) naming the argument and the fix. ``dataclasses.replace`` re-validates.

    Attributes:
        erase: Concepts to erase: a string or a list of strings (stripped; ``()`` if none).
        erase_scale: Suppression scale w, one float or one per concept (see :attr:`scales`).
            ``None`` means the model's preset for the concept (``anchors="auto"`` with a preset in
            ``eiup_anchors.json``), else :data:`DEFAULT_ERASE_SCALE`.
        erase_mode: ``"single"`` or ``"dual"``; ``None`` means :data:`DEFAULT_ERASE_MODE`.
        cross_attn_fraction: Dual mode: the first ``floor(f * steps)`` steps use the original
            branch's prompt cross-attention output.
        self_attn_fraction: Dual mode: the first ``floor(f * steps)`` steps use the original
            branch's self-attention maps.
        self_attn_max_tokens: Dual mode: largest self-attention layer (tokens) whose maps are
            swapped. ``None``: latent_h * latent_w / 16 (16x16 for SD at 512 px). 0 disables.
        tail: Dual mode, after the cross window: ``"suppress"`` (own M_P plus concept term) or
            ``"reference"`` (the authors' code: concepts with positive weight +1).
        allow_amplify: Allow positive scales (which amplify the concept instead of erasing it).
        gate: ``None`` or ``"presence"``: weight the concept term per pixel by how strongly the
            pixel attends to the concept compared with the rest of the image (see
            :func:`eiup.scale.presence_gate`), so regions without the concept are left alone.
        gate_threshold: Presence gate: relative concept attention (to the image's maximum)
            below which a pixel is not suppressed, in [0, 1).
        concept_context: How E_C is encoded. ``"separate"``: the concepts alone,
            ``" ".join(concepts)``. ``"prompt"``: after the prompt, ``prompt + " " + concepts``, as
            the authors' code does, so the concept tokens carry the prompt's context (a causal text
            encoder lets "red" after "a tomato" see the tomato); J_C are the concept's positions at
            the end. Unlike the authors' code the concept is never cut: a prompt too long to leave
            room for it is shortened in this encoding only. ``None`` means
            :data:`DEFAULT_CONCEPT_CONTEXT`, or ``"separate"`` when the call gives ``prompt_embeds``
            instead of prompt text.
        anchors: Concepts of the same kind as the erased ones (for "red": other colours). When
            given, each erased concept is also projected out of every prompt token after BOS,
            relative to the anchors (:mod:`eiup.anchors`); tokens that do not lean towards the
            concept are left exactly as they are. ``"auto"``: per concept, the anchors listed in
            the model folder's ``eiup_anchors.json`` (the toy model ships one; concepts it does not
            list get none, with a warning). An entry may also carry measured presets,
            ``{"anchors": [...], "strength": s, "named_strength": s2, "scale": w}``, used when the
            call leaves ``anchor_strength`` / ``erase_scale`` unset. A prompt that names the
            concept moves away from its counterfactuals instead (the concept word replaced by each
            anchor, where that keeps the token count), with ``named_strength``. ``"one_thing": {"anchors":
            [...], "strength": s, "named_strength": s2}`` gives prompts that name one thing
            (:func:`eiup.anchors.names_one_thing`) their own anchors and strengths (:meth:`AnchorPlan.for_one_thing`).
            ``()``: off. ``None``: :data:`DEFAULT_ANCHORS`. SD 1.x/2.x pipelines.
        anchor_strength: s of the anchored projection (1 removes the concept's component, larger
            values push past the anchors), in (0, 8]. ``None``: with ``anchors="auto"`` the model's
            preset for the concept when its ``eiup_anchors.json`` gives one, else
            :data:`DEFAULT_ANCHOR_STRENGTH`. A sequence: one strength per image of the call (for every
            concept; what :mod:`eiup.guard` escalates). ``"auto"``: predicted per prompt and concept from the
            prompt's text embedding by the model folder's calibrated strength predictor
            (``eiup_strength_predictors/``, :mod:`eiup.strength`, ``eiup calibrate --target strength``),
            for prompts that name the concept and prompts that imply it alike.
        anchor_protect: Words of another attribute (for "star": the colours) whose differences the
            projection must not move a prompt along (:func:`eiup.anchors.protect_directions`): two or
            more, for every erased concept, in place of the preset's ``"protect"``; ``()``: none.
            ``None``: the model's preset with ``anchors="auto"``, else none.
        anchor_in_context: Also project each prompt that the probe says implies the concept along
            in-context anchors: the implying word located and replaced by the concept and by each
            anchor (:func:`eiup.anchors.implying_word`). Costs one text-encoder pass over
            (1 + anchors + protected words) x words variants per such prompt. Needs the prompt text
            and a prompt probe (a call with ``prompt_embeds`` or a model without probes gets the first
            projection only). ``None``: the model's preset with ``anchors="auto"``, else off.
        anchor_gate: Project only prompts that name the concept (whole words) or imply it: by the
            model's prompt probe where its folder has one (``eiup_prompt_probes/``, fitted by
            ``eiup fit-gate`` on what the model draws; :mod:`eiup.probe`), else when their tokens
            are closer to the concept's than to every anchor's (mean cosine over the tokens after
            BOS). ``False`` projects every prompt that leans towards the concept.
        anchor_region: Confine the projection to the concept's region of the image: in every
            cross-attention layer the output for the projected prompt is blended with the output for
            the prompt as given, per pixel, by the attention to the *carrier*, the word that names the
            concept or, for a prompt that implies it, the implying word (the one
            :func:`eiup.anchors.implying_word` finds), averaged over the layers of the steps so far.
            Two rules (:data:`REGION_RULES`, :data:`REGION_THRESHOLDS`, :class:`eiup.attention.RegionGate`):
            ``"map"``, the carrier's attention relative to the image's maximum, weight 0 up to 5% of it,
            1 from 15%; ``"phrases"``, the share of the carrier's phrase in the attention to the content
            words of it and of the other phrases that name a thing (split at "and" and commas, opening
            with a determiner: "a tomato | a lime", not ", highly detailed"), weight 0 up to 25%, 1 from
            50%, so a prompt of one such phrase is projected everywhere (a colour the model reads
            everywhere in the image is still erased) and another object keeps its pixels. The other
            objects of the prompt keep their attributes ("a valentine and a lime": the heart goes, the
            lime stays as drawn). For concepts of an object, not of the whole image (a background, a
            style). Needs the prompt text; an image erasing several concepts is confined to the union
            of their regions (by the map rule if any of them asks for it). ``True``: each concept's
            preset rule, else ``"map"``; ``None``: the model's preset with ``anchors="auto"``, else off.
        prompt_gate: Apply the concept term only to images whose prompt names the concept or, by
            the model's prompt probe, implies it; the images of other prompts come out as without
            erasure (bit for bit when no image of the call needs the term). Only where the model
            folder has a probe for the concept (SD 1.x/2.x); without one every prompt is erased.

    ``erase_scale="auto"`` predicts one scale per image and concept from the concept's
    attention at the first step, with a predictor calibrated by ``eiup calibrate``.
    """

    erase: str | Sequence[str] | None = None
    erase_scale: float | Sequence[float] | None = None
    erase_mode: str | None = None
    cross_attn_fraction: float = 0.8
    self_attn_fraction: float = 0.4
    self_attn_max_tokens: int | None = None
    tail: str = "suppress"
    allow_amplify: bool = False
    gate: str | None = None
    gate_threshold: float = 0.4
    concept_context: str | None = None
    anchors: str | Sequence[str] | None = None
    anchor_strength: float | str | None = None
    anchor_protect: Sequence[str] | None = None
    anchor_in_context: bool | None = None
    anchor_gate: bool = True
    anchor_region: bool | str | None = None
    prompt_gate: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "erase", self._concepts(self.erase))
        if self.anchors is not None:  # None stays None: DEFAULT_ANCHORS, resolved at call time
            set_(self, "anchors", self._anchor_spec(self.anchors))
        if isinstance(self.anchor_strength, str):
            if self.anchor_strength.strip().lower() != AUTO:
                raise EraseConfigError(f"anchor_strength={self.anchor_strength!r}: give a number in "
                                       f"(0, {MAX_ANCHOR_STRENGTH:g}] or 'auto'")
            set_(self, "anchor_strength", AUTO)
        elif isinstance(self.anchor_strength, (list, tuple, np.ndarray)):  # one per image
            if len(self.anchor_strength) == 0:
                raise EraseConfigError("anchor_strength=[]: give one strength per image, one number, or 'auto'")
            set_(self, "anchor_strength", tuple(_anchor_strength(v, f"anchor_strength[{i}]")
                                                for i, v in enumerate(self.anchor_strength)))
        elif self.anchor_strength is not None:  # None: the model's preset for the concept, else the default
            set_(self, "anchor_strength", _anchor_strength(self.anchor_strength, "anchor_strength"))
        if self.anchor_protect is not None:  # None: the model's preset, else none
            set_(self, "anchor_protect", _protect_words(self.anchor_protect, "anchor_protect"))
        for name in ("anchor_gate", "prompt_gate"):
            if not isinstance(getattr(self, name), bool):
                raise EraseConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.anchor_in_context is not None and not isinstance(self.anchor_in_context, bool):
            raise EraseConfigError(f"anchor_in_context={self.anchor_in_context!r} must be True, False or None "
                                   "(the model's preset)")
        if self.anchor_region is not None and not isinstance(self.anchor_region, bool) and self.anchor_region not in REGION_RULES:
            raise EraseConfigError(f"anchor_region={self.anchor_region!r} must be True, False, None (the model's preset) "
                                   f"or a rule of {REGION_RULES}")
        set_(self, "allow_amplify", bool(self.allow_amplify))
        if isinstance(self.erase_scale, list):
            set_(self, "erase_scale", tuple(self.erase_scale))
        self._scales(self.erase_scale, len(self.erase))  # validates
        mode = DEFAULT_ERASE_MODE if self.erase_mode is None else self.erase_mode
        if mode not in ERASE_MODES:
            raise EraseConfigError(f"erase_mode={mode!r} is unknown; use one of {ERASE_MODES}")
        set_(self, "erase_mode", mode)
        for name in ("cross_attn_fraction", "self_attn_fraction"):
            value = _finite_number(getattr(self, name), name)
            if not 0.0 <= value <= 1.0:
                raise EraseConfigError(f"{name}={value} is outside [0, 1]; pass a fraction of the steps, e.g. {name}=0.5")
            set_(self, name, value)
        if self.self_attn_max_tokens is not None:
            if isinstance(self.self_attn_max_tokens, bool) or not isinstance(self.self_attn_max_tokens, int) or self.self_attn_max_tokens < 0:
                raise EraseConfigError(
                    f"self_attn_max_tokens={self.self_attn_max_tokens!r} must be a non-negative int "
                    "(tokens of the largest swapped self-attention layer) or None for latent_h*latent_w/16"
                )
        if self.tail not in TAILS:
            raise EraseConfigError(f"tail={self.tail!r} is unknown; use one of {TAILS}")
        if self.gate is not None and self.gate not in GATES:
            raise EraseConfigError(f"gate={self.gate!r} is unknown; use None or one of {GATES}")
        threshold = _finite_number(self.gate_threshold, "gate_threshold")
        if not 0.0 <= threshold < 1.0:
            raise EraseConfigError(f"gate_threshold={threshold} is outside [0, 1); e.g. gate_threshold=0.4")
        set_(self, "gate_threshold", threshold)
        context = DEFAULT_CONCEPT_CONTEXT if self.concept_context is None else self.concept_context
        if context not in CONCEPT_CONTEXTS:
            raise EraseConfigError(f"concept_context={context!r} is unknown; use one of {CONCEPT_CONTEXTS}")
        set_(self, "concept_context", context)

    @staticmethod
    def _concepts(erase: Any, name: str = "erase") -> tuple[str, ...]:
        if erase is None:
            return ()
        items = (erase,) if isinstance(erase, str) else erase
        if not isinstance(items, (list, tuple)):
            raise EraseConfigError(f"{name} must be a string or a list of strings, got {type(erase).__name__}")
        example = "erase=['nudity']" if name == "erase" else "anchors=['blue', 'green']"
        concepts = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise EraseConfigError(f"{name}[{i}]={item!r} is not a string; pass concepts as text, e.g. {example}")
            if not item.strip():
                raise EraseConfigError(f"{name}[{i}]={item!r} is empty or whitespace; remove it or give a word, e.g. {example}")
            concepts.append(item.strip())
        return tuple(concepts)

    @classmethod
    def _anchor_spec(cls, anchors: Any) -> str | tuple[str, ...]:
        if isinstance(anchors, (list, tuple)) and len(anchors) == 1 and isinstance(anchors[0], str):
            anchors = anchors[0] if anchors[0].strip().lower() == AUTO else anchors
        if isinstance(anchors, str) and anchors.strip().lower() == AUTO:
            return AUTO
        return cls._concepts(anchors, "anchors")

    @property
    def anchor_spec(self) -> str | tuple[str, ...]:
        """The anchors of this call: ``"auto"``, a tuple of words, or ``()`` (``None`` resolves :data:`DEFAULT_ANCHORS`)."""
        if self.anchors is None:
            return () if DEFAULT_ANCHORS is None else self._anchor_spec(DEFAULT_ANCHORS)
        return self.anchors  # type: ignore[return-value]

    @property
    def auto(self) -> bool:
        """Whether the scale is predicted per image (``erase_scale="auto"``)."""
        return isinstance(self.erase_scale, str) and self.erase_scale.strip().lower() == AUTO

    @property
    def strength_per_image(self) -> bool:
        """Whether the projection strength varies per image (``anchor_strength="auto"`` or a sequence)."""
        return self.anchor_strength == AUTO or isinstance(self.anchor_strength, tuple)

    def _scales(self, scale: Any, n: int) -> tuple[float, ...]:
        scale = DEFAULT_ERASE_SCALE if scale is None else scale
        if isinstance(scale, str):
            if scale.strip().lower() != AUTO:
                raise EraseConfigError(f"erase_scale={scale!r}: give a negative number, one per concept, or 'auto'")
            return (0.0,) * n  # replaced per image after the first step
        if isinstance(scale, (list, tuple)):
            if len(scale) != n:
                raise EraseConfigError(
                    f"erase_scale has {len(scale)} values but erase has {n} concepts; pass one scale per concept or a single float"
                )
            values = tuple(_finite_number(s, f"erase_scale[{i}]") for i, s in enumerate(scale))
        else:
            values = (_finite_number(scale, "erase_scale"),) * n
        for i, v in enumerate(values):
            if abs(v) > MAX_ABS_SCALE:
                raise EraseConfigError(
                    f"erase_scale={v} (concept {i}) is beyond +-{MAX_ABS_SCALE:g}, which only destroys the image; "
                    "useful scales lie between about -0.5 and -8")
        if not self.allow_amplify:
            for i, v in enumerate(values):
                if v > 0:
                    raise EraseConfigError(
                        f"erase_scale={v} (concept {i}) is positive, which amplifies the concept instead of erasing it; "
                        "use a negative scale, or pass allow_amplify=True if amplification is intended"
                    )
        return values

    @property
    def concepts(self) -> tuple[str, ...]:
        """The concepts to erase."""
        return self.erase  # type: ignore[return-value]

    @property
    def scales(self) -> tuple[float, ...]:
        """One scale per concept (:data:`DEFAULT_ERASE_SCALE` when ``erase_scale`` is ``None``)."""
        return self._scales(self.erase_scale, len(self.erase))
