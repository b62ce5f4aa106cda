"""I2P-style prompt CSVs and plain prompt lists, read into :class:`PromptRow` records; bad rows are reported with
their line numbers.

This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import csv
import io as _io
import math
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64)


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
