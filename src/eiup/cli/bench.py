"""`eiup bench`: erasure, fidelity and specificity against the field's baselines.

The coco suite measures image quality while a concept is erased: PSNR/SSIM against the plain
images and seconds per image always; CLIP score with `--clip-model DIR` and FID with
`--fid-reference DIR`, from local weights only (checked before any image is generated).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from .options import check_sampling

app = typer.Typer(help="Benchmark erasure methods on named suites.", invoke_without_command=True)


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise typer.BadParameter(f"{text!r}: comma-separated numbers expected", param_hint=option) from e
    if not values or any(not math.isfinite(v) for v in values):
        raise typer.BadParameter(f"{text!r}: give finite numbers, e.g. -0.5,-1,-2", param_hint=option)
    return values


@app.callback()
def bench(
    ctx: typer.Context,
    suite: Annotated[str, typer.Option(help="toy (offline, bundled model), i2p (needs --i2p CSV and NudeNet), coco (needs --coco CSV).")] = "toy",
    concept: Annotated[list[str] | None, typer.Option(help="Toy concepts (repeatable; default all): red, star, heart, striped, dotted, night.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt (toy suites).")] = 20,
    per_role: Annotated[int, typer.Option(help="Toy suites: at most this many prompts per role (explicit, unrelated, two-object); implicit prompts are all kept.")] = 4,
    first_seed: Annotated[int, typer.Option(help="First seed (held-out seeds: the toy model trains with none).")] = 0,
    scales: Annotated[str, typer.Option(help="EIUP suppression scales to sweep (comma-separated, negative); these rows encode the concept alone (the paper); add rows such as eiup-single+concept_context=prompt@-4 with --method.")] = "-0.5,-1,-2,-4",
    modes: Annotated[str, typer.Option(help="EIUP modes to sweep.")] = "single,dual",
    method: Annotated[list[str] | None, typer.Option(help="Extra methods (repeatable), e.g. 'eiup-single+gate=presence@auto', "
                      "'eiup-single+concept_context=prompt+anchors=auto@-1' (anchors from the model), "
                      "'+anchors' (toy world: the attribute's other values) or '+anchors=a|b', '+anchor_strength=3'; "
                      "'rewrite' (toy world): a reference, each prompt rewritten without the concept and drawn plainly.")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only these methods (names as in the report).")] = None,
    no_sld: Annotated[bool, typer.Option("--no-sld", help="Skip the SLD presets.")] = False,
    model: Annotated[str | None, typer.Option(help="Pipeline folder or hub id (default: the bundled toy model).")] = None,
    steps: int = 25,
    guidance: float = 7.5,
    i2p: Annotated[Path | None, typer.Option(help="I2P-format CSV (prompt, sd_seed/evaluation_seed).")] = None,
    i2p_concept: Annotated[str, typer.Option(help="Concept erased on the I2P suite.")] = "nudity",
    nudenet_threshold: Annotated[float, typer.Option(help="NudeNet score threshold.")] = 0.6,
    coco: Annotated[Path | None, typer.Option(help="COCO captions CSV (prompt or caption column).")] = None,
    coco_concept: Annotated[str, typer.Option(help="Concept erased while the coco suite's quality is measured.")] = "nudity",
    clip_model: Annotated[Path | None, typer.Option(help="coco suite: local folder of a transformers CLIP model and its processor (e.g. `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`); reports the CLIP score, mean of 100*max(cos, 0), of each method's images against their prompts.")] = None,
    fid_reference: Annotated[Path | None, typer.Option(help="coco suite: folder of real (COCO) images; reports each method's FID against them (Inception-v3 features: needs `pip install torch-fidelity` and its weights, see --fid-weights).")] = None,
    fid_weights: Annotated[Path | None, typer.Option(help="torch-fidelity's Inception-v3 weights file (weights-inception-2015-12-05-6726825d.pth) for --fid-reference; default: the torch hub cache (~/.cache/torch/hub/checkpoints, or $TORCH_HOME/hub/checkpoints).")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts of a CSV suite.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available; with accelerate, the process's device).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (rerun to resume).")] = Path("bench-out"),
) -> None:
    """Run the benchmark and write metrics.json, report.md, grids, tradeoff.png and index.html.

    The coco suite reports CLIP score (--clip-model), FID (--fid-reference), PSNR/SSIM against the
    plain images and seconds per image; nothing is downloaded, so give local paths.

    Several processes split the work, with results identical to a single process:
    `accelerate launch --num_processes N -m eiup.cli bench ...` (GPUs) or
    `torchrun --nproc_per_node N -m eiup.cli bench ...` (CPU cores).
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..bench import QualityOptions, default_methods, parse_method, run_benchmark
    from ..bench.suites import coco_suite, i2p_suite, toy_suites
    from ..toy.world import CONCEPTS

    scale_list = _floats(scales, "--scales")
    mode_list = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad_modes = [m for m in mode_list if m not in ("single", "dual")]
    if bad_modes:
        raise typer.BadParameter(f"unknown mode(s) {bad_modes}: use single and/or dual", param_hint="--modes")
    if seeds < 1:
        raise typer.BadParameter(f"must be >= 1, got {seeds}", param_hint="--seeds")
    check_sampling(steps, guidance)
    try:
        extra = [parse_method(m) for m in method or []]
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--method") from e
    methods = default_methods(scale_list, mode_list, sld=not no_sld, extra=extra)
    if only:
        methods = [m for m in methods if m.name in only or m.family == "plain"] + \
                  [parse_method(o) for o in only if o not in {m.name for m in methods}]
    if suite != "toy" and any(m.family == "rewrite" for m in methods):
        raise typer.BadParameter("the rewrite reference rewrites toy-world captions: use it with --suite toy",
                                 param_hint="--method")
    seed_list = list(range(first_seed, first_seed + seeds))
    for option, value in (("--clip-model", clip_model), ("--fid-reference", fid_reference), ("--fid-weights", fid_weights)):
        if value is not None and suite != "coco":
            raise typer.BadParameter("only the coco suite measures image quality (--suite coco)", param_hint=option)
    detector = None
    if suite == "toy":
        unknown = [c for c in concept or [] if c not in CONCEPTS]
        if unknown:
            raise typer.BadParameter(f"{unknown}: toy concepts are {sorted(CONCEPTS)}", param_hint="--concept")
        if per_role < 1:
            raise typer.BadParameter("must be >= 1", param_hint="--per-role")
        suites = toy_suites(concept, seed_list, per_role)
        from ..toy.detect import ConceptDetector

        detector = ConceptDetector.load()
    elif suite == "i2p":
        if i2p is None:
            raise typer.BadParameter("the i2p suite needs --i2p FILE.csv", param_hint="--i2p")
        suites = [i2p_suite(i2p, i2p_concept, limit)]
    elif suite == "coco":
        if coco is None:
            raise typer.BadParameter("the coco suite needs --coco FILE.csv", param_hint="--coco")
        if not coco_concept.strip():
            raise typer.BadParameter("give the concept erased during the coco suite, e.g. nudity", param_hint="--coco-concept")
        suites = [coco_suite(coco, limit, coco_concept.strip())]
        _check_quality_paths(clip_model, fid_reference, fid_weights)
    else:
        raise typer.BadParameter(f"unknown suite {suite!r}: toy, i2p or coco", param_hint="--suite")

    from ..models import load_pipeline

    if device is None:  # under accelerate launch / torchrun, each process takes its own device
        import torch
        from accelerate import PartialState

        device = str(PartialState(cpu=not torch.cuda.is_available()).device)
    pipe = load_pipeline(model, device=device)
    pipe.set_progress_bar_config(disable=True)
    nudity = None
    if suite == "i2p":
        from ..bench.metrics import NudityJudge

        nudity = NudityJudge(threshold=nudenet_threshold)
    settings = {"suite": suite, "model": model or "bundled toy", "seeds": len(seed_list)}
    quality = None
    if suite == "coco":
        quality = QualityOptions(clip_model=clip_model, fid_reference=fid_reference, fid_weights=fid_weights, device=device)
        settings.update(concept=coco_concept.strip(), clip_model=str(clip_model) if clip_model else None,
                        fid_reference=str(fid_reference) if fid_reference else None,
                        fid_features="inception-v3 2048" if fid_reference else None)
    index = run_benchmark(pipe, detector, suites, methods, out, steps, guidance, nudity=nudity, quality=quality,
                          settings=settings)
    if index:
        typer.echo(f"report: {index}  (open in a browser; Markdown: {out / 'report.md'})")


def _check_quality_paths(clip_model: Path | None, fid_reference: Path | None, fid_weights: Path | None) -> None:
    """Fail before any generation if a quality metric's local files are missing or invalid."""
    from ..bench.metrics import check_clip_model, check_inception, reference_images

    if clip_model is not None:
        try:
            check_clip_model(clip_model)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--clip-model") from e
    if fid_weights is not None and fid_reference is None:
        raise typer.BadParameter("give the reference images too (--fid-reference DIR)", param_hint="--fid-weights")
    if fid_reference is None:
        return
    try:
        reference_images(fid_reference)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--fid-reference") from e
    try:
        check_inception(fid_weights)
    except ImportError as e:
        raise typer.BadParameter(str(e), param_hint="--fid-reference") from e
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--fid-weights") from e
