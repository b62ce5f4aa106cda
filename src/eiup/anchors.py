"""Anchored padding projection: remove a concept from the prompt's padding tokens.

A CLIP-style causal text encoder writes the whole prompt's meaning into the padding positions after
the end-of-text token, and the UNet reads much of it there (measured on the bundled toy model with
``benchmarks/carrier.py``: replacing the padding of "a tomato" by the empty prompt's removes the red
in every seed, replacing its words changes nothing). EIUP's concept term acts through the concept
*word*, so an implied attribute carried by the padding survives it. This step edits the padding of
the prompt embedding before denoising, relative to anchor concepts of the same kind (for "red":
the other colours):

    m_i = mean_a A_a[i]                      # anchors' embedding at padding position i
    d_i = (C[i] - m_i) / |C[i] - m_i|        # the concept's direction away from its anchors
    e_i <- e_i - s * max(0, <e_i - m_i, d_i>) * d_i

Prompts whose padding does not lean from the anchors towards the concept (coefficient <= 0) are
left exactly as they are. With the nearest-concept gate (default), so is every prompt whose padding
is on average closer (cosine) to one of the anchors' padding than to the concept's: "a lemon" is
nearer "yellow" than "red" and keeps its colour even where it leans a little towards red.
"""

from __future__ import annotations

import torch


def padding_positions(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, L) mask of the positions after each sequence's end-of-text token (its padding)."""
    return torch.arange(seq_len, device=lengths.device)[None, :] >= lengths[:, None]


def aligned_padding(embeds: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(K, L, D): row k's vector at position max(i, length_k): its own padding, aligned with any prompt's."""
    idx = torch.maximum(torch.arange(seq_len, device=embeds.device)[None, :], lengths[:, None]).clamp(max=embeds.shape[1] - 1)
    return torch.gather(embeds, 1, idx[..., None].expand(-1, -1, embeds.shape[-1]))


def concept_directions(concept: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor mean m_i and unit direction d_i = (C[i] - m_i) / |C[i] - m_i|, each (L, D), from aligned padding."""
    m = anchors.mean(0)
    return m, torch.nn.functional.normalize(concept - m, dim=-1)


def aligned_concept_and_anchors(concept: torch.Tensor, concept_length: int, anchors: torch.Tensor,
                                anchor_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept's (L, D) and the anchors' (K, L, D) padding, aligned position by position."""
    seq_len = concept.shape[0]
    c = aligned_padding(concept[None], torch.tensor([concept_length], device=concept.device), seq_len)[0]
    return c, aligned_padding(anchors, anchor_lengths, seq_len)


def nearest_to_concept(prompt_embeds: torch.Tensor, prompt_lengths: torch.Tensor, concept: torch.Tensor,
                       anchors: torch.Tensor) -> torch.Tensor:
    """(B,) True where the prompt's padding is closer (mean cosine) to the concept's than to every anchor's.

    ``concept`` (L, D) and ``anchors`` (K, L, D) aligned as by :func:`aligned_concept_and_anchors`.
    A prompt without padding (as long as the encoder) is never gated in.
    """
    pad = padding_positions(prompt_lengths, prompt_embeds.shape[1]).float()  # (B, L)
    count = pad.sum(1).clamp_min(1)
    cos = torch.nn.functional.cosine_similarity
    to_concept = (cos(prompt_embeds, concept[None], dim=-1) * pad).sum(1) / count
    to_anchors = (cos(prompt_embeds[:, None], anchors[None], dim=-1) * pad[:, None]).sum(2) / count[:, None]
    return (to_concept > to_anchors.max(1).values) & (pad.sum(1) > 0)


def project_padding(prompt_embeds: torch.Tensor, prompt_lengths: torch.Tensor, anchor_mean: torch.Tensor,
                    direction: torch.Tensor, strength: float) -> torch.Tensor:
    """e_i - s * max(0, <e_i - m_i, d_i>) * d_i on padding positions (module docstring); words untouched."""
    coef = ((prompt_embeds - anchor_mean) * direction).sum(-1).clamp_min(0)
    coef = coef * padding_positions(prompt_lengths, prompt_embeds.shape[1])
    return prompt_embeds - strength * coef[..., None] * direction
