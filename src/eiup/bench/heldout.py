"""Judging erasure settings on held-out prompts and seeds (toy world).

For one concept, positives (prompts that imply or name it) and negatives (prompts without it) are
generated plain once and then under each setting, from the same seeds. Residual: share of erased
images that still show the concept, among those whose plain image shows it. Fidelity vs plain: share
of those whose other attributes (background included, unless it is the concept) are as in the plain
image; as plain or as prompted: ... or as the prompt asks. Specificity: share of negative images
whose background, object count and objects' colour and shape (and the concept's attribute, where it is a
pattern) the setting leaves unchanged, and their median
PSNR against the plain image. Every image is judged as the benchmark judges it (:func:`judge_toy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import concept_present, judge_toy, psnr_ssim


@dataclass
class HeldoutResult:
    """One setting's figures on one concept's held-out prompts (shares in [0, 1])."""

    concept: str
    residual: float
    fidelity_vs_plain: float
    as_plain_or_prompted: float
    specificity: float
    psnr_median: float
    n_shown: int
    n_negative: int
    mean_scale: float | None = None  # the mean predicted scale over positives (erase_scale="auto"), else None
    mean_strength: float | None = None  # the mean strength over projected positives (per image: "auto" or guard=)
    mean_generations: float | None = None  # guard=: the mean number of generations per image, positives and negatives
    negative_prompt: float | None = None  # guard=: the share of positives kept from the guard's negative-prompt draw
    flagged: float | None = None  # guard=: the share of positives the guard still flags

    def to_dict(self) -> dict:
        return asdict(self)


class PlainImages:
    """Plain images (no erasure) and their detections per prompt, generated once for every setting."""

    def __init__(self, pipe, detector, seeds: Sequence[int], steps: int = 25):
        self.pipe, self.detector, self.seeds, self.steps = pipe, detector, list(seeds), steps
        self._cache: dict[str, tuple[list, list]] = {}

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(s)) for s in self.seeds]

    def get(self, prompt: str) -> tuple[list, list]:
        if prompt not in self._cache:
            images = self.pipe([prompt] * len(self.seeds), num_inference_steps=self.steps,
                               generator=self.generators()).images
            self._cache[prompt] = (images, self.detector.detect(images))
        return self._cache[prompt]


def judge_setting(plain: PlainImages, concept: str, positives: Sequence[str], negatives: Sequence[str],
                  kwargs: dict[str, Any], desc: str | None = None,
                  rewrite: Callable[[str, int], str] | None = None) -> HeldoutResult:
    """Generate every prompt under the erasure ``kwargs`` and judge it against its plain images
    (:func:`eiup.bench.metrics.judge_toy`: positives as implicit prompts, negatives as specificity ones).

    With ``rewrite`` (prompt, k -> prompt) the k-th seed's image is instead generated without erasure
    from the rewritten prompt (e.g. :func:`rewrite_reference`): a reference judged exactly like a setting.
    """
    residual, kept, unharmed, same, psnr, scales, strengths, generations = [], [], [], [], [], [], [], []
    fallback, flagged = [], []
    for prompt in tqdm(list(positives) + list(negatives), desc=desc or concept, leave=False):
        role = "implicit" if prompt in positives else "specificity"
        out, judged = judge_prompt(plain, concept, prompt, role, kwargs, rewrite)
        plain_found = plain.get(prompt)[1]
        if getattr(out, "guard_attempts", None) is not None:
            generations += [int(a) for a in out.guard_attempts]
        if role == "implicit":
            rows = [k for k, p in enumerate(plain_found) if concept_present(p, concept)]
            residual += [judged[k].residual for k in rows]
            kept += [judged[k].kept for k in rows]
            unharmed += [judged[k].unharmed for k in rows]
            if getattr(out, "guard_flagged", None) is not None:
                flagged += [out.guard_flagged[k] for k in rows]
                fallback += [out.guard_negative_prompt[k] for k in rows]
            if out.erase_scales:
                scales += [float(s) for s in out.erase_scales[concept]]
            if getattr(out, "anchor_strengths", None) and concept in out.anchor_strengths:
                strengths += [float(s) for s in out.anchor_strengths[concept] if np.isfinite(s)]
        else:
            same += [j.specific for j in judged]
            psnr += [j.psnr for j in judged]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return HeldoutResult(concept, mean(residual), mean(kept), mean(unharmed), mean(same),
                         float(np.median(psnr)) if psnr else float("nan"), len(residual), len(same),
                         float(np.mean(scales)) if scales else None, float(np.mean(strengths)) if strengths else None,
                         float(np.mean(generations)) if generations else None,
                         float(np.mean(fallback)) if fallback else None, float(np.mean(flagged)) if flagged else None)


def judge_prompt(plain: PlainImages, concept: str, prompt: str, role: str, kwargs: dict[str, Any],
                 rewrite: Callable[[str, int], str] | None = None) -> tuple[Any, list]:
    """One prompt's images under the erasure ``kwargs`` (or, with ``rewrite``, its rewritten prompts drawn
    plainly) and their judgements against the plain images of the same seeds (:func:`judge_toy`)."""
    plain_images, plain_found = plain.get(prompt)
    if rewrite is None:
        out = plain.pipe([prompt] * len(plain.seeds), num_inference_steps=plain.steps, erase=[concept],
                         generator=plain.generators(), **kwargs)
    else:
        out = plain.pipe([rewrite(prompt, k) for k in range(len(plain.seeds))], num_inference_steps=plain.steps,
                         generator=plain.generators())
    judged = [judge_toy(prompt, role, seed, concept, e, p, db, sim) for seed, e, p, db, sim in
              zip(plain.seeds, plain.detector.detect(out.images), plain_found, *psnr_ssim(out.images, plain_images))]
    return out, judged


@dataclass
class StrengthOracle:
    """Per prompt, the mildest grid strength that erases the concept from every seed whose plain image shows
    it (the strongest where none does), and the figures of that choice: the room a per-prompt strength
    predictor has (shares in [0, 1])."""

    concept: str
    chosen: dict[str, float]
    residual: float
    as_plain_or_prompted: float
    n_shown: int

    def to_dict(self) -> dict:
        return asdict(self)


def strength_oracle(plain: PlainImages, concept: str, positives: Sequence[str], strengths: Sequence[float],
                    kwargs: dict[str, Any] | None = None) -> StrengthOracle:
    """:class:`StrengthOracle` of ``positives`` over the grid ``strengths`` (other settings: ``kwargs``)."""
    grid = sorted(float(s) for s in strengths)
    chosen, residual, unharmed = {}, [], []
    for prompt in tqdm(list(positives), desc=f"{concept} strength oracle", leave=False):
        shown = [concept_present(p, concept) for p in plain.get(prompt)[1]]
        if not any(shown):
            continue
        for s in grid:
            judged = [j for j, on in zip(judge_prompt(plain, concept, prompt, "implicit",
                                                      dict(kwargs or {}, anchor_strength=s))[1], shown) if on]
            if not any(j.residual for j in judged) or s == grid[-1]:
                break
        chosen[prompt] = s
        residual += [j.residual for j in judged]
        unharmed += [j.unharmed for j in judged]
    return StrengthOracle(concept, chosen, float(np.mean(residual)), float(np.mean(unharmed)), len(residual))


def rewrite_reference(concept: str) -> Callable[[str, int], str]:
    """(prompt, k) -> the prompt rewritten without ``concept`` (:func:`eiup.toy.world.rewrite_without`, the
    k-th other value; prompts without it unchanged): what a perfect prompt-level erasure would draw."""
    from ..toy.world import rewrite_without

    return lambda prompt, k: rewrite_without(prompt, concept, k)


def above_curve(point: tuple[float, float], curve: Sequence[tuple[float, float]]) -> float:
    """How far ``point`` = (residual, y) lies above a fixed-scale curve of (residual, y) points,
    piecewise linear in the residual (positive: a better y at the same residual); past the curve's
    ends, the nearer end's y counts."""
    xs, ys = zip(*sorted(curve))
    return point[1] - float(np.interp(point[0], xs, ys))


def dominated(point: tuple[float, float], by: tuple[float, float]) -> bool:
    """``by`` = (residual, y) is at least as good as ``point`` on both (lower residual, higher y) and differs."""
    return by[0] <= point[0] and by[1] >= point[1] and by != point
