"""How much and where to suppress: presence gating and the automatic (predicted) scale.

Gating weights the concept term per pixel by how strongly that pixel attends to the concept
compared with the rest of the image. The automatic scale follows GIE (arXiv 2408.01014v2): a
small MLP maps the concept's mean cross-attention per layer at the first denoising step to a
suppression scale. eiup calibrates it per model and concept (`eiup calibrate`): for each
calibration prompt and seed, the mildest scale that removes the concept (detector-judged) is
the target; prompts without the concept teach it to stay at zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import concept_file, load_tensors, save_tensors_atomic

PREDICTOR_DIR = "eiup_scale_predictors"


def presence_gate(mass: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Gate g_p = clamp((m_p / max_p m_p - t) / (1 - t), 0, 1) per image and concept; mass (B, L, K)."""
    rel = mass / mass.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return ((rel - threshold) / (1.0 - threshold)).clamp(0.0, 1.0)


def token_gate(gate: torch.Tensor, spans, length: int) -> torch.Tensor:
    """Spread a per-concept gate (B, L, K) onto the concept's token positions: (B, L, T), 0 elsewhere."""
    out = gate.new_zeros(gate.shape[0], gate.shape[1], length)
    for k, span in enumerate(spans):
        out[:, :, list(span)] = gate[:, :, k:k + 1]
    return out


def attention_features(concept_means: torch.Tensor) -> torch.Tensor:
    """Predictor input from per-layer mean concept attention (..., layers): its logarithm (GIE's input, log-scaled)."""
    return torch.log(concept_means.float().clamp_min(1e-6))


class ScaleMLP(nn.Module):
    """GIE's adapter shape (layers -> 64 -> 32 -> 1), output a non-positive scale: -softplus(.)."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_layers, 64), nn.SiLU(), nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return -F.softplus(self.net(features).squeeze(-1))


@dataclass
class ScalePredictor:
    """A calibrated scale predictor for one concept of one model."""

    concept: str
    mlp: ScaleMLP
    mean: torch.Tensor
    std: torch.Tensor
    margin: float = 1.0  # predictions are multiplied by this safety factor
    min_scale: float = -8.0
    info: dict | None = None

    @torch.no_grad()
    def predict(self, concept_means: torch.Tensor) -> torch.Tensor:
        """Scales (...,) from mean concept attention per layer (..., layers)."""
        x = (attention_features(concept_means) - self.mean) / self.std
        return (self.mlp(x) * self.margin).clamp(min=self.min_scale)

    def save(self, path: str | Path) -> Path:
        tensors = {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}
        tensors.update(mean=self.mean, std=self.std)
        meta = {"concept": self.concept, "n_layers": str(self.mean.numel()), "margin": str(self.margin),
                "min_scale": str(self.min_scale), "info": json.dumps(self.info or {})}
        return save_tensors_atomic(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ScalePredictor":
        tensors, meta = load_tensors(path)
        mlp = ScaleMLP(int(meta["n_layers"]))
        mlp.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("mlp.")})
        return cls(meta["concept"], mlp.eval(), tensors["mean"], tensors["std"], float(meta["margin"]),
                   float(meta["min_scale"]), json.loads(meta.get("info", "{}")))


predictor_path = concept_file


def find_predictors(concepts, model_folder: str | Path | None, search: str | Path | None = None) -> list[ScalePredictor]:
    """Predictors for `concepts` from `search` (a folder or one file) or `<model>/eiup_scale_predictors/`."""
    folders = [Path(search)] if search else []
    if model_folder:
        folders.append(Path(model_folder) / PREDICTOR_DIR)
    found = []
    for concept in concepts:
        candidates = [f if f.is_file() else predictor_path(f, concept) for f in folders]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            where = ", ".join(str(f) for f in folders) or "(no model folder known)"
            raise FileNotFoundError(
                f"erase_scale='auto': no calibrated scale predictor for concept {concept!r} in {where}. "
                f"Run `eiup calibrate --concept {concept!r} ...` for this model, pass scale_predictors=PATH, "
                "or give a number as erase_scale.")
        pred = ScalePredictor.load(path)
        if pred.concept.strip().lower() != concept.strip().lower():
            raise ValueError(f"scale predictor {path} was calibrated for {pred.concept!r}, not {concept!r}")
        found.append(pred)
    return found


def _asymmetric_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error, under-suppression (pred above target: the concept stays) counted twice."""
    err = pred - target
    return torch.where(err > 0, 2.0 * err**2, err**2).mean()


def _best_constant(targets: torch.Tensor) -> float:
    """The constant scale minimising :func:`_asymmetric_loss` over ``targets`` (grid search)."""
    grid = torch.linspace(float(targets.min()), 0.0, 201)
    losses = torch.stack([_asymmetric_loss(torch.full_like(targets, float(c)), targets) for c in grid])
    return float(grid[int(losses.argmin())])


def _fit_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> tuple[ScaleMLP, float]:
    torch.manual_seed(seed)
    mlp = ScaleMLP(x.shape[1])
    opt = torch.optim.AdamW(mlp.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(epochs):
        loss = _asymmetric_loss(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return mlp.eval(), float(loss.item())


def _constant_mlp(n_layers: int, value: float) -> ScaleMLP:
    """An MLP that outputs ``value`` (<= 0) whatever its input: -softplus(b) = value."""
    mlp = ScaleMLP(n_layers)
    with torch.no_grad():
        last = mlp.net[-1]
        last.weight.zero_()
        v = max(-value, 1e-4)
        last.bias.fill_(math.log(math.expm1(v)))  # softplus^-1(v)
    return mlp.eval()


def fit_predictor(concept: str, means: torch.Tensor, targets: torch.Tensor, margin: float = 1.1,
                  epochs: int = 1500, seed: int = 0, info: dict | None = None, folds: int = 4,
                  groups: list | None = None) -> ScalePredictor:
    """Fit the MLP to the mildest erasing scales (targets <= 0) from per-layer concept attention (N, layers).

    The MLP is kept only if it predicts held-out samples better than the best constant scale
    (``folds``-fold cross-validation, same asymmetric loss; with ``groups``, e.g. the prompt of
    each sample, whole groups are held out, so the test is on unseen prompts); otherwise the
    predictor is that constant: with few calibration samples an MLP can fit them and still
    extrapolate to ~0 on new prompts, which under-suppresses.
    """
    x = attention_features(means)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-3)
    x = (x - mean) / std
    y = targets.float()
    n = len(y)
    labels = list(groups) if groups is not None else list(range(n))
    if len(labels) != n:
        raise ValueError(f"groups has {len(labels)} entries for {n} samples")
    unique = list(dict.fromkeys(labels))
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {unique[j]: rank % folds for rank, j in enumerate(perm)}
    cv_mlp, cv_const = [], []
    for k in range(min(folds, len(unique))):
        held = torch.tensor([i for i in range(n) if fold_of[labels[i]] == k], dtype=torch.long)
        kept = torch.tensor([i for i in range(n) if fold_of[labels[i]] != k], dtype=torch.long)
        if len(held) == 0 or len(kept) < 2:
            continue
        mlp, _ = _fit_mlp(x[kept], y[kept], epochs, seed)
        with torch.no_grad():
            cv_mlp.append(float(_asymmetric_loss(mlp(x[held]), y[held])))
        c = _best_constant(y[kept])
        cv_const.append(float(_asymmetric_loss(torch.full_like(y[held], c), y[held])))
    use_mlp = bool(cv_mlp) and float(np.mean(cv_mlp)) < float(np.mean(cv_const))
    if use_mlp:
        mlp, loss = _fit_mlp(x, y, epochs, seed)
    else:
        constant = _best_constant(y)
        mlp, loss = _constant_mlp(x.shape[1], constant), float(_asymmetric_loss(torch.full_like(y, constant), y))
    min_scale = float(min(y.min().item() * 1.5, -1.0))
    cv = {"cv_loss_mlp": float(np.mean(cv_mlp)) if cv_mlp else None,
          "cv_loss_constant": float(np.mean(cv_const)) if cv_const else None, "kind": "mlp" if use_mlp else "constant"}
    return ScalePredictor(concept, mlp, mean, std, margin, min_scale,
                          dict(info or {}, n_samples=int(n), train_loss=loss, **cv))
