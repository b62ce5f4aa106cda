"""Tiny randomly initialised Stable Diffusion pipelines built from configs (no downloads).

They have the architecture of the real families (SD 1.x, SD 2.x, SDXL) at toy size: latents of
16x16 (32 px images), a few attention layers at three resolutions, and the toy-world CLIP-format
tokenizer. Use them for tests and examples; their images are noise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "tiny_components", "tiny_pipeline"]

FAMILIES = ("sd1", "sd2", "sdxl")


def _text_config(tok: Any, **overrides: Any):
    from transformers import CLIPTextConfig

    cfg = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
    )
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def tiny_components(family: str = "sd1", seed: int = 0, tmpdir: str | Path | None = None) -> dict[str, Any]:
    """Components of a tiny pipeline of ``family`` ("sd1", "sd2" or "sdxl"), weights seeded by ``seed``.

    Args:
        family: Architecture family.
        seed: Seed of the random initialisation (the global RNG is left untouched).
        tmpdir: Folder for the tokenizer files; a new temporary folder if ``None``.

    Returns:
        Keyword arguments for the family's pipeline class.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .toy.tokenizer import build_clip_tokenizer
    from .toy.world import words

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is unknown; use one of {FAMILIES}")
    tmpdir = Path(tmpdir) if tmpdir is not None else Path(tempfile.mkdtemp(prefix="eiup-tiny-"))
    tok = build_clip_tokenizer(words(), tmpdir / f"tokenizer-{family}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        common = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32, 32),
            norm_num_groups=4,
        )
        if family == "sd1":
            unet = UNet2DConditionModel(
                **common,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=2,
            )
            text_encoder = CLIPTextModel(_text_config(tok))
            return dict(
                unet=unet, vae=_vae(), text_encoder=text_encoder, tokenizer=tok, scheduler=_scheduler(),
                safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
            )
        if family == "sd2":
            unet = UNet2DConditionModel(
                **common,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=(2, 4, 4),
                use_linear_projection=True,
            )
            text_encoder = CLIPTextModel(_text_config(tok, hidden_act="gelu"))
            return dict(
                unet=unet, vae=_vae(), text_encoder=text_encoder, tokenizer=tok,
                scheduler=_scheduler("v_prediction"), safety_checker=None, feature_extractor=None,
                image_encoder=None, requires_safety_checker=False,
            )
        # SDXL: two encoders; cross_attention_dim = 32 + 32; text_time conditioning.
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1, 2),
            projection_class_embeddings_input_dim=8 * 6 + 32,
            cross_attention_dim=64,
        )
        text_encoder = CLIPTextModel(_text_config(tok, hidden_act="gelu", projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok, hidden_act="gelu", projection_dim=32))
        return dict(
            unet=unet, vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
            tokenizer_2=tok, scheduler=_scheduler(), image_encoder=None, feature_extractor=None,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )


def tiny_pipeline(family: str = "sd1", seed: int = 0, tmpdir: str | Path | None = None, *, plain: bool = False):
    """A tiny randomly initialised pipeline of ``family``, on CPU in float32, eval mode, no progress bar.

    Args:
        family: "sd1", "sd2" or "sdxl".
        seed: Seed of the weights.
        tmpdir: Folder for the tokenizer files (a temporary folder if ``None``).
        plain: Return the plain diffusers class (``StableDiffusionPipeline`` /
            ``StableDiffusionXLPipeline``) instead of the EIUP subclass.

    Returns:
        The pipeline.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .pipeline import EIUPPipeline, EIUPXLPipeline

    components = tiny_components(family, seed, tmpdir)
    if family == "sdxl":
        cls = StableDiffusionXLPipeline if plain else EIUPXLPipeline
    else:
        cls = StableDiffusionPipeline if plain else EIUPPipeline
    pipe = cls(**components)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class ModelCalls:
    """Records every forward of the UNet, the text encoder(s) and the VAE decoder of ``pipe``."""

    def __init__(self, pipe):
        self.calls: list[str] = []
        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae.decoder}
        if getattr(pipe, "text_encoder_2", None) is not None:
            modules["text_encoder_2"] = pipe.text_encoder_2
        self.handles = [m.register_forward_pre_hook(lambda *a, _n=n: self.calls.append(_n)) for n, m in modules.items()]

    def __enter__(self) -> ModelCalls:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
