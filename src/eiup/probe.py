"""Prompt probes: does a prompt imply a concept? A logistic regression on the text encoder's output.

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
whole prompt). Classes are weighted equally, so a missed prompt costs as much as a false edit whatever
the share of prompts with the concept. One small safetensors file per concept in
``<model>/eiup_prompt_probes/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

PROBE_DIR = "eiup_prompt_probes"


def prompt_features(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(B, 2D): each prompt's mean token embedding after BOS and its last token (module docstring)."""
    e = prompt_embeds.float()
    return torch.cat([e[:, 1:].mean(1), e[:, -1]], dim=-1)


@dataclass
class PromptProbe:
    """p(concept | prompt) = sigmoid(<weight, prompt_features> + bias) for one concept of one model."""

    concept: str
    weight: torch.Tensor  # (2D,)
    bias: float
    info: dict = field(default_factory=dict)

    @torch.no_grad()
    def logits(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """(B,) logits from prompt embeddings (B, L, D); > 0 means the prompt implies the concept."""
        x = prompt_features(prompt_embeds)
        if x.shape[-1] != self.weight.numel():
            raise ValueError(f"prompt probe for {self.concept!r} expects {self.weight.numel() // 2}-dim text embeddings,"
                             f" got {x.shape[-1] // 2}: it was fitted for another model (refit with `eiup fit-gate`)")
        return x @ self.weight.to(x.device) + self.bias

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"weight": self.weight.float().contiguous(), "bias": torch.tensor([float(self.bias)])}, str(tmp),
                  metadata={"concept": self.concept, "features": "[mean of prompt_embeds[:, 1:], prompt_embeds[:, -1]]",
                            "info": json.dumps(self.info)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PromptProbe":
        from safetensors import safe_open

        path = Path(path)
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            weight, bias = tensors["weight"], tensors["bias"]
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"{path}: not a prompt probe ({e}); refit it with `eiup fit-gate`") from e
        if weight.ndim != 1 or bias.numel() != 1 or "concept" not in meta or not torch.isfinite(weight).all():
            raise ValueError(f"{path}: not a prompt probe (weight (2D,), bias (1,), concept metadata); "
                             "refit it with `eiup fit-gate`")
        return cls(meta["concept"], weight.float(), float(bias), json.loads(meta.get("info", "{}")))


def probe_path(folder: str | Path, concept: str) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in concept.strip().lower())
    return Path(folder) / f"{safe}.safetensors"


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


def fit_probe(concept: str, features: torch.Tensor, targets: torch.Tensor, l2: float = 1e-3,
              info: dict | None = None, balanced: bool = True) -> PromptProbe:
    """Logistic regression (L2, LBFGS; classes weighted equally when ``balanced``) of soft labels in
    [0, 1] on standardised features, folded back into one weight vector and bias."""
    x = features.double()
    y = targets.double()
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features (N, D) and targets (N,) expected, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not ((y >= 0) & (y <= 1)).all():
        raise ValueError("targets are shares of images with the concept, in [0, 1]")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    pos_weight = (1 - y).sum() / y.sum().clamp_min(1e-6) if balanced else None
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w / std).detach()
    bias = float(b.detach() - (weight * mean).sum())
    logits = x @ weight + bias
    stats = {"n_prompts": int(len(y)), "positive_share": float((y >= 0.5).double().mean()),
             "train_accuracy": float(((logits > 0) == (y >= 0.5)).double().mean()), "l2": l2,
             "balanced": balanced}
    return PromptProbe(concept, weight.float(), bias, dict(info or {}, **stats))


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
             l2: float = 1e-3) -> list[tuple[PromptProbe, Path]]:
    """Generate ``prompts`` x ``seeds`` once without erasure, judge every concept, fit and save one probe each."""
    if len(prompts) < 4:
        raise ValueError(f"prompts: {len(prompts)} given; the gate needs prompts with and without each concept")
    if out is None:
        folder = getattr(pipe.config, "_name_or_path", None)
        if not folder or not Path(folder).is_dir():
            raise ValueError("the model is not a local folder: pass out=FOLDER for the prompt probes")
        out = Path(folder) / PROBE_DIR
    shares = judge_plain(pipe, prompts, judges, seeds, steps, guidance)
    features = prompt_features(encode_prompts(pipe, prompts))
    fitted = []
    for concept, y in shares.items():
        if not (0 < float((y >= 0.5).double().mean()) < 1):
            raise ValueError(f"concept {concept!r}: the judge saw it in {'every' if y.min() >= 0.5 else 'no'} "
                             "prompt's images; give prompts with and without it")
        probe = fit_probe(concept, features, y, l2, {"seeds": len(seeds), "steps": steps, "guidance": guidance})
        fitted.append((probe, probe.save(probe_path(out, concept))))
    return fitted
