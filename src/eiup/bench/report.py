"""Benchmark report: metrics JSON, Markdown tables, image grids, trade-off plots, an HTML index.

Toy suites get erasure/fidelity/specificity columns, I2P suites NudeNet columns and COCO suites
quality columns (CLIP score, FID, PSNR/SSIM against the plain images, seconds per image).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from ..io import atomic_write_text, write_json_atomic
from ..toy.quality import image_grid
from .runner import Unit, load_unit_images

COLUMNS = [
    ("residual_implicit", "residual (implicit)", "{:.1%}"),
    ("residual_explicit", "residual (explicit)", "{:.1%}"),
    ("fidelity", "fidelity", "{:.1%}"),
    ("fidelity_vs_plain", "fidelity vs plain (colour, shape)", "{:.1%}"),
    ("fidelity_unharmed", "fidelity: as plain or as prompted", "{:.1%}"),
    ("specificity", "specificity (colour, shape)", "{:.1%}"),
    ("specificity_psnr", "median PSNR (dB)", "{:.1f}"),
    ("specificity_ssim", "median SSIM", "{:.3f}"),
    ("seconds_per_image", "s / image", "{:.3f}"),
]
NUDITY_COLUMNS = [("flagged_rate", "NudeNet-flagged rate", "{:.1%}"), ("n", "images", "{}"),
                  ("seconds_per_image", "s / image", "{:.3f}")]
COCO_COLUMNS = [
    ("clip_score", "CLIP score", "{:.2f}"),
    ("fid", "FID", "{:.2f}"),
    ("median_psnr", "median PSNR vs plain (dB)", "{:.1f}"),
    ("median_ssim", "median SSIM vs plain", "{:.3f}"),
    ("seconds_per_image", "s / image", "{:.3f}"),
    ("n", "images", "{}"),
]
TOY_NOTE = ("Residual: share of images where the detector still finds the erased concept (implicit prompts imply "
            "it, explicit ones name it). Fidelity, on those images: the other attributes as the prompt asks "
            "(the plain model itself does not reach 100%); vs plain: as in the plain image of the same seed "
            "(colour, shape, object count, background; the erasure's own changes); as plain or as prompted: "
            "either of the two (an erasure that corrects the model's mistake is not charged). Specificity: "
            "unrelated prompts unchanged against the plain image (object count, background, colour, shape) and "
            "the other object of two-object prompts as the prompt asks (colour, shape); the pattern only where "
            "it is the erased concept; "
            "PSNR/SSIM of the unrelated prompts' images against the plain ones (100 dB: identical).")
COCO_NOTE = ("CLIP score: mean of 100 * max(cos, 0) between each image and its prompt (higher is better; "
             "n/a without --clip-model). FID against the reference images (lower is better; n/a without "
             "--fid-reference). PSNR/SSIM: against the plain image of the same prompt and seed.")
REWRITE_NOTE = ("rewrite is no method but a reference: each prompt rewritten without the concept by the toy world's "
                "grammar (\"a tomato\" -> \"an orange circle\", \"a yellow circle\", ... over the seeds) and drawn "
                "without erasure, what a person rewriting the prompt would get.")


def _nan_stat(fn, values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(fn(values)) if values else math.nan


def summarise(metrics: dict) -> dict:
    """Per method across suites: mean of each metric, and the worst concept's implicit residual."""
    methods: dict = {}
    for suite, by_method in metrics.items():
        for method, m in by_method.items():
            if "residual_implicit" in m:
                methods.setdefault(method, []).append(m)
    out = {}
    for method, ms in methods.items():
        row = {k: _nan_stat(np.nanmean, [m.get(k) for m in ms]) for k, _, _ in COLUMNS}
        row["worst_residual_implicit"] = _nan_stat(np.nanmax, [m["residual_implicit"] for m in ms])
        out[method] = row
    return out


def json_safe(obj):
    """NaN (a metric with no images behind it) becomes null, so metrics.json stays strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(fmt: str, v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def is_quality(rows: dict) -> bool:
    """Whether these per-method rows are COCO quality metrics."""
    return any("fid" in r for r in rows.values())


def markdown_table(rows: dict, extra_first: tuple | None = None) -> str:
    nudity = any("flagged_rate" in r for r in rows.values())
    table = COCO_COLUMNS if is_quality(rows) else NUDITY_COLUMNS if nudity else COLUMNS
    cols = ([extra_first] if extra_first else []) + table
    head = "| method | " + " | ".join(c[1] for c in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    for method, m in rows.items():
        lines.append(f"| {method} | " + " | ".join(_fmt(fmt, m.get(k)) for k, _, fmt in cols) + " |")
    return "\n".join(lines)


def tradeoff_plot(summary: dict, path: Path) -> None:
    """Residual concept rate vs fidelity and vs specificity; EIUP scale sweeps as curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict = {}
    for method, m in summary.items():
        fam = method.split("@")[0] if "@" in method else method
        families.setdefault(fam, []).append((method, m))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5 + 0.16 * len(families)))
    colors = dict(zip(families, plt.get_cmap("tab20")(np.linspace(0, 1, max(len(families), 2)))))  # one per family
    vs_plain = all(not math.isnan(m.get("fidelity_vs_plain", math.nan)) for m in summary.values())
    fidelity = ("fidelity_vs_plain", "fidelity vs plain (colour, shape)") if vs_plain else ("fidelity", "fidelity")
    for ax, key, label in ((axes[0], *fidelity), (axes[1], "specificity", "specificity (colour, shape)")):
        for fam, items in families.items():
            xs = [m["residual_implicit"] for _, m in items]
            ys = [m[key] for _, m in items]
            if len(items) > 1:
                order = np.argsort(xs)
                ax.plot(np.array(xs)[order], np.array(ys)[order], "o-", label=fam, markersize=4, color=colors[fam])
                for (method, m) in items:
                    ax.annotate(method.split("@")[1], (m["residual_implicit"], m[key]), fontsize=6)
            elif fam == "rewrite":  # a reference, not a method
                ax.plot(xs, ys, "X", label="rewrite (reference: prompts rewritten without the concept)",
                        markersize=9, color="black")
            else:
                ax.plot(xs, ys, "s", label=fam, markersize=7, color=colors[fam])
        ax.set_xlabel("residual concept rate on implicit prompts (lower is better)")
        ax.set_ylabel(f"{label} (higher is better)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Erasure vs fidelity / specificity (toy world, mean over concepts)")
    fig.tight_layout(rect=(0, 0.03 * (len(families) + 1) / 2 + 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grids(out: Path, units: list[Unit], methods: list[str], per_suite: int = 2, n_seeds: int = 8) -> list[Path]:
    """One grid per suite and role shown: rows = methods, columns = the same seeds."""
    paths = []
    suites = {u.suite.name: u.suite for u in units}
    by_key = {(u.suite.name, u.method.name, u.prompt_index): u for u in units}
    for name, suite in suites.items():
        shown = [i for i, p in enumerate(suite.prompts) if p.role == "implicit"][:1]
        shown += [i for i, p in enumerate(suite.prompts) if p.role == "specificity"][:1]
        shown += [i for i, p in enumerate(suite.prompts) if p.role == "two-object"][:1]
        for i in shown[:per_suite + 1]:
            rows, labels = [], []
            for method in methods:
                unit = by_key.get((name, method, i))
                if unit is None:
                    continue
                rows.append(load_unit_images(out, unit)[:n_seeds])
                labels.append(method)
            if rows:
                path = out / "grids" / f"{name}-{i:03d}-{suite.prompts[i].role}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image_grid(rows, labels).save(path)
                paths.append(path)
    return paths


def write_report(out: Path, metrics: dict, units: list[Unit], settings: dict, grid_methods: list[str]) -> Path:
    summary = summarise(metrics)
    write_json_atomic(out / "metrics.json", json_safe({"settings": settings, "summary": summary, "per_suite": metrics}))
    if summary:
        tradeoff_plot(summary, out / "tradeoff.png")
    grid_paths = grids(out, units, grid_methods)
    quality_only = bool(metrics) and all(is_quality(m) for m in metrics.values())  # COCO only: no toy summary
    md = ["# eiup benchmark", "", f"Settings: `{json.dumps(settings)}`", ""]
    if not quality_only:
        md += ["Mean over concepts (worst concept's implicit residual in its own column).", "", TOY_NOTE, "",
               *([REWRITE_NOTE, ""] if "rewrite" in summary else []),
               markdown_table(summary, ("worst_residual_implicit", "worst concept residual", "{:.1%}")), "",
               "![trade-off](tradeoff.png)", ""]
    for suite, by_method in metrics.items():
        md += [f"## {suite}", "", markdown_table(by_method), ""]
        md += [COCO_NOTE, ""] if is_quality(by_method) else []
        md += [f"![{p.stem}](grids/{p.name})" for p in grid_paths if p.name.startswith(suite + "-")] + [""]
    atomic_write_text(out / "report.md", "\n".join(md))
    body = ["<h1>eiup benchmark</h1>", f"<p><code>{html.escape(json.dumps(settings))}</code></p>"]
    if not quality_only:
        body += ['<img src="tradeoff.png" style="max-width:100%">', f"<p>{html.escape(TOY_NOTE)}</p>",
                 *([f"<p>{html.escape(REWRITE_NOTE)}</p>"] if "rewrite" in summary else []), _html_table(summary)]
    for suite, by_method in metrics.items():
        body += [f"<h2>{html.escape(suite)}</h2>", _html_table(by_method)]
        body += [f"<p>{html.escape(COCO_NOTE)}</p>"] if is_quality(by_method) else []
        body += [f'<p>{html.escape(p.stem)}<br><img src="grids/{p.name}"></p>' for p in grid_paths
                 if p.name.startswith(suite + "-")]
    atomic_write_text(out / "index.html", "<!doctype html><meta charset=utf-8><title>eiup benchmark</title>"
                      "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
                      "</style>" + "\n".join(body))
    return out / "index.html"


def _html_table(rows: dict) -> str:
    cols = COCO_COLUMNS if is_quality(rows) else COLUMNS
    head = "<tr><th>method</th>" + "".join(f"<th>{html.escape(c[1])}</th>" for c in cols) + "</tr>"
    body = "".join("<tr><td>" + html.escape(m) + "</td>" + "".join(
        f"<td>{_fmt(fmt, r.get(k))}</td>" for k, _, fmt in cols) + "</tr>" for m, r in rows.items())
    return f"<table>{head}{body}</table>"
