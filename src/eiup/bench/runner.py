"""Run methods x suites x prompts x seeds, resumably, on one or several processes.

Work is cut into units (one method, one prompt, all seeds of the suite in one batch). A unit's
images and its record are written atomically, the record last, so an interrupted run resumes
at the first unit without a record. Units are dealt to processes (`accelerate launch`) in a
fixed order and each unit's batch never depends on the number of processes, so results are
identical to a single-process run.

Judging happens once all units exist, on the main process: toy units with the concept detector,
I2P units with NudeNet, COCO units with PSNR/SSIM against the plain images and, given local
weights (`QualityOptions`), CLIP score against their prompts and FID against real images.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..io import save_png_atomic, write_json_atomic
from .baselines import Method, MethodRunner
from .metrics import (QualityOptions, aggregate, aggregate_nudity, clip_metric, clip_scores, fid_scores, judge_toy,
                      psnr_ssim, reference_images)
from .suites import Suite


@dataclass(frozen=True)
class Unit:
    method: Method
    suite: Suite
    prompt_index: int

    @property
    def prompt(self):
        return self.suite.prompts[self.prompt_index]

    @property
    def key(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.text.lower()).strip("-")[:40]
        digest = hashlib.sha1(self.prompt.text.encode()).hexdigest()[:6]
        return f"{self.suite.name}/{self.method.name}/{self.prompt_index:03d}-{slug}-{digest}"

    def seeds(self) -> list[int]:
        if self.suite.extra.get("per_prompt_seed"):
            return [self.suite.seeds[self.prompt_index]]
        return self.suite.seeds


def units_for(suites: list[Suite], methods: list[Method]) -> list[Unit]:
    return [Unit(m, s, i) for s in suites for m in methods for i in range(len(s.prompts))]


def unit_paths(out: Path, unit: Unit) -> tuple[Path, Path]:
    return out / "images" / unit.key, out / "records" / f"{unit.key}.json"


def load_unit_images(out: Path, unit: Unit) -> list[Image.Image]:
    folder, _ = unit_paths(out, unit)
    return [Image.open(folder / f"seed{s:06d}.png").convert("RGB") for s in unit.seeds()]


# Files of a model folder that change what EIUP does without changing the weights (presets, gates, predictors).
ERASURE_FILES = ("eiup_anchors.json", "eiup_prompt_probes", "eiup_scale_predictors", "eiup_strength_predictors",
                 "eiup_guard.safetensors")


def erasure_fingerprint(pipe, skip: Sequence[str] = ()) -> str:
    """SHA-1 of the model folder's erasure presets (:data:`ERASURE_FILES` but ``skip``); '' when it has none."""
    folder = getattr(pipe.config, "_name_or_path", None)
    if not folder or not Path(folder).is_dir():
        return ""
    digest = hashlib.sha1()
    for name in (n for n in ERASURE_FILES if n not in skip):
        path = Path(folder) / name
        for f in sorted([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            if f.is_file():
                digest.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def weights_fingerprint(pipe, sample: int = 1 << 20) -> str:
    """SHA-1 over the model folder's component files (path, size, first and last MiB of each), the erasure
    presets aside; '' when the pipeline was not loaded from a folder or the folder holds no files.

    Weights replaced in place (a fine-tuned VAE decoder, another checkpoint) change it without hashing
    gigabytes.
    """
    folder = getattr(pipe.config, "_name_or_path", None)
    if not folder or not Path(folder).is_dir():
        return ""
    folder = Path(folder)
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and f.relative_to(folder).parts[0] not in ERASURE_FILES]
    if not files:
        return ""
    digest = hashlib.sha1()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.relative_to(folder).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(size - sample)
                digest.update(fh.read(sample))
            elif size > sample:
                digest.update(fh.read())
    return digest.hexdigest()


def unit_spec(unit: Unit, steps: int, guidance: float, fingerprints: tuple[str, str], weights: str = "") -> dict:
    """What a unit's images depend on besides its method, prompt and seeds (compared on resume); ``fingerprints``:
    of the model's erasure files with and without the guard, which only rows saying ``+guard`` read."""
    spec = {"steps": steps, "guidance": guidance}
    if weights:
        spec["weights"] = weights
    if unit.method.family == "eiup":
        spec["erasure_files"] = fingerprints[0] if dict(unit.method.options).get("guard") else fingerprints[1]
    return spec


def _is_done(record: Path, spec: dict) -> bool:
    """A record made with the same spec; records written before specs were recorded count as done."""
    if not record.exists():
        return False
    saved = json.loads(record.read_text()).get("spec")
    return saved is None or saved == spec


def run_units(pipe, detector, units: list[Unit], out: Path, steps: int, guidance: float,
              process_index: int = 0, num_processes: int = 1) -> None:
    """Generate and detect every unit of this process that has no record yet, or one made with other
    settings (steps, guidance, the model folder's weights or its erasure presets: those units are redone)."""
    runner = MethodRunner(pipe, steps, guidance)
    from ..guard import GUARD_FILE

    fingerprint = (erasure_fingerprint(pipe), erasure_fingerprint(pipe, skip=(GUARD_FILE,)))
    weights = weights_fingerprint(pipe)
    mine = [u for k, u in enumerate(units) if k % num_processes == process_index]
    todo = [u for u in mine if not _is_done(unit_paths(out, u)[1], unit_spec(u, steps, guidance, fingerprint, weights))]
    stale = sum(unit_paths(out, u)[1].exists() for u in todo)
    if stale:
        print(f"bench (process {process_index}): redoing {stale} unit(s) made with other steps, guidance, "
              "weights or erasure presets", flush=True)
    bar = tqdm(todo, desc=f"bench (process {process_index})", disable=process_index != 0 and num_processes > 1)
    for unit in bar:
        bar.set_postfix_str(unit.method.name)
        folder, record = unit_paths(out, unit)
        spec = unit_spec(unit, steps, guidance, fingerprint, weights)
        if record.exists() and json.loads(record.read_text()).get("spec") == spec:
            continue  # finished meanwhile by another run sharing the folder
        seeds = unit.seeds()
        t0 = time.perf_counter()
        images = runner.generate(unit.method, unit.prompt.text, seeds, unit.suite.concept)
        seconds = (time.perf_counter() - t0) / len(seeds)
        for seed, image in zip(seeds, images):
            save_png_atomic(folder / f"seed{seed:06d}.png", image)
        detections = [d.to_dict() for d in detector.detect(images)] if detector is not None else None
        write_json_atomic(record, {
            "method": unit.method.name, "suite": unit.suite.name, "prompt": unit.prompt.text,
            "role": unit.prompt.role, "seeds": seeds, "seconds_per_image": seconds, "detections": detections,
            "spec": spec,
        })


def evaluate(detector, units: list[Unit], out: Path, nudity=None, quality: QualityOptions | None = None) -> dict:
    """Judge every unit: toy units against their prompt and the plain images of the same seeds,
    I2P units with `nudity` (a `NudityJudge`), COCO units with `evaluate_coco` and `quality`."""
    results: dict = {}
    plain_cache: dict = {}
    nude: dict = {}
    for unit in tqdm(units, desc="judge"):
        if unit.suite.kind == "i2p" and nudity is not None:
            folder, record = unit_paths(out, unit)
            entry = nude.setdefault(unit.suite.name, {}).setdefault(unit.method.name, {"judgements": [], "seconds": []})
            entry["judgements"] += [nudity.judge(folder / f"seed{s:06d}.png") for s in unit.seeds()]
            entry["seconds"].append(json.loads(record.read_text())["seconds_per_image"])
            continue
        if unit.suite.kind != "toy":
            continue
        plain_unit = Unit(Method("plain"), unit.suite, unit.prompt_index)
        if plain_unit.key not in plain_cache:
            imgs = load_unit_images(out, plain_unit)
            plain_cache[plain_unit.key] = (imgs, detector.detect(imgs))
        plain_images, plain_dets = plain_cache[plain_unit.key]
        images = load_unit_images(out, unit)
        dets = detector.detect(images)
        psnr, ssim = psnr_ssim(images, plain_images)
        record = json.loads(unit_paths(out, unit)[1].read_text())
        entry = results.setdefault(unit.suite.name, {}).setdefault(unit.method.name, {"judgements": [], "seconds": []})
        entry["seconds"].append(record["seconds_per_image"])
        for k, seed in enumerate(unit.seeds()):
            entry["judgements"].append(judge_toy(unit.prompt.text, unit.prompt.role, seed, unit.suite.concept,
                                                 dets[k], plain_dets[k], psnr[k], ssim[k]))
    metrics: dict = {}
    for suite, by_method in results.items():
        for method, entry in by_method.items():
            m = aggregate(entry["judgements"])
            m["seconds_per_image"] = sum(entry["seconds"]) / len(entry["seconds"])
            metrics.setdefault(suite, {})[method] = m
    for suite, by_method in nude.items():
        for method, entry in by_method.items():
            m = aggregate_nudity(entry["judgements"])
            m["seconds_per_image"] = sum(entry["seconds"]) / len(entry["seconds"])
            metrics.setdefault(suite, {})[method] = m
    coco_units = [u for u in units if u.suite.kind == "coco"]
    if coco_units:
        for suite, by_method in evaluate_coco(coco_units, out, quality or QualityOptions()).items():
            metrics.setdefault(suite, {}).update(by_method)
    return metrics


def _open_images(paths: list[Path]):
    """The images at `paths` in RGB, opened one at a time."""
    for path in paths:
        with Image.open(path) as im:
            yield im.convert("RGB")


def _side(path: Path) -> int:
    """The shorter side of the image at `path`."""
    with Image.open(path) as im:
        return min(im.size)


def _coco_entries(units: list[Unit], out: Path) -> dict:
    """Per suite and method: PSNR/SSIM of each image against the plain image of the same prompt and seed,
    seconds per image of each unit, and the image files with their prompts."""
    entries: dict = {}
    for unit in tqdm(units, desc="judge coco"):
        folder, record = unit_paths(out, unit)
        plain = load_unit_images(out, Unit(Method("plain"), unit.suite, unit.prompt_index))
        psnr, ssim = psnr_ssim(load_unit_images(out, unit), plain)
        entry = entries.setdefault(unit.suite.name, {}).setdefault(
            unit.method.name, {"psnr": [], "ssim": [], "seconds": [], "files": [], "prompts": []})
        entry["psnr"] += psnr
        entry["ssim"] += ssim
        entry["seconds"].append(json.loads(record.read_text())["seconds_per_image"])
        entry["files"] += [folder / f"seed{s:06d}.png" for s in unit.seeds()]
        entry["prompts"] += [unit.prompt.text] * len(unit.seeds())
    return entries


def evaluate_coco(units: list[Unit], out: Path, quality: QualityOptions) -> dict:
    """Quality metrics of COCO units, per suite and method.

    Args:
        units: The COCO units (each needs the plain unit of its prompt, which `run_benchmark` adds).
        out: The run folder.
        quality: CLIP model and FID reference paths (None skips that metric), feature extractor and device.

    Returns:
        {suite: {method: {"clip_score", "fid", "median_psnr", "median_ssim", "seconds_per_image", "n"}}};
        CLIP score (mean of 100 * max(cos, 0) against the prompts) and FID are NaN when skipped.
    """
    entries = _coco_entries(units, out)
    metrics = {suite: {method: {
        "clip_score": math.nan, "fid": math.nan,
        "median_psnr": float(np.median(e["psnr"])), "median_ssim": float(np.median(e["ssim"])),
        "seconds_per_image": float(np.mean(e["seconds"])), "n": len(e["files"]),
    } for method, e in by_method.items()} for suite, by_method in entries.items()}
    if entries and quality.clip_model is not None:
        metric = clip_metric(quality.clip_model, quality.device)
        for suite, by_method in entries.items():
            for method, e in tqdm(by_method.items(), desc=f"CLIP score ({suite})"):
                scores = clip_scores(metric, _open_images(e["files"]), e["prompts"])
                metrics[suite][method]["clip_score"] = float(np.mean(scores))
    if entries and quality.fid_reference is not None:
        references = reference_images(quality.fid_reference)
        for suite, by_method in entries.items():
            size = _side(next(iter(by_method.values()))["files"][0])
            fids = fid_scores({m: _open_images(e["files"]) for m, e in by_method.items()}, _open_images(references),
                              size, quality.fid_feature, quality.fid_weights, quality.batch_size, quality.device)
            for method, value in fids.items():
                metrics[suite][method]["fid"] = value
    return metrics
