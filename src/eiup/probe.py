"""Prompt probes: does a prompt imply a concept? A small classifier on the text encoder's output.

The anchored projection (:mod:`eiup.anchors`) must edit prompts that imply the concept and leave
every other prompt bit-identical. Similarity to the concept word cannot tell them apart: on the toy
model "a tomato" is as close to "orange" as to "red", and "a lemon" leans towards red as much as a
tomato does. What the model draws is the ground truth, so the gate is learnt from it, as Latent
Guard (Liu et al., ECCV 2024) learns unsafe concepts on text-encoder embeddings: generate each
training prompt without erasure, let a judge (the toy detector, NudeNet, any callable) say whether
the concept is in the image, and fit

    p(concept | prompt) = sigmoid(<w, [mean_{i >= 1} e_i, e_last]> + b)

on the prompt's token embeddings: their mean after BOS (the padding and filler tokens that carry
implied attributes included) and the last token (in a causal encoder, the one that has read the
whole prompt), or, where 5-fold cross-validation finds it at least a point more accurate, the same
features through a small MLP (the mean of five 16-unit GELU MLPs: on the toy model star's gate goes
from 93% to 95% of unseen prompts right, red's from 93% to 96%). Classes are weighted equally, so a
missed prompt costs as much as a false edit whatever the share of prompts with the concept. One small
safetensors file per concept in ``<model>/eiup_prompt_probes/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import concept_file, in_model_folder, load_tensors, save_tensors_atomic

PROBE_DIR = "eiup_prompt_probes"


FEATURES = "[mean of prompt_embeds[:, 1:], prompt_embeds[:, -1]]"


def prompt_features(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(B, 2D): each prompt's mean token embedding after BOS and its last token (module docstring)."""
    e = prompt_embeds.float()
    return torch.cat([e[:, 1:].mean(1), e[:, -1]], dim=-1)


@dataclass
class PromptProbe:
    """p(concept | prompt) = sigmoid(<weight, h(x)> + bias) for one concept of one model, x the prompt
    features; h is the identity (a logistic regression) or, with ``hidden = (W1, b1)``, one GELU layer
    ``gelu(W1 x + b1)`` (a small MLP for concepts a hyperplane does not separate)."""

    concept: str
    weight: torch.Tensor  # (2D,) or (H,) after the hidden layer
    bias: float
    info: dict = field(default_factory=dict)
    hidden: tuple[torch.Tensor, torch.Tensor] | None = None  # W1 (H, 2D), b1 (H,)

    @property
    def in_features(self) -> int:
        return self.weight.numel() if self.hidden is None else self.hidden[0].shape[1]

    @torch.no_grad()
    def logits(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) logits from prompt embeddings (B, L, D); > 0 means the prompt implies the concept."""
        x = prompt_features(prompt_embeds)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"prompt probe for {self.concept!r} expects {self.in_features // 2}-dim text embeddings,"
                             f" got {x.shape[-1] // 2}: it was fitted for another model (refit with `eiup fit-gate`)")
        return self.logits_from_features(x)

    def logits_from_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) logits from prompt features (B, 2D) (:func:`prompt_features`)."""
        x = x.float()
        if self.hidden is not None:
            w1, b1 = self.hidden
            x = F.gelu(x @ w1.to(x.device).T + b1.to(x.device))
        return x @ self.weight.to(x.device) + self.bias

    def save(self, path: str | Path) -> Path:
        tensors = {"weight": self.weight.float(), "bias": torch.tensor([float(self.bias)])}
        if self.hidden is not None:
            tensors |= {"hidden.weight": self.hidden[0].float(), "hidden.bias": self.hidden[1].float()}
        return save_tensors_atomic(path, tensors, {"concept": self.concept, "features": FEATURES, "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path) -> "PromptProbe":
        try:
            tensors, meta = load_tensors(path)
            weight, bias = tensors["weight"], tensors["bias"]
            hidden = (tensors["hidden.weight"], tensors["hidden.bias"]) if "hidden.weight" in tensors else None
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"{path}: not a prompt probe ({e}); refit it with `eiup fit-gate`") from e
        shapes_ok = weight.ndim == 1 and bias.numel() == 1 and (
            hidden is None or hidden[0].ndim == 2 and hidden[0].shape[0] == weight.numel() == hidden[1].numel())
        finite = all(torch.isfinite(t).all() for t in (weight, bias, *(hidden or ())))
        if not shapes_ok or not finite or "concept" not in meta:
            raise ValueError(f"{path}: not a prompt probe (weight (2D,) or hidden.weight (H, 2D), hidden.bias (H,) and "
                             "weight (H,); bias (1,); concept metadata); refit it with `eiup fit-gate`")
        hidden = None if hidden is None else (hidden[0].float(), hidden[1].float())
        return cls(meta["concept"], weight.float(), float(bias), json.loads(meta.get("info", "{}")), hidden)


probe_path = concept_file


def find_probe(concept: str, model_folder: str | Path | None) -> PromptProbe | None:
    """``<model>/eiup_prompt_probes/<concept>.safetensors``, or None when the model has none."""
    if not model_folder:
        return None
    path = probe_path(Path(model_folder) / PROBE_DIR, concept)
    if not path.is_file():
        return None
    probe = PromptProbe.load(path)
    if probe.concept.strip().lower() != concept.strip().lower():
        raise ValueError(f"prompt probe {path} was fitted for {probe.concept!r}, not {concept!r}")
    return probe


MLP_STEPS = 300
MLP_HIDDEN = 16
PROBE_KINDS = ("auto", "logistic", "mlp")


def fit_probe(concept: str, features: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3,
              info: dict | None = None, balanced: bool = True, hidden: int = 0, weight_decay: float = 1.0,
              seed: int = 0, members: int = 5) -> PromptProbe:
    """Fit a probe to soft labels in [0, 1] on standardised features (classes weighted equally when
    ``balanced``): a logistic regression (``hidden=0``; L2 ``l2``, LBFGS) or a one-hidden-layer GELU MLP
    (``hidden=H``; AdamW with ``weight_decay``, full batch; the mean logit of ``members`` seeds, which
    stabilises decisions near the boundary), the standardisation folded back into the first layer."""
    x = features.double()
    y = targets.double()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and targets (N,) expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not ((y >= 0) & (y <= 1)).all():
        raise ValueError("targets are shares of images with the concept, in [0, 1]")
    if hidden < 0:
        raise ValueError(f"hidden: {hidden}; give 0 (logistic regression) or a layer width")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    pos_weight = (1 - y).sum() / y.sum().clamp_min(1e-6) if balanced else None
    if hidden == 0:
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight) + l2 * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        weight = (w / std).detach()
        probe = PromptProbe(concept, weight.float(), float(b.detach() - (weight * mean).sum()))
        stats = {"probe": "logistic regression", "l2": l2}
    else:
        layers, outputs, offset = [], [], 0.0
        for member in range(members):  # an ensemble of MLPs is one wider MLP with averaged output weights
            g = torch.Generator().manual_seed(seed + member)
            w1 = (torch.randn(hidden, x.shape[1], generator=g, dtype=torch.float64) / x.shape[1] ** 0.5).requires_grad_()
            w2 = (torch.randn(hidden, generator=g, dtype=torch.float64) / hidden**0.5).requires_grad_()
            b1 = torch.zeros(hidden, dtype=torch.float64, requires_grad=True)
            b2 = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            opt = torch.optim.AdamW([w1, b1, w2, b2], lr=1e-2, weight_decay=weight_decay)
            for _ in range(MLP_STEPS):
                opt.zero_grad()
                F.binary_cross_entropy_with_logits(F.gelu(z @ w1.T + b1) @ w2 + b2, y, pos_weight=pos_weight).backward()
                opt.step()
            folded = (w1 / std).detach()
            layers.append((folded, b1.detach() - folded @ mean))
            outputs.append(w2.detach() / members)
            offset += float(b2.detach()) / members
        probe = PromptProbe(concept, torch.cat(outputs).float(), offset,
                            hidden=(torch.cat([w for w, _ in layers]).float(), torch.cat([b for _, b in layers]).float()))
        stats = {"probe": f"{members} MLPs of {hidden} hidden units, averaged", "weight_decay": weight_decay}
    accuracy = float(((probe.logits_from_features(features) > 0) == (targets >= 0.5)).double().mean())
    probe.info = dict(info or {}, n_prompts=int(len(y)), positive_share=float((y >= 0.5).double().mean()),
                      train_accuracy=accuracy, balanced=balanced, **stats)
    return probe


def cross_validated_accuracy(features: torch.Tensor, targets: torch.Tensor, folds: int = 5, seed: int = 0,
                             **fit) -> float:
    """Share of prompts whose held-out fold's probe (``fit_probe(**fit)``) gets their label (share >= 0.5) right."""
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    right = 0
    for held in order.chunk(folds):
        train = torch.ones(len(targets), dtype=torch.bool)
        train[held] = False
        probe = fit_probe("cv", features[train], targets[train], **fit)
        right += int(((probe.logits_from_features(features[held]) > 0) == (targets[held] >= 0.5)).sum())
    return right / len(targets)


def select_probe(concept: str, features: torch.Tensor, targets: torch.Tensor, hidden: int = MLP_HIDDEN, folds: int = 5,
                 info: dict | None = None) -> PromptProbe:
    """A logistic regression, or the ``hidden``-unit MLP where its k-fold cross-validated accuracy is at
    least a point better; refitted on every prompt. Too few prompts for k folds: the regression."""
    positives = int((targets >= 0.5).sum())
    if len(targets) < 10 * folds or min(positives, len(targets) - positives) < folds:
        return fit_probe(concept, features, targets, info=info)
    scores = {h: cross_validated_accuracy(features, targets, folds, hidden=h) for h in (0, hidden)}
    chosen = hidden if scores[hidden] >= scores[0] + 0.01 else 0
    cv = {"cv_accuracy_logistic": scores[0], f"cv_accuracy_mlp{hidden}": scores[hidden], "cv_folds": folds}
    return fit_probe(concept, features, targets, info=dict(info or {}, **cv), hidden=chosen)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, L, D) conditional prompt embeddings as the pipeline computes them."""
    out = []
    for i in range(0, len(prompts), batch_size):
        embeds, _ = pipe.encode_prompt(list(prompts[i:i + batch_size]), pipe._execution_device, 1, False)
        out.append(embeds.float().cpu())
    return torch.cat(out)


def judge_plain(pipe, prompts: Sequence[str], judges: dict[str, Callable[[list], list[bool]]], seeds: Sequence[int],
                steps: int, guidance: float, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per concept, per prompt: the share of seeds whose plain image (no erasure) shows the concept."""
    hits = {c: np.zeros(len(prompts)) for c in judges}
    jobs = [(i, s) for i in range(len(prompts)) for s in seeds]
    for k in tqdm(range(0, len(jobs), batch_size), desc="plain images for the gate"):
        chunk = jobs[k:k + batch_size]
        images = pipe([prompts[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                      generator=[torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk], erase=None).images
        for concept, judge in judges.items():
            for (i, _), present in zip(chunk, judge(images)):
                hits[concept][i] += bool(present)
    return {c: torch.from_numpy(h / len(seeds)) for c, h in hits.items()}


def fit_gate(pipe, judges: dict[str, Callable[[list], list[bool]]], prompts: Sequence[str], seeds: Sequence[int],
             steps: int = 25, guidance: float = 7.5, out: str | Path | None = None,
             probe: str = "auto") -> list[tuple[PromptProbe, Path]]:
    """Generate ``prompts`` x ``seeds`` once without erasure, judge every concept, fit and save one probe each:
    ``probe="auto"`` the better by cross-validation of a logistic regression and a 16-unit MLP
    (:func:`select_probe`), ``"logistic"`` or ``"mlp"`` that one."""
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe: {probe!r}; give one of {', '.join(PROBE_KINDS)}")
    if len(prompts) < 4:
        raise ValueError(f"prompts: {len(prompts)} given; the gate needs prompts with and without each concept")
    if out is None:
        out = in_model_folder(pipe, PROBE_DIR, "out=FOLDER for the prompt probes")
    shares = judge_plain(pipe, prompts, judges, seeds, steps, guidance)
    features = prompt_features(encode_prompts(pipe, prompts))
    fitted = []
    for concept, y in shares.items():
        if not (0 < float((y >= 0.5).double().mean()) < 1):
            raise ValueError(f"concept {concept!r}: the judge saw it in {'every' if y.min() >= 0.5 else 'no'} "
                             "prompt's images; give prompts with and without it")
        info = {"seeds": len(seeds), "steps": steps, "guidance": guidance}
        if probe == "auto":
            fit = select_probe(concept, features, y, MLP_HIDDEN, info=info)
        else:
            fit = fit_probe(concept, features, y, info=info, hidden=MLP_HIDDEN if probe == "mlp" else 0)
        fitted.append((fit, fit.save(probe_path(out, concept))))
    return fitted
