"""Carrying a trained UNet into another VAE's latent space (eiup.toy.transfer)."""

import pytest
import torch
import torch.nn.functional as F

from eiup.toy.train import build_unet
from eiup.toy.transfer import (
    fit_latent_map, noise_readout, pixels, transfer_unet_weights, translate_conv_in, translate_conv_out,
)


def test_the_latent_map_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    ours = torch.randn(5000, 8, generator=g)
    a_true, offset_true = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    theirs = ours @ a_true.T + offset_true + 0.01 * torch.randn(5000, 4, generator=g)
    a_map, offset = fit_latent_map(ours, theirs)
    assert torch.allclose(a_map, a_true, atol=2e-3) and torch.allclose(offset, offset_true, atol=2e-3)


def test_the_noise_readout_is_the_conditional_mean_of_gaussian_noise():
    g = torch.Generator().manual_seed(1)
    a_map = torch.randn(4, 8, generator=g)
    readout = noise_readout(a_map)
    assert torch.allclose(a_map @ readout, torch.eye(4), atol=1e-5)  # reads A eps back exactly
    eps = torch.randn(200_000, 8, generator=g)
    empirical = torch.linalg.lstsq(eps @ a_map.T, eps).solution.T  # regression of eps on A eps
    assert torch.allclose(readout, empirical, atol=0.01)


def test_translated_convolutions_compute_the_map_then_the_old_convolution():
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(16, 4, 3, 3, generator=g), torch.randn(16, generator=g)
    a_map, offset = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    x = torch.randn(2, 8, 6, 6, generator=g)
    mapped = torch.einsum("mn,bnhw->bmhw", a_map, x) + offset[:, None, None]
    w, b = translate_conv_in(weight, bias, a_map, offset)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # zero padding sees no offset at the border
    assert torch.allclose(F.conv2d(x, w, b, padding=1)[inner], F.conv2d(mapped, weight, bias, padding=1)[inner], atol=1e-4)
    h = torch.randn(2, 16, 6, 6, generator=g)
    readout = torch.randn(8, 4, generator=g)
    w, b = translate_conv_out(weight.transpose(0, 1)[:4].contiguous(), bias[:4], readout)
    old = F.conv2d(h, weight.transpose(0, 1)[:4].contiguous(), bias[:4], padding=1)
    assert torch.allclose(F.conv2d(h, w, b, padding=1), torch.einsum("nm,bmhw->bnhw", readout, old), atol=1e-4)


def test_a_transferred_unet_answers_in_the_new_space_what_the_old_one_answers_in_its_own():
    torch.manual_seed(3)
    old = build_unet(4).eval()
    g = torch.Generator().manual_seed(3)
    theirs = torch.randn(64, 4, 8, 8, generator=g)
    mix = torch.linalg.qr(torch.randn(8, 8, generator=g)).Q  # the new space: their 4 channels and 4 others, rotated
    ours = torch.einsum("nm,bmhw->bnhw", mix, torch.cat([theirs, torch.randn(64, 4, 8, 8, generator=g)], 1))
    state, r2 = transfer_unet_weights(old.state_dict(), ours, theirs)
    assert r2 == pytest.approx(1.0, abs=1e-4)
    new = build_unet(8).eval()
    new.load_state_dict(state)
    emb, t = torch.randn(2, 77, 64, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        answer = new(ours[:2], t, emb).sample
        expected = old(theirs[:2], t, emb).sample
    back = mix[:, :4].T  # their channels read back from the new space
    assert torch.allclose(torch.einsum("mn,bnhw->bmhw", back, answer), expected, atol=1e-4)
    untouched = [k for k in state if not k.startswith(("conv_in.", "conv_out."))]
    assert untouched and all(torch.equal(state[k], old.state_dict()[k]) for k in untouched)


def test_pixels_are_rows_of_channels():
    lat = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2).float()
    rows = pixels(lat)
    assert rows.shape == (8, 3) and torch.equal(rows[1], lat[0, :, 0, 1])


def test_weights_of_another_latent_space_are_refused_by_name_unless_translated(bundled_latent_widths):
    from eiup.models import default_model_path
    from eiup.toy.train import build_text_encoder, load_pipeline_weights
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(default_model_path() / "tokenizer")
    text = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    other_width = bundled_latent_widths[1]
    with pytest.raises(ValueError, match=r"lacks 0 tensors of the toy architecture and has 3 of other shapes "
                                         r"\(e\.g\. conv_in\.weight\); unet_from takes a toy pipeline"):
        load_pipeline_weights(default_model_path(), build_unet(other_width), text, option="unet_from")
