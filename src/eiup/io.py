"""Atomic files: a file appears under its final name only once it is complete (a temporary file in the same folder,
fsync, ``os.replace``), so a run killed at any moment leaves either the finished file or nothing; also safetensors,
PNG, JSON and JSON-lines helpers and cached arrays.

This module imports neither torch nor diffusers at import time (the CLI validates its arguments before paying for
those imports).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".eiup-tmp-"


# ---------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every platform can fsync a folder)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to `path`; on success it replaces `path` in one step.

    If the body raises, the temporary file is removed and `path` is left untouched (absent, or
    its previous complete content).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _mkstemp(path)
    tmp = Path(tmp_name)
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


_UMASK: int | None = None


def _file_mode() -> int:
    """0o666 minus the process umask: what a plain open() would give (mkstemp gives 0o600)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def _mkstemp(path: Path) -> tuple[int, str]:
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
    except (AttributeError, OSError):  # no fchmod on Windows
        pass
    return fd, name


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Serialise first (a non-serialisable object raises before any file is touched), then write."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def concept_file(folder: str | Path, concept: str) -> Path:
    """``<folder>/<concept>.safetensors``, the concept in lower case with non-alphanumerics as ``_``: where a
    per-concept probe or predictor lives in a model folder."""
    safe = "".join(c if c.isalnum() else "_" for c in concept.strip().lower())
    return Path(folder) / f"{safe}.safetensors"


def in_model_folder(pipe: Any, name: str, instead: str) -> Path:
    """``<the pipeline's model folder>/<name>``, where eiup keeps what it fits for that model; a ValueError
    naming the alternative (``instead``, e.g. "out=PATH for the predictor") when it was not loaded from one."""
    folder = getattr(pipe.config, "_name_or_path", None)
    if not folder or not Path(folder).is_dir():
        raise ValueError(f"the model is not a local folder: pass {instead}")
    return Path(folder) / name


def save_tensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under its final name only once complete (parent folders created)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def tensor_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (``{}`` when it has none), without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_tensors(path: str | Path) -> tuple[dict, dict[str, str]]:
    """A safetensors file's tensors and metadata (``{}`` when it has none)."""
    from safetensors.torch import load_file

    return load_file(str(path)), tensor_metadata(path)


def replace_dir(dest: str | Path, write: Callable[[Path], Any]) -> Path:
    """Replace folder `dest` with what `write(tmp)` puts in a sibling temporary folder.

    If `write` fails, `dest` is untouched and the temporary folder removed; the swap itself is two
    renames, so `dest` is either the old or the new folder (the old one is deleted afterwards).
    """
    import shutil

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.new")
    old = dest.with_name(f"{TMP_PREFIX}{dest.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        dest.replace(old)
    tmp.replace(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def cached_npz(path: str | Path | None, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The arrays of the .npz at `path`, or `make()`'s, then saved there atomically (a rerun loads them).

    `path` None: nothing is cached.
    """
    import numpy as np

    if path is not None and Path(path).exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    arrays = make()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path)
    return arrays


def save_png_atomic(path: str | Path, image, text: dict[str, str] | None = None) -> None:
    """Save a PIL image as PNG atomically, with optional tEXt chunks (e.g. the generation record)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for k, v in text.items():
            info.add_itxt(k, v)  # iTXt: UTF-8, so any prompt survives
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line with a single write to an O_APPEND descriptor, then fsync.

    A line is written whole or (after a crash mid-write) as a truncated tail that readers skip
    and `OutputDir` removes on its next start.
    """
    data = (json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete, valid JSON-object line of `path` (a damaged line is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out
