"""Checks of the sampling options that several commands share (before any model is loaded)."""

from __future__ import annotations

import math

import typer


def check_sampling(steps: int, guidance: float) -> None:
    """Refuse a step count under 1 and a guidance scale that is not a finite number >= 0, naming the option."""
    if steps < 1:
        raise typer.BadParameter(f"must be >= 1, got {steps}", param_hint="--steps")
    if not math.isfinite(guidance) or guidance < 0:
        raise typer.BadParameter(f"must be a finite number >= 0 (e.g. 7.5), got {guidance}", param_hint="--guidance")
