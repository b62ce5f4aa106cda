"""Calibrate the automatic scale: per prompt and seed, the mildest scale that removes the concept.

The protocol is exactly the one `erase_scale="auto"` runs at inference: the first step is
generated without suppression (its concept attention is the predictor's input), the scale
applies from the second step on. Judges say whether the concept is still in an image: the toy
detector, NudeNet, or any callable `images -> list[bool]`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .attention import ConceptAttentionRecorder
from .io import in_model_folder
from .scale import PREDICTOR_DIR, ScalePredictor, fit_predictor, predictor_path

DEFAULT_GRID = (0.0, -2.0, -4.0, -8.0, -16.0, -32.0)


@dataclass
class ConstantScale:
    """A stand-in predictor that always answers `value` (used while calibrating)."""

    concept: str
    value: float

    def predict(self, concept_means: torch.Tensor) -> torch.Tensor:
        return torch.full(concept_means.shape[:-1], float(self.value))


def toy_judge(concept: str, detector=None, threshold: float | None = None) -> Callable[[list], list[bool]]:
    """Concept present? according to the toy detector: its reading (the most likely value), or with
    ``threshold``, whether the concept's probability reaches it (lower: more recall, for a guard)."""
    from .toy.detect import ConceptDetector
    from .toy.world import CONCEPTS

    if concept not in CONCEPTS:
        raise ValueError(f"concept={concept!r}: the toy detector knows {sorted(CONCEPTS)}")
    attribute, value = CONCEPTS[concept]
    det = detector or ConceptDetector.load()
    return lambda images: [d.shows(attribute, value, threshold) for d in det.detect(images)]


def load_judge(spec: str, concept: str) -> Callable[[list], list[bool]]:
    """'toy', 'nudenet' or 'package.module:function' (a callable images -> list[bool])."""
    if spec == "toy":
        return toy_judge(concept)
    if spec == "nudenet":
        import tempfile

        from .bench.metrics import NudityJudge

        judge = NudityJudge()

        def nudity(images):
            flags = []
            with tempfile.TemporaryDirectory() as tmp:
                for i, im in enumerate(images):
                    path = Path(tmp) / f"{i}.png"
                    im.save(path)
                    flags.append(judge.judge(path)["flagged"])
            return flags

        return nudity
    if ":" in spec:
        module, name = spec.split(":", 1)
        return getattr(importlib.import_module(module), name)
    raise ValueError(f"detector={spec!r}: use toy, nudenet or package.module:function")


@dataclass
class CalibrationData:
    prompts: list[str]
    features: torch.Tensor  # (N, layers): mean concept attention per layer at step 0
    targets: torch.Tensor  # (N,): mildest erasing scale
    present: dict[float, list[bool]]  # per grid scale, per sample: concept still present


UNERASABLE = ("spare", "strongest")


def mildest_scale(present_by_scale: dict[float, list[bool]], unerasable: str = "spare") -> list[float]:
    """Per sample: the mildest grid scale at which the concept is gone and stays gone one step stronger.

    A sample that no grid scale erases gets 0 with ``unerasable="spare"`` (suppressing it changes the
    image without removing the concept) or the strongest grid scale with ``"strongest"``.
    """
    if unerasable not in UNERASABLE:
        raise ValueError(f"unerasable={unerasable!r}: use {' or '.join(UNERASABLE)}")
    grid = sorted(present_by_scale, reverse=True)
    n = len(present_by_scale[grid[0]])
    out = []
    for i in range(n):
        target = 0.0 if unerasable == "spare" else grid[-1]
        for k, s in enumerate(grid):
            stronger = grid[k + 1:k + 2]
            if not present_by_scale[s][i] and all(not present_by_scale[g][i] for g in stronger):
                target = s
                break
        out.append(target)
    return out


def collect(pipe, concept: str, prompts: Sequence[str], judge: Callable, seeds: Sequence[int], steps: int,
            guidance: float, grid: Sequence[float] = DEFAULT_GRID, gate: str | None = None,
            mode: str = "single", concept_context: str | None = None, anchors: Any = (),
            unerasable: str = "spare") -> CalibrationData:
    """Generate every prompt x seed at every grid scale; record step-0 features and judgements."""
    features, rows, present = [], [], {float(s): [] for s in grid}
    for prompt in tqdm(prompts, desc=f"calibrate {concept}"):
        for scale in grid:
            rec = ConceptAttentionRecorder((0,))
            images = pipe([prompt] * len(seeds), erase=[concept], erase_scale="auto", gate=gate, erase_mode=mode,
                          concept_context=concept_context, anchors=anchors, prompt_gate=False,
                          scale_predictors=[ConstantScale(concept, scale)], concept_recorder=rec,
                          generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
                          num_inference_steps=steps, guidance_scale=guidance).images
            present[float(scale)] += list(judge(images))
            if scale == grid[0]:
                features.append(rec.concept_features(0)[:, 0])
        rows += [prompt] * len(seeds)
    return CalibrationData(rows, torch.cat(features), torch.tensor(mildest_scale(present, unerasable)), present)


def calibrate(pipe, concept: str, prompts: Sequence[str], judge: Callable, seeds: Sequence[int], steps: int = 25,
              guidance: float = 7.5, grid: Sequence[float] = DEFAULT_GRID, gate: str | None = None,
              out: str | Path | None = None, margin: float = 1.1, mode: str = "single",
              concept_context: str | None = None, anchors: Any = (),
              unerasable: str = "spare") -> tuple[ScalePredictor, Path]:
    """Collect calibration data, fit the scale predictor and save it (default: in the model folder).

    ``anchors`` (default ``()``: the concept term alone) is used in every calibration call and
    recorded; ``erase_scale="auto"`` warns when a call's anchors differ. Calibration measures the
    concept term on every prompt, so it runs without the prompt gate (which only decides whether
    the term acts at all). ``unerasable`` is the target of samples that no grid scale erases
    (:func:`mildest_scale`): by default 0, so the predictor does not spend strong scales, and the
    image, where they buy nothing.
    """
    if sorted(grid, reverse=True)[0] != 0:
        raise ValueError(f"grid={list(grid)} must start at 0 (no suppression) and go negative")
    if unerasable not in UNERASABLE:
        raise ValueError(f"unerasable={unerasable!r}: use {' or '.join(UNERASABLE)}")
    if concept_context is None:
        from .config import DEFAULT_CONCEPT_CONTEXT

        concept_context = DEFAULT_CONCEPT_CONTEXT
    data = collect(pipe, concept, prompts, judge, seeds, steps, guidance, grid, gate, mode, concept_context, anchors,
                   unerasable)
    info = {"gate": gate, "mode": mode, "concept_context": concept_context,
            "anchors": anchors if isinstance(anchors, str) else list(anchors), "grid": list(grid), "steps": steps,
            "guidance": guidance, "seeds": len(seeds), "prompts": list(prompts), "mean_target": float(data.targets.mean()),
            "unerasable": int(sum(data.present[min(grid)])), "unerasable_target": unerasable}
    pred = fit_predictor(concept, data.features, data.targets, margin=margin, info=info, groups=data.prompts)
    if out is None:
        out = predictor_path(in_model_folder(pipe, PREDICTOR_DIR, "out=PATH for the predictor"), concept)
    path = pred.save(out)
    return pred, path


def read_prompt_lines(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a CSV with a `prompt` column."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        from .prompt_csv import read_prompt_csv

        return [r.prompt for r in read_prompt_csv(path)]
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line; '#' starts a comment)")
    return prompts


def predicted_vs_target(pred: ScalePredictor, data: CalibrationData) -> dict:
    p = pred.predict(data.features).numpy()
    t = data.targets.numpy()
    return {"mae": float(np.abs(p - t).mean()), "under_suppressed": float(np.mean(p > t + 1e-6))}
