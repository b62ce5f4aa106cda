"""The `eiup` command line: `eiup generate`, `eiup toy ...`, `eiup bench ...`.

Heavy imports (torch, diffusers) happen inside commands, so `eiup --help` and argument errors
are fast.
"""

from __future__ import annotations

import typer

from . import bench, toy
from .calibrate import calibrate
from .fit_gate import fit_gate
from .generate import generate

app = typer.Typer(
    name="eiup",
    help="Erase concepts from Stable Diffusion images at inference time (EIUP, arXiv 2408.01014).",
    no_args_is_help=True,
    add_completion=False,
)
app.command("generate")(generate)
app.command("calibrate")(calibrate)
app.command("fit-gate")(fit_gate)
app.add_typer(toy.app, name="toy")
app.add_typer(bench.app, name="bench")


def main() -> None:
    app()


__all__ = ["app", "main"]
