"""`eiup calibrate`: fit the automatic-scale (or automatic anchor-strength) predictor of one concept for one model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import check_sampling


def calibrate(
    concept: Annotated[str, typer.Option(help="Concept to calibrate, e.g. red (toy) or nudity.")],
    target: Annotated[str, typer.Option(help="What to predict: scale (the concept term's, erase_scale='auto') or strength (the anchored projection's, anchor_strength='auto', calibrated with the library's other defaults).")] = "scale",
    prompts: Annotated[Path | None, typer.Option(help="Calibration prompts: text file (one per line) or CSV with a prompt column. Include prompts WITHOUT the concept too. Default for toy concepts: the held-out calibration prompts.")] = None,
    model: Annotated[str | None, typer.Option(help="Pipeline folder (default: the bundled toy model).")] = None,
    detector: Annotated[str, typer.Option(help="Judge of 'concept still present': toy, nudenet, or package.module:function (images -> list of bool).")] = "toy",
    seeds: Annotated[int, typer.Option(help="Seeds per prompt.")] = 8,
    first_seed: Annotated[int, typer.Option(help="First seed (keep calibration seeds apart from benchmark seeds: the toy benchmark uses 0-19, its held-out sets 4000-4005 and 5000-5005).")] = 7000,
    grid: Annotated[str | None, typer.Option(help="Values tried, mild to strong: scales starting at 0 (default 0,-2,-4,-8,-16,-32), or positive strengths (default 0.5,0.75,1,1.25,1.5,2).")] = None,
    mode: Annotated[str, typer.Option(help="Erase mode to calibrate for (single or dual; use the same at inference).")] = "single",
    concept_context: Annotated[str, typer.Option(help="Concept encoding to calibrate for: separate or prompt (use the same at inference).")] = "prompt",
    gate: Annotated[bool, typer.Option("--gate/--no-gate", help="Calibrate with presence gating (use the same at inference).")] = False,
    anchor: Annotated[list[str] | None, typer.Option(help="Anchors used while calibrating (repeat, or 'auto'); default none: the scale of the concept term alone.")] = None,
    unerasable: Annotated[str, typer.Option(help="Target of samples no grid scale erases: spare (0, leave them alone) or strongest (the grid's strongest scale).")] = "spare",
    coverage: Annotated[float, typer.Option(help="--target strength: the share of calibration samples whose predicted strength must reach their mildest erasing one (cross-validated).")] = 0.95,
    steps: int = 25,
    guidance: float = 7.5,
    out: Annotated[Path | None, typer.Option(help="Predictor file (default: MODEL/eiup_scale_predictors/CONCEPT.safetensors, or eiup_strength_predictors/ for --target strength).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
) -> None:
    """Find, per prompt and seed, the mildest scale (or anchor strength) that removes the concept, and
    fit the predictor that `erase_scale="auto"` (or `anchor_strength="auto"`) uses."""
    import math

    from ..calibrate import UNERASABLE, calibrate as run, load_judge, read_prompt_lines
    from ..strength import DEFAULT_STRENGTH_GRID

    if target not in ("scale", "strength"):
        raise typer.BadParameter(f"{target!r}: use scale or strength", param_hint="--target")
    if grid is None:
        grid = "0,-2,-4,-8,-16,-32" if target == "scale" else ",".join(f"{v:g}" for v in DEFAULT_STRENGTH_GRID)
    try:
        grid_values = [float(v) for v in grid.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{grid!r}: comma-separated numbers, e.g. 0,-1,-2", param_hint="--grid") from e
    if target == "scale" and (not grid_values or grid_values[0] != 0 or any(v > 0 for v in grid_values)):
        raise typer.BadParameter("start at 0 and go negative, e.g. 0,-1,-2,-4", param_hint="--grid")
    if target == "strength":
        if not grid_values or not all(math.isfinite(v) and 0 < v <= 8 for v in grid_values):
            raise typer.BadParameter("strengths in (0, 8], mild to strong, e.g. 0.5,1,1.5,2", param_hint="--grid")
        if not 0 < coverage < 1:
            raise typer.BadParameter(f"{coverage} must be in (0, 1), e.g. 0.95", param_hint="--coverage")
        scale_only = {"--mode": mode != "single", "--gate": gate, "--anchor": anchor is not None,
                      "--unerasable": unerasable != "spare", "--concept-context": concept_context != "prompt"}
        if any(scale_only.values()):
            raise typer.BadParameter("is for --target scale; the strength is calibrated with the library's defaults",
                                     param_hint=next(k for k, v in scale_only.items() if v))
    if not concept.strip():
        raise typer.BadParameter("give a concept", param_hint="--concept")
    check_sampling(steps, guidance)
    if mode not in ("single", "dual"):
        raise typer.BadParameter(f"{mode!r}: use single or dual", param_hint="--mode")
    if concept_context not in ("separate", "prompt"):
        raise typer.BadParameter(f"{concept_context!r}: use separate or prompt", param_hint="--concept-context")
    if unerasable not in UNERASABLE:
        raise typer.BadParameter(f"{unerasable!r}: use {' or '.join(UNERASABLE)}", param_hint="--unerasable")
    if prompts is not None and not prompts.is_file():
        raise typer.BadParameter(f"{prompts}: no such file", param_hint="--prompts")
    if prompts is None:
        if detector != "toy":
            raise typer.BadParameter("give calibration prompts for non-toy concepts", param_hint="--prompts")
        from ..bench.suites import calibration_negatives, calibration_prompts, strength_prompts
        from ..toy.world import CONCEPTS

        if concept not in CONCEPTS:
            raise typer.BadParameter(f"{concept!r} is no toy concept ({', '.join(CONCEPTS)}): give --prompts",
                                     param_hint="--concept")
        prompt_list = (strength_prompts(concept) if target == "strength"
                       else calibration_prompts(concept) + calibration_negatives(concept))
    else:
        prompt_list = read_prompt_lines(prompts)
    try:
        judge = load_judge(detector, concept)
    except (ValueError, ImportError, AttributeError) as e:
        raise typer.BadParameter(str(e), param_hint="--detector") from e

    from ..models import load_pipeline

    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    seed_list = list(range(first_seed, first_seed + seeds))
    if target == "strength":
        from ..strength import calibrate_strength

        try:
            pred, path, _ = calibrate_strength(pipe, concept.strip(), prompt_list, judge, seed_list, steps, guidance,
                                               grid_values, out, coverage)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--prompts") from e
        typer.echo(json.dumps({"predictor": str(path), **pred.info}, indent=2))
        return
    pred, path = run(pipe, concept.strip(), prompt_list, judge, seed_list, steps,
                     guidance, grid_values, "presence" if gate else None, out, mode=mode,
                     concept_context=concept_context, anchors="auto" if anchor == ["auto"] else tuple(anchor or ()),
                     unerasable=unerasable)
    typer.echo(json.dumps({"predictor": str(path), **{k: v for k, v in (pred.info or {}).items() if k != "prompts"}}, indent=2))
