"""`eiup generate`: text-to-image with concepts erased, into a resumable folder of PNGs.

A thin layer: arguments are checked here (before any model is loaded), everything else lives
in eiup.prompt_csv (CSV), eiup.generation (plan, resumable output), eiup.models (loading) and eiup.pipeline (erasure).
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from eiup import generation, prompt_csv

MODES = ("single", "dual")


def _bad(message: str, option: str) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=f"'{option}'")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def _library_defaults() -> tuple[float | str, str, str | None, str, tuple[str, ...]]:
    from eiup.config import (DEFAULT_ANCHORS, DEFAULT_CONCEPT_CONTEXT, DEFAULT_ERASE_MODE, DEFAULT_ERASE_SCALE,
                             DEFAULT_GATE)

    anchors = () if DEFAULT_ANCHORS is None else ((DEFAULT_ANCHORS,) if isinstance(DEFAULT_ANCHORS, str) else tuple(DEFAULT_ANCHORS))
    return DEFAULT_ERASE_SCALE, str(DEFAULT_ERASE_MODE), DEFAULT_GATE, str(DEFAULT_CONCEPT_CONTEXT), anchors


def generate(
    prompt: Optional[list[str]] = typer.Option(
        None, "--prompt", "-p", help="A prompt; repeat for several. Files are named by position (00000, 00001...)."),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="An I2P-style CSV: column 'prompt' (required); optional evaluation_seed/sd_seed, "
        "evaluation_guidance/sd_guidance_scale (override --seed/--guidance for that row), erase_target "
        "(';' or ','-separated: EXTENDS --erase for that row), case_number (names the files).",
        dir_okay=False),
    erase: Optional[list[str]] = typer.Option(
        None, "--erase", "-e", help="A concept to erase (repeat for several). None: plain generation."),
    scale: Optional[str] = typer.Option(
        None, "--scale", help="Suppression scale w (< 0 erases), or 'auto' (predicted per image by the model's "
        "calibrated predictor, see `eiup calibrate`). Default: the model's preset for the concept "
        "(eiup_anchors.json, with anchors), else the library's DEFAULT_ERASE_SCALE."),
    gate: Optional[bool] = typer.Option(
        None, "--gate/--no-gate", help="Presence gating: suppress only where the image attends to the concept. "
        "Default: the library's DEFAULT_GATE."),
    concept_context: Optional[str] = typer.Option(
        None, "--concept-context", help="separate (concepts encoded alone) or prompt (encoded after the prompt, "
        "as the authors' code; stronger on implicit prompts). Default: the library's DEFAULT_CONCEPT_CONTEXT."),
    anchor: Optional[list[str]] = typer.Option(
        None, "--anchor", help="A concept of the erased one's kind (repeat; e.g. the other colours when erasing "
        "'red'): also projects the concept out of the prompt's tokens (the padding included), where implied concepts "
        "live. 'auto': the model folder's eiup_anchors.json; 'none': off. Default: the library's DEFAULT_ANCHORS."),
    anchor_strength: Optional[str] = typer.Option(
        None, "--anchor-strength", help="Strength of the anchored token projection, in (0, 8], or 'auto': predicted "
        "per prompt by the model's calibrated strength predictors (eiup_strength_predictors/, `eiup calibrate --target "
        "strength`). Default: the model's preset for the concept (eiup_anchors.json), else the library's "
        "DEFAULT_ANCHOR_STRENGTH."),
    protect: Optional[list[str]] = typer.Option(
        None, "--protect", help="A value of another attribute the anchored projection must keep (repeat, two or more; "
        "e.g. the colours when erasing star); 'none': nothing. Default: the model's preset (eiup_anchors.json)."),
    in_context: Optional[bool] = typer.Option(
        None, "--in-context/--no-in-context", help="Also project prompts that imply the concept along in-context "
        "anchors (the implying word replaced by the concept and each anchor). Default: the model's preset "
        "(eiup_anchors.json), else off."),
    region: Optional[bool] = typer.Option(
        None, "--region/--no-region", help="Project only where the image attends to the word that names or implies "
        "the concept (for concepts of an object: the prompt's other objects keep theirs). Default: the model's preset "
        "(eiup_anchors.json), else off."),
    region_rule: Optional[str] = typer.Option(
        None, "--region-rule", help="How --region finds the concept's region: 'map' (the word's attention map) or "
        "'phrases' (its phrase's share against the prompt's other phrases that name a thing, split at 'and' and "
        "commas; a prompt of one such phrase is projected everywhere). Implies --region. Default: the model's preset, else 'map'."),
    anchor_gate: bool = typer.Option(
        True, "--anchor-gate/--no-anchor-gate", help="Project only prompts that name or imply the concept (the "
        "model's prompt probe, else the nearest anchor)."),
    prompt_gate: bool = typer.Option(
        True, "--prompt-gate/--no-prompt-gate", help="Apply the concept term only to prompts that name the concept "
        "or, by the model's prompt probe (eiup fit-gate), imply it; other prompts come out as without erasure."),
    guard: Optional[str] = typer.Option(
        None, "--guard", help="Closed-loop erasure: check each erased image and generate it again from the same noise "
        "at the next --guard-ladder strength while the concept is still seen. 'auto' (the model folder's guard, "
        "eiup_guard.safetensors: the toy model ships a detector trained apart from the one that judges; none elsewhere), "
        "'none', 'nudenet', or 'package.module:function' (images -> list[bool]). Replaces --anchor-strength; the "
        "manifest records each image's strength and whether the guard still flags it. Default: the library's "
        "DEFAULT_GUARD ('auto', off where --anchor-strength is given)."),
    guard_ladder: Optional[str] = typer.Option(
        None, "--guard-ladder", help="The strengths --guard climbs, comma-separated and increasing. "
        "Default: 0.5,0.75,1,1.25,1.5,2 (eiup.guard.DEFAULT_LADDER)."),
    guard_negative_prompt: bool = typer.Option(
        True, "--guard-negative-prompt/--no-guard-negative-prompt", help="The guard's last resort: an image still "
        "flagged (or harmed) at the end of its walk is drawn again without the erasure, with the concepts as negative "
        "prompt, at 1, 1.5 and 2 times --guidance in turn, and keeps the first draw the guard finds clean and "
        "unharmed, else the best (manifest: outcome.negative_prompt)."),
    allow_amplify: bool = typer.Option(False, "--allow-amplify", help="Allow a positive --scale (amplifies the concepts)."),
    mode: Optional[str] = typer.Option(
        None, "--mode", help="single (fast, one branch) or dual (the paper's: keeps the original layout, ~2x cost). "
        "Default: the library's DEFAULT_ERASE_MODE."),
    model: Optional[str] = typer.Option(
        None, "--model", help="A diffusers SD 1.x/2.x/XL folder or hub id. Default: the bundled toy model."),
    seed: int = typer.Option(0, "--seed", help="Seed of a prompt's first image; image k uses seed + k."),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    guidance: float = typer.Option(7.5, "--guidance", help="Classifier-free guidance scale."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt for every image."),
    images_per_prompt: int = typer.Option(1, "--images-per-prompt", help="Images per prompt."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per pipeline call (does not change the images)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda. Default: cuda if available."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", file_okay=False,
        help="Output folder; rerun with the same folder to resume. Default: outputs/<date-time>."),
    skip_bad_rows: bool = typer.Option(False, "--skip-bad-rows", help="Warn about bad CSV rows and go on without them."),
    ignore_erase_target: bool = typer.Option(
        False, "--ignore-erase-target", help="Ignore the CSV's erase_target column (e.g. for a no-erasure baseline)."),
    save_original: bool = typer.Option(
        False, "--save-original", help="Also save the un-erased image of each erased one as NAME-original.png."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate images with concepts erased (EIUP); one PNG per image plus run.json.

    Files are named CASE-K-seedSEED.png (CASE: the CSV case_number or the prompt position; K: the image index).

    run.json records every setting, the model, library versions and the image list; manifest.jsonl records each finished image, so rerunning the same command with the same --out completes an interrupted run without redoing finished images.
    """
    # ---- validate everything that needs no model (and no torch import)
    if prompt and prompts:
        raise _bad("give either --prompt or --prompts, not both", "--prompt")
    if not prompt and prompts is None:
        raise _bad("give at least one --prompt TEXT, or --prompts FILE.csv", "--prompt")
    if prompt and any(not p.strip() for p in prompt):
        raise _bad("empty prompt", "--prompt")
    concepts: list[str] = []
    for c in erase or []:
        if not c.strip():
            raise _bad("empty concept", "--erase")
        concepts.append(" ".join(c.split()))
    concepts = list(dict.fromkeys(concepts))
    if scale is not None and scale.strip().lower() == "auto":
        scale = "auto"
    elif scale is not None:
        try:
            scale = float(scale)
        except ValueError:
            raise _bad(f"{scale!r} is neither a number nor 'auto'", "--scale") from None
        if not math.isfinite(scale):
            raise _bad(f"{scale} is not a finite number", "--scale")
        if abs(scale) > 100:
            raise _bad(f"{scale} is beyond +-100, which only destroys the image; useful scales lie between "
                       "about -0.5 and -8", "--scale")
        if scale > 0 and not allow_amplify:
            raise _bad(f"{scale} > 0 would amplify the concepts instead of erasing them; use a negative scale, "
                       "or pass --allow-amplify if amplifying is what you want", "--scale")
    if mode is not None:
        mode = mode.strip().lower()
        if mode not in MODES:
            raise _bad(f"{mode!r} is not one of {', '.join(MODES)}", "--mode")
    if concept_context is not None and concept_context not in ("separate", "prompt"):
        raise _bad(f"{concept_context!r} is not one of separate, prompt", "--concept-context")
    anchors = tuple(a.strip() for a in anchor or ())
    if len(anchors) > 1 and {"auto", "none"} & {a.lower() for a in anchors}:
        raise _bad("'auto' and 'none' stand alone; give either them or a list of words", "--anchor")
    if any(not a for a in anchors):
        raise _bad("an empty anchor; give a concept of the erased one's kind, e.g. --anchor blue", "--anchor")
    protected = tuple(p.strip() for p in protect) if protect else None  # none given: the model's preset
    if protected is not None:
        if [p.lower() for p in protected] == ["none"]:
            protected = ()
        elif len(protected) < 2 or not all(protected) or "none" in {p.lower() for p in protected}:
            raise _bad("give two or more words of the attribute to keep (their differences are protected), "
                       "e.g. --protect red --protect orange, or --protect none", "--protect")
    strength: float | str | None = None
    if anchor_strength is not None and anchor_strength.strip().lower() == "auto":
        strength = "auto"
    elif anchor_strength is not None:
        from eiup.config import MAX_ANCHOR_STRENGTH

        try:
            strength = float(anchor_strength)
        except ValueError:
            raise _bad(f"{anchor_strength!r}: give a number in (0, {MAX_ANCHOR_STRENGTH:g}] or auto",
                       "--anchor-strength") from None
        if not (math.isfinite(strength) and 0 < strength <= MAX_ANCHOR_STRENGTH):
            raise _bad(f"{anchor_strength} is outside (0, {MAX_ANCHOR_STRENGTH:g}]; 1 removes the concept from the "
                       "prompt tokens", "--anchor-strength")
    ladder = None
    if guard is not None:
        guard = guard.strip()
        if guard not in ("auto", "none", "nudenet") and ":" not in guard:
            raise _bad(f"{guard!r}: use auto, none, nudenet or package.module:function", "--guard")
        if strength is not None and guard != "none":
            raise _bad("--guard chooses each image's strength from --guard-ladder; drop --anchor-strength", "--guard")
    if guard_ladder is not None:
        from eiup.guard import check_ladder
        from eiup.config import MAX_ANCHOR_STRENGTH

        if guard == "none" or (guard is None and strength is not None):
            raise _bad("--guard-ladder is the strengths a guard climbs, and this run has none", "--guard-ladder")
        try:
            ladder = check_ladder([v for v in guard_ladder.split(",") if v.strip()], MAX_ANCHOR_STRENGTH)
        except ValueError as e:
            raise _bad(str(e).replace("guard_ladder=", ""), "--guard-ladder") from None
    if steps < 1:
        raise _bad(f"{steps} < 1", "--steps")
    if not math.isfinite(guidance) or guidance < 0:
        raise _bad(f"{guidance} must be a finite number >= 0", "--guidance")
    if not 0 <= seed <= prompt_csv.MAX_SEED:
        raise _bad(f"{seed} is outside [0, 2**64)", "--seed")
    if images_per_prompt < 1:
        raise _bad(f"{images_per_prompt} < 1", "--images-per-prompt")
    if batch_size < 1:
        raise _bad(f"{batch_size} < 1", "--batch-size")
    if device is not None:
        device = device.strip().lower()
        if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise _bad(f"{device!r} is not cpu or cuda", "--device")
    out_given = out is not None
    if out is None:
        out = Path("outputs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    elif out.exists() and not out.is_dir():
        raise _bad(f"{out} exists and is not a folder", "--out")
    if negative_prompt is not None and not negative_prompt.strip():
        negative_prompt = None

    if prompts is not None:
        def warn_row(bad: prompt_csv.BadRow) -> None:
            typer.echo(f"Warning: {prompts}: skipping {bad}", err=True)

        try:
            rows = prompt_csv.read_prompt_csv(prompts, skip_bad_rows=skip_bad_rows, on_bad_row=warn_row)
        except prompt_csv.PromptFileError as e:
            raise _bad(str(e), "--prompts") from None
    else:
        rows = prompt_csv.rows_from_prompts(prompt or [])

    # ---- the model: checked from its configs, without loading weights
    from eiup import models

    try:
        info = models.inspect_model(model)
    except models.ModelLoadError as e:
        raise _bad(str(e), "--model") from None
    if info.source == "bundled":
        typer.echo("Using the bundled toy model (64x64 synthetic shapes). For real images: "
                   "--model /path/to/stable-diffusion-v1-5 or a hub id (with a GPU).", err=True)
    if device is None:
        device = models.default_device()
    elif device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise _bad("CUDA is not available on this machine; use --device cpu", "--device")

    if region_rule is not None:
        from eiup.config import REGION_RULES

        if region_rule not in REGION_RULES:
            raise _bad(f"--region-rule {region_rule!r} is unknown; use one of {', '.join(REGION_RULES)}", "--region-rule")
        if region is False:
            raise _bad("--region-rule confines the projection, which --no-region turns off; drop one of them",
                       "--region-rule")
        region = region_rule
    _, default_mode, default_gate, default_context, default_anchors = _library_defaults()
    if guard is None:
        from eiup.config import DEFAULT_GUARD

        guard = "none" if strength is not None else DEFAULT_GUARD
    if not anchors:
        anchors = default_anchors
    elif anchors[0].lower() in ("auto", "none"):
        anchors = () if anchors[0].lower() == "none" else ("auto",)
    settings = generation.GenerationSettings(
        model=info.location, steps=steps, guidance=guidance, seed=seed, erase=tuple(concepts),
        scale=scale, mode=mode or default_mode,  # None: the library's default (a model preset, else DEFAULT_ERASE_SCALE)
        gate=default_gate if gate is None else ("presence" if gate else None),
        concept_context=concept_context or default_context,
        anchors=anchors, anchor_strength=strength, anchor_protect=protected, anchor_in_context=in_context,
        anchor_region=region, anchor_gate=anchor_gate,
        prompt_gate=prompt_gate, guard=guard, guard_ladder=ladder, guard_negative_prompt=guard_negative_prompt,
        negative_prompt=negative_prompt, images_per_prompt=images_per_prompt,
        save_original=save_original, use_row_erase=not ignore_erase_target, allow_amplify=allow_amplify,
    )
    try:
        jobs = generation.plan_jobs(rows, settings)
    except ValueError as e:
        raise _bad(str(e), "--seed") from None
    if guard not in ("auto", "none") and not settings.anchors:
        raise _bad("--guard climbs the anchored projection's strength; drop --anchor none", "--guard")
    if save_original and not any(j.erase for j in jobs):
        typer.echo("Warning: --save-original has no effect without concepts to erase.", err=True)

    # ---- the output folder: refuse conflicts and skip finished work before loading the model
    try:
        with generation.OutputDir(out) as od:
            todo = od.pending(jobs, settings)
    except generation.OutputDirError as e:
        raise _fail(str(e))
    except OSError as e:
        raise _bad(f"cannot use {out}: {e}", "--out") from None
    done = len(jobs) - len(todo)
    typer.echo(f"{len(jobs)} image(s) into {out}" + (f" ({done} already done)" if done else "")
               + ("" if out_given else f" (if interrupted, rerun with --out {out} to resume)"), err=True)
    if not todo:
        typer.echo(f"Nothing to do: all {len(jobs)} images are in {out}.", err=True)
        return

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # loading bars; ours counts images
    transformers_logging.disable_progress_bar()
    try:
        pipe = models.load_pipeline(info, device=device)
    except models.ModelLoadError as e:
        raise _fail(str(e))
    extra = {
        "model": info.as_dict(),
        "device": str(device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "pipeline_class": type(pipe).__name__,
        "prompts_file": str(prompts.resolve()) if prompts is not None else None,
        "command": sys.argv,
    }
    try:
        report = generation.generate_to_dir(pipe, jobs, out, settings, batch_size=batch_size, progress=progress,
                                     extra_record=extra)
    except (generation.GenerationError, generation.OutputDirError) as e:
        raise _fail(str(e))
    except KeyboardInterrupt:
        raise _fail(f"interrupted; rerun the same command to finish (finished images are kept in {out})", 130)
    typer.echo(f"Generated {report.generated}, skipped {report.skipped} already done: {report.total} images in "
               f"{out} (settings: {out / generation.RUN_RECORD_NAME})", err=True)
    flagged = [r["file"] for r in report.record["images"] if (r.get("outcome") or {}).get("guard_flagged")]
    if flagged:
        typer.echo(f"Warning: the guard still sees an erased concept in {len(flagged)} image(s) at the ladder's top "
                   f"(or where the prompt gate left the prompt alone): {', '.join(flagged[:5])}"
                   f"{' ...' if len(flagged) > 5 else ''} (manifest: outcome.guard_flagged)", err=True)
