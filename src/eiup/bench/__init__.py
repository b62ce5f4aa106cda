"""The benchmark: erasure, fidelity and specificity of EIUP next to the field's baselines, and image
quality (CLIP score, FID, PSNR/SSIM against plain images) on COCO captions."""

from __future__ import annotations

from pathlib import Path

from .baselines import Method, default_methods, parse_method
from .metrics import QualityOptions, check_quality
from .suites import Suite, toy_suites


def run_benchmark(pipe, detector, suites: list[Suite], methods: list[Method], out: str | Path, steps: int = 25,
                  guidance: float = 7.5, settings: dict | None = None, grid_methods: list[str] | None = None,
                  nudity=None, quality: QualityOptions | None = None) -> Path | None:
    """Generate (resumably, split across `accelerate launch` processes), judge, and write the report.

    `nudity` (a `NudityJudge`) judges I2P suites; `quality` gives the CLIP model and FID reference
    images for COCO suites (without it they get PSNR/SSIM and speed only).

    Returns the HTML index on the main process, None on the others.
    """
    from accelerate import PartialState

    from .report import write_report
    from .runner import evaluate, run_units, units_for

    if quality is not None:
        check_quality(quality)  # missing CLIP/FID files fail now, not after generating
    out = Path(out)
    if not any(m.family == "plain" for m in methods):
        methods = [Method("plain")] + list(methods)  # specificity is measured against plain images
    import torch

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes (torchrun) share work over gloo
    units = units_for(suites, methods)
    run_units(pipe, detector, units, out, steps, guidance, state.process_index, state.num_processes)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    metrics = evaluate(detector, units, out, nudity, quality)
    settings = dict(settings or {}, steps=steps, guidance=guidance, processes=state.num_processes)
    names = grid_methods or [m.name for m in methods]
    return write_report(out, metrics, units, settings, names)


__all__ = ["Method", "QualityOptions", "Suite", "default_methods", "parse_method", "run_benchmark", "toy_suites"]
