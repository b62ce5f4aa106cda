"""`eiup toy ...`: train, inspect and measure the bundled toy-world model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from .options import check_sampling

app = typer.Typer(help="The bundled toy-world model: train it, detect concepts, report its quality.", no_args_is_help=True)

WEIGHTS = Path(__file__).resolve().parent.parent / "toy" / "weights"


class ToyDefaults:
    """Training defaults shown in --help without importing torch at CLI start-up."""

    localisation_weight = 0.03
    lr = 3e-4
    long_caption_prob = 0.1
    batch = 64


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any work."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise typer.BadParameter(f"{device!r} is not a device; use cpu or cuda[:N]", param_hint="--device")
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise typer.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Work folder (data, checkpoints); rerun to resume.")] = Path("runs/toy"),
    minutes: Annotated[float, typer.Option(help="UNet + text encoder training time budget (minutes of steps).")] = 55.0,
    vae_minutes: Annotated[float, typer.Option(help="VAE training time budget.")] = 30.0,
    vae_mark_weight: Annotated[float, typer.Option(
        help="Extra VAE loss on the pixels of dots and stripes (0: none). Fine-tuning the bundled VAE with 4 "
             "kept 81% of the dots' contrast through the round trip, against 28% (docs/experiments/dots.md).")] = 0.0,
    decoder_minutes: Annotated[float, typer.Option(
        help="Then the VAE's decoder alone, on whole images (0 skips; see docs/experiments/decoder.md).")] = 0.0,
    scenes: Annotated[int, typer.Option(help="Number of rendered training scenes.")] = 60_000,
    seed: int = 0,
    threads: Annotated[int, typer.Option(help="torch threads (1 avoids stalls when other work shares the CPU).")] = 1,
    export_to: Annotated[Path | None, typer.Option(help="Pipeline folder to write (default OUT/pipeline).")] = None,
    localisation_weight: Annotated[float, typer.Option(
        help="Weight of the token-localisation loss (next to the diffusion loss).")] = ToyDefaults.localisation_weight,
    lr: Annotated[float, typer.Option(help="Peak learning rate of the UNet + text encoder.")] = ToyDefaults.lr,
    long_caption_prob: Annotated[float, typer.Option(
        help="Share of captions padded with style words (teaches prompts longer than 77 tokens).")
    ] = ToyDefaults.long_caption_prob,
    batch: Annotated[int, typer.Option(help="UNet batch size (64 on a CPU; larger on a GPU).")] = ToyDefaults.batch,
    device: Annotated[str, typer.Option(
        help="cpu, or cuda[:N]: the VAE and UNet stages train there (rendering uses --threads processes).")] = "cpu",
    init_from: Annotated[Path | None, typer.Option(
        help="Train on from this toy pipeline folder: its VAE is kept (no VAE stage), its UNet and text encoder "
             "are the starting weights (a fresh optimizer, warm-up and cosine over --minutes).")] = None,
    latent_channels: Annotated[int | None, typer.Option(
        help="Latent channels of a new VAE (default 4, as SD 1.x; more keep stripes and dots through the 8x "
             "compression). With --init-from the pipeline's VAE has them.")] = None,
    unet_from: Annotated[Path | None, typer.Option(
        help="Start the UNet and text encoder from this toy pipeline folder's weights while training a new VAE "
             "(e.g. with more --latent-channels): its UNet's first and last convolutions are carried into the "
             "new latent space by a least-squares map between both VAEs' latents.")] = None,
    patterned_weight: Annotated[float, typer.Option(
        help="UNet batches draw scenes holding a striped or dotted object this many times more often (1: "
             "uniform).")] = 1.0,
    snr_gamma: Annotated[float, typer.Option(
        help="Min-SNR weighting of the diffusion loss: timesteps whose signal-to-noise ratio exceeds it weigh "
             "less (inf: the plain noise-prediction loss, low-noise steps, where fine texture is drawn, in full).")
    ] = 5.0,
    data_from: Annotated[Path | None, typer.Option(
        help="Reuse this earlier run's rendered scenes (its work folder; hard links, no copy) instead of rendering "
             "new ones, and its latents where its VAE is this run's (e.g. training on with --init-from its "
             "pipeline). --scenes must match its count.")] = None,
) -> None:
    """Train the toy Stable Diffusion pipeline from scratch (resumable; on the CPU unless --device cuda)."""
    _check_device(device)
    if batch < 2:
        raise typer.BadParameter("must be >= 2", param_hint="--batch")
    if init_from is not None and unet_from is not None:
        raise typer.BadParameter("--init-from keeps the pipeline's VAE, --unet-from trains a new one: pass one of them",
                                 param_hint="--unet-from")
    for folder, hint in ((init_from, "--init-from"), (unet_from, "--unet-from")):
        lacking = [p for p in ("unet/config.json", "text_encoder/config.json", "vae/config.json", "tokenizer")
                   if folder is not None and not (folder / p).exists()]
        if lacking:
            raise typer.BadParameter(f"{folder} is not a pipeline folder (no {', '.join(lacking)})", param_hint=hint)
    from ..toy.train import ToyTrainConfig, check_latent_channels, train_toy_model

    if not (minutes > 0 and vae_minutes > 0) or scenes < 64:
        raise typer.BadParameter("--minutes and --vae-minutes must be > 0 and --scenes >= 64")
    if not 0 < patterned_weight < math.inf:
        raise typer.BadParameter(f"must be a finite number > 0 (1 samples uniformly), got {patterned_weight}",
                                 param_hint="--patterned-weight")
    if not 0 <= vae_mark_weight < math.inf:
        raise typer.BadParameter(f"must be a finite number >= 0 (0: none), got {vae_mark_weight}",
                                 param_hint="--vae-mark-weight")
    if init_from is not None and vae_mark_weight:
        raise typer.BadParameter("--init-from keeps the pipeline's VAE (no VAE stage to weigh); leave it out or "
                                 "train a new VAE (--unet-from carries a UNet into it)", param_hint="--vae-mark-weight")
    if not snr_gamma > 0:
        raise typer.BadParameter(f"must be a number > 0 (inf turns the weighting off), got {snr_gamma}",
                                 param_hint="--snr-gamma")
    if not decoder_minutes >= 0:
        raise typer.BadParameter("--decoder-minutes must be >= 0 (0 skips the decoder fine-tuning)")
    if not (localisation_weight >= 0 and lr > 0):
        raise typer.BadParameter("--localisation-weight must be >= 0 and --lr > 0")
    if not 0 <= long_caption_prob <= 1:
        raise typer.BadParameter("--long-caption-prob must be in [0, 1]")
    if init_from is not None:
        theirs = json.loads((init_from / "vae" / "config.json").read_text()).get("latent_channels", 4)
        if latent_channels not in (None, theirs):
            raise typer.BadParameter(f"{init_from}'s VAE has {theirs} latent channels and is kept; "
                                     f"leave --latent-channels out or pass {theirs}", param_hint="--latent-channels")
        latent_channels = theirs
    latent_channels = 4 if latent_channels is None else latent_channels
    if not 1 <= latent_channels <= 64:
        raise typer.BadParameter(f"must be in 1..64, got {latent_channels}", param_hint="--latent-channels")
    cfg = ToyTrainConfig(latent_channels=latent_channels, n_scenes=scenes, vae_minutes=vae_minutes, decoder_minutes=decoder_minutes,
                         vae_mark_weight=vae_mark_weight,
                         unet_minutes=minutes, seed=seed, threads=threads,
                         localisation_weight=localisation_weight, lr=lr, long_caption_prob=long_caption_prob,
                         unet_batch=batch, device=device, init_from=str(init_from) if init_from else None,
                         unet_from=str(unet_from) if unet_from else None, patterned_weight=patterned_weight,
                         snr_gamma=snr_gamma, data_from=str(data_from) if data_from else None)
    try:
        check_latent_channels(out, cfg)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--latent-channels") from None
    if data_from is not None and not (out / "data" / "scenes.json").exists():
        from ..toy.train import check_data_from

        try:
            check_data_from(data_from, cfg)
        except ValueError as e:
            raise typer.BadParameter(str(e).replace("n_scenes=", "--scenes "), param_hint="--data-from") from None
    dest = train_toy_model(out, cfg, export_to)
    typer.echo(f"pipeline written to {dest}")


@app.command("finetune-decoder")
def finetune_decoder_cmd(
    model: Annotated[Path, typer.Option(help="Toy pipeline folder whose VAE decoder is fine-tuned, in place "
                                        "(work on a copy of the bundled one).")],
    minutes: Annotated[float, typer.Option(help="Time budget (minutes of steps).")] = 20.0,
    scenes: Annotated[int, typer.Option(help="Rendered scenes to train on (the last 500 measure PSNR).")] = 24_000,
    seed: int = 91,
    work: Annotated[Path, typer.Option(help="Folder for the rendered data and the checkpoint; rerun to resume.")] = Path("runs/decoder"),
    latent_noise: Annotated[float, typer.Option(
        help="Noise added to the training latents (amplitude uniform below it): a decoder robust to a UNet's latents.")] = 0.0,
) -> None:
    """Fine-tune the toy VAE's decoder alone (its latents, hence the UNet, unchanged): truer colours on
    renders; without --latent-noise generated images show the UNet's latent noise as blotches
    (docs/experiments/decoder.md); with --latent-noise 0.6 the 8-channel model draws its colours
    (docs/experiments/latent-channels.md)."""
    import math

    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    if not (model / "vae" / "config.json").exists():
        raise typer.BadParameter(f"no VAE at {model / 'vae'}; --model takes a toy pipeline folder", param_hint="--model")
    if minutes <= 0 or scenes < 1000:
        raise typer.BadParameter("--minutes must be > 0 and --scenes >= 1000")
    if not (math.isfinite(latent_noise) and latent_noise >= 0):
        raise typer.BadParameter("must be a finite number >= 0", param_hint="--latent-noise")
    if not weights.exists():
        raise typer.BadParameter(f"no safetensors weights at {weights}", param_hint="--model")
    from ..toy.train import finetune_pipeline_decoder

    result = finetune_pipeline_decoder(model, minutes, scenes, seed, work, latent_noise)
    typer.echo(f"{result.steps} steps; held-out PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB; "
               f"written to {model / 'vae'}")


@app.command("finetune-vae")
def finetune_vae_cmd(
    model: Annotated[Path, typer.Option(help="Toy pipeline folder whose VAE is fine-tuned, in place (work on a copy "
                                        "of the bundled one).")],
    minutes: Annotated[float, typer.Option(help="Time budget (minutes of steps).")] = 20.0,
    mark_weight: Annotated[float, typer.Option(
        help="Weight of the extra loss on the pixels of dots and stripes (0: the VAE's own loss only).")] = 4.0,
    bare_weight: Annotated[float, typer.Option(
        help="Weight of the extra loss on the objects' pixels away from dots and stripes, where a VAE fine-tuned "
             "with --mark-weight alone learns to draw dots on plain objects (0: none; "
             "benchmarks/vae_patterns.py measures both).")] = 0.0,
    decoder_only: Annotated[bool, typer.Option(
        help="Train the decoder alone: the latents keep their meaning, so the folder's UNet needs no more steps.")
    ] = False,
    scenes: Annotated[int, typer.Option(help="Rendered scenes to train on (the last 500 measure PSNR).")] = 12_000,
    seed: int = 777,
    work: Annotated[Path, typer.Option(help="Folder for the rendered data and the checkpoint; rerun to resume.")] = Path("runs/vae-marks"),
) -> None:
    """Fine-tune the toy VAE, encoder included, so that its latents keep dots (docs/experiments/dots.md).

    The latent space moves: train the UNet on in it (eiup toy train --init-from MODEL) and retrain the
    detector and guard through it before using the folder. With --decoder-only it stays: retrain the
    detector and guard."""
    import math

    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    if not (model / "vae" / "config.json").exists() or not weights.exists():
        raise typer.BadParameter(f"no VAE with safetensors weights at {model / 'vae'}; --model takes a toy pipeline "
                                 "folder", param_hint="--model")
    if not 0 < minutes < math.inf or scenes < 1000:
        raise typer.BadParameter("--minutes must be a finite number > 0 and --scenes >= 1000")
    for value, hint in ((mark_weight, "--mark-weight"), (bare_weight, "--bare-weight")):
        if not 0 <= value < math.inf:
            raise typer.BadParameter(f"must be a finite number >= 0, got {value}", param_hint=hint)
    from ..toy.train import finetune_pipeline_vae

    try:
        result = finetune_pipeline_vae(model, minutes, scenes, seed, work, mark_weight, bare_weight, decoder_only)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--work") from None
    done = (f"{result.steps} steps; held-out PSNR {result.psnr_before:.2f} -> {result.psnr_after:.2f} dB; "
            f"written to {model / 'vae'}")
    if decoder_only:
        typer.echo(f"{done}; the latents are unchanged; retrain the detector through the new decoder")
    else:
        typer.echo(f"{done}; train the UNet on in the new latent space before use "
                   f"(eiup toy train --init-from {model}) and retrain the detector through it")


@app.command("train-detector")
def train_detector_cmd(
    model: Annotated[Path, typer.Option(help="Toy pipeline folder whose VAE the detector learns to see through.")] = WEIGHTS / "pipeline",
    out: Annotated[Path, typer.Option(help="Where to write the detector weights.")] = WEIGHTS / "detector.safetensors",
    scenes: int = 30_000,
    minutes: float = 8.0,
    seed: Annotated[int, typer.Option(help="Seed of the rendered scenes and of training.")] = 1,
    init: Annotated[Path | None, typer.Option(
        help="Continue from these detector weights (a second round on new scenes: another --seed).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay over --minutes).")] = 2e-3,
    device: Annotated[str, typer.Option(help="cpu or cuda[:N]: where the detector trains (renders stay on the CPU).")] = "cpu",
    processes: Annotated[int, typer.Option(help="Rendering processes.")] = 2,
    raw_renders: Annotated[bool, typer.Option(
        help="Train on the renders as rendered, no VAE: a judge that cannot learn a VAE's traces of a colour "
             "(for benchmarks/colour_check.py --detector); it is measured on raw renders and through --model's VAE.")] = False,
    shading: Annotated[float, typer.Option(
        help="Train also on blotchy images: brightness scaled by 1 + a x (smooth random field), a up to this "
             "(0: off), so that a generated plain object's blotches do not read as a pattern.")] = 0.0,
    brightness: Annotated[float, typer.Option(
        help="Train also on objects made up to this share brighter or darker (0: off), so that the pattern is "
             "read from its marks, not from the mean colour they darken.")] = 0.0,
) -> None:
    """Train the concept detector on renders passed through the toy VAE; prints its accuracy."""
    _check_device(device)
    if processes < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--processes")
    if init is not None and not init.is_file():
        raise typer.BadParameter(f"no detector weights at {init}", param_hint="--init")
    if not (minutes > 0 and lr > 0 and scenes >= 64):
        raise typer.BadParameter("--minutes and --lr must be > 0 and --scenes >= 64")
    for name, value in (("--shading", shading), ("--brightness", brightness)):
        if not 0 <= value < 1:
            raise typer.BadParameter(f"must be in [0, 1), got {value}", param_hint=name)
    import torch
    from diffusers import AutoencoderKL

    from ..toy.detect import ConceptDetector, evaluate_detector, train_detector

    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32, use_safetensors=True).eval()
    path = train_detector(None if raw_renders else vae, out, n_train=scenes, minutes=minutes, seed=seed, init=init,
                          lr=lr, device=device, processes=processes, shading=shading,
                          brightness=brightness)
    report = evaluate_detector(ConceptDetector.load(path), vae)
    if raw_renders:
        report = {"through_vae": report, "raw_renders": evaluate_detector(ConceptDetector.load(path), None)}
    typer.echo(json.dumps(report, indent=2))


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG images (64x64 toy images; others are resized).")],
    detector: Annotated[Path | None, typer.Option(help="Detector weights (default: the bundled one).")] = None,
) -> None:
    """Print what the toy detector sees in each image (objects, their attributes, background)."""
    from PIL import Image

    from ..toy.detect import ConceptDetector

    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such image file(s): {', '.join(missing)}", param_hint="IMAGES")
    det = ConceptDetector.load(detector)
    for path, d in zip(images, det.detect([Image.open(p).convert("RGB") for p in images])):
        typer.echo(json.dumps({"image": str(path), **d.to_dict()}))


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="Folder for toy-quality.md, .json and the image grid.")] = Path("runs/toy-quality"),
    model: Annotated[Path, typer.Option(help="Toy pipeline folder.")] = WEIGHTS / "pipeline",
    seeds: Annotated[int, typer.Option(help="Seeds per prompt (held out: starting at --first-seed).")] = 20,
    first_seed: int = 1000,
    steps: int = 25,
    guidance: float = 7.5,
    detector: Annotated[Path | None, typer.Option(
        help="Detector weights (default: the bundled one, trained through the bundled VAE; a model with "
             "another VAE is judged by a detector trained through it: eiup toy train-detector --model).")] = None,
) -> None:
    """Measure the toy model against its quality targets (detector-judged) and write a report."""
    if seeds < 1:
        raise typer.BadParameter(f"must be >= 1, got {seeds}", param_hint="--seeds")
    check_sampling(steps, guidance)
    if detector is not None and not detector.is_file():
        raise typer.BadParameter(f"no detector weights at {detector}", param_hint="--detector")
    from ..models import load_pipeline
    from ..toy.detect import ConceptDetector
    from ..toy.quality import quality_report

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    rep = quality_report(pipe, ConceptDetector.load(detector), list(range(first_seed, first_seed + seeds)), steps, guidance, out)
    typer.echo((out / "toy-quality.md").read_text())
    typer.echo(json.dumps(rep.accuracy))
