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
left exactly as they are.
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


def concept_directions(concept: torch.Tensor, concept_length: int, anchors: torch.Tensor,
                       anchor_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor mean m_i and unit direction d_i = (C[i] - m_i) / |C[i] - m_i| per position, each (L, D)."""
    seq_len = concept.shape[0]
    c = aligned_padding(concept[None], torch.tensor([concept_length], device=concept.device), seq_len)[0]
    m = aligned_padding(anchors, anchor_lengths, seq_len).mean(0)
    return m, torch.nn.functional.normalize(c - m, dim=-1)


def project_padding(prompt_embeds: torch.Tensor, prompt_lengths: torch.Tensor, anchor_mean: torch.Tensor,
                    direction: torch.Tensor, strength: float) -> torch.Tensor:
    """e_i - s * max(0, <e_i - m_i, d_i>) * d_i on padding positions (module docstring); words untouched."""
    coef = ((prompt_embeds - anchor_mean) * direction).sum(-1).clamp_min(0)
    coef = coef * padding_positions(prompt_lengths, prompt_embeds.shape[1])
    return prompt_embeds - strength * coef[..., None] * direction
