"""Carry a trained UNet into another VAE's latent space (e.g. 4 -> 8 latent channels).

The UNet's body (its features, cross-attention and text conditioning) does not depend on the latent space;
only its first and last convolutions read and write latents. Both VAEs encode the same renders, so a
least-squares map between their latents, pixel by pixel (both compress 8x), lets the old UNet read the new
latents (conv_in after the map) and answer in them (conv_out followed by the map's noise read-out).
"""

from __future__ import annotations

import torch


def fit_latent_map(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``theirs ≈ ours @ A.T + a`` over pixels; ours (n, N), theirs (n, M) -> A (M, N), a (M,)."""
    x = torch.cat([ours.double(), torch.ones(len(ours), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x, theirs.double()).solution  # (N + 1, M)
    return sol[:-1].T.float(), sol[-1].float()


def noise_readout(a_map: torch.Tensor) -> torch.Tensor:
    """E[eps | A eps] for eps ~ N(0, I): ``B = A^T (A A^T)^-1``, (N, M); maps the old UNet's noise back."""
    a = a_map.double()
    return (a.T @ torch.linalg.inv(a @ a.T)).float()


def translate_conv_in(weight: torch.Tensor, bias: torch.Tensor, a_map: torch.Tensor,
                      offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_in(A x + a) as one convolution of x: ``W' = W A``, ``b' = b + sum W a`` (exact away from the border)."""
    return (torch.einsum("oikl,in->onkl", weight, a_map),
            bias + torch.einsum("oikl,i->o", weight, offset))


def translate_conv_out(weight: torch.Tensor, bias: torch.Tensor,
                       readout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B conv_out(h) as one convolution: ``W' = B W``, ``b' = B b``."""
    return torch.einsum("ni,ickl->nckl", readout, weight), readout @ bias


def pixels(latents: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) latents as (n * h * w, C) rows, one per latent pixel."""
    return latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])


def transfer_unet_weights(theirs: dict[str, torch.Tensor], our_latents: torch.Tensor,
                          their_latents: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
    """The UNet state dict ``theirs`` translated to read and write ``our_latents``' space.

    Args:
        theirs: the trained UNet's state dict (its conv_in reads M channels, its conv_out writes M).
        our_latents: (n, N, h, w) scaled latents of some renders in the new VAE's space.
        their_latents: (n, M, h, w) scaled latents of the same renders in the trained UNet's space.

    Returns:
        The translated state dict (float32) and the share of their latents' variance the map explains (R^2).
    """
    ours_px, theirs_px = pixels(our_latents.float()), pixels(their_latents.float())
    a_map, offset = fit_latent_map(ours_px, theirs_px)
    residual = theirs_px - (ours_px @ a_map.T + offset)
    r2 = 1.0 - (residual.var(0).sum() / theirs_px.var(0).sum()).item()
    out = {k: v.float() for k, v in theirs.items()}
    out["conv_in.weight"], out["conv_in.bias"] = translate_conv_in(
        out["conv_in.weight"], out["conv_in.bias"], a_map, offset)
    out["conv_out.weight"], out["conv_out.bias"] = translate_conv_out(
        out["conv_out.weight"], out["conv_out.bias"], noise_readout(a_map))
    return out, r2
