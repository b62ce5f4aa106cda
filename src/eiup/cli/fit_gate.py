"""`eiup fit-gate`: fit the prompt probes that decide which prompts the anchored projection edits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import check_sampling


def fit_gate(
    concept: Annotated[list[str], typer.Option(help="Concept(s) to fit a probe for (repeat), e.g. red (toy) or nudity.")],
    prompts: Annotated[Path | None, typer.Option(help="Training prompts: text file (one per line) or CSV with a prompt column, with and without the concepts. Default for toy concepts: random toy-world captions that are in no benchmark.")] = None,
    n_prompts: Annotated[int, typer.Option(help="Number of default toy prompts.", min=4)] = 600,
    model: Annotated[str | None, typer.Option(help="Pipeline folder (default: the bundled toy model).")] = None,
    detector: Annotated[str, typer.Option(help="Judge of 'concept present': toy, nudenet, or package.module:function (images -> list of bool).")] = "toy",
    seeds: Annotated[int, typer.Option(help="Seeds per prompt (the label is the share of seeds showing the concept).", min=1)] = 2,
    first_seed: Annotated[int, typer.Option(help="First seed (keep these apart from benchmark seeds).")] = 7000,
    steps: int = 25,
    guidance: float = 7.5,
    out: Annotated[Path | None, typer.Option(help="Folder for the probes (default: MODEL/eiup_prompt_probes/).")] = None,
    probe: Annotated[str, typer.Option(help="auto (a logistic regression, or a 16-unit MLP where 5-fold cross-validation finds it a point better), logistic or mlp.")] = "auto",
    device: Annotated[str | None, typer.Option(help="cpu or cuda.")] = None,
) -> None:
    """Generate every prompt without erasure, let the detector judge each concept, and fit one
    prompt probe per concept (the anchored projection's gate, used by default when the model has one)."""
    from ..calibrate import load_judge, read_prompt_lines
    from ..probe import fit_gate as run

    check_sampling(steps, guidance)
    concepts = [c.strip() for c in concept]
    if not all(concepts):
        raise typer.BadParameter("give non-empty concepts", param_hint="--concept")
    from ..probe import PROBE_KINDS

    if probe not in PROBE_KINDS:
        raise typer.BadParameter(f"{probe!r}: give one of {', '.join(PROBE_KINDS)}", param_hint="--probe")
    if prompts is not None and not prompts.is_file():
        raise typer.BadParameter(f"{prompts}: no such file", param_hint="--prompts")
    if prompts is None:
        if detector != "toy":
            raise typer.BadParameter("give training prompts for non-toy concepts", param_hint="--prompts")
        from ..bench.suites import gate_prompts

        prompt_list = gate_prompts(n_prompts)
    else:
        prompt_list = read_prompt_lines(prompts)
    try:
        judges = {c: load_judge(detector, c) for c in concepts}
    except (ValueError, ImportError, AttributeError) as e:
        raise typer.BadParameter(str(e), param_hint="--detector") from e

    from ..models import load_pipeline

    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    try:
        fitted = run(pipe, judges, prompt_list, list(range(first_seed, first_seed + seeds)), steps, guidance, out, probe)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--prompts") from e
    typer.echo(json.dumps([{"concept": p.concept, "probe": str(path), **p.info} for p, path in fitted], indent=2))
