"""Files in and out: atomic writes, I2P-style prompt CSVs, and resumable output folders.

Everything written here is crash-safe: a file appears under its final name only once it is
complete (temporary file in the same folder, fsync, ``os.replace``), so a run killed at any
moment leaves either the finished file or nothing. A rerun into the same folder reads
``manifest.jsonl`` (one line per finished image) and the images' embedded records, skips every
image already made with the same settings, and refuses to overwrite images made with others.

This module imports neither torch nor diffusers at import time (the CLI validates its
arguments before paying for those imports).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import hashlib
import io as _io
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".eiup-tmp-"
MANIFEST_NAME = "manifest.jsonl"
RUN_RECORD_NAME = "run.json"
LOCK_NAME = ".eiup.lock"
PNG_TEXT_KEY = "eiup"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64)


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


# ---------------------------------------------------------------- prompt CSV

PROMPT_COLUMN = "prompt"
SEED_COLUMNS = ("evaluation_seed", "sd_seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale")
ERASE_COLUMN = "erase_target"
CASE_COLUMN = "case_number"
_CASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SURROGATE_RE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True)
class PromptRow:
    """One prompt to generate: from a CSV row or a --prompt.

    `case` names the row in file names (I2P/GIE `case_number`, else the 0-based row index),
    zero-padded to 5 digits when it is an integer so that names sort. `seed`, `guidance` and
    `erase` are None when the row does not set them (the caller's defaults apply).
    """

    index: int
    case: str
    prompt: str
    seed: int | None = None
    guidance: float | None = None
    erase: tuple[str, ...] | None = None
    line: int | None = None


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class PromptFileError(ValueError):
    """A prompt CSV that cannot be used; `bad_rows` lists every faulty row with its line."""

    def __init__(self, path: str | Path, message: str, bad_rows: Sequence[BadRow] = ()):
        self.path = Path(path)
        self.bad_rows = list(bad_rows)
        super().__init__(message)


def format_case(value: int | str) -> str:
    if isinstance(value, int):
        return f"{value:05d}"
    return value


def parse_seed(text: str) -> int:
    """An integer seed in [0, 2**64). Accepts '42' and pandas' '42.0'; rejects '4.5', 'abc', '-1'."""
    s = text.strip()
    try:
        value = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"seed {text!r} is not an integer") from None
        if not math.isfinite(f) or f != int(f):
            raise ValueError(f"seed {text!r} is not an integer") from None
        value = int(f)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed {value} is outside [0, 2**64)")
    return value


def parse_guidance(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"guidance {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"guidance {text!r} must be a finite number >= 0")
    return value


def split_concepts(text: str) -> tuple[str, ...]:
    """'nudity; sexual' or 'nudity,sexual' -> ('nudity', 'sexual'); empty items dropped, order kept."""
    items = [c.strip() for c in re.split(r"[;,]", text)]
    return tuple(dict.fromkeys(c for c in items if c))


def _warn_bad_row(path: Path, bad: BadRow) -> None:
    warnings.warn(f"{path}: skipping {bad}", stacklevel=3)


def read_prompt_csv(
    path: str | Path,
    *,
    skip_bad_rows: bool = False,
    on_bad_row: Callable[[BadRow], None] | None = None,
    max_listed: int = 50,
) -> list[PromptRow]:
    """Read an I2P-style prompt CSV (UTF-8, optional BOM, header row required).

    Columns (header names are matched case-insensitively, other columns are ignored):
      prompt (required); seed from evaluation_seed, else (column absent or cell empty)
      sd_seed; guidance from evaluation_guidance, else sd_guidance_scale; erase_target (';' or
      ','-separated); case_number (else the 0-based row index). Empty optional cells mean
      "not set". Other I2P columns (categories, sd_image_width/height...) are ignored.
    Bad rows (empty prompt, non-integer seed, bad guidance, invalid or duplicate case_number,
    too many fields, bytes that are not UTF-8) are collected with their line numbers: by
    default one PromptFileError lists them all; with `skip_bad_rows` each is reported through
    `on_bad_row` (default: a warning) and the remaining rows are returned.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(path, f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptFileError(path, f"{path}: is a folder, not a CSV file") from None
    except OSError as e:
        raise PromptFileError(path, f"{path}: cannot read: {e}") from None
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row does not
    # make the whole file unreadable: the rows holding them are reported with their line.
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    reader = csv.reader(_io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise PromptFileError(path, f"{path}: empty file (expected a header row with a 'prompt' column)") from None
    except csv.Error as e:
        raise PromptFileError(path, f"{path}: line 1: not a readable CSV header: {e}") from None
    names = [h.strip().lower() for h in header]
    col = {}
    for i, name in enumerate(names):
        col.setdefault(name, i)
    if PROMPT_COLUMN not in col:
        shown = ", ".join(repr(h) for h in header[:12]) or "(none)"
        raise PromptFileError(path, f"{path}: line 1: no 'prompt' column in the header; found {shown}")
    seed_cols = [col[c] for c in SEED_COLUMNS if c in col]
    guid_cols = [col[c] for c in GUIDANCE_COLUMNS if c in col]
    erase_col = col.get(ERASE_COLUMN)
    case_col = col.get(CASE_COLUMN)

    rows: list[PromptRow] = []
    bad: list[BadRow] = []
    seen_cases: dict[str, int] = {}
    prev_line = reader.line_num
    index = -1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad.append(BadRow(prev_line + 1, f"not readable as CSV ({e}); the rest of the file was not read"))
            break
        line, prev_line = prev_line + 1, reader.line_num
        if not fields or all(not f.strip() for f in fields):
            continue  # blank line
        index += 1

        def cell(c: int | None) -> str:
            return fields[c].strip() if c is not None and c < len(fields) else ""

        problems: list[str] = []
        if any(_SURROGATE_RE.search(f) for f in fields):
            bytes_ = sorted({f"0x{ord(ch) - 0xDC00:02x}" for f in fields for ch in _SURROGATE_RE.findall(f)})
            problems.append(f"not valid UTF-8 (bytes {', '.join(bytes_[:4])}); re-save the file as UTF-8")
        if any(f.strip() for f in fields[len(header):]):  # trailing empty fields are harmless
            problems.append(f"{len(fields)} fields but the header has {len(header)} (an unquoted comma?)")
        prompt = cell(col[PROMPT_COLUMN])
        if not prompt:
            problems.append("empty prompt")
        seed = guidance = None
        seed_text = next((cell(c) for c in seed_cols if cell(c)), "")  # first non-empty, in priority order
        guid_text = next((cell(c) for c in guid_cols if cell(c)), "")
        if seed_text:
            try:
                seed = parse_seed(seed_text)
            except ValueError as e:
                problems.append(str(e))
        if guid_text:
            try:
                guidance = parse_guidance(guid_text)
            except ValueError as e:
                problems.append(str(e))
        erase = (split_concepts(cell(erase_col)) or None) if erase_col is not None else None
        if case_col is not None:
            raw_case = cell(case_col)
            case: str | None = None
            if not raw_case:
                problems.append("empty case_number")
            else:
                try:
                    case = format_case(parse_seed(raw_case))  # a non-negative integer
                except ValueError:
                    if _CASE_RE.match(raw_case):
                        case = raw_case
                    else:
                        problems.append(
                            f"case_number {raw_case!r} must be an integer or 1-64 letters, digits, '.', '_', '-'"
                        )
        else:
            case = format_case(index)
        if case is not None:
            if case in seen_cases:
                problems.append(f"case_number {case!r} repeats line {seen_cases[case]}")
            else:
                seen_cases[case] = line
        if problems:
            bad.append(BadRow(line, "; ".join(problems)))
            continue
        rows.append(PromptRow(index=index, case=case, prompt=prompt, seed=seed, guidance=guidance, erase=erase, line=line))

    if bad and not skip_bad_rows:
        listed = "\n".join(f"  {b}" for b in bad[:max_listed])
        more = f"\n  ... and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        raise PromptFileError(
            path,
            f"{path}: {len(bad)} bad row{'s' if len(bad) != 1 else ''} (fix them, or skip them with "
            f"--skip-bad-rows / skip_bad_rows=True):\n{listed}{more}",
            bad,
        )
    for b in bad:
        (on_bad_row or (lambda b: _warn_bad_row(path, b)))(b)
    if not rows:
        raise PromptFileError(path, f"{path}: no usable prompt rows", bad)
    return rows


def rows_from_prompts(prompts: Iterable[str]) -> list[PromptRow]:
    """PromptRows for prompts given directly (case = 0-based position)."""
    out = []
    for i, p in enumerate(prompts):
        if not p or not p.strip():
            raise ValueError(f"prompt {i} is empty")
        out.append(PromptRow(index=i, case=format_case(i), prompt=p.strip()))
    return out


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
