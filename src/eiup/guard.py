"""Closed-loop erasure: a guard checks every erased image; an image in which it still sees the concept is
drawn again from the same starting noise one strength up a ladder, and, with a guard that also compares
the image with the one drawn without erasure, an image that lost more than the concept one strength down.

The projection's strength (``anchor_strength``) is what trades erasure against fidelity on the toy
model: too weak and the concept survives, too strong and the image changes more than the concept.
Which strength a prompt and seed needs is not known in advance (the presets and
``anchor_strength="auto"`` guess it per concept or per prompt); a guard looks at the result. Every
image is first drawn as the call would draw it without a guard (the model's preset), so the guard
only changes images it finds wanting: up the ladder while it sees the concept, down while the image is
clean but harmed, stopping where a milder strength shows the concept again; an image still flagged (or,
with a guard that checks the rest, still harmed) at the end is drawn without the erasure and with the
concept as negative prompt, at rising guidance, as a last resort (:data:`NEGATIVE_PROMPT_GUIDANCE`), then
with the negative prompt and the erasure together, and keeps such a draw where it ranks better.
A guard is any callable ``images -> list[bool]`` (True: the concept is still shown), e.g. NudeNet or a product's own safety
classifier, optionally with ``harmed(images, originals) -> list[bool]`` (:class:`ToyGuard`, the toy
model's: a second concept detector). It should not be the detector that judges the benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_LADDER = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
GUARD_FILE = "eiup_guard.safetensors"  # in a model folder: a toy-world concept detector, what guard="auto" loads

NEGATIVE_PROMPT_GUIDANCE = (1.0, 1.5, 2.0)
"""The guard's last resort: negative-prompt draws at these multiples of the call's guidance scale, in turn (then
one at the call's guidance with the erasure too)."""


Guard = Callable[[Any], Sequence[bool]]


def check_ladder(ladder: Any, limit: float) -> tuple[float, ...]:
    """The ladder as increasing strengths in (0, ``limit``], or a ValueError naming the fix."""
    try:
        values = tuple(float(v) for v in ladder)
    except (TypeError, ValueError):
        raise ValueError(f"guard_ladder={ladder!r}: give increasing strengths, e.g. {list(DEFAULT_LADDER)}") from None
    if not values or not all(np.isfinite(v) and 0 < v <= limit for v in values) or list(values) != sorted(set(values)):
        raise ValueError(f"guard_ladder={list(values)}: give strictly increasing strengths in (0, {limit:g}], "
                         f"e.g. {list(DEFAULT_LADDER)}")
    return values


def load_guard(spec: str) -> Guard | str | bool:
    """What the pipeline's ``guard=`` gets for a CLI spec: ``"auto"`` (the model folder's), ``"none"`` (False),
    ``"nudenet"``, or ``"package.module:function"`` (a callable images -> list[bool]). These judges do not depend
    on the concept (NudeNet flags any exposed class), so one serves every call."""
    from .calibrate import load_judge

    if spec == "none":
        return False
    if spec == "auto":
        return "auto"
    return load_judge(spec, "")  # the concept only matters to the toy judge, which "auto" covers


THRESHOLDS = ("threshold", "milder_threshold", "keep_threshold")
"""The :class:`ToyGuard` thresholds a guard file may carry in its metadata (:func:`set_guard_thresholds`)."""


def check_thresholds(*values: float | None) -> dict[str, float | None]:
    """The :data:`THRESHOLDS` by name, or a ValueError naming the first that is not a probability in (0, 1) or None."""
    named = dict(zip(THRESHOLDS, values, strict=True))
    for name, value in named.items():
        if value is not None and not 0 < value < 1:
            raise ValueError(f"{name}={value!r}: give a probability in (0, 1), or None for the detector's reading")
    return named


def set_guard_thresholds(path: str | Path, threshold: float | None = None, milder_threshold: float | None = None,
                         note: str | None = None, keep_threshold: float | None = None) -> Path:
    """Store a guard file's ``threshold`` / ``milder_threshold`` / ``keep_threshold`` (what :func:`model_guard` passes
    to :class:`ToyGuard`) in its metadata, with ``note`` saying how they were chosen; the three replace those stored
    (one left None is dropped), other metadata kept, the file replaced atomically."""
    from .io import load_tensors, save_tensors_atomic

    values = check_thresholds(threshold, milder_threshold, keep_threshold)
    tensors, meta = load_tensors(path)
    meta = {k: v for k, v in meta.items() if k not in THRESHOLDS and not k.endswith("chosen_on")}
    meta.update({k: str(v) for k, v in (*values.items(), ("thresholds_chosen_on", note)) if v is not None})
    return save_tensors_atomic(path, tensors, meta)


@functools.lru_cache(maxsize=4)
def _detector(path: str, mtime_ns: int) -> tuple[Any, dict[str, float]]:
    """The guard detector and the thresholds its file's metadata holds (:data:`THRESHOLDS`; one missing: not given)."""
    from .io import tensor_metadata
    from .toy.detect import ConceptDetector

    meta = tensor_metadata(path)
    return ConceptDetector.load(path), {key: float(meta[key]) for key in THRESHOLDS if meta.get(key) is not None}


class ToyGuard:
    """A toy-world guard: flags an image where one of ``concepts`` is seen by ``detector`` (its probability
    reaching ``threshold``; None: the detector's reading), doubts it where the probability reaches
    ``milder_threshold`` (a stricter bar for drawing an image milder than the preset), and, with ``keep``,
    finds it harmed where the rest of the image differs from the one drawn without erasure (object count,
    background unless erased, colour and shape of each object but the erased attribute:
    :func:`eiup.bench.metrics.kept_from_plain`; not checked when the concepts are of several attributes), or,
    with ``keep_threshold``, where the detector gives one of those kept colours and shapes a probability under it
    (an object erased into a shapeless blob can still be read as its old shape, by a small margin)."""

    def __init__(self, detector: Any, concepts: Sequence[str], threshold: float | None = None, keep: bool = True,
                 milder_threshold: float | None = None, keep_threshold: float | None = None):
        from .toy.world import CONCEPTS

        unknown = [c for c in concepts if c not in CONCEPTS]
        if unknown or not concepts:
            raise ValueError(f"concepts={list(concepts)}: the toy guard knows {sorted(CONCEPTS)}")
        check_thresholds(threshold, milder_threshold, keep_threshold)
        self.detector, self.concepts, self.threshold, self.keep = detector, list(concepts), threshold, keep
        self.milder_threshold, self.keep_threshold = milder_threshold, keep_threshold
        if not keep:
            self.harmed = None
        if milder_threshold is None:
            self.doubt = None

    def _shown(self, images: Any, threshold: float | None) -> list[bool]:
        """Per image (detected once): any of the concepts shown, by the reading or ``threshold``."""
        from .toy.world import CONCEPTS

        return [any(d.shows(*CONCEPTS[c], threshold) for c in self.concepts) for d in self.detector.detect(images)]

    def __call__(self, images: Any) -> list[bool]:
        return self._shown(images, self.threshold)

    def doubt(self, images: Any) -> list[bool]:
        """Per image: a concept's probability reaches ``milder_threshold`` (a milder draw is accepted only below it)."""
        return self._shown(images, self.milder_threshold)

    def harmed(self, images: Any, originals: Any) -> list[bool]:
        """Per image: the rest of it changed against ``originals`` (for any of the concepts' attributes)."""
        from .bench.metrics import RELIABLE_ATTRIBUTES, kept_from_plain
        from .toy.detect import HEADS, match_objects
        from .toy.world import CONCEPTS

        attributes = {CONCEPTS[c][0] for c in self.concepts}
        if len(attributes) > 1:  # concepts of several attributes: what may change is not one attribute; no check
            return [False] * len(images)
        (a,) = attributes
        skip = None if a == "background" else a
        found, plain = self.detector.detect(images), self.detector.detect(originals)

        def sure(d: Any, p: Any) -> bool:  # every kept colour and shape read with at least keep_threshold
            return self.keep_threshold is None or all(
                float(d.objects[i].scores[k][HEADS[k].index(getattr(p.objects[j], k))]) >= self.keep_threshold
                for i, j in match_objects(d.objects, p.objects) for k in RELIABLE_ATTRIBUTES if k != skip)

        return [not (kept_from_plain(d, p, skip, a == "background") and sure(d, p)) for d, p in zip(found, plain)]


def model_guard(folder: str | Path | None, concepts: Sequence[str]) -> Guard | None:
    """``guard="auto"``: the model folder's guard (:data:`GUARD_FILE`, a toy-world concept detector; the file's
    thresholds in its metadata, :data:`THRESHOLDS`, go to :class:`ToyGuard`) for the ``concepts`` it knows, or
    None when the folder has none or it knows none of them."""
    from .toy.world import CONCEPTS

    path = Path(folder) / GUARD_FILE if folder else None
    known = [c for c in concepts if c in CONCEPTS]
    if path is None or not path.is_file() or not known:
        return None
    detector, thresholds = _detector(str(path), path.stat().st_mtime_ns)
    return ToyGuard(detector, known, **thresholds)


class Walk:
    """One image's path along the rungs, from the strength it was first drawn with: up while the guard sees the
    concept; then, with a guard that checks the rest, on up while the image is clean but harmed. A first draw
    that is clean but harmed walks down while it stays clean and harmed (``seen``: for a milder draw, also the
    guard's doubt), and where that finds nothing, up from above the first strength. It stops at a clean
    unharmed image, at the ends, or where going up the guard sees the concept again after a clean draw."""

    def __init__(self, rungs: Sequence[float], start: float, onward: bool = True):
        self.rungs, self.start, self.onward = list(rungs), list(rungs).index(start), onward
        self.at, self.direction, self.clean = self.start, 0, False

    @property
    def strength(self) -> float:
        return self.rungs[self.at]

    @property
    def milder(self) -> bool:
        """Whether the current draw is milder than the first."""
        return self.at < self.start

    def step(self, seen: bool, harmed: bool) -> bool:
        """Move after an image (the guard's answers); False when the walk is over."""
        if not seen and not harmed:
            return False
        if self.direction == 0:
            self.direction = 1 if seen else -1
        elif self.direction > 0:
            if seen and self.clean or not seen and not self.onward:
                return False
        elif seen:  # down, and the milder draw is not clean: up from above the first strength
            if not self.onward:
                return False
            self.direction, self.at = 1, self.start
        self.clean = self.clean or not seen
        self.at += self.direction
        if self.at < 0 and self.onward:
            self.direction, self.at = 1, self.start + 1
        return 0 <= self.at < len(self.rungs)


def _rows(value: Any, n_prompts: int, per_prompt: int, name: str) -> list:
    """A per-prompt argument (one value or one per prompt) as one value per image."""
    values = [value] * n_prompts if value is None or isinstance(value, str) else list(value)
    if len(values) != n_prompts:
        raise ValueError(f"{name} has {len(values)} entries for {n_prompts} prompts; give one or one per prompt")
    return [v for v in values for _ in range(per_prompt)]


def _assemble(per_row: list, like: Any) -> Any:
    if isinstance(like, np.ndarray):
        return np.stack(per_row)
    if isinstance(like, torch.Tensor):
        return torch.stack(per_row)
    return per_row


def guarded_call(pipe: Any, guard: Guard, ladder: Sequence[float], call: dict[str, Any], config: Any,
                 return_original: bool = False, negative_prompt_fallback: bool = True, **erase_kwargs: Any) -> Any:
    """Generate ``call`` (the parent pipeline's arguments) with the erasure ``config`` as the pipeline's
    ``guard=`` argument asks (it validates everything first; :class:`eiup.pipeline.EIUPPipelineOutput`):
    each image the projection acts on walks the rungs of ``ladder`` (and its own first strength) from the
    strength the call gives it, up while ``guard`` sees the concept, and with a guard that has
    ``harmed(images, originals)`` (one more generation per image: the originals), down while it is clean
    but harmed (:class:`Walk`). An image keeps its first clean and unharmed draw, else its first clean
    one, else the last. With ``negative_prompt_fallback``, an image without a clean and unharmed draw after its
    walk is drawn again from the same noise without the erasure and with the concepts as negative prompt
    (classifier-free guidance away from their names), at the call's guidance scale times each of
    :data:`NEGATIVE_PROMPT_GUIDANCE` in turn until a draw is clean and unharmed, then once more with that
    negative prompt and the erasure at its first strength, at the call's guidance; a draw replaces the kept
    one where it ranks better (clean over seen, unharmed over harmed)."""
    from diffusers.utils.torch_utils import randn_tensor

    from .pipeline import EIUPPipelineOutput, _row_prompts

    prompts = _row_prompts(call)
    per_prompt = int(call.get("num_images_per_prompt") or 1)
    n = len(prompts)
    negatives = _rows(call.get("negative_prompt"), n // per_prompt, per_prompt, "negative_prompt")
    return_dict = call.get("return_dict", True)
    latents, generator = call.get("latents"), call.get("generator")
    height, width = pipe._resolve_hw(call)
    shape = (n, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor, int(width) // pipe.vae_scale_factor)
    if latents is None:  # drawn once, as the pipeline draws them: every rung starts from the same noise
        latents = randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=pipe.unet.dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents has shape {tuple(latents.shape)}, the call needs {shape}")
    rest = {k: v for k, v in call.items() if k not in ("prompt", "negative_prompt", "latents", "generator", "return_dict")}

    def draw(rows: Sequence[int], negative: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if negative is None and call.get("negative_prompt") is not None:
            negative = [negatives[i] for i in rows]
        return pipe(prompt=[prompts[i] for i in rows], latents=latents[torch.as_tensor(rows)], negative_prompt=negative,
                    **{**rest, "num_images_per_prompt": 1, **kwargs})

    harmed = getattr(guard, "harmed", None)  # a guard that also compares each image with the one drawn without erasure
    doubt = getattr(guard, "doubt", None)  # ... and may doubt an image it reads clean (for milder draws)
    originals = draw(range(n), erase=None).images if harmed is not None or return_original else None

    def check(images: Any, rows: Sequence[int]) -> tuple[list[bool], list[bool]]:
        """The guard's answers for the images of ``rows``: concept seen, rest harmed (against the originals)."""
        seen = [bool(f) for f in guard(images)]
        if len(seen) != len(rows):
            raise ValueError(f"the guard answered {len(seen)} flags for {len(rows)} images; it must answer one per image")
        return seen, [bool(f) for f in harmed(images, [originals[i] for i in rows])] if harmed else [False] * len(rows)

    attempts = np.zeros(n, dtype=int)
    rank = np.full(n, -1)  # of the attempt kept per image: 2 clean and unharmed, 1 clean (the first), 0 seen (the last)
    images, nsfw = [None] * n, [None] * n
    keyed: dict[str, dict[str, list]] = {"heatmaps": {}, "erase_scales": {}, "anchor_strengths": {}}
    walks: dict[int, Walk] = {}
    like, todo = None, np.arange(n)
    fallback = np.zeros(n, dtype=bool)  # per image: kept from the negative-prompt draw

    def keep(i: int, out: Any, j: int, now: int, erased: bool = True) -> None:
        """Image ``i`` is row ``j`` of ``out`` now, ranked ``now``; a draw without erasure has no strength, scale or map."""
        rank[i], images[i] = now, out.images[j]
        nsfw[i] = None if out.nsfw_content_detected is None else out.nsfw_content_detected[j]
        for field, per_concept in keyed.items():
            for concept, values in (getattr(out, field) or {}).items():
                per_concept.setdefault(concept, [None] * n)[i] = values[j]
            if not erased:
                for values in per_concept.values():
                    if values[i] is not None:
                        values[i] = np.zeros_like(values[i]) if field == "heatmaps" else np.full_like(values[i], np.nan)

    while len(todo):
        if not walks:  # the first draw: every image at the strength the call gives it without a guard
            out = draw(todo, erase_config=config, guard=False, **erase_kwargs)
        else:
            out = draw(todo, erase_config=config, anchor_strength=[walks[i].strength for i in todo], guard=False,
                       **erase_kwargs)
        like = out.images
        seen, bad = check(out.images, todo)
        milder = [i in walks and walks[i].milder for i in todo]
        if doubt is not None and any(milder):  # a milder draw than the first counts as seen where the guard doubts
            seen = [s or (m and d) for s, m, d in zip(seen, milder, doubt(out.images))]
        given = np.full(len(todo), np.nan)  # per image, the strength it was drawn with (NaN: the gate left it alone)
        for values in (out.anchor_strengths or {}).values():
            given = np.fmax(given, values)
        for j, i in enumerate(todo):
            attempts[i] += 1
            now = 0 if seen[j] else 1 if bad[j] else 2
            if now > rank[i] or now == rank[i] == 0:
                keep(i, out, j, now)
            if i not in walks and np.isfinite(given[j]):
                walks[i] = Walk(sorted(set(ladder) | {float(given[j])}), float(given[j]))
        todo = np.array([i for j, i in enumerate(todo) if i in walks and walks[i].step(seen[j], bad[j])], dtype=int)
    guidance = float(call.get("guidance_scale") or 0.0)  # a negative prompt acts through classifier-free guidance
    last = [i for i in walks if rank[i] < 2] if negative_prompt_fallback and guidance > 1 else []
    names = ", ".join(config.concepts)
    with_names = [f"{negative}, {names}" if negative else names for negative in negatives]
    for factor in (*NEGATIVE_PROMPT_GUIDANCE, None):  # None: the call's guidance, the erasure at the first strength
        if not last:
            break
        if factor is None:
            out = draw(last, negative=[with_names[i] for i in last], erase_config=config, guard=False,
                       anchor_strength=[walks[i].rungs[walks[i].start] for i in last], **erase_kwargs)
        else:
            out = draw(last, negative=[with_names[i] for i in last], erase=None, guidance_scale=factor * guidance)
        seen, bad = check(out.images, last)
        for j, i in enumerate(last):
            attempts[i] += 1
            now = 0 if seen[j] else 1 if bad[j] else 2
            if now > rank[i]:
                fallback[i] = True
                keep(i, out, j, now, erased=factor is None)
        last = [i for i in last if rank[i] < 2]
    stack = lambda field: {c: np.stack(v) for c, v in keyed[field].items()} or None  # noqa: E731
    result = EIUPPipelineOutput(
        images=_assemble(images, like), nsfw_content_detected=None if all(f is None for f in nsfw) else nsfw,
        original_images=_assemble(originals, like) if return_original else None, heatmaps=stack("heatmaps"),
        erase_scales=stack("erase_scales"), anchor_strengths=stack("anchor_strengths"),
        guard_flagged=[bool(r == 0) for r in rank], guard_attempts=attempts, guard_negative_prompt=fallback.tolist())
    if return_dict:
        return result
    return (result.images, result.nsfw_content_detected) + ((result.original_images,) if return_original else ())
