"""The automatic anchor strength: how hard to project each prompt, predicted from its text embedding.

On a model whose erasure is done by the anchored projection (:mod:`eiup.anchors`), the projection's
strength s is the trade-off: a fixed s strong enough for the hardest prompt damages the others (the toy
model's "an image of a first aid kit in the fog" loses its red at s = 0.5 and its shape at s = 1.25,
while "a drawing of a ladybug" needs 1.25). ``anchor_strength="auto"`` predicts s per prompt and concept
from the prompt's features (:func:`eiup.probe.prompt_features`: the mean token embedding and the last
token, available before denoising), with a linear model calibrated per model and concept by
``eiup calibrate --target strength``: for each calibration prompt and seed, the mildest grid strength
that removes the concept (detector-judged) is the target.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .probe import prompt_features

STRENGTH_DIR = "eiup_strength_predictors"
DEFAULT_STRENGTH_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
L2_CHOICES = (0.01, 0.1, 1.0)


def under_erasing_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error, a strength below the target (the concept stays) counted twice."""
    err = target - pred
    return torch.where(err > 0, 2.0 * err**2, err**2).mean()


def mildest_strength(present_by_strength: dict[float, list[bool]]) -> list[float]:
    """Per sample: the mildest grid strength at which the concept is gone and stays gone one step
    stronger; the strongest grid strength where none removes it."""
    grid = sorted(present_by_strength)
    n = len(present_by_strength[grid[0]])
    out = []
    for i in range(n):
        target = grid[-1]
        for k, s in enumerate(grid):
            if all(not present_by_strength[g][i] for g in grid[k:k + 2]):
                target = s
                break
        out.append(target)
    return out


@dataclass
class StrengthPredictor:
    """s = clamp(margin * (<w, (x - mean) / std> + b), low, high) for one concept of one model, x the
    prompt features (:func:`eiup.probe.prompt_features`); ``w = 0`` is a constant strength."""

    concept: str
    weight: torch.Tensor  # (F,)
    bias: float
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    margin: float = 1.0
    low: float = 0.25
    high: float = 4.0
    info: dict = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return self.weight.numel()

    @torch.no_grad()
    def predict(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) strengths from prompt embeddings (B, L, D)."""
        x = prompt_features(prompt_embeds)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"strength predictor for {self.concept!r} expects {self.in_features // 2}-dim text "
                             f"embeddings, got {x.shape[-1] // 2}: it was calibrated for another model (rerun "
                             "`eiup calibrate --target strength`)")
        return self.predict_from_features(x)

    def predict_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) strengths from prompt features (B, F)."""
        z = (x.float() - self.mean.to(x.device)) / self.std.to(x.device)
        return (self.margin * (z @ self.weight.to(x.device) + self.bias)).clamp(self.low, self.high)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.float().contiguous(), "mean": self.mean.float().contiguous(),
                   "std": self.std.float().contiguous()}
        meta = {"concept": self.concept, "bias": repr(float(self.bias)), "margin": repr(float(self.margin)),
                "low": repr(float(self.low)), "high": repr(float(self.high)), "info": json.dumps(self.info)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StrengthPredictor":
        from safetensors import safe_open

        t = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        missing = {"concept", "bias", "margin", "low", "high"} - set(meta)
        if missing or set(t) != {"weight", "mean", "std"}:
            raise ValueError(f"{path} is not an eiup strength predictor (missing {sorted(missing) or 'tensors'}); "
                             "write one with `eiup calibrate --target strength`")
        return cls(meta["concept"], t["weight"], float(meta["bias"]), t["mean"], t["std"], float(meta["margin"]),
                   float(meta["low"]), float(meta["high"]), json.loads(meta.get("info") or "{}"))


def strength_predictor_path(folder: str | Path, concept: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in concept.strip().lower())
    return Path(folder) / f"{safe}.safetensors"


def find_strength_predictor(concept: str, model_folder: str | Path | None) -> StrengthPredictor:
    """``<model folder>/eiup_strength_predictors/<concept>.safetensors``; a clear error where there is none."""
    path = strength_predictor_path(Path(model_folder) / STRENGTH_DIR, concept) if model_folder else None
    if path is None or not path.is_file():
        where = path or "(no model folder known)"
        raise FileNotFoundError(
            f"anchor_strength='auto': no calibrated strength predictor for {concept!r} at {where}. Run "
            f"`eiup calibrate --target strength --concept {concept!r} ...` for this model, or give a number "
            "as anchor_strength.")
    pred = StrengthPredictor.load(path)
    if pred.concept.strip().lower() != concept.strip().lower():
        raise ValueError(f"strength predictor {path} was calibrated for {pred.concept!r}, not {concept!r}")
    return pred


def _fit_linear(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 600) -> tuple[torch.Tensor, float]:
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.tensor(float(y.mean()), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.02)
    for _ in range(steps):
        loss = under_erasing_loss(x @ w + b, y) + l2 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), float(b.detach())


def _best_constant(y: torch.Tensor) -> float:
    grid = torch.linspace(float(y.min()), float(y.max()), 201)
    return float(grid[int(torch.stack([under_erasing_loss(torch.full_like(y, float(c)), y) for c in grid]).argmin())])


def fit_strength_predictor(concept: str, features: torch.Tensor, targets: torch.Tensor, groups: Sequence,
                           margin: float = 1.0, folds: int = 4, seed: int = 0, info: dict | None = None,
                           low: float = 0.25, high: float = 4.0) -> StrengthPredictor:
    """Fit s(prompt) to the mildest erasing strengths (N,) from prompt features (N, F).

    The linear model (with an L2 penalty from :data:`L2_CHOICES`) is kept only if it predicts held-out
    prompts better than the best constant (``folds``-fold cross-validation over whole ``groups``, e.g. the
    prompt of each sample; same loss); otherwise the predictor is that constant.
    """
    x = features.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    x = (x - mean) / std
    y = targets.float()
    labels = list(groups)
    if len(labels) != len(y):
        raise ValueError(f"groups has {len(labels)} entries for {len(y)} samples")
    unique = list(dict.fromkeys(labels))
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {unique[j]: rank % folds for rank, j in enumerate(perm)}
    cv: dict[str, list[float]] = {"constant": [], **{f"l2={l2:g}": [] for l2 in L2_CHOICES}}
    for k in range(min(folds, len(unique))):
        held = torch.tensor([i for i in range(len(y)) if fold_of[labels[i]] == k])
        kept = torch.tensor([i for i in range(len(y)) if fold_of[labels[i]] != k])
        if len(held) == 0 or len(kept) < 2:
            continue
        c = _best_constant(y[kept])
        cv["constant"].append(float(under_erasing_loss(torch.full_like(y[held], c), y[held])))
        for l2 in L2_CHOICES:
            w, b = _fit_linear(x[kept], y[kept], l2)
            cv[f"l2={l2:g}"].append(float(under_erasing_loss(x[held] @ w + b, y[held])))
    scores = {name: float(np.mean(v)) for name, v in cv.items() if v}
    best = min(scores, key=scores.get) if scores else "constant"
    if best == "constant":
        w, b = torch.zeros(x.shape[1]), _best_constant(y)
    else:
        w, b = _fit_linear(x, y, float(best.split("=")[1]))
    fitted = x @ w + b
    return StrengthPredictor(concept, w, b, mean, std, margin, low, high,
                             dict(info or {}, n_samples=len(y), kind=best, cv_loss=scores,
                                  train_loss=float(under_erasing_loss(fitted, y)),
                                  under_erasing=float((margin * fitted < y - 1e-6).float().mean())))


@dataclass
class StrengthData:
    """Per calibration sample (prompt x seed whose plain image shows the concept): whether the concept is
    still present at each grid strength, and the prompt features."""

    prompts: list[str]
    seeds: list[int]
    features: torch.Tensor  # (N, F)
    present: dict[float, list[bool]]

    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor(mildest_strength(self.present))


def collect_strengths(pipe, concept: str, prompts: Sequence[str], judge: Callable[[list], list[bool]],
                      seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
                      grid: Sequence[float] = DEFAULT_STRENGTH_GRID, **erase_kwargs) -> StrengthData:
    """Generate every prompt x seed plainly and at every grid strength (the call's other settings: the
    library defaults or ``erase_kwargs``); keep the samples whose plain image shows the concept and whose
    prompt the projection's gate edits (the strength does nothing to the others)."""
    gated = pipe.projection_gate(list(prompts), concept, **erase_kwargs)
    kept_prompts, kept_seeds, feats = [], [], []
    present: dict[float, list[bool]] = {float(s): [] for s in grid}
    gens = lambda: [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]  # noqa: E731
    for prompt, on in tqdm(list(zip(prompts, gated)), desc=f"calibrate strength {concept}"):
        if not on:
            continue
        plain = judge(pipe([prompt] * len(seeds), generator=gens(), num_inference_steps=steps,
                           guidance_scale=guidance).images)
        shown = [i for i, p in enumerate(plain) if p]
        if not shown:
            continue
        for s in grid:
            found = judge(pipe([prompt] * len(seeds), erase=[concept], anchor_strength=float(s), generator=gens(),
                               num_inference_steps=steps, guidance_scale=guidance, **erase_kwargs).images)
            present[float(s)] += [found[i] for i in shown]
        kept_prompts += [prompt] * len(shown)
        kept_seeds += [int(seeds[i]) for i in shown]
        feats.append(pipe.prompt_features([prompt]).expand(len(shown), -1))
    features = torch.cat(feats) if feats else torch.zeros(0, 2 * pipe.text_encoder.config.hidden_size)
    return StrengthData(kept_prompts, kept_seeds, features, present)


def calibrate_strength(pipe, concept: str, prompts: Sequence[str], judge: Callable[[list], list[bool]],
                       seeds: Sequence[int], steps: int = 25, guidance: float = 7.5,
                       grid: Sequence[float] = DEFAULT_STRENGTH_GRID, out: str | Path | None = None,
                       margin: float = 1.0, **erase_kwargs) -> tuple[StrengthPredictor, Path, StrengthData]:
    """Collect (:func:`collect_strengths`), fit (:func:`fit_strength_predictor`) and save the predictor
    (default: ``<model folder>/eiup_strength_predictors/<concept>.safetensors``)."""
    grid = sorted(float(s) for s in grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"grid={grid}: give positive strengths, e.g. {list(DEFAULT_STRENGTH_GRID)}")
    data = collect_strengths(pipe, concept, prompts, judge, seeds, steps, guidance, grid, **erase_kwargs)
    if len(data.prompts) == 0:
        raise ValueError(f"no calibration prompt shows {concept!r} in its plain images and passes the projection's "
                         "gate: give prompts that name or imply it")
    info = {"grid": grid, "steps": steps, "guidance": guidance, "seeds": [int(s) for s in seeds],
            "erase_kwargs": erase_kwargs, "n_prompts": len(set(data.prompts)),
            "unerased_at_strongest": int(sum(data.present[grid[-1]])), "mean_target": float(data.targets.mean())}
    pred = fit_strength_predictor(concept, data.features, data.targets, data.prompts, margin=margin, info=info,
                                  low=grid[0], high=grid[-1])
    if out is None:
        folder = getattr(pipe.config, "_name_or_path", None)
        if not folder or not Path(folder).is_dir():
            raise ValueError("the model is not a local folder: pass out=PATH for the strength predictor")
        out = strength_predictor_path(Path(folder) / STRENGTH_DIR, concept)
    return pred, pred.save(out), data
