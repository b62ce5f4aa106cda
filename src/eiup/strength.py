"""The automatic anchor strength: how hard to project each prompt, predicted from its text embedding.

On a model whose erasure is done by the anchored projection (:mod:`eiup.anchors`), the projection's
strength s is the trade-off: a fixed s strong enough for the hardest prompt damages the others (the toy
model's "an image of a first aid kit in the fog" loses its red at s = 0.5 and its shape at s = 1.25,
while "a drawing of a ladybug" needs 1.25). ``anchor_strength="auto"`` predicts s per prompt and concept
from the prompt's features (:func:`eiup.probe.prompt_features`: the mean token embedding and the last
token, available before denoising), with a linear model calibrated per model and concept by
``eiup calibrate --target strength``: for each calibration prompt and seed, the mildest grid strength
that removes the concept (detector-judged) is the target; ridge regression, lifted by a split-conformal
offset so that a chosen share of held-out calibration samples (``coverage``) get at least their target.
On the bundled toy model it does not beat the per-concept presets on held-out prompts, while the
mildest erasing strength per prompt would (``benchmarks/heldout.py --oracle-strengths``, README).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .io import concept_file, in_model_folder, load_tensors, save_tensors_atomic
from .probe import prompt_features

STRENGTH_DIR = "eiup_strength_predictors"
DEFAULT_STRENGTH_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
L2_CHOICES = (0.01, 0.1, 1.0, 10.0)


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
    """s = clamp(<w, (x - mean) / std> + b, low, high) for one concept of one model, x the
    prompt features (:func:`eiup.probe.prompt_features`); ``w = 0`` is a constant strength."""

    concept: str
    weight: torch.Tensor  # (F,)
    bias: float
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
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
        return (z @ self.weight.to(x.device) + self.bias).clamp(self.low, self.high)

    def save(self, path: str | Path) -> Path:
        tensors = {"weight": self.weight.float(), "mean": self.mean.float(), "std": self.std.float()}
        return save_tensors_atomic(path, tensors, {"concept": self.concept, "bias": repr(float(self.bias)),
                                                   "low": repr(float(self.low)), "high": repr(float(self.high)),
                                                   "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> "StrengthPredictor":
        t, meta = load_tensors(path)
        missing = {"concept", "bias", "low", "high"} - set(meta)
        if missing or set(t) != {"weight", "mean", "std"}:
            raise ValueError(f"{path} is not an eiup strength predictor (missing {sorted(missing) or 'tensors'}); "
                             "write one with `eiup calibrate --target strength`")
        return cls(meta["concept"], t["weight"], float(meta["bias"]), t["mean"], t["std"], float(meta["low"]),
                   float(meta["high"]), json.loads(meta.get("info") or "{}"))


strength_predictor_path = concept_file


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


def _fit_linear(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Ridge regression y ~ <w, x> + b (x standardised), closed form."""
    xc, yc = x - x.mean(0), y - y.mean()
    w = torch.linalg.solve(xc.T @ xc + l2 * len(y) * torch.eye(x.shape[1]), xc.T @ yc)
    return w, float(y.mean() - x.mean(0) @ w)


def fit_strength_predictor(concept: str, features: torch.Tensor, targets: torch.Tensor, groups: Sequence,
                           erasable: torch.Tensor | None = None, coverage: float = 0.95, folds: int = 5,
                           seed: int = 0, info: dict | None = None, low: float = 0.25,
                           high: float = 4.0) -> StrengthPredictor:
    """Fit s(prompt) to the mildest erasing strengths (N,) from prompt features (N, F), then lift it so that
    ``coverage`` of held-out samples get at least their target (a split-conformal offset: the ``coverage``
    quantile of target - prediction over ``folds``-fold cross-validation by whole ``groups``, e.g. prompts).

    Ridge models (L2 from :data:`L2_CHOICES`) compete with a constant (the targets' ``coverage`` quantile):
    the one with the mildest mean strength at that coverage is kept. Samples that no grid strength erases
    (``erasable`` False) are left out of the fit: no strength buys anything there.
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage={coverage} must be in (0, 1), e.g. 0.95")
    keep = torch.ones(len(targets), dtype=torch.bool) if erasable is None else erasable.bool()
    labels = [g for g, k in zip(groups, keep.tolist()) if k]
    x_all = features.float()
    mean, std = x_all.mean(0), x_all.std(0).clamp_min(1e-3)
    x, y = ((x_all - mean) / std)[keep], targets.float()[keep]
    if len(y) < 2:
        raise ValueError(f"{int(keep.sum())} erasable calibration samples: too few to fit (give more prompts or seeds)")
    unique = list(dict.fromkeys(labels))
    perm = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {unique[j]: rank % folds for rank, j in enumerate(perm)}
    fold = torch.tensor([fold_of[g] for g in labels])
    candidates: dict[str, tuple[float, float]] = {}  # name -> (offset, mean strength at that coverage)
    const = float(torch.quantile(y, coverage))
    candidates["constant"] = (0.0, const)
    for l2 in L2_CHOICES:
        cv = torch.empty_like(y)
        for k in range(folds):
            held, kept = fold == k, fold != k
            if not held.any() or kept.sum() < 2:
                cv[held] = float(y[kept].mean()) if kept.any() else float(y.mean())
                continue
            w, b = _fit_linear(x[kept], y[kept], l2)
            cv[held] = x[held] @ w + b
        offset = float(torch.quantile(y - cv, coverage))
        candidates[f"l2={l2:g}"] = (offset, float((cv + offset).clamp(low, high).mean()))
    best = min(candidates, key=lambda name: candidates[name][1])
    if best == "constant":
        w, b = torch.zeros(x.shape[1]), const
    else:
        w, b = _fit_linear(x, y, float(best.split("=")[1]))
        b += candidates[best][0]
    fitted = (x @ w + b).clamp(low, high)
    return StrengthPredictor(concept, w, b, mean, std, low, high,
                             dict(info or {}, n_samples=len(targets), n_erasable=len(y), kind=best, coverage=coverage,
                                  cv_mean_strength={k: v[1] for k, v in candidates.items()},
                                  train_under_erasing=float((fitted < y - 1e-6).float().mean()),
                                  mean_strength=float(fitted.mean())))


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
                       coverage: float = 0.95, **erase_kwargs) -> tuple[StrengthPredictor, Path, StrengthData]:
    """Collect (:func:`collect_strengths`), fit (:func:`fit_strength_predictor`) and save the predictor
    (default: ``<model folder>/eiup_strength_predictors/<concept>.safetensors``)."""
    grid = sorted(float(s) for s in grid)
    if not grid or grid[0] <= 0:
        raise ValueError(f"grid={grid}: give positive strengths, e.g. {list(DEFAULT_STRENGTH_GRID)}")
    data = collect_strengths(pipe, concept, prompts, judge, seeds, steps, guidance, grid, **erase_kwargs)
    pred, path = fit_and_save(pipe, concept, data, seeds, steps, guidance, out, coverage, **erase_kwargs)
    return pred, path, data


def fit_and_save(pipe, concept: str, data: StrengthData, seeds: Sequence[int], steps: int, guidance: float,
                 out: str | Path | None = None, coverage: float = 0.95, **erase_kwargs) -> tuple[StrengthPredictor, Path]:
    """The second half of :func:`calibrate_strength`: fit the predictor to collected data and save it."""
    grid = sorted(data.present)
    if len(data.prompts) == 0:
        raise ValueError(f"no calibration prompt shows {concept!r} in its plain images and passes the projection's "
                         "gate: give prompts that name or imply it")
    info = {"grid": grid, "steps": steps, "guidance": guidance, "seeds": [int(s) for s in seeds],
            "erase_kwargs": erase_kwargs, "n_prompts": len(set(data.prompts)),
            "unerased_at_strongest": int(sum(data.present[grid[-1]])), "mean_target": float(data.targets.mean())}
    erasable = ~torch.tensor(data.present[grid[-1]])
    pred = fit_strength_predictor(concept, data.features, data.targets, data.prompts, erasable, coverage, info=info,
                                  low=grid[0], high=grid[-1])
    if out is None:
        out = strength_predictor_path(in_model_folder(pipe, STRENGTH_DIR, "out=PATH for the strength predictor"), concept)
    return pred, pred.save(out)
