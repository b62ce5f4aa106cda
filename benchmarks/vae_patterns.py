"""Does a toy VAE keep each object's pattern? Lost dots and dots drawn on plain objects, judged without a detector.

For every object of the detector's evaluation scenes (one or two objects, every background) the scene is
rendered twice, that object dotted and plain, the rest unchanged. The dotted render gives the dots' pixels
and the object's unmarked ones; the mark contrast (1 - luminance on the dots / luminance on the rest,
``benchmarks/mark_contrast.py``) is then measured at those pixels in both round trips (posterior mean
decoded). A faithful VAE keeps the dotted object's contrast and draws none on the plain one. Reports, per
VAE: the mean contrast of dotted and of plain objects; the share of objects whose dotted round trip shows
more contrast than its plain one (paired: 100% when the VAE never blurs dots into the plain look or draws
dots where there were none); the share of plain objects whose round trip shows a quarter of the render's
dot contrast or more (dots drawn), and of dotted ones under a quarter (dots lost); and, for plain
objects, the spread of luminance over their inner pixels (what blotches look like, 0 as rendered).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mark_contrast import luminance, mark_contrast, pattern_marks

SHARE_BINS = ((0.0, 0.06), (0.06, 0.12), (0.12, 1.0))


def inner_spread(image: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation / mean of the luminance over an object's inner pixels (mask eroded by 2 pixels)."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(mask > 0.99, iterations=2)
    if inner.sum() < 4:
        inner = mask > 0.99
    lum = luminance(image)[inner]
    return float(lum.std() / max(float(lum.mean()), 1.0))


def object_pairs(n_scenes: int, seed: int) -> list[dict]:
    """Per object of the detector's scenes ``seed``: its scene rendered with that object dotted and plain."""
    import random

    from eiup.toy.render import render
    from eiup.toy.world import Scene, random_scene

    pairs = []
    for i in range(n_scenes):
        scene = random_scene(random.Random(seed * 7_000_003 + i))  # render_detector_scenes' scenes
        for k, obj in enumerate(scene.objects):
            versions = {}
            for pattern in ("dotted", "plain"):
                objects = tuple(o if j != k else type(o)(o.color, o.shape, pattern, o.noun)
                                for j, o in enumerate(scene.objects))
                versions[pattern] = render(Scene(objects, scene.background, scene.layout_seed))
            mask = versions["dotted"].masks[k]
            marks, bare = pattern_marks(versions["dotted"].image, versions["plain"].image, mask)
            if marks.sum() < 3 or bare.sum() < 3:
                continue
            pairs.append({"dotted": versions["dotted"].image, "plain": versions["plain"].image, "mask": mask,
                          "marks": marks, "bare": bare, "share": float((mask > 0.5).mean()),
                          "color": obj.color, "shape": obj.shape, "background": scene.background})
    return pairs


def round_trips(vae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """Posterior means decoded, uint8."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def measure(vae, pairs: list[dict]) -> list[dict]:
    trips = {p: round_trips(vae, np.stack([pair[p] for pair in pairs])) for p in ("dotted", "plain")}
    rows = []
    for i, pair in enumerate(pairs):
        render_contrast = mark_contrast(pair["dotted"], pair["marks"], pair["bare"])
        rows.append({"share": pair["share"], "color": pair["color"], "background": pair["background"],
                     "render": render_contrast,
                     "dotted": mark_contrast(trips["dotted"][i], pair["marks"], pair["bare"]) / render_contrast,
                     "plain": mark_contrast(trips["plain"][i], pair["marks"], pair["bare"]) / render_contrast,
                     "plain spread": inner_spread(trips["plain"][i], pair["mask"]),
                     "plain spread as rendered": inner_spread(pair["plain"], pair["mask"])})
    return rows


def summarise(rows: list[dict]) -> dict:
    def stats(sel: list[dict]) -> dict:
        return {"n": len(sel),
                "dotted kept": float(np.mean([r["dotted"] for r in sel])),
                "plain drawn": float(np.mean([r["plain"] for r in sel])),
                "paired": float(np.mean([r["dotted"] > r["plain"] for r in sel])),
                "dots drawn on plain": float(np.mean([r["plain"] >= 0.25 for r in sel])),
                "dots lost": float(np.mean([r["dotted"] < 0.25 for r in sel])),
                "plain spread": float(np.mean([r["plain spread"] for r in sel])),
                "plain spread as rendered": float(np.mean([r["plain spread as rendered"] for r in sel]))}

    out = {"all": stats(rows)}
    for lo, hi in SHARE_BINS:
        sel = [r for r in rows if lo <= r["share"] < hi]
        if sel:
            out[f"{lo:.0%}-{hi:.0%} of the image"] = stats(sel)
    return out


def markdown(results: dict) -> str:
    lines = ["| VAE | objects | dotted: contrast kept | plain: contrast drawn | paired | dots drawn on plain | "
             "dots lost | plain spread (rendered) |", "|---|---|---|---|---|---|---|---|"]
    for name, summary in results.items():
        for part, s in summary.items():
            lines.append(f"| {name} | {part} ({s['n']}) | {s['dotted kept']:.0%} | {s['plain drawn']:.0%} | "
                         f"{s['paired']:.1%} | {s['dots drawn on plain']:.1%} | {s['dots lost']:.1%} | "
                         f"{s['plain spread']:.3f} ({s['plain spread as rendered']:.3f}) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=None,
                    help="pipeline folder whose VAE is measured (repeatable; default: the bundled toy model)")
    ap.add_argument("--scenes", type=int, default=600, help="detector evaluation scenes (each object counts)")
    ap.add_argument("--seed", type=int, default=12345, help="their seed (evaluate_detector's: 12345)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    if args.scenes < 1:
        ap.error("--scenes must be >= 1")

    from eiup.models import load_pipeline

    pairs = object_pairs(args.scenes, args.seed)
    results = {}
    for model in args.model or [None]:
        results[str(model or "bundled")] = summarise(measure(load_pipeline(model).vae.float(), pairs))
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": results},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
