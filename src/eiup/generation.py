"""Resumable generation into a folder: the plan (one :class:`ImageJob` per image), the output folder (manifest, run
record, lock) and the loop that runs a plan through a pipeline.

A rerun into the same folder reads ``manifest.jsonl`` (one line per finished image) and the images' embedded records,
skips every image already made with the same settings, and refuses to overwrite images made with others. Files are
written atomically (:mod:`eiup.io`).

This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .io import TMP_PREFIX, append_jsonl, atomic_write_bytes, read_jsonl, save_png_atomic, write_json_atomic
from .prompt_csv import MAX_SEED, PromptRow

MANIFEST_NAME = "manifest.jsonl"
RUN_RECORD_NAME = "run.json"
LOCK_NAME = ".eiup.lock"
PNG_TEXT_KEY = "eiup"


# ---------------------------------------------------------------- generation plan


@dataclass(frozen=True)
class GenerationSettings:
    """What every image of a run shares. `model` identifies the weights (folder or hub id)."""

    model: str
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    erase: tuple[str, ...] = ()
    scale: float | str | None = -1.0  # a number, "auto" (calibrated per image), or None (the library's default)
    mode: str = "single"
    gate: str | None = None
    concept_context: str = "separate"  # "prompt": concepts encoded after the prompt (EraseConfig.concept_context)
    anchors: tuple[str, ...] = ()  # EraseConfig.anchors (anchored token projection); () = off
    anchor_strength: float | None = None  # None: the model's preset, else the library default
    anchor_protect: tuple[str, ...] | None = None  # EraseConfig.anchor_protect; None: the model's preset
    anchor_in_context: bool | None = None  # EraseConfig.anchor_in_context; None: the model's preset
    anchor_region: bool | str | None = None  # EraseConfig.anchor_region; None: the model's preset
    anchor_gate: bool = True
    prompt_gate: bool = True  # EraseConfig.prompt_gate: the concept term only where the model's probe says so
    negative_prompt: str | None = None
    images_per_prompt: int = 1
    save_original: bool = False
    use_row_erase: bool = True
    allow_amplify: bool = False
    guard: str | None = None  # closed-loop erasure (eiup.guard): 'auto', 'none', 'nudenet' or 'module:function'
    guard_ladder: tuple[float, ...] | None = None  # the strengths the guard climbs; None: eiup.guard.DEFAULT_LADDER
    guard_negative_prompt: bool = True  # the guard's last resort (eiup.guard.guarded_call)


@dataclass(frozen=True)
class ImageJob:
    """One image to make. Its file name says case, image index and seed, and sorts by case."""

    row: PromptRow
    k: int
    seed: int
    guidance: float
    erase: tuple[str, ...]
    width: int = 2

    @property
    def stem(self) -> str:
        return f"{self.row.case}-{self.k:0{self.width}d}-seed{self.seed}"

    @property
    def filename(self) -> str:
        return self.stem + ".png"

    @property
    def original_filename(self) -> str:
        return self.stem + "-original.png"

    def spec(self, settings: GenerationSettings) -> dict:
        """Everything that determines this image's pixels (compared on resume)."""
        erasing = bool(self.erase)
        return {
            "model": settings.model,
            "prompt": self.row.prompt,
            "negative_prompt": settings.negative_prompt,
            "seed": self.seed,
            "steps": settings.steps,
            "guidance": self.guidance,
            "erase": list(self.erase),
            "scale": settings.scale if erasing else None,
            "mode": settings.mode if erasing else None,
            **({"gate": settings.gate} if erasing and settings.gate else {}),
            **({"concept_context": settings.concept_context}
               if erasing and settings.concept_context != "separate" else {}),
            **({"anchors": list(settings.anchors), "anchor_strength": settings.anchor_strength,
                "anchor_gate": settings.anchor_gate} if erasing and settings.anchors else {}),
            **({"anchor_protect": list(settings.anchor_protect)}
               if erasing and settings.anchors and settings.anchor_protect is not None else {}),
            **({"anchor_in_context": settings.anchor_in_context}
               if erasing and settings.anchors and settings.anchor_in_context is not None else {}),
            **({"anchor_region": settings.anchor_region}
               if erasing and settings.anchors and settings.anchor_region is not None else {}),
            **({"prompt_gate": settings.prompt_gate} if erasing else {}),
            **({"guard": settings.guard, "guard_ladder": None if settings.guard_ladder is None
                else list(settings.guard_ladder), "guard_negative_prompt": settings.guard_negative_prompt}
               if erasing and settings.guard and settings.guard != "none" else {}),
            "original": bool(settings.save_original and erasing),
        }


def plan_jobs(rows: Sequence[PromptRow], settings: GenerationSettings) -> list[ImageJob]:
    """Expand rows into images: image k of a row uses seed (row seed or settings.seed) + k.

    Concepts: `settings.erase` (from --erase) for every row, followed by the row's own
    erase_target when `settings.use_row_erase` (the CSV extends --erase; duplicates dropped).
    """
    n = settings.images_per_prompt
    if n < 1:
        raise ValueError("images_per_prompt must be >= 1")
    width = max(2, len(str(n - 1)))
    jobs = []
    for row in rows:
        base = row.seed if row.seed is not None else settings.seed
        if base + n - 1 > MAX_SEED:
            raise ValueError(f"seed {base} + {n - 1} images exceeds 2**64 - 1")
        concepts = tuple(settings.erase)
        if settings.use_row_erase and row.erase:
            concepts = tuple(dict.fromkeys(concepts + tuple(row.erase)))
        guidance = row.guidance if row.guidance is not None else settings.guidance
        for k in range(n):
            jobs.append(ImageJob(row=row, k=k, seed=base + k, guidance=guidance, erase=concepts, width=width))
    names = [j.filename for j in jobs]
    if len(set(names)) != len(names):  # unreachable with unique cases; guards future changes
        raise ValueError("two images would share a file name")
    return jobs


# ---------------------------------------------------------------- resumable output folder


class OutputDirError(RuntimeError):
    """The output folder cannot be used (locked by another run, or holds conflicting images)."""


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _png_record(path: Path) -> dict | None:
    """The generation record embedded in one of our PNGs, after checking the whole file decodes."""
    from PIL import Image

    if not png_is_valid(path):
        return None
    try:
        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", {}) or {}
        rec = json.loads(text[PNG_TEXT_KEY])
        return rec if isinstance(rec, dict) else None
    except Exception:
        return None


def png_is_valid(path: str | Path) -> bool:
    """True if `path` is a complete PNG: chunk CRCs and the IEND chunk check out, and it decodes.

    (`verify` does not depend on PIL's global LOAD_TRUNCATED_IMAGES switch, which would let a
    truncated file "load".)
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                return False
            im.verify()
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OutputDir:
    """A folder of generated images that a rerun completes without redoing finished work.

    Use as a context manager: it takes an exclusive lock (a second run on the same folder is
    refused), removes temporary files left by a killed run, and compacts ``manifest.jsonl``
    (drops a truncated last line, records of deleted files and superseded duplicates).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest_path = self.path / MANIFEST_NAME
        self.run_path = self.path / RUN_RECORD_NAME
        self.records: dict[str, dict] = {}
        self._lock_fd: int | None = None

    # -- lifecycle
    def __enter__(self) -> OutputDir:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"{self.path} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        for tmp in self.path.glob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._load_manifest()

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; single-run use is the caller's duty
            self._lock_fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputDirError(
                f"{self.path} is in use by another eiup run (lock {LOCK_NAME}); wait for it or use another --out"
            ) from None
        self._lock_fd = fd

    def _load_manifest(self) -> None:
        raw = self.manifest_path.read_bytes() if self.manifest_path.exists() else b""
        records = read_jsonl(self.manifest_path)
        kept: dict[str, dict] = {}
        for rec in records:
            name = rec.get("file")
            if not isinstance(name, str) or not (self.path / name).is_file():
                continue
            orig = rec.get("original_file")
            if orig and not (self.path / orig).is_file():
                continue
            kept.pop(name, None)
            kept[name] = rec
        self.records = kept
        compact = "".join(
            json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in kept.values()
        ).encode("utf-8")
        if compact != raw and (raw or kept):
            atomic_write_bytes(self.manifest_path, compact)

    # -- resume
    def pending(self, jobs: Sequence[ImageJob], settings: GenerationSettings) -> list[ImageJob]:
        """The jobs still to make. Raises OutputDirError listing images made with other settings."""
        todo, conflicts = [], []
        for job in jobs:
            spec = _normal(job.spec(settings))
            rec = self.records.get(job.filename)
            if rec is not None and self._unchanged(job.filename, rec):
                if _normal(rec.get("spec")) == spec:
                    continue
                conflicts.append((job, rec.get("spec")))
                continue
            # not recorded, or changed on disk since: trust only the record embedded in the PNG
            path = self.path / job.filename
            if path.exists():
                embedded = _png_record(path)
                if embedded is not None and _normal(embedded.get("spec")) == spec:
                    # made by a run killed between writing the PNG and its manifest line
                    if not spec["original"] or png_is_valid(self.path / job.original_filename):
                        self._record(job, settings, embedded.get("spec"))
                        continue
                    todo.append(job)
                    continue
                conflicts.append((job, embedded.get("spec") if embedded else None))
                continue
            todo.append(job)
        if conflicts:
            lines = []
            for job, old in conflicts[:10]:
                if old is None:
                    why = "not an image made by eiup (or damaged)"
                else:
                    new = _normal(job.spec(settings))
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    why = "made with different " + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in diff)
                lines.append(f"  {job.filename}: {why}")
            more = f"\n  ... and {len(conflicts) - 10} more" if len(conflicts) > 10 else ""
            raise OutputDirError(
                f"{self.path} already holds {len(conflicts)} image(s) with the same name but other settings; "
                f"nothing was overwritten. Use another --out (or delete those files):\n" + "\n".join(lines) + more
            )
        return todo

    def _unchanged(self, name: str, rec: dict) -> bool:
        try:
            st = (self.path / name).stat()
        except OSError:
            return False
        return rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns

    def is_done(self, job: ImageJob, settings: GenerationSettings) -> bool:
        rec = self.records.get(job.filename)
        return rec is not None and _normal(rec.get("spec")) == _normal(job.spec(settings))

    # -- writing
    def save(self, job: ImageJob, settings: GenerationSettings, image, original=None, outcome: dict | None = None) -> dict:
        """Write the image (and its original) atomically, then append the manifest line (with ``outcome``:
        what the erasure decided for this image, e.g. the guard's strength and flag)."""
        spec = job.spec(settings)
        embedded = json.dumps({"spec": spec, "file": job.filename, "case": job.row.case,
                               **({"outcome": outcome} if outcome else {})}, ensure_ascii=False)
        if original is not None:
            save_png_atomic(self.path / job.original_filename, original, {PNG_TEXT_KEY: embedded})
        save_png_atomic(self.path / job.filename, image, {PNG_TEXT_KEY: embedded})
        return self._record(job, settings, spec, has_original=original is not None, outcome=outcome)

    def _record(self, job: ImageJob, settings: GenerationSettings, spec: dict, has_original: bool | None = None,
                outcome: dict | None = None) -> dict:
        if has_original is None:
            has_original = bool(spec.get("original"))
        st = (self.path / job.filename).stat()
        rec = {
            "file": job.filename,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "original_file": job.original_filename if has_original else None,
            "case": job.row.case,
            "row": job.row.index,
            "line": job.row.line,
            "image": job.k,
            "sha256": _sha256(self.path / job.filename),
            "finished": _now(),
            "spec": spec,
            **({"outcome": outcome} if outcome else {}),
        }
        append_jsonl(self.manifest_path, rec)
        self.records[job.filename] = rec
        return rec

    def write_run_record(self, record: dict) -> None:
        write_json_atomic(self.run_path, record)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- running a plan


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("eiup", "torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def pipeline_supports_erase(pipe) -> bool:
    import inspect

    try:
        return "erase" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False


@dataclass
class GenerateReport:
    out: Path
    total: int
    generated: int
    skipped: int
    files: list[str] = field(default_factory=list)
    record: dict = field(default_factory=dict)


class GenerationError(RuntimeError):
    """The pipeline refused or failed on a batch; says which images."""


def _batches(jobs: Sequence[ImageJob], batch_size: int, same_prompt: bool = False) -> Iterator[list[ImageJob]]:
    """Consecutive jobs that can share one pipeline call (same guidance and concepts; with
    `same_prompt`, also the same prompt: concepts encoded in the prompt's context)."""
    batch: list[ImageJob] = []

    def key(j: ImageJob) -> tuple:
        return (j.guidance, j.erase, j.row.prompt if same_prompt and j.erase else None)

    for job in jobs:
        if batch and (len(batch) >= batch_size or key(job) != key(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def run_record(settings: GenerationSettings, jobs: Sequence[ImageJob], out: OutputDir, *, status: str,
               extra: dict | None = None) -> dict:
    images = []
    for job in jobs:
        rec = out.records.get(job.filename)
        images.append({
            "file": job.filename,
            "original_file": rec.get("original_file") if rec else None,
            "done": bool(rec) and _normal(rec.get("spec")) == _normal(job.spec(settings)),
            "case": job.row.case,
            "row": job.row.index,
            "line": job.row.line,
            "image": job.k,
            "prompt": job.row.prompt,
            "seed": job.seed,
            "guidance": job.guidance,
            "erase": list(job.erase),
            "sha256": rec.get("sha256") if rec else None,
            **({"outcome": rec["outcome"]} if rec and rec.get("outcome") else {}),
        })
    return {
        "eiup_run": 1,
        "status": status,
        "updated": _now(),
        "settings": asdict(settings),
        "versions": library_versions(),
        **(extra or {}),
        "images_total": len(jobs),
        "images_done": sum(i["done"] for i in images),
        "images": images,
    }


def _outcome(result: Any, i: int) -> dict | None:
    """What the erasure decided for image ``i`` of a call, worth keeping beside it (guard: strength, flag)."""
    attempts = getattr(result, "guard_attempts", None)
    if attempts is None:
        return None
    strengths = {c: (round(float(v[i]), 4) if math.isfinite(float(v[i])) else None)
                 for c, v in (result.anchor_strengths or {}).items()}
    return {"guard_flagged": bool(result.guard_flagged[i]), "generations": int(attempts[i]),
            "anchor_strength": strengths, "negative_prompt": bool(result.guard_negative_prompt[i])}


def generate_to_dir(
    pipe,
    jobs: Sequence[ImageJob],
    out_dir: str | Path,
    settings: GenerationSettings,
    *,
    batch_size: int = 1,
    progress: bool = True,
    extra_record: dict | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> GenerateReport:
    """Make every job's image into `out_dir`, skipping those a previous run finished.

    Each image has its own CPU generator seeded with its seed, so an image does not depend on
    the batch it was made in, on the device, or on whether the run was resumed. `run.json`
    (settings, versions, one entry per image) is written at the start and rewritten at the end;
    `manifest.jsonl` grows by one line per finished image.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    erasing = any(j.erase for j in jobs)
    if erasing and not pipeline_supports_erase(pipe):
        raise GenerationError(
            f"{type(pipe).__name__} cannot erase concepts (no 'erase' argument); load it with eiup.models.load_pipeline"
        )
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    guard = None  # the pipeline's guard= for settings.guard (eiup.guard.load_guard), loaded at the first erasure
    with OutputDir(out_dir) as out:
        todo = out.pending(jobs, settings)
        skipped = len(jobs) - len(todo)
        if on_start:
            on_start(len(jobs), skipped)
        out.write_run_record(run_record(settings, jobs, out, status="running", extra=extra_record))
        generated = 0
        status = "failed"
        try:
            bar = tqdm(total=len(jobs), initial=skipped, unit="img", desc="generate", disable=not progress,
                       file=sys.stderr, dynamic_ncols=True)
            with bar:
                for batch in _batches(todo, batch_size, same_prompt=settings.concept_context == "prompt"):
                    kwargs: dict[str, Any] = dict(
                        prompt=[j.row.prompt for j in batch],
                        generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
                        num_inference_steps=settings.steps,
                        guidance_scale=batch[0].guidance,
                    )
                    if settings.negative_prompt:
                        kwargs["negative_prompt"] = [settings.negative_prompt] * len(batch)
                    want_original = bool(settings.save_original and batch[0].erase)
                    if batch[0].erase:
                        kwargs.update(erase=list(batch[0].erase), erase_scale=settings.scale, erase_mode=settings.mode)
                        if settings.gate:
                            kwargs["gate"] = settings.gate
                        if settings.concept_context != "separate":
                            kwargs["concept_context"] = settings.concept_context
                        kwargs["anchors"] = list(settings.anchors)  # [] = off, whatever the library default
                        kwargs["prompt_gate"] = settings.prompt_gate
                        if settings.anchors:
                            kwargs["anchor_gate"] = settings.anchor_gate
                            if settings.anchor_strength is not None:
                                kwargs["anchor_strength"] = settings.anchor_strength
                            if settings.anchor_protect is not None:
                                kwargs["anchor_protect"] = list(settings.anchor_protect)
                            if settings.anchor_in_context is not None:
                                kwargs["anchor_in_context"] = settings.anchor_in_context
                            if settings.anchor_region is not None:
                                kwargs["anchor_region"] = settings.anchor_region
                        if settings.allow_amplify:
                            kwargs["allow_amplify"] = True
                        if want_original:
                            kwargs["return_original"] = True
                        if settings.guard:
                            if guard is None:
                                from .guard import load_guard

                                guard = load_guard(settings.guard)
                            kwargs["guard"] = guard
                            if settings.guard_ladder is not None:
                                kwargs["guard_ladder"] = list(settings.guard_ladder)
                            kwargs["guard_negative_prompt"] = settings.guard_negative_prompt
                    elif pipeline_supports_erase(pipe):
                        kwargs["erase"] = None
                    try:
                        result = pipe(**kwargs)
                    except ValueError as e:
                        where = ", ".join(
                            f"{j.filename}" + (f" (CSV line {j.row.line})" if j.row.line else "") for j in batch[:3]
                        )
                        raise GenerationError(f"the pipeline refused {where}: {e}") from e
                    images = list(result.images)
                    originals = list(getattr(result, "original_images", None) or []) if want_original else []
                    if len(images) != len(batch) or (want_original and len(originals) != len(batch)):
                        raise GenerationError(
                            f"the pipeline returned {len(images)} images ({len(originals)} originals) for {len(batch)} prompts"
                        )
                    for i, job in enumerate(batch):
                        out.save(job, settings, images[i], originals[i] if want_original else None,
                                 _outcome(result, i))
                        generated += 1
                        bar.update(1)
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            record = run_record(settings, jobs, out, status=status, extra=extra_record)
            out.write_run_record(record)
    files = [j.filename for j in jobs]
    return GenerateReport(out=Path(out_dir), total=len(jobs), generated=generated, skipped=skipped, files=files,
                          record=record)
