"""Fine-tuning the toy VAE's decoder alone: latents unchanged, reconstructions better, resumable."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from eiup.toy.render import render
from eiup.toy.train import build_vae, encode_latent_stats, finetune_decoder
from eiup.toy.world import random_scene


@pytest.fixture(scope="module")
def images():
    return np.stack([render(random_scene(random.Random(i)), 64).image for i in range(48)])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_only_the_decoder_learns_and_reconstructions_improve(images):
    from diffusers import AutoencoderKL

    from eiup.models import default_model_path

    vae = AutoencoderKL.from_pretrained(default_model_path() / "vae", use_safetensors=True).float().eval()
    stats = encode_latent_stats(vae, images)
    torch.nn.init.zeros_(vae.decoder.conv_out.weight)  # the bundled decoder with its last layer wiped
    torch.nn.init.zeros_(vae.decoder.conv_out.bias)
    encoder, decoder = _state(vae.encoder), _state(vae.decoder)
    result = finetune_decoder(vae, images, stats, minutes=10, max_steps=25, batch=8, n_eval=8, lr=1e-3)
    assert result.steps == 25
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert any(not torch.equal(v, vae.decoder.state_dict()[k]) for k, v in decoder.items())
    np.testing.assert_array_equal(encode_latent_stats(vae, images), stats)  # the UNet's latent space
    assert result.psnr_after > result.psnr_before + 3.0  # measured: 7.6 -> 16.6 dB
    assert not any(p.requires_grad for p in vae.parameters())


def test_an_interrupted_finetune_resumes_from_its_checkpoint(images, tmp_path):
    torch.manual_seed(0)
    vae = build_vae().eval()
    stats = encode_latent_stats(vae, images)
    ckpt = tmp_path / "decoder_ckpt.safetensors"
    first = finetune_decoder(vae, images, stats, minutes=10, max_steps=3, batch=8, n_eval=8, checkpoint=ckpt)
    assert first.steps == 3 and ckpt.exists()
    torch.manual_seed(0)
    fresh = build_vae().eval()  # a new process: weights come from the checkpoint
    second = finetune_decoder(fresh, images, stats, minutes=10, max_steps=5, batch=8, n_eval=8, checkpoint=ckpt)
    assert second.steps == 5
    assert second.psnr_before == first.psnr_before  # measured once, before the first step


def test_too_few_images_is_refused(images):
    vae = build_vae()
    with pytest.raises(ValueError, match="needs more than"):
        finetune_decoder(vae, images[:10], encode_latent_stats(vae, images[:10]), minutes=1, n_eval=8, batch=8)


def test_latent_noise_reaches_training_and_bad_values_are_refused(images):
    def tuned(noise: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        vae = build_vae().eval()
        stats = encode_latent_stats(vae, images)
        finetune_decoder(vae, images, stats, minutes=10, max_steps=2, batch=8, n_eval=8, latent_noise=noise)
        return _state(vae.decoder)

    clean, again, noisy = tuned(0.0), tuned(0.0), tuned(0.5)

    def moved(other: dict[str, torch.Tensor]) -> float:
        return max(float((v - other[k]).abs().max()) for k, v in clean.items())

    # same seed, same steps: the same weights up to CPU kernels' summation order (threaded backward
    # passes are not bit-reproducible); the noise moves them by orders of magnitude more
    assert moved(again) < 1e-5
    assert moved(noisy) > 100 * max(moved(again), 1e-7)
    vae = build_vae()
    stats = encode_latent_stats(vae, images)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="latent_noise"):
            finetune_decoder(vae, images, stats, minutes=1, n_eval=8, batch=8, latent_noise=bad)
