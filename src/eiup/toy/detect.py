"""The toy-world concept detector: a small fully-convolutional CNN that finds each object and
reads its color, shape and pattern, plus the background.

It predicts, on a 16x16 grid over the 64x64 image, whether each cell belongs to an object and
that object's attributes; objects are the connected groups of object cells, each attribute the
area-weighted vote of its cells. Trained on renders passed through the toy model's VAE, so it
sees what generated images look like.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .render import render
from .world import BACKGROUNDS, COLORS, PATTERNS, SHAPES, Scene, random_scene

GRID = 16
HEADS = {"color": COLORS, "shape": SHAPES, "pattern": PATTERNS}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ConceptDetectorNet(nn.Module):
    """Encoder down to 4x4 (whole-image context), decoder back to a 16x16 grid of predictions."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.d1 = _block(3, w, 2)        # 32
        self.d2 = _block(w, 2 * w, 2)    # 16
        self.d3 = _block(2 * w, 4 * w, 2)  # 8
        self.d4 = _block(4 * w, 4 * w, 2)  # 4
        self.u3 = _block(8 * w, 4 * w, 1)
        self.u2 = _block(6 * w, 2 * w, 1)
        n_out = 1 + len(COLORS) + len(SHAPES) + len(PATTERNS)
        self.cells = nn.Conv2d(2 * w, n_out, 1)
        self.background = nn.Linear(4 * w, len(BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h1 = self.d1(x)
        h2 = self.d2(h1)
        h3 = self.d3(h2)
        h4 = self.d4(h3)
        u3 = self.u3(torch.cat([h3, F.interpolate(h4, scale_factor=2.0)], 1))
        u2 = self.u2(torch.cat([h2, F.interpolate(u3, scale_factor=2.0)], 1))
        return self.cells(u2), self.background(h4.mean((2, 3)))


def split_cells(cells: torch.Tensor) -> dict[str, torch.Tensor]:
    i = 1
    out = {"object": cells[:, 0]}
    for name, values in HEADS.items():
        out[name] = cells[:, i:i + len(values)]
        i += len(values)
    return out


# ---------------------------------------------------------------- detections

@dataclass
class DetectedObject:
    color: str
    shape: str
    pattern: str
    area: float  # share of the image, in [0, 1]
    center: tuple[float, float]  # (x, y) in [0, 1]
    confidence: dict[str, float] = field(default_factory=dict)
    mask: np.ndarray | None = field(default=None, repr=False)  # (16, 16) bool grid cells
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per head: probability of each value

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "pattern": self.pattern}


@dataclass
class Detection:
    objects: list[DetectedObject]
    background: str
    background_confidence: float
    background_scores: np.ndarray | None = field(default=None, repr=False)  # probability of each background

    def has(self, attribute: str, value: str) -> bool:
        """True if the image shows `value` for `attribute` ('background' or an object attribute)."""
        if attribute == "background":
            return self.background == value
        return any(getattr(o, attribute) == value for o in self.objects)

    def score(self, attribute: str, value: str) -> float:
        """How likely the image shows `value` for `attribute`: the background's probability, or the highest of
        its objects' (0 without objects)."""
        if attribute == "background":
            return float(self.background_scores[BACKGROUNDS.index(value)])
        index = HEADS[attribute].index(value)
        return max((float(o.scores[attribute][index]) for o in self.objects), default=0.0)

    def shows(self, attribute: str, value: str, threshold: float | None = None) -> bool:
        """:meth:`has` (the reading), or with ``threshold``, whether :meth:`score` reaches it."""
        return self.has(attribute, value) if threshold is None else self.score(attribute, value) >= threshold

    def to_dict(self) -> dict:
        return {
            "background": self.background,
            "objects": [dict(o.attributes(), area=round(o.area, 4), center=[round(c, 3) for c in o.center])
                        for o in self.objects],
        }


def palette_color(image: np.ndarray, cells: np.ndarray, background: str) -> str:
    """The world colour nearest to an object's pixels, read without any learned model: the median of the
    brighter half of the pixels under its detector cells that are not near the background colour (pattern
    marks are dark), ``image`` uint8 (64, 64, 3)."""
    from .world import BACKGROUND_RGB, COLOR_RGB

    region = np.kron(cells.astype(bool), np.ones((64 // GRID, 64 // GRID), dtype=bool))
    pixels = np.asarray(image, dtype=np.float64)[region]
    pixels = pixels[np.abs(pixels - BACKGROUND_RGB[background]).sum(1) > 90]
    if len(pixels) == 0:
        raise ValueError("palette_color: no pixel of the object's cells differs from the background")
    bright = pixels[pixels.max(1) >= np.median(pixels.max(1))]
    names, rgb = list(COLOR_RGB), np.array(list(COLOR_RGB.values()), dtype=np.float64)
    return names[int(np.argmin(((rgb - np.median(bright, 0)) ** 2).sum(1)))]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    from scipy.ndimage import label

    labels, n = label(mask, structure=np.ones((3, 3)))
    return [labels == k for k in range(1, n + 1)]


def decode(cells: torch.Tensor, bg_logits: torch.Tensor, min_cells: int = 3) -> list[Detection]:
    """Turn network outputs into per-image detections (objects = connected object cells)."""
    parts = split_cells(cells.float())
    obj_prob = torch.sigmoid(parts["object"]).numpy()
    probs = {name: parts[name].softmax(1).numpy() for name in HEADS}
    bg_prob = bg_logits.float().softmax(-1).numpy()
    out = []
    for b in range(cells.shape[0]):
        objects = []
        for comp in _components(obj_prob[b] > 0.5):
            if comp.sum() < min_cells:
                continue
            weight = obj_prob[b] * comp
            attrs, conf, scores = {}, {}, {}
            for name, values in HEADS.items():
                votes = (probs[name][b] * weight[None]).sum((1, 2)) / weight.sum()
                attrs[name] = values[int(votes.argmax())]
                conf[name] = float(votes.max())
                scores[name] = votes
            ys, xs = np.nonzero(comp)
            objects.append(DetectedObject(
                **attrs, area=float(comp.sum()) / comp.size, confidence=conf,
                center=(float(xs.mean() + 0.5) / GRID, float(ys.mean() + 0.5) / GRID), mask=comp, scores=scores,
            ))
        objects.sort(key=lambda o: o.center)
        k = int(bg_prob[b].argmax())
        out.append(Detection(objects, BACKGROUNDS[k], float(bg_prob[b, k]), bg_prob[b]))
    return out


class ConceptDetector:
    """Python API: `ConceptDetector.load().detect(images)` -> list of `Detection`."""

    def __init__(self, net: ConceptDetectorNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ConceptDetector":
        path = Path(path) if path else default_detector_path()
        if not path.exists():
            raise FileNotFoundError(f"no detector weights at {path}; train them with `eiup toy train-detector`")
        net = ConceptDetectorNet()
        net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        return cls(net)

    @torch.no_grad()
    def detect(self, images, batch_size: int = 256) -> list[Detection]:
        """Detect objects in PIL images, uint8 arrays (N,H,W,3) or float tensors (N,3,H,W) in [0,1]."""
        x = to_tensor(images)
        out = []
        for i in range(0, len(x), batch_size):
            cells, bg = self.net(x[i:i + batch_size] * 2 - 1)
            out += decode(cells, bg)
        return out


def default_detector_path() -> Path:
    return Path(__file__).parent / "weights" / "detector.safetensors"


def to_tensor(images) -> torch.Tensor:
    """Images (PIL, uint8 arrays, float arrays or tensors in [0, 1]) as a float tensor (N,3,64,64) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 255.0
    else:
        if not isinstance(images, (list, tuple)) and not (isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        arrs = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        x = torch.from_numpy(arrs).permute(0, 3, 1, 2).float()
        if not np.issubdtype(arrs.dtype, np.floating):  # uint8; float arrays (output_type="np") are in [0, 1]
            x = x / 255.0
    if x.shape[-1] != 64:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
    return x


# ---------------------------------------------------------------- training

def _render_for_detector(args):
    seed = args
    scene = random_scene(random.Random(seed))
    r = render(scene, 64)
    cover = np.zeros((2, GRID, GRID), dtype=np.float32)
    for k, m in enumerate(r.masks):
        cover[k] = m.reshape(GRID, 64 // GRID, GRID, 64 // GRID).mean((1, 3))
    return r.image, cover, scene


def cell_targets(covers: np.ndarray, scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-cell targets: object (coverage>=0.5 of one object) and that object's attribute indices."""
    n = len(scenes)
    owner = np.where(covers.max(1) >= 0.5, covers.argmax(1), -1)  # (N, G, G)
    t = {"object": (owner >= 0).astype(np.float32)}
    for name, values in HEADS.items():
        idx = np.full((n, GRID, GRID), -100, dtype=np.int64)
        for i, s in enumerate(scenes):
            for k, o in enumerate(s.objects):
                idx[i][owner[i] == k] = values.index(getattr(o, name))
        t[name] = idx
    t["background"] = np.array([BACKGROUNDS.index(s.background) for s in scenes])
    return t


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 256, sample: bool = True, seed: int = 0) -> np.ndarray:
    """Encode and decode uint8 images with the toy VAE (what the UNet's outputs look like)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(images), batch), desc="vae round trip", leave=False):
        x = torch.from_numpy(np.asarray(images[i:i + batch])).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g) if sample else dist.mean
        y = vae.decode(z).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def render_detector_scenes(n: int, seed: int, processes: int = 2) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """The detector's scenes of ``seed`` as rendered: uint8 images (n, 64, 64, 3), each object's share of every
    grid cell (n, 2, GRID, GRID) and the scenes (``evaluate_detector`` uses seed 12345)."""
    with Pool(processes) as pool:
        rows = list(tqdm(pool.imap(_render_for_detector, [seed * 7_000_003 + i for i in range(n)], chunksize=64),
                         total=n, desc="render (detector)"))
    return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), [r[2] for r in rows]


def cover_center(cover: np.ndarray) -> tuple[float, float]:
    """(x, y) in [0, 1] of one object's cell coverage (GRID, GRID): where its detection should be."""
    yy, xx = np.mgrid[0:GRID, 0:GRID]
    w = cover / cover.sum()
    return float(((xx + 0.5) * w).sum() / GRID), float(((yy + 0.5) * w).sum() / GRID)


def nearest_detection(objects: list[DetectedObject], cover: np.ndarray) -> DetectedObject | None:
    """The detected object whose centre is nearest to a rendered object's coverage centre (None if none)."""
    cx, cy = cover_center(cover)
    return min(objects, key=lambda o: (o.center[0] - cx) ** 2 + (o.center[1] - cy) ** 2, default=None)


def make_detector_data(vae, n: int, seed: int, processes: int = 2):
    """The detector's scenes of ``seed``, round-tripped through ``vae`` (as rendered where ``vae`` is None)."""
    images, covers, scenes = render_detector_scenes(n, seed, processes)
    return (images if vae is None else vae_round_trip(vae, images, seed=seed)), covers, scenes


def detector_loss(net, x, targets, idx) -> torch.Tensor:
    cells, bg = net(x)
    parts = split_cells(cells)
    target = {k: torch.from_numpy(np.ascontiguousarray(v[idx])).to(x.device) for k, v in targets.items()}
    loss = F.binary_cross_entropy_with_logits(parts["object"], target["object"])
    for name in HEADS:
        loss = loss + F.cross_entropy(parts[name], target[name], ignore_index=-100)
    return loss + F.cross_entropy(bg, target["background"])


def shading_field(shape: tuple[int, ...], g: torch.Generator, cells: tuple[int, ...] = (4, 8)) -> torch.Tensor:
    """Smooth random field of unit spread per image, (B, 1, H, W): sums of upsampled coarse Gaussian grids."""
    b, h, w = shape[0], shape[-2], shape[-1]
    field = sum(F.interpolate(torch.randn(b, 1, c, c, generator=g), size=(h, w), mode="bicubic", align_corners=False)
                for c in cells)
    return field / field.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]


def scale_objects(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] with their objects' brightness scaled by ``scale`` (a number, or per image
    or pixel: (B, 1, 1, 1), (B, 1, H, W)); a pixel counts as object as far as it differs from its image's
    border's median colour, so the background stays as it is."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1)
    off_background = (x - border.median(-1).values[..., None, None]).abs().sum(1, keepdim=True).clamp(0, 1)
    scaled = ((x + 1) * torch.as_tensor(scale, dtype=x.dtype).clamp_min(0.0) - 1).clamp(-1, 1)
    return x + off_background * (scaled - x)


def augment(x: torch.Tensor, g: torch.Generator, shading: float = 0.0,
            brightness: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mild generation-like noise: pixel noise and a little blur; hues are left alone.

    Two options act on the objects only (where the image differs from its border's median colour):
    ``brightness`` scales each image's objects by one factor drawn from [1 - brightness, 1 + brightness], so
    that a pattern has to be read from its marks, not from the darker mean colour they give (a generated plain
    object is often a few percent darker than its render, a dotted one after the VAE a few percent darker
    with its dots blurred away); ``shading`` scales them by 1 + a * (smooth random field), a drawn from
    [0, shading], each channel by a field a fifth as strong: blotches.
    """
    x = x + 0.03 * torch.randn(x.shape, generator=g) * torch.rand(x.shape[0], 1, 1, 1, generator=g)
    if shading > 0 or brightness > 0:
        scale = torch.ones(x.shape[0], 1, 1, 1)
        if brightness > 0:
            scale = scale * (1 + brightness * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=g) - 1))
        if shading > 0:
            strength = shading * torch.rand(x.shape[0], 1, 1, 1, generator=g)
            tint = torch.cat([shading_field(x.shape, g) for _ in range(x.shape[1])], 1)
            scale = scale * (1 + strength * (shading_field(x.shape, g) + 0.2 * tint))
        x = scale_objects(x, scale)
    if torch.rand((), generator=g) < 0.3:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x), flip


def cached_detector_data(vae, n: int, seed: int, processes: int, cache: Path | None):
    """`make_detector_data`, kept in `cache` (an .npz) so that a rerun skips rendering and the VAE."""
    from .train import scene_from_json, scene_to_json

    from ..io import cached_npz

    def make() -> dict:
        images, covers, scenes = make_detector_data(vae, n, seed, processes)
        return {"images": images, "covers": covers, "scenes": json.dumps([scene_to_json(s) for s in scenes])}

    z = cached_npz(cache, make)
    return z["images"], z["covers"], [scene_from_json(d) for d in json.loads(str(z["scenes"]))]


def train_detector(vae, out: str | Path, n_train: int = 30_000, minutes: float = 8.0, seed: int = 1,
                   batch: int = 64, processes: int = 2, cache: str | Path | None = None,
                   init: str | Path | None = None, lr: float = 2e-3, device: str = "cpu",
                   shading: float = 0.0, brightness: float = 0.0) -> Path:
    """Train the detector on VAE-round-tripped renders (optionally continuing from `init`); saves fp16 safetensors.

    With `vae` None it trains on the renders as rendered: a judge that cannot learn a VAE's traces of an
    attribute (benchmarks/colour_check.py). The renders and their round trips are made on the CPU
    (`processes` rendering processes); `device` is where the detector itself trains. ``shading`` and
    ``brightness``: see :func:`augment` (0: off).
    """
    for name, value in (("shading", shading), ("brightness", brightness)):
        if not 0 <= value < 1:
            raise ValueError(f"train_detector: {name} must be in [0, 1) (0: off), got {value}")
    out = Path(out)
    torch.manual_seed(seed)
    images, covers, scenes = cached_detector_data(vae, n_train, seed, processes, Path(cache) if cache else None)
    targets = cell_targets(covers, scenes)
    net = ConceptDetectorNet()
    if init is not None:
        net.load_state_dict({k: v.float() for k, v in load_file(str(init)).items()})
    net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    budget, spent, step = minutes * 60, 0.0, 0
    bar = tqdm(total=int(budget), desc="detector (s)")
    while spent < budget:
        t0 = time.time()
        idx = rng.choice(len(images), batch, replace=False)
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x, flip = augment(x, g, shading, brightness)
        x = x.to(device)
        t = {k: v.copy() for k, v in ((k, targets[k][idx]) for k in targets)}
        for k in ("object", *HEADS):
            t[k][flip.numpy()] = t[k][flip.numpy()][..., ::-1]
        for grp in opt.param_groups:
            grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, spent / budget))) + 1e-5
        loss = detector_loss(net, x, t, slice(None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        spent += time.time() - t0
        bar.update(int(spent) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.4f}", step=step)
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file({k: v.half().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp),
              metadata={"steps": str(step), "n_train": str(n_train), "seed": str(seed), "shading": str(shading),
                        "brightness": str(brightness)})
    tmp.replace(out)
    return out


def match_objects(expected: list, detected: list[DetectedObject]) -> list[tuple[int, int]]:
    """Pair expected and detected objects, maximising attribute agreement (ties: left to right)."""
    from itertools import permutations

    best, best_score = [], -1
    n, m = len(expected), len(detected)
    for perm in permutations(range(m), min(n, m)):
        score = sum(sum(getattr(expected[i], a) == getattr(detected[j], a) for a in HEADS) for i, j in enumerate(perm))
        if score > best_score:
            best, best_score = list(enumerate(perm)), score
    return best


def evaluate_detector(detector: ConceptDetector, vae, n: int = 2000, seed: int = 12345) -> dict:
    """Accuracy per head on fresh VAE-round-tripped renders (as rendered where `vae` is None; objects matched
    by attributes)."""
    images, covers, scenes = make_detector_data(vae, n, seed)
    dets = detector.detect(images)
    correct = {name: 0 for name in HEADS}
    total = count_ok = bg_ok = 0
    for s, cover, d in zip(scenes, covers, dets):
        count_ok += len(d.objects) == len(s.objects)
        bg_ok += d.background == s.background
        total += len(s.objects)
        for k, obj in enumerate(s.objects):
            near = nearest_detection(d.objects, cover[k])
            if near is None:
                continue
            for name in HEADS:
                correct[name] += getattr(obj, name) == getattr(near, name)
    report = {name: correct[name] / total for name in HEADS}
    report["background"] = bg_ok / n
    report["object_count"] = count_ok / n
    report["n_images"] = n
    return report


def save_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
