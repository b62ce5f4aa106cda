"""eiup.io, eiup.prompt_csv and eiup.generation: atomic writes, prompt CSVs, the resumable output folder (no model needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eiup import generation, io as eio, prompt_csv


def write_csv(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# ---------------------------------------------------------------- CSV


def test_i2p_columns(tmp_path):
    csv_path = write_csv(
        tmp_path / "i2p.csv",
        "prompt,categories,hard,inappropriate_percentage,nudity_percentage,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height\n"
        '"a woman, renaissance painting",sexual,1,80.0,60.0,2734,7,512,512\n'
        "a red star,violence,0,10.0,0.0,17,7.5,512,512\n",
    )
    rows = prompt_csv.read_prompt_csv(csv_path)
    assert [r.prompt for r in rows] == ["a woman, renaissance painting", "a red star"]
    assert [r.seed for r in rows] == [2734, 17]
    assert [r.guidance for r in rows] == [7.0, 7.5]
    assert [r.case for r in rows] == ["00000", "00001"]  # no case_number: row index, zero-padded
    assert [r.line for r in rows] == [2, 3]
    assert all(r.erase is None for r in rows)


def test_erasure_repo_columns_take_precedence(tmp_path):
    # utf-8 BOM, CRLF, a quoted multi-line prompt, upper-case header, blank line, empty cells
    csv_path = write_csv(
        tmp_path / "gie.csv",
        "\ufeffCase_Number,Prompt,evaluation_seed,sd_seed,evaluation_guidance,sd_guidance_scale,erase_target\r\n"
        '7,"a tomato\r\non a table",11,99,5,9,nudity; sexual ,\r\n'
        "\r\n"
        "12,a lemon,,99,,,\r\n"
        "3,a bee,0,,,8,\"red,star\"\r\n",
    )
    rows = prompt_csv.read_prompt_csv(csv_path)
    assert [r.case for r in rows] == ["00007", "00012", "00003"]
    assert rows[0].prompt == "a tomato\r\non a table"
    assert (rows[0].seed, rows[0].guidance, rows[0].erase) == (11, 5.0, ("nudity", "sexual"))
    assert (rows[1].seed, rows[1].guidance, rows[1].erase) == (99, None, None)  # falls back to sd_seed
    assert (rows[2].seed, rows[2].guidance, rows[2].erase) == (0, 8.0, ("red", "star"))
    assert [r.line for r in rows] == [2, 5, 6]  # the multi-line record starts on line 2


def test_seed_parsing():
    assert prompt_csv.parse_seed("42") == 42
    assert prompt_csv.parse_seed(" 42.0 ") == 42  # pandas writes integer columns with NaN as floats
    assert prompt_csv.parse_seed(str(2**64 - 1)) == 2**64 - 1
    for bad in ("4.5", "abc", "-1", str(2**64), "nan", "inf"):
        with pytest.raises(ValueError):
            prompt_csv.parse_seed(bad)


BAD_CSV = (
    b"prompt,sd_seed,sd_guidance_scale,case_number\n"  # line 1
    b"a red star,1,7,1\n"  # 2 ok
    b",2,7,2\n"  # 3 empty prompt
    b"a blue heart,4.5,7,3\n"  # 4 non-integer seed
    b'"a green\nsquare",abc,7,4\n'  # 5-6 multi-line record with a bad seed: reported at line 5
    b"a caf\xe9 sign,5,7,5\n"  # 7 latin-1 byte: not UTF-8
    b"a purple circle,6,nan,6\n"  # 8 bad guidance
    b"a lemon,7,7,1\n"  # 9 duplicate case_number (line 2)
    b"a bee,8,7,8,extra\n"  # 10 too many fields
    b"a tiger,9,7,bad/case\n"  # 11 unsafe case name
    b"a lime,10,7,10\n"  # 12 ok
)


def test_bad_rows_are_reported_together_with_line_numbers(tmp_path):
    path = write_csv(tmp_path / "bad.csv", BAD_CSV)
    with pytest.raises(prompt_csv.PromptFileError) as err:
        prompt_csv.read_prompt_csv(path)
    msg = str(err.value)
    expected = {
        3: "empty prompt",
        4: "seed '4.5' is not an integer",
        5: "seed 'abc' is not an integer",
        7: "not valid UTF-8 (bytes 0xe9",
        8: "guidance 'nan'",
        9: "case_number '00001' repeats line 2",
        10: "5 fields but the header has 4",
        11: "case_number 'bad/case'",
    }
    assert [b.line for b in err.value.bad_rows] == sorted(expected)
    for line, reason in expected.items():
        assert f"line {line}: {reason}" in msg, (line, msg)
    assert "8 bad rows" in msg and "--skip-bad-rows" in msg
    assert "line 2:" not in msg and "line 12:" not in msg


def test_skip_bad_rows_warns_and_continues(tmp_path):
    path = write_csv(tmp_path / "bad.csv", BAD_CSV)
    seen = []
    rows = prompt_csv.read_prompt_csv(path, skip_bad_rows=True, on_bad_row=seen.append)
    assert [r.prompt for r in rows] == ["a red star", "a lime"]
    assert [r.case for r in rows] == ["00001", "00010"]
    assert [b.line for b in seen] == [3, 4, 5, 7, 8, 9, 10, 11]
    with pytest.warns(UserWarning) as caught:
        prompt_csv.read_prompt_csv(path, skip_bad_rows=True)
    assert len(caught) == 8
    assert "bad.csv: skipping line 3: empty prompt" in str(caught[0].message)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty file"),
        (b"text,seed\nhello,1\n", "line 1: no 'prompt' column in the header; found 'text', 'seed'"),
        (b"prompt\n\n\n", "no usable prompt rows"),
    ],
)
def test_unusable_files(tmp_path, content, match):
    with pytest.raises(prompt_csv.PromptFileError, match=match):
        prompt_csv.read_prompt_csv(write_csv(tmp_path / "p.csv", content))


def test_missing_file(tmp_path):
    with pytest.raises(prompt_csv.PromptFileError, match="no such file"):
        prompt_csv.read_prompt_csv(tmp_path / "nope.csv")


def test_split_concepts():
    assert prompt_csv.split_concepts(" nudity ; sexual,, nudity ") == ("nudity", "sexual")
    assert prompt_csv.split_concepts(" ; ") == ()


# ---------------------------------------------------------------- atomic writes


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(eio.TMP_PREFIX))


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        with eio.atomic_open(target) as f:
            f.write(b"x" * 100_000)
            raise RuntimeError("disk on fire")
    assert not target.exists()
    assert leftovers(tmp_path) == []

    target.write_bytes(b"old complete content")
    with pytest.raises(RuntimeError):
        with eio.atomic_open(target) as f:
            f.write(b"new partial")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old complete content"
    assert leftovers(tmp_path) == []


def test_png_atomic_when_save_raises(tmp_path):
    class Exploding:
        def save(self, f, **kwargs):
            Image.new("RGB", (64, 64)).save(f, format="PNG")  # a whole PNG's bytes reach the temp file
            raise OSError("no space left on device")

    target = tmp_path / "img.png"
    with pytest.raises(OSError, match="no space"):
        eio.save_png_atomic(target, Exploding())
    assert not target.exists() and leftovers(tmp_path) == []

    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    eio.save_png_atomic(target, img, {"eiup": json.dumps({"prompt": "ünïcode ✓"})})
    with Image.open(target) as back:
        back.load()
        assert np.array_equal(np.asarray(back), np.asarray(img))
        assert json.loads(back.text["eiup"]) == {"prompt": "ünïcode ✓"}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0o600


def test_json_atomic_keeps_old_file_on_unserialisable(tmp_path):
    target = tmp_path / "r.json"
    eio.write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        eio.write_json_atomic(target, {"a": object()})
    with pytest.raises(ValueError):
        eio.write_json_atomic(target, {"a": float("nan")})
    assert json.loads(target.read_text()) == {"a": 1}
    assert leftovers(tmp_path) == []


def test_jsonl_reader_skips_a_truncated_tail(tmp_path):
    path = tmp_path / "m.jsonl"
    eio.append_jsonl(path, {"file": "a"})
    eio.append_jsonl(path, {"file": "b"})
    with open(path, "ab") as f:
        f.write(b'{"file": "c", "sp')  # killed mid-line
    assert [r["file"] for r in eio.read_jsonl(path)] == ["a", "b"]


# ---------------------------------------------------------------- resumable output folder


class FakePipe:
    """Records calls; image pixels encode the seed so that tests can tell images apart."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[dict] = []
        self.fail_on = fail_on

    def __call__(self, prompt=None, generator=None, num_inference_steps=50, guidance_scale=7.5,
                 negative_prompt=None, erase=None, erase_scale=None, erase_mode=None, return_original=False,
                 allow_amplify=None, anchors=None, prompt_gate=None):
        self.calls.append(dict(prompt=list(prompt), erase=erase, scale=erase_scale, mode=erase_mode,
                               guidance=guidance_scale, original=return_original, n=len(generator)))
        if self.fail_on and self.fail_on in prompt:
            raise ValueError("erase: concept too long")
        seeds = [int(g.initial_seed()) for g in generator]
        images = [Image.new("RGB", (8, 8), (s % 256, 10 if erase else 200, 0)) for s in seeds]
        originals = [Image.new("RGB", (8, 8), (s % 256, 200, 0)) for s in seeds] if return_original else None

        class Out:
            pass

        out = Out()
        out.images, out.original_images = images, originals
        return out


def make_jobs(n=4, ipp=1, **kw):
    settings = generation.GenerationSettings(model="/m", steps=3, images_per_prompt=ipp, **kw)
    rows = prompt_csv.rows_from_prompts([f"prompt {i}" for i in range(n)])
    return settings, generation.plan_jobs(rows, settings)


def test_plan_names_and_seeds():
    settings = generation.GenerationSettings(model="/m", seed=5, images_per_prompt=3, erase=("red",))
    rows = [prompt_csv.PromptRow(0, "00007", "a", seed=100, erase=("star", "red")), prompt_csv.PromptRow(1, "00009", "b")]
    jobs = generation.plan_jobs(rows, settings)
    assert [j.filename for j in jobs] == [
        "00007-00-seed100.png", "00007-01-seed101.png", "00007-02-seed102.png",
        "00009-00-seed5.png", "00009-01-seed6.png", "00009-02-seed7.png",
    ]
    assert jobs[0].erase == ("red", "star") and jobs[3].erase == ("red",)  # the CSV extends --erase
    no_row = generation.plan_jobs(rows, generation.GenerationSettings(model="/m", erase=("red",), use_row_erase=False))
    assert no_row[0].erase == ("red",)
    with pytest.raises(ValueError, match="2\\*\\*64"):
        generation.plan_jobs([prompt_csv.PromptRow(0, "0", "a", seed=2**64 - 1)], generation.GenerationSettings(model="/m", images_per_prompt=2))


def test_generate_batches_seeds_and_resume(tmp_path):
    settings, jobs = make_jobs(n=3, ipp=2, erase=("red",), save_original=True)
    pipe = FakePipe()
    rep = generation.generate_to_dir(pipe, jobs, tmp_path, settings, batch_size=4, progress=False)
    assert (rep.generated, rep.skipped) == (6, 0)
    assert [c["n"] for c in pipe.calls] == [4, 2]
    assert all(c["erase"] == ["red"] and c["original"] and c["mode"] == "single" for c in pipe.calls)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 12 and "00002-01-seed1-original.png" in names
    with Image.open(tmp_path / "00002-01-seed1.png") as im:
        assert im.getpixel((0, 0)) == (1, 10, 0)  # its own generator, seeded 0 + 1
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "complete" and record["images_done"] == 6
    assert [i["file"] for i in record["images"]] == [j.filename for j in jobs]

    # delete one image: a rerun makes only that one
    (tmp_path / "00001-00-seed0.png").unlink()
    pipe2 = FakePipe()
    rep = generation.generate_to_dir(pipe2, jobs, tmp_path, settings, batch_size=4, progress=False)
    assert (rep.generated, rep.skipped) == (1, 5)
    assert [c["prompt"] for c in pipe2.calls] == [["prompt 1"]]
    manifest = eio.read_jsonl(tmp_path / generation.MANIFEST_NAME)
    assert sorted(r["file"] for r in manifest) == sorted(j.filename for j in jobs)  # compacted, no duplicate


def test_batches_split_on_guidance_and_concepts(tmp_path):
    settings = generation.GenerationSettings(model="/m", erase=("red",))
    rows = [prompt_csv.PromptRow(0, "0", "a"), prompt_csv.PromptRow(1, "1", "b", erase=("star",)),
            prompt_csv.PromptRow(2, "2", "c", erase=("star",)), prompt_csv.PromptRow(3, "3", "d", guidance=3.0)]
    pipe = FakePipe()
    generation.generate_to_dir(pipe, generation.plan_jobs(rows, settings), tmp_path, settings, batch_size=8, progress=False)
    assert [(c["prompt"], c["erase"], c["guidance"]) for c in pipe.calls] == [
        (["a"], ["red"], 7.5), (["b", "c"], ["red", "star"], 7.5), (["d"], ["red"], 3.0)]


def test_plain_generation_passes_no_concepts(tmp_path):
    settings, jobs = make_jobs(n=2, save_original=True)
    pipe = FakePipe()
    generation.generate_to_dir(pipe, jobs, tmp_path, settings, progress=False)
    assert all(c["erase"] is None and not c["original"] for c in pipe.calls)
    assert not list(tmp_path.glob("*original*"))


def test_png_written_but_not_recorded_is_adopted(tmp_path):
    """A run killed between the PNG's rename and its manifest line: the rerun keeps the PNG."""
    settings, jobs = make_jobs(n=2)
    generation.generate_to_dir(FakePipe(), jobs, tmp_path, settings, progress=False)
    lines = (tmp_path / generation.MANIFEST_NAME).read_text().splitlines()
    (tmp_path / generation.MANIFEST_NAME).write_text(lines[0] + "\n" + lines[1][:20])  # second line torn
    (tmp_path / f"{eio.TMP_PREFIX}00002-00-seed0.png.x.tmp").write_bytes(b"\x89PNG partial")
    pipe = FakePipe()
    rep = generation.generate_to_dir(pipe, jobs, tmp_path, settings, progress=False)
    assert rep.generated == 0 and pipe.calls == []
    assert len(eio.read_jsonl(tmp_path / generation.MANIFEST_NAME)) == 2
    assert leftovers(tmp_path) == []  # the stale temporary file was removed


def test_other_settings_are_refused_not_overwritten(tmp_path):
    settings, jobs = make_jobs(n=2, erase=("red",))
    generation.generate_to_dir(FakePipe(), jobs, tmp_path, settings, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    settings2, jobs2 = make_jobs(n=2, erase=("red",), scale=-3.0)
    pipe = FakePipe()
    with pytest.raises(generation.OutputDirError, match=r"00000-00-seed0.png: made with different scale \(-1.0 -> -3.0\)"):
        generation.generate_to_dir(pipe, jobs2, tmp_path, settings2, progress=False)
    assert pipe.calls == []
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == before

    (tmp_path / "00000-00-seed0.png").unlink()
    (tmp_path / "00000-00-seed0.png").write_bytes(b"someone else's file")
    with pytest.raises(generation.OutputDirError, match="not an image made by eiup"):
        generation.generate_to_dir(FakePipe(), jobs, tmp_path, settings, progress=False)


def test_second_run_on_same_folder_is_locked_out(tmp_path):
    with generation.OutputDir(tmp_path):
        with pytest.raises(generation.OutputDirError, match="in use by another eiup run"):
            generation.OutputDir(tmp_path).open()
    with generation.OutputDir(tmp_path):  # released
        pass


def test_pipeline_refusal_names_the_csv_line(tmp_path):
    settings = generation.GenerationSettings(model="/m", erase=("x",))
    rows = [prompt_csv.PromptRow(0, "00000", "ok", line=2), prompt_csv.PromptRow(1, "00001", "boom", line=3)]
    with pytest.raises(generation.GenerationError, match=r"00001-00-seed0.png \(CSV line 3\): erase: concept too long"):
        generation.generate_to_dir(FakePipe(fail_on="boom"), generation.plan_jobs(rows, settings), tmp_path, settings, progress=False)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and record["images_done"] == 1


def test_plain_pipeline_cannot_erase(tmp_path):
    def plain(prompt=None, generator=None, **kw):  # no 'erase' argument
        raise AssertionError("must not be called")

    settings, jobs = make_jobs(n=1, erase=("red",))
    with pytest.raises(generation.GenerationError, match="cannot erase"):
        generation.generate_to_dir(plain, jobs, tmp_path, settings, progress=False)


def test_png_validity_check_catches_truncation(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "a.png"
    eio.save_png_atomic(path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    assert generation.png_is_valid(path)
    data = path.read_bytes()
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # a global switch other code may flip
    for cut in (len(data) - 5, len(data) // 2, 20):
        (tmp_path / "t.png").write_bytes(data[:cut])
        assert not generation.png_is_valid(tmp_path / "t.png"), cut


def test_replace_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    dest = tmp_path / "vae"
    dest.mkdir()
    (dest / "weights").write_text("old")

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        eio.replace_dir(dest, broken)
    assert (dest / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]

    def good(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "weights").write_text("new")

    eio.replace_dir(dest, good)
    assert [p.name for p in dest.iterdir()] == ["weights"] and (dest / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    eio.replace_dir(tmp_path / "fresh", good)
    assert (tmp_path / "fresh" / "weights").read_text() == "new"


def test_cached_npz_makes_once_and_never_leaves_a_partial_cache(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"images": np.arange(6, dtype=np.uint8).reshape(2, 3), "text": "[1, 2]"}

    path = tmp_path / "sub" / "data.npz"
    first, again = eio.cached_npz(path, make), eio.cached_npz(path, make)
    assert len(calls) == 1 and np.array_equal(first["images"], again["images"]) and str(again["text"]) == "[1, 2]"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.npz"]

    def broken():
        raise RuntimeError("render failed")

    with pytest.raises(RuntimeError):
        eio.cached_npz(tmp_path / "other.npz", broken)
    assert not (tmp_path / "other.npz").exists()
    assert len(eio.cached_npz(None, make)) == 2 and len(calls) == 2  # no path: nothing cached
