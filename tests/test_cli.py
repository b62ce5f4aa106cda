"""`eiup generate` end to end on a tiny random pipeline saved as safetensors (no downloads)."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from eiup import generation, io as eio
from eiup import models
from eiup.cli import app

STEPS = "2"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine is shared: one torch thread is much faster than oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from eiup.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("cli-model")
    tiny_pipeline("sd1", tmpdir=root / "tok", plain=True).save_pretrained(root / "sd1", safe_serialization=True)
    return root / "sd1"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"TERMINAL_WIDTH": "400"})


def flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", " ", text)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def write_csv(path: Path, rows: list[str], header: str = "case_number,prompt,evaluation_seed,erase_target") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture
def count_calls(monkeypatch):
    """Record the prompts of every pipeline call made by the CLI."""
    calls: list[list[str]] = []
    real_load = models.load_pipeline

    def load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        cls = type(pipe)
        original = cls.__call__
        if getattr(original, "counted", False):  # already wrapped by an earlier load in this test
            return pipe

        @functools.wraps(original)
        def counted(self, *a, **kw):
            calls.append(list(kw["prompt"]))
            return original(self, *a, **kw)

        counted.counted = True
        monkeypatch.setattr(cls, "__call__", counted)
        return pipe

    monkeypatch.setattr(models, "load_pipeline", load)
    return calls


def test_help_lists_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for cmd in ("generate", "toy", "bench"):
        assert cmd in res.output


@pytest.mark.parametrize(
    "args, option, text",
    [
        ([], "--prompt", "give at least one --prompt"),
        (["--prompt", "  "], "--prompt", "empty prompt"),
        (["--prompt", "x", "--scale", "nan"], "--scale", "not a finite number"),
        (["--prompt", "x", "--scale", "0.5"], "--scale", "--allow-amplify"),
        (["--prompt", "x", "--mode", "triple"], "--mode", "not one of single, dual"),
        (["--prompt", "x", "--erase", "red", "--erase", " "], "--erase", "empty concept"),
        (["--prompt", "x", "--steps", "0"], "--steps", "0 < 1"),
        (["--prompt", "x", "--guidance", "-1"], "--guidance", ">= 0"),
        (["--prompt", "x", "--guidance", "inf"], "--guidance", "finite"),
        (["--prompt", "x", "--seed", "-3"], "--seed", "outside"),
        (["--prompt", "x", "--images-per-prompt", "0"], "--images-per-prompt", "0 < 1"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size", "0 < 1"),
        (["--prompt", "x", "--device", "tpu"], "--device", "not cpu or cuda"),
        (["--prompt", "x", "--guard", "none", "--guard-ladder", "0.5,1"], "--guard-ladder", "this run has none"),
        (["--prompt", "x", "--anchor-strength", "1", "--guard-ladder", "0.5,1"], "--guard-ladder", "this run has none"),
        (["--prompt", "x", "--guard", "magic"], "--guard", "auto, none, nudenet or package.module:function"),
        (["--prompt", "x", "--guard", "auto", "--anchor-strength", "1"], "--guard", "drop --anchor-strength"),
        (["--prompt", "x", "--guard-ladder", "1,0.5"], "--guard-ladder", "strictly increasing"),
    ],
)
def test_arguments_are_checked_before_the_model(monkeypatch, args, option, text):
    def forbidden(*a, **k):
        raise AssertionError("the model must not be touched before the arguments are checked")

    monkeypatch.setattr(models, "inspect_model", forbidden)
    monkeypatch.setattr(models, "load_pipeline", forbidden)
    res = invoke("generate", *args)
    assert res.exit_code == 2, res.output
    out = flat(res.output)
    assert f"Invalid value for '{option}'" in out and text in out, out


def test_bad_csv_rows_are_listed_before_loading(tmp_path, monkeypatch, model_dir, count_calls):
    csv_path = write_csv(tmp_path / "p.csv", ["1,a red star,1,", "2,,2,", "3,a lemon,x,", "4,a bee,4,"])
    res = invoke("generate", "--prompts", csv_path, "--model", model_dir, "--out", tmp_path / "o")
    assert res.exit_code == 2
    out = flat(res.output)
    assert "Invalid value for '--prompts'" in out
    assert "line 3: empty prompt" in out and "line 4: seed 'x' is not an integer" in out
    assert count_calls == [] and not (tmp_path / "o").exists()

    res = invoke("generate", "--prompts", csv_path, "--model", model_dir, "--out", tmp_path / "o",
                 "--steps", STEPS, "--skip-bad-rows", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "skipping line 3: empty prompt" in res.output and "skipping line 4" in res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == ["00001-00-seed1.png", "00004-00-seed4.png"]


def test_model_problems_name_the_option(tmp_path, monkeypatch):
    res = invoke("generate", "--prompt", "x", "--model", tmp_path / "nope")
    assert res.exit_code == 2 and "Invalid value for '--model'" in flat(res.output)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.ckpt").write_bytes(b"not really")
    res = invoke("generate", "--prompt", "x", "--model", tmp_path / "m")
    assert res.exit_code == 2 and "no model_index.json" in flat(res.output) and "pickled" in flat(res.output)
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "absent")
    res = invoke("generate", "--prompt", "x")
    out = flat(res.output)
    assert res.exit_code == 2 and "bundled toy model is missing" in out and "--model /path/to/stable-diffusion-v1-5" in out


def test_plain_generation_files_and_record(tmp_path, monkeypatch, model_dir):
    monkeypatch.setattr(models, "default_model_path", lambda: model_dir)  # stands in for the bundled toy
    out = tmp_path / "out"
    res = invoke("generate", "-p", "a red star", "-p", "a blue heart", "--images-per-prompt", "2", "--seed", "5",
                 "--steps", STEPS, "--guidance", "3", "--batch-size", "3", "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    assert "Using the bundled toy model" in res.output and "--model /path/to/stable-diffusion-v1-5" in res.output
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000-00-seed5.png", "00000-01-seed6.png", "00001-00-seed5.png", "00001-01-seed6.png"]
    for n in names:
        with Image.open(out / n) as im:
            im.load()
            assert im.size == (32, 32)
    assert not np.array_equal(pixels(out / names[0]), pixels(out / names[1]))  # seeds differ
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["images_done"] == 4
    s = rec["settings"]
    assert (s["model"], s["erase"], s["seed"], s["steps"], s["guidance"]) == (str(model_dir), [], 5, 2, 3.0)
    assert "scale" in s and s["mode"] in ("single", "dual")
    assert rec["model"]["source"] == "bundled" and rec["pipeline_class"] == "EIUPPipeline"
    assert {"torch", "diffusers", "transformers", "eiup"} <= set(rec["versions"])
    assert [(i["file"], i["prompt"], i["seed"]) for i in rec["images"]] == [
        ("00000-00-seed5.png", "a red star", 5), ("00000-01-seed6.png", "a red star", 6),
        ("00001-00-seed5.png", "a blue heart", 5), ("00001-01-seed6.png", "a blue heart", 6)]


def test_resume_regenerates_only_the_missing_image(tmp_path, model_dir, count_calls, monkeypatch):
    csv_path = write_csv(tmp_path / "p.csv", [f"{c},a {w} star,{c * 10}," for c, w in
                                              [(3, "red"), (4, "blue"), (8, "green"), (9, "purple")]])
    out = tmp_path / "out"
    args = ["generate", "--prompts", csv_path, "--model", model_dir, "--steps", STEPS, "--out", out, "--no-progress"]
    assert invoke(*args).exit_code == 0
    assert len(count_calls) == 4
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00003-00-seed30.png", "00004-00-seed40.png", "00008-00-seed80.png",
                                       "00009-00-seed90.png"]
    before = {f.name: (f.stat().st_mtime_ns, f.stat().st_ino, f.read_bytes()) for f in files}
    (out / "00008-00-seed80.png").unlink()

    count_calls.clear()
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert count_calls == [["a green star"]]  # one call, for the deleted image only
    assert "Generated 1, skipped 3" in res.output
    after = {f.name: (f.stat().st_mtime_ns, f.stat().st_ino, f.read_bytes()) for f in sorted(out.glob("*.png"))}
    assert after.keys() == before.keys()
    for name in before:
        if name != "00008-00-seed80.png":
            assert after[name] == before[name]  # untouched
    assert after["00008-00-seed80.png"][2] == before["00008-00-seed80.png"][2]  # same seed, same pixels

    # everything done: the rerun does not even load the model
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("model loaded for nothing"))
    res = invoke(*args)
    assert res.exit_code == 0 and "Nothing to do" in res.output

    # other settings into the same folder: refused, nothing overwritten
    res = invoke(*args[:-1], "--erase", "red", "--no-progress")
    assert res.exit_code == 1 and "other settings" in res.output and "nothing was overwritten" in res.output
    assert {f.name: f.read_bytes() for f in out.glob("*.png")} == {k: v[2] for k, v in after.items()}


def test_erase_changes_the_image_and_original_is_the_plain_one(tmp_path, model_dir):
    common = ["-p", "a red star", "--model", model_dir, "--steps", STEPS, "--seed", "3", "--no-progress"]
    assert invoke("generate", *common, "--out", tmp_path / "plain").exit_code == 0
    res = invoke("generate", *common, "--erase", "red", "--scale", "-4", "--save-original", "--out", tmp_path / "er")
    assert res.exit_code == 0, res.output
    plain = pixels(tmp_path / "plain" / "00000-00-seed3.png")
    erased = pixels(tmp_path / "er" / "00000-00-seed3.png")
    original = pixels(tmp_path / "er" / "00000-00-seed3-original.png")
    assert np.abs(erased - plain).max() > 0
    assert np.abs(original - plain).max() <= 1  # the un-erased branch is the plain image
    rec = json.loads((tmp_path / "er" / "run.json").read_text())
    assert rec["settings"]["erase"] == ["red"] and rec["settings"]["scale"] == -4.0
    assert rec["images"][0]["original_file"] == "00000-00-seed3-original.png"


def test_csv_erase_target_extends_erase(tmp_path, model_dir):
    csv_path = write_csv(tmp_path / "p.csv", ["0,a red star,1,star", "1,a red heart,2,"])
    out = tmp_path / "out"
    res = invoke("generate", "--prompts", csv_path, "--model", model_dir, "--steps", STEPS, "--erase", "red",
                 "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())
    assert [i["erase"] for i in rec["images"]] == [["red", "star"], ["red"]]
    res = invoke("generate", "--prompts", csv_path, "--model", model_dir, "--steps", STEPS,
                 "--ignore-erase-target", "--out", tmp_path / "base", "--no-progress")
    assert res.exit_code == 0
    rec = json.loads((tmp_path / "base" / "run.json").read_text())
    assert [i["erase"] for i in rec["images"]] == [[], []]


def kill_when(args: list[str], ready, timeout: float = 180.0) -> None:
    """Run `eiup ARGS` in a real subprocess and SIGKILL it as soon as `ready()` is true."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", "from eiup.cli import main; main()", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"{args[0]} exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{args[0]}: nothing finished after {timeout:.0f} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_killed_run_resumes_without_duplicates(tmp_path, model_dir, count_calls):
    """SIGKILL a real `eiup generate` process after its first image, rerun, check the set."""
    n = 10
    csv_path = write_csv(tmp_path / "p.csv", [f"{i},a {'red' if i % 2 else 'blue'} star {i},{i}," for i in range(n)])
    out = tmp_path / "out"
    args = ["generate", "--prompts", str(csv_path), "--model", str(model_dir), "--steps", "12", "--out", str(out),
            "--erase", "red", "--no-progress"]
    kill_when(args, lambda: list(out.glob("*.png")))
    done_before = {p.name for p in out.glob("*.png")}
    assert 1 <= len(done_before) < n, "the run finished before it could be killed"
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    res = invoke(*args)
    assert res.exit_code == 0, res.output
    made = [p[0] for p in count_calls]
    assert len(made) == len(set(made)) == n - len(done_before)  # every finished image kept, none made twice
    assert not {m.split()[-1] for m in made} & {name.split("-")[0].lstrip("0") or "0" for name in done_before}
    expected = [f"{i:05d}-00-seed{i}.png" for i in range(n)]
    assert sorted(p.name for p in out.glob("*.png")) == expected
    assert not [p for p in out.iterdir() if p.name.startswith(eio.TMP_PREFIX)]
    for name in expected:
        assert generation.png_is_valid(out / name), name
    manifest = eio.read_jsonl(out / generation.MANIFEST_NAME)
    assert sorted(r["file"] for r in manifest) == expected  # one record per image, no duplicates
    rec = json.loads((out / "run.json").read_text())
    assert rec["status"] == "complete" and rec["images_done"] == n


def test_killed_bench_resumes_without_redoing_units(tmp_path, model_dir, monkeypatch):
    """SIGKILL a real `eiup bench` process after its first finished unit, rerun, check the set."""
    from eiup.bench.runner import MethodRunner

    out = tmp_path / "bench"
    args = ["bench", "--model", str(model_dir), "--concept", "red", "--seeds", "2", "--per-role", "2",
            "--no-sld", "--scales", "-1,-2", "--modes", "single", "--steps", "10", "--out", str(out)]
    records = out / "records"
    kill_when(args, lambda: list(records.rglob("*.json")))
    done_before = {str(p.relative_to(records).with_suffix("")) for p in records.rglob("*.json")}
    pngs_before = {p: p.read_bytes() for p in (out / "images").rglob("*.png")
                   if str(p.parent.relative_to(out / "images")) in done_before}

    generated = []
    real = MethodRunner.generate
    monkeypatch.setattr(MethodRunner, "generate",
                        lambda self, method, prompt, *a: generated.append((method.name, prompt)) or real(self, method, prompt, *a))
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    units = {str(p.relative_to(records).with_suffix("")) for p in records.rglob("*.json")}
    assert 1 <= len(done_before) < len(units), "the run finished before it could be killed"
    assert len(generated) == len(set(generated)) == len(units) - len(done_before)  # nothing made twice
    for png, data in pngs_before.items():
        assert png.read_bytes() == data  # finished units untouched
    for unit in units:
        record = json.loads((records / f"{unit}.json").read_text())
        files = sorted((out / "images" / unit).glob("*.png"))
        assert [f.name for f in files] == [f"seed{s:06d}.png" for s in record["seeds"]]
        assert all(generation.png_is_valid(f) for f in files)
    assert not [p for p in out.rglob("*") if p.name.startswith(eio.TMP_PREFIX)]
    assert (out / "metrics.json").is_file() and (out / "index.html").is_file()


def test_concept_context_prompt_batches_per_prompt_and_is_recorded(tmp_path, model_dir, count_calls):
    out = tmp_path / "ctx"
    args = ["generate", "-p", "a red star", "-p", "a red star on a white background", "--model", model_dir,
            "--steps", STEPS, "--erase", "red", "--concept-context", "prompt", "--images-per-prompt", "2", "--batch-size", "4",
            "--out", out, "--no-progress"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    assert len(count_calls) == 2 and all(len(set(c)) == 1 for c in count_calls)  # one prompt per call
    rec = json.loads((out / "run.json").read_text())
    assert rec["settings"]["concept_context"] == "prompt" and len(list(out.glob("*.png"))) == 4
    res = invoke(*args[:-1], "--concept-context", "separate", "--no-progress")
    assert res.exit_code == 1 and "other settings" in res.output  # part of what the images depend on
    res = invoke("generate", "-p", "x", "--model", model_dir, "--concept-context", "joint", "--out", tmp_path / "bad")
    assert res.exit_code != 0 and "--concept-context" in flat(res.output)


def test_anchors_reach_the_pipeline_and_are_recorded(tmp_path, model_dir, monkeypatch):
    out = tmp_path / "anch"
    args = ["generate", "-p", "a red star", "--model", model_dir, "--steps", STEPS, "--erase", "red",
            "--anchor", "blue", "--anchor", "green", "--anchor-strength", "2", "--out", out, "--no-progress"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())
    assert rec["settings"]["anchors"] == ["blue", "green"] and rec["settings"]["anchor_strength"] == 2.0
    assert rec["settings"]["anchor_gate"] is True and rec["settings"]["prompt_gate"] is True
    plain = tmp_path / "plain"
    assert invoke(*args[:7], "--erase", "red", "--out", plain, "--no-progress").exit_code == 0
    (a,), (b,) = sorted(out.glob("*.png")), sorted(plain.glob("*.png"))
    assert a.read_bytes() != b.read_bytes()  # the projection changed the image
    for changed in (["--anchor-strength", "3"], ["--no-anchor-gate"], ["--no-prompt-gate"]):
        res = invoke(*args[:-1], *changed, "--no-progress")
        assert res.exit_code == 1 and "other settings" in res.output  # part of what the images depend on
    res = invoke(*args[:-3], "--anchor-strength", "auto", "--out", tmp_path / "auto", "--no-progress")
    assert res.exit_code != 0 and "eiup calibrate --target strength" in flat(res.output)  # no predictor in this folder
    assert not list((tmp_path / "auto").glob("*.png"))
    for bad in (["--anchor", " "], ["--anchor", "blue", "--anchor-strength", "nan"], ["--anchor", "blue", "--anchor-strength", "0"],
                ["--anchor", "blue", "--anchor-strength", "fast"],
                ["--anchor", "blue", "--protect", "circle"], ["--anchor", "blue", "--protect", "circle", "--protect", "none"]):
        res = invoke("generate", "-p", "x", "--model", model_dir, "--erase", "red", *bad, "--out", tmp_path / "bad")
        assert res.exit_code != 0 and bad[-2] in flat(res.output)
    protected = tmp_path / "protected"  # "a tree" does not name red: projected along the protected direction
    base = ["generate", "-p", "a tree in the fog", "--model", model_dir, "--steps", STEPS, "--erase", "red", "--anchor",
            "blue", "--anchor", "green", "--no-anchor-gate", "--no-progress"]
    assert invoke(*base, "--protect", "circle", "--protect", "square", "--out", protected).exit_code == 0
    assert json.loads((protected / "run.json").read_text())["settings"]["anchor_protect"] == ["circle", "square"]
    assert invoke(*base, "--out", tmp_path / "unprotected").exit_code == 0
    (a,), (b,) = sorted(protected.glob("*.png")), sorted((tmp_path / "unprotected").glob("*.png"))
    assert a.read_bytes() != b.read_bytes()
    in_context = tmp_path / "in-context"  # no probe in this folder: in-context anchors have no implying prompt to act on
    assert invoke(*base, "--in-context", "--out", in_context).exit_code == 0
    assert json.loads((in_context / "run.json").read_text())["settings"]["anchor_in_context"] is True
    ((c,),) = [sorted(in_context.glob("*.png"))]
    assert np.array_equal(np.asarray(Image.open(c)), np.asarray(Image.open(b)))  # pixels; the PNG text records settings
    named = ["generate", "-p", "a red star", "--model", model_dir, "--steps", STEPS, "--erase", "red", "--anchor", "blue",
             "--anchor", "green", "--no-progress"]  # names red: confined to the map of "red" with --region
    from eiup.config import REGION_THRESHOLDS

    monkeypatch.setitem(REGION_THRESHOLDS, "map", (0.98, 0.99))  # the tiny model's maps are nearly flat
    assert invoke(*named, "--region", "--out", tmp_path / "region").exit_code == 0
    assert json.loads((tmp_path / "region" / "run.json").read_text())["settings"]["anchor_region"] is True
    assert invoke(*named, "--out", tmp_path / "everywhere").exit_code == 0
    (r,), (e,) = sorted((tmp_path / "region").glob("*.png")), sorted((tmp_path / "everywhere").glob("*.png"))
    assert not np.array_equal(np.asarray(Image.open(r)), np.asarray(Image.open(e)))
    # the phrase rule: "a red star" is one phrase, projected everywhere; "and a blue circle" claims its pixels
    assert invoke(*named, "--region-rule", "phrases", "--out", tmp_path / "phrases").exit_code == 0
    assert json.loads((tmp_path / "phrases" / "run.json").read_text())["settings"]["anchor_region"] == "phrases"
    (p,) = sorted((tmp_path / "phrases").glob("*.png"))
    assert np.abs(np.asarray(Image.open(p), float) - np.asarray(Image.open(e), float)).max() <= 1
    for extra, message in ((["--region-rule", "box"], "unknown"), (["--region-rule", "map", "--no-region"], "--no-region")):
        result = invoke(*named, *extra, "--out", tmp_path / "bad")
        assert result.exit_code == 2 and message in result.output and "--region-rule" in result.output
    assert not (tmp_path / "bad").exists()


def test_guard_climbs_and_the_manifest_records_each_images_outcome(tmp_path, model_dir, monkeypatch):
    (tmp_path / "always_guard.py").write_text("def flag(images):\n    return [True] * len(images)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["generate", "-p", "a red star", "--model", model_dir, "--steps", STEPS, "--erase", "red", "--anchor", "blue",
            "--anchor", "green", "--no-anchor-gate", "--images-per-prompt", "2", "--no-progress"]
    # anchors given without a strength: the library's 3, then up the ladder's stronger rungs
    res = invoke(*base, "--guard", "always_guard:flag", "--guard-ladder", "0.5,1,4,5", "--out", tmp_path / "guarded")
    assert res.exit_code == 0, res.output
    assert "the guard still sees an erased concept in 2 image(s)" in flat(res.output)
    lines = [json.loads(x) for x in (tmp_path / "guarded" / "manifest.jsonl").read_text().splitlines()]
    # flagged at the top, again without the erasure, the concept as negative prompt at 1, 1.5 and 2x the
    # guidance, and once with the negative prompt and the erasure: the top's image kept
    assert [x["outcome"] for x in lines] == [{"guard_flagged": True, "generations": 7, "anchor_strength": {"red": 5.0},
                                              "negative_prompt": False}] * 2
    rec = json.loads((tmp_path / "guarded" / "run.json").read_text())
    assert rec["settings"]["guard"] == "always_guard:flag" and rec["settings"]["guard_ladder"] == [0.5, 1.0, 4.0, 5.0]
    assert rec["settings"]["guard_negative_prompt"] is True and all(i["outcome"]["generations"] == 7 for i in rec["images"])
    res = invoke(*base, "--guard", "always_guard:flag", "--guard-ladder", "0.5,1,4,5", "--no-guard-negative-prompt",
                 "--out", tmp_path / "no-fallback")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "no-fallback" / "run.json").read_text())
    assert rec["settings"]["guard_negative_prompt"] is False and all(i["outcome"]["generations"] == 3 for i in rec["images"])
    assert invoke(*base, "--anchor-strength", "5", "--out", tmp_path / "fixed").exit_code == 0
    for a, b in zip(sorted((tmp_path / "guarded").glob("*.png")), sorted((tmp_path / "fixed").glob("*.png"))):
        assert np.array_equal(pixels(a), pixels(b))  # the top rung from the same noise is the fixed strength's image
    res = invoke(*base[:9], "--guard", "always_guard:flag", "--anchor", "none", "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "--anchor none" in flat(res.output)


def test_anchor_auto_reads_the_model_folder_and_none_switches_off(tmp_path, model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "eiup_anchors.json").write_text('{"red": ["blue", "green"]}')
    base = ["generate", "-p", "a red star", "--model", model, "--steps", STEPS, "--erase", "red", "--no-anchor-gate",
            "--no-progress"]
    runs = {}
    for name, extra in {"auto": ["--anchor", "auto"], "explicit": ["--anchor", "blue", "--anchor", "green"],
                        "none": ["--anchor", "none"]}.items():
        res = invoke(*base, *extra, "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
        png = sorted((tmp_path / name).glob("*.png"))[0]
        runs[name] = (np.asarray(Image.open(png)).tobytes(),  # pixels (the PNG's metadata names the settings)
                      json.loads((tmp_path / name / "run.json").read_text())["settings"].get("anchors"))
    assert runs["auto"][1] == ["auto"] and runs["none"][1] == []
    assert runs["auto"][0] == runs["explicit"][0] != runs["none"][0]
    res = invoke(*base, "--anchor", "auto", "--anchor", "blue", "--out", tmp_path / "bad")
    assert res.exit_code != 0 and "--anchor" in flat(res.output)


def test_finetune_decoder_refuses_a_folder_without_a_vae(tmp_path):
    res = invoke("toy", "finetune-decoder", "--model", tmp_path, "--work", tmp_path / "w")
    assert res.exit_code == 2 and "Invalid value for --model: no VAE" in flat(res.output)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{}")
    for bad in ("-1", "nan", "inf"):
        res = invoke("toy", "finetune-decoder", "--model", tmp_path, "--work", tmp_path / "w", "--latent-noise", bad)
        assert res.exit_code == 2 and "Invalid value for --latent-noise: must be a finite number" in flat(res.output)
    assert not (tmp_path / "w").exists()


def test_finetune_decoder_rewrites_only_the_decoder_and_resumes(tmp_path):
    import shutil

    from safetensors.torch import load_file

    model = tmp_path / "pipe"
    shutil.copytree(models.default_model_path() / "vae", model / "vae")
    before = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    args = ("toy", "finetune-decoder", "--model", model, "--work", tmp_path / "w", "--scenes", "1000",
            "--minutes", "0.05")
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    after = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in after.values()} == {torch.float16}  # the folder's own precision
    assert all(torch.equal(before[k], v) for k, v in after.items() if not k.startswith(("decoder.", "post_quant_conv.")))
    assert any(not torch.equal(before[k], v) for k, v in after.items() if k.startswith("decoder."))
    assert "_name_or_path" not in json.loads((model / "vae" / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "w"]  # no temporary folders left
    steps = int(re.search(r"(\d+) steps", res.output).group(1))
    again = invoke(*args)  # the budget is spent: the checkpoint is reused, nothing is rendered or trained again
    assert again.exit_code == 0 and f"{steps} steps" in again.output
    assert len(list((tmp_path / "w").glob("decoder-*.safetensors"))) == 1
    noisy = invoke(*args, "--latent-noise", "0.3")  # other settings: the same data, a checkpoint of their own
    assert noisy.exit_code == 0, noisy.output
    assert len(list((tmp_path / "w").glob("decoder-*.safetensors"))) == 2
    assert len(list((tmp_path / "w").glob("data-*.npz"))) == 1


def test_train_detector_checks_init_before_any_work(tmp_path):
    res = invoke("toy", "train-detector", "--init", tmp_path / "missing.safetensors", "--out", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and "Invalid value for --init: no detector weights" in flat(res.output)
    res = invoke("toy", "train-detector", "--lr", "0", "--out", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and "--lr must be > 0" in flat(res.output)
    for option, value in (("--shading", "nan"), ("--brightness", "1.5"), ("--brightness", "-0.1")):
        res = invoke("toy", "train-detector", option, value, "--out", tmp_path / "d.safetensors")
        assert res.exit_code == 2 and f"Invalid value for {option}: must be in [0, 1)" in flat(res.output), option
    assert not (tmp_path / "d.safetensors").exists()


def test_toy_training_refuses_a_device_it_cannot_use_before_any_work(tmp_path, bundled_latent_widths):
    import torch

    for cmd in (("toy", "train", "--out", tmp_path / "run"), ("toy", "train-detector", "--out", tmp_path / "d.safetensors")):
        res = invoke(*cmd, "--device", "gpu")
        assert res.exit_code == 2 and "Invalid value for --device: 'gpu' is not a device; use cpu or cuda[:N]" in flat(res.output)
        if not torch.cuda.is_available():
            res = invoke(*cmd, "--device", "cuda:0")
            assert res.exit_code == 2 and "CUDA is not available on this machine; use --device cpu" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--batch", "1")
    assert res.exit_code == 2 and "Invalid value for --batch: must be >= 2" in flat(res.output)
    (tmp_path / "half").mkdir()
    res = invoke("toy", "train", "--out", tmp_path / "run", "--init-from", tmp_path / "half")
    assert res.exit_code == 2 and "Invalid value for --init-from:" in flat(res.output)
    assert "is not a pipeline folder (no unet/config.json, text_encoder/config.json, vae/config.json, tokenizer)" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--unet-from", tmp_path / "half")
    assert res.exit_code == 2 and "Invalid value for --unet-from:" in flat(res.output)
    assert "is not a pipeline folder (no unet/config.json" in flat(res.output)
    res = invoke("toy", "report", "--out", tmp_path / "rep", "--detector", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and f"Invalid value for --detector: no detector weights at {tmp_path / 'd.safetensors'}" in flat(res.output)
    assert not (tmp_path / "rep").exists()
    res = invoke("toy", "train-detector", "--out", tmp_path / "d.safetensors", "--processes", "0")
    assert res.exit_code == 2 and "Invalid value for --processes: must be >= 1" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--latent-channels", "0")
    assert res.exit_code == 2 and "Invalid value for --latent-channels: must be in 1..64, got 0" in flat(res.output)
    for value in ("0", "nan", "inf", "-2"):
        res = invoke("toy", "train", "--out", tmp_path / "run", "--patterned-weight", value)
        assert res.exit_code == 2 and "Invalid value for --patterned-weight: must be a finite number > 0" in flat(res.output)
    for value in ("nan", "inf", "-1"):
        for option in ("--mark-weight", "--bare-weight"):
            res = invoke("toy", "finetune-vae", "--model", models.default_model_path(), option, value)
            assert res.exit_code == 2 and f"Invalid value for {option}: must be a finite number >= 0" in flat(res.output)
    res = invoke("toy", "finetune-vae", "--model", tmp_path / "nothing")
    assert res.exit_code == 2 and f"Invalid value for --model: no VAE with safetensors weights at {tmp_path / 'nothing' / 'vae'}" in flat(res.output)
    for value in ("nan", "inf", "-1"):
        res = invoke("toy", "train", "--out", tmp_path / "run", "--vae-mark-weight", value)
        assert res.exit_code == 2 and "Invalid value for --vae-mark-weight: must be a finite number >= 0" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--init-from", models.default_model_path(), "--vae-mark-weight", "4")
    assert res.exit_code == 2 and "Invalid value for --vae-mark-weight: --init-from keeps the pipeline's VAE" in flat(res.output)
    for value in ("0", "nan", "-1"):
        res = invoke("toy", "train", "--out", tmp_path / "run", "--snr-gamma", value)
        assert res.exit_code == 2 and "Invalid value for --snr-gamma: must be a number > 0 (inf turns the weighting off)" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--minutes", "nan")
    assert res.exit_code == 2 and "--minutes and --vae-minutes must be > 0" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--data-from", tmp_path / "half")
    assert res.exit_code == 2 and "Invalid value for --data-from: data_from:" in flat(res.output)
    assert "holds no rendered scenes" in flat(res.output) and "pass the work folder of a run" in flat(res.output)
    (tmp_path / "half" / "data").mkdir()
    for name in ("images.npy", "masks8.npy"):
        (tmp_path / "half" / "data" / name).touch()
    (tmp_path / "half" / "data" / "scenes.json").write_text(json.dumps([{}] * 70))
    res = invoke("toy", "train", "--out", tmp_path / "run", "--data-from", tmp_path / "half", "--scenes", "100")
    assert res.exit_code == 2 and "holds 70 scenes, not --scenes 100; pass --scenes 70" in flat(res.output)
    assert not (tmp_path / "run").exists()
    from safetensors.torch import save_file

    (tmp_path / "old").mkdir()  # a run's VAE with 8 latent channels (its quant conv maps 2 x 8 moments)
    save_file({"quant_conv.weight": torch.zeros(16, 16, 1, 1)}, str(tmp_path / "old" / "vae_final.safetensors"))
    res = invoke("toy", "train", "--out", tmp_path / "old")
    assert res.exit_code == 2 and "Invalid value for --latent-channels:" in flat(res.output)
    assert "holds a VAE with 8 latent channels, not 4; resume it with latent_channels=8 (--latent-channels 8)" in flat(res.output)
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["vae_final.safetensors"]
    from eiup.models import default_model_path

    bundled, other = bundled_latent_widths
    res = invoke("toy", "train", "--out", tmp_path / "run", "--init-from", default_model_path(), "--latent-channels", str(other))
    assert res.exit_code == 2 and "Invalid value for --latent-channels:" in flat(res.output)
    assert f"VAE has {bundled} latent channels and is kept; leave --latent-channels out or pass {bundled}" in flat(res.output)
    res = invoke("toy", "train", "--out", tmp_path / "run", "--init-from", default_model_path(), "--unet-from", default_model_path())
    assert res.exit_code == 2 and "Invalid value for --unet-from: --init-from keeps the pipeline's VAE, --unet-from trains a new one" in flat(res.output)
    assert not (tmp_path / "run").exists() and not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("args, option, text", [
    (["--unerasable", "max"], "--unerasable", "use spare or strongest"),
    (["--grid=-1,-2"], "--grid", "start at 0"),
    (["--mode", "triple"], "--mode", "use single or dual"),
    (["--target", "speed"], "--target", "use scale or strength"),
    (["--target", "strength", "--grid", "0,1"], "--grid", "strengths in (0, 8]"),
    (["--target", "strength", "--mode", "dual"], "--mode", "is for --target scale"),
    (["--target", "strength", "--coverage", "1"], "--coverage", "must be in (0, 1)"),
    (["--guidance", "nan"], "--guidance", "must be a finite number >= 0"),
    (["--steps", "0"], "--steps", "must be >= 1, got 0"),
])
def test_calibrate_checks_its_arguments_before_the_model(monkeypatch, args, option, text):
    def forbidden(*a, **k):
        raise AssertionError("the model must not be touched before the arguments are checked")

    monkeypatch.setattr(models, "load_pipeline", forbidden)
    res = invoke("calibrate", "--concept", "red", *args)
    assert res.exit_code == 2, res.output
    out = flat(res.output).replace("'", "")
    assert f"Invalid value for {option}" in out and text in out, out


@pytest.mark.parametrize("command", [("bench", "--concept", "red"), ("fit-gate", "--concept", "red"), ("toy", "report")])
@pytest.mark.parametrize("args, option, text", [
    (["--guidance", "nan"], "--guidance", "must be a finite number >= 0 (e.g. 7.5), got nan"),
    (["--guidance", "-1"], "--guidance", "must be a finite number >= 0"),
    (["--steps", "0"], "--steps", "must be >= 1"),
])
def test_sampling_options_are_checked_before_the_model(monkeypatch, tmp_path, command, args, option, text):
    def forbidden(*a, **k):
        raise AssertionError("the model must not be touched before the arguments are checked")

    monkeypatch.setattr(models, "load_pipeline", forbidden)
    res = invoke(*command, *args, "--out", tmp_path / "out")
    assert res.exit_code == 2, res.output
    assert f"Invalid value for {option}: {text}" in flat(res.output)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [("toy", "report"), ("bench", "--concept", "red")])
def test_no_seeds_are_refused_before_the_model(monkeypatch, tmp_path, command):
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: pytest.fail("the model must not be loaded"))
    res = invoke(*command, "--seeds", "0", "--out", tmp_path / "rep")
    assert res.exit_code == 2 and "Invalid value for --seeds: must be >= 1, got 0" in flat(res.output)
    assert not (tmp_path / "rep").exists()
