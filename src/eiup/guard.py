"""Closed-loop erasure: a guard checks every erased image, and the images in which it still sees the
concept are generated again from the same starting noise at the next strength of a ladder.

The projection's strength (``anchor_strength``) is what trades erasure against fidelity on the toy
model: too weak and the concept survives, too strong and the image changes more than the concept.
Which strength a prompt and seed needs is not known in advance (the presets and
``anchor_strength="auto"`` guess it per concept or per prompt); a guard looks at the result. Every
image starts at the mildest rung and climbs only while the guard still sees the concept, so each
image gets about the mildest strength that erases it. A guard is any callable ``images ->
list[bool]`` (True: the concept is still shown), e.g. :func:`eiup.calibrate.toy_judge` with the toy
model's guard detector, NudeNet, or a product's own safety classifier; it should not be the detector
that judges the benchmark.
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


def climb(rungs: np.ndarray, rows: Sequence[int], flagged: Sequence[bool], top: int) -> np.ndarray:
    """The ``rows`` to generate again: flagged by the guard and below the ladder's ``top`` rung (their rung raised by one)."""
    again = np.array([i for i, f in zip(rows, flagged) if f and rungs[i] < top], dtype=int)
    rungs[again] += 1
    return again


def load_guard(spec: str, concepts: Sequence[str]) -> Guard | str | bool:
    """What the pipeline's ``guard=`` gets for a CLI spec: ``"auto"`` (the model folder's), ``"none"`` (False),
    ``"nudenet"``, or ``"package.module:function"`` (a callable images -> list[bool]); flags an image where any
    of ``concepts`` is shown."""
    from .calibrate import load_judge

    if spec in ("auto", "none"):
        return spec == "auto" and "auto"
    return _any_of([load_judge(spec, c) for c in concepts])


@functools.lru_cache(maxsize=4)
def _detector(path: str, mtime_ns: int) -> tuple[Any, float | None]:
    """The guard detector and its threshold (the file's ``threshold`` metadata; None: its reading)."""
    from safetensors import safe_open

    from .toy.detect import ConceptDetector

    with safe_open(path, "pt") as f:
        threshold = (f.metadata() or {}).get("threshold")
    return ConceptDetector.load(path), None if threshold is None else float(threshold)


class ToyGuard:
    """A toy-world guard: flags an image where one of ``concepts`` is seen by ``detector`` (its probability
    reaching ``threshold``; None: the detector's reading), and, with ``keep``, finds it harmed where the rest of
    the image differs from the one drawn without erasure (object count, background unless erased, colour and
    shape of each object but the erased attribute: :func:`eiup.bench.metrics.kept_from_plain`; not checked when
    the concepts are of several attributes)."""

    def __init__(self, detector: Any, concepts: Sequence[str], threshold: float | None = None, keep: bool = True):
        from .calibrate import toy_judge
        from .toy.world import CONCEPTS

        unknown = [c for c in concepts if c not in CONCEPTS]
        if unknown or not concepts:
            raise ValueError(f"concepts={list(concepts)}: the toy guard knows {sorted(CONCEPTS)}")
        self.detector, self.concepts, self.threshold, self.keep = detector, list(concepts), threshold, keep
        self._judges = [toy_judge(c, detector, threshold) for c in concepts]
        if not keep:
            self.harmed = None

    def __call__(self, images: Any) -> list[bool]:
        return _any_of(self._judges)(images)

    def harmed(self, images: Any, originals: Any) -> list[bool]:
        """Per image: the rest of it changed against ``originals`` (for any of the concepts' attributes)."""
        from .bench.metrics import kept_from_plain
        from .toy.world import CONCEPTS

        attributes = {CONCEPTS[c][0] for c in self.concepts}
        if len(attributes) > 1:  # concepts of several attributes: what may change is not one attribute; no check
            return [False] * len(images)
        (a,) = attributes
        found, plain = self.detector.detect(images), self.detector.detect(originals)
        return [not kept_from_plain(d, p, None if a == "background" else a, a == "background") for d, p in zip(found, plain)]


def model_guard(folder: str | Path | None, concepts: Sequence[str]) -> Guard | None:
    """``guard="auto"``: the model folder's guard (:data:`GUARD_FILE`, a toy-world concept detector, flagging an
    image where a concept's probability reaches the file's ``threshold`` metadata) for the ``concepts`` it knows,
    or None when the folder has none or it knows none of them."""
    from .toy.world import CONCEPTS

    path = Path(folder) / GUARD_FILE if folder else None
    known = [c for c in concepts if c in CONCEPTS]
    if path is None or not path.is_file() or not known:
        return None
    detector, threshold = _detector(str(path), path.stat().st_mtime_ns)
    return ToyGuard(detector, known, threshold)


def _any_of(judges: list[Guard]) -> Guard:
    if len(judges) == 1:
        return judges[0]
    return lambda images: [any(flags) for flags in zip(*(judge(images) for judge in judges))]


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
                 return_original: bool = False, **erase_kwargs: Any) -> Any:
    """Generate ``call`` (the parent pipeline's arguments) with the erasure ``config``, every image from the
    mildest rung of ``ladder`` up, again at the next rung while ``guard`` still sees the concept in it (the
    pipeline's ``guard=`` argument, which validates everything first; :class:`eiup.pipeline.EIUPPipelineOutput`).

    A guard with a ``harmed(images, originals) -> list[bool]`` method (:class:`ToyGuard`) also climbs past
    rungs that erase the concept but change the rest of the image (against the image drawn without
    erasure, one more generation per image); an image keeps the first rung that is clean and unharmed,
    else the first clean one, else the top."""
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

    def draw(rows: Sequence[int], **kwargs: Any) -> Any:
        return pipe(prompt=[prompts[i] for i in rows], latents=latents[torch.as_tensor(rows)],
                    negative_prompt=None if call.get("negative_prompt") is None else [negatives[i] for i in rows],
                    **{**rest, "num_images_per_prompt": 1}, **kwargs)

    harmed = getattr(guard, "harmed", None)  # a guard that also compares each image with the one drawn without erasure
    originals = draw(range(n), erase=None).images if harmed is not None or return_original else None
    rungs = np.zeros(n, dtype=int)
    attempts = np.zeros(n, dtype=int)
    rank = np.full(n, -1)  # of the attempt kept per image: 2 clean and unharmed, 1 clean (the first), 0 flagged (the last)
    images, nsfw = [None] * n, [None] * n
    keyed: dict[str, dict[str, list]] = {"heatmaps": {}, "erase_scales": {}, "anchor_strengths": {}}
    like, todo = None, np.arange(n)
    while len(todo):
        out = draw(todo, erase_config=config, anchor_strength=[ladder[r] for r in rungs[todo]], guard=False,
                   **erase_kwargs)
        like = out.images
        seen = [bool(f) for f in guard(out.images)]
        if len(seen) != len(todo):
            raise ValueError(f"the guard answered {len(seen)} flags for {len(todo)} images; it must answer one per image")
        bad = [bool(f) for f in harmed(out.images, [originals[i] for i in todo])] if harmed else [False] * len(todo)
        projected = np.zeros(len(todo), dtype=bool)  # rows the gate left alone: no strength changes them
        for values in (out.anchor_strengths or {}).values():
            projected |= np.isfinite(values)
        for j, i in enumerate(todo):
            attempts[i] += 1
            now = 0 if seen[j] else 1 if bad[j] else 2
            if now > rank[i] or now == rank[i] == 0:
                rank[i] = now
                images[i] = out.images[j]
                nsfw[i] = None if out.nsfw_content_detected is None else out.nsfw_content_detected[j]
                for field, per_concept in keyed.items():
                    for concept, values in (getattr(out, field) or {}).items():
                        per_concept.setdefault(concept, [None] * n)[i] = values[j]
        todo = climb(rungs, todo, [(s or b) and p for s, b, p in zip(seen, bad, projected)], len(ladder) - 1)
    stack = lambda field: {c: np.stack(v) for c, v in keyed[field].items()} or None  # noqa: E731
    result = EIUPPipelineOutput(
        images=_assemble(images, like), nsfw_content_detected=None if all(f is None for f in nsfw) else nsfw,
        original_images=_assemble(originals, like) if return_original else None, heatmaps=stack("heatmaps"),
        erase_scales=stack("erase_scales"), anchor_strengths=stack("anchor_strengths"),
        guard_flagged=[bool(r == 0) for r in rank], guard_attempts=attempts)
    if return_dict:
        return result
    return (result.images, result.nsfw_content_detected) + ((result.original_images,) if return_original else ())
