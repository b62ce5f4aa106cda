"""Anchored token projection: remove a concept from every token of the prompt embedding.

A causal text encoder (CLIP) writes what the prompt has said so far into every later token, the
padding after end-of-text included, and the UNet reads implied attributes there: on the bundled toy
model, replacing the padding of "a tomato" by the empty prompt's removes the red in every seed while
replacing its words changes nothing (``benchmarks/carrier.py``); in a prompt padded with style words
("a valentine, highly detailed, 4k, ...") the filler tokens carry the heart the same way. EIUP's
concept term acts through the concept *word*, so these carriers survive it. This step edits every
token after BOS before denoising, relative to anchor concepts of the same kind (for "red": the other
colours), at each position i:

    m_i = mean_a A_a[i]                      # the anchors' embedding (their padding, aligned)
    d_i = (C[i] - m_i) / |C[i] - m_i|        # the concept's direction away from its anchors
    e_i <- e_i - s * max(0, <e_i - m_i, d_i>) * d_i

Tokens that do not lean from the anchors towards the concept (coefficient <= 0) are left as they
are. A prompt that names the concept has better anchors, its own counterfactuals (the concept word
replaced by each anchor): it moves away from their mean, e <- e - s * (e - mean_a e[concept -> a]);
the tokens before the word are those of the counterfactuals already (causal encoder) and stay. A
counterfactual whose anchor has another token count than the concept word (``"night"`` ->
``"white background"``) is read position by position through a token alignment of the two texts
(:func:`counterfactual_positions`): shared tokens with shared tokens, the concept's tokens with the
anchor's last ones, the padding with the padding.
A prompt that only implies the concept can get the same in-context anchors (``in_context``, a
preset of the toy model's red, star and heart): the word that implies it is located
(:func:`implying_word`: the word where the concept fits and the anchors do not), the concept and
each anchor are put in its place, and the prompt is projected once more along the direction those
variants give at each position; in "an image of a strawberry in the fog" the bare words' padding
direction misses the heart the padding carries, the variants "an image of a heart / circle / ...
in the fog" find it.
Which prompts are edited at all is the gate's decision (``EraseConfig.anchor_gate``): those that
name the concept or that the model's prompt probe (:mod:`eiup.probe`) says imply it, or, for a model
without probes, those whose tokens are on average closer (cosine) to the concept's than to every
anchor's (:func:`nearest_to_concept`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from difflib import SequenceMatcher

import torch
import torch.nn.functional as F


def aligned_padding(embeds: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(K, L, D): row k's vector at position max(i, length_k): its own padding, aligned with any prompt's."""
    idx = torch.maximum(torch.arange(seq_len, device=embeds.device)[None, :], lengths[:, None]).clamp(max=embeds.shape[1] - 1)
    return torch.gather(embeds, 1, idx[..., None].expand(-1, -1, embeds.shape[-1]))


def aligned_concept_and_anchors(concept: torch.Tensor, concept_length: int, anchors: torch.Tensor,
                                anchor_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept's (L, D) and the anchors' (K, L, D) padding, aligned position by position."""
    seq_len = concept.shape[0]
    c = aligned_padding(concept[None], torch.tensor([concept_length], device=concept.device), seq_len)[0]
    return c, aligned_padding(anchors, anchor_lengths, seq_len)


def concept_directions(concept: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor mean m_i and unit direction d_i = (C[i] - m_i) / |C[i] - m_i|, each (L, D), from aligned padding."""
    m = anchors.mean(0)
    return m, F.normalize(concept - m, dim=-1)


def protect_directions(direction: torch.Tensor, anchor_mean: torch.Tensor, concept: torch.Tensor,
                       protected: torch.Tensor) -> torch.Tensor:
    """d_i with the span of the protected words' differences from their mean removed from C[i] - m_i, renormalised:
    the projection then cannot move a prompt along another attribute (the starfish's colour when star is erased).
    Where the concept's difference lies inside that span, d_i is kept as it is (the erasure is not given up).

    ``direction``, ``anchor_mean``, ``concept`` (L, D); ``protected`` (K, L, D) aligned like the anchors.
    """
    diff = (protected - protected.mean(0, keepdim=True)).permute(1, 2, 0)  # (L, D, K)
    basis = torch.linalg.qr(diff).Q  # orthonormal columns spanning the protected differences, per position
    full = concept - anchor_mean
    v = full - torch.einsum("ldk,lk->ld", basis, torch.einsum("ldk,ld->lk", basis, full))
    left = v.norm(dim=-1, keepdim=True) > 1e-4 * full.norm(dim=-1, keepdim=True)
    return torch.where(left, F.normalize(v, dim=-1), direction)  # nothing left outside the span: erasure first


def project_tokens(prompt_embeds: torch.Tensor, anchor_mean: torch.Tensor, direction: torch.Tensor,
                   strength: float | torch.Tensor) -> torch.Tensor:
    """e_i - s * max(0, <e_i - m_i, d_i>) * d_i for every token after BOS (module docstring); s a number or (B, 1, 1)."""
    coef = ((prompt_embeds - anchor_mean) * direction).sum(-1).clamp_min(0)
    coef[:, 0] = 0  # BOS carries no prompt content
    return prompt_embeds - strength * coef[..., None] * direction


def nearest_to_concept(prompt_embeds: torch.Tensor, concept: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(B,) True where the prompt's tokens after BOS are closer (mean cosine) to the concept's than to every anchor's.

    ``concept`` (L, D) and ``anchors`` (K, L, D) aligned as by :func:`aligned_concept_and_anchors`.
    """
    e = prompt_embeds[:, 1:]
    to_concept = F.cosine_similarity(e, concept[None, 1:], dim=-1).mean(1)
    to_anchors = F.cosine_similarity(e[:, None], anchors[None, :, 1:], dim=-1).mean(2)
    return to_concept > to_anchors.max(1).values


def away_from_counterfactuals(embeds: torch.Tensor, original: torch.Tensor, counterfactual_mean: torch.Tensor,
                              strength: float) -> torch.Tensor:
    """e - s * (e0 - mean_a e0[concept -> a]) for a prompt that names the concept (module docstring)."""
    return embeds - strength * (original - counterfactual_mean)


def word_substitutions(prompt: str, words: Sequence[str]) -> list[str]:
    """The prompt with each whitespace-separated word in turn replaced by each of ``words``: word-major, (J * K,)."""
    split = prompt.split()
    return [" ".join(split[:j] + [w] + split[j + 1:]) for j in range(len(split)) for w in words]


def implying_word(prompt_embeds: torch.Tensor, substituted: torch.Tensor) -> int:
    """The word j maximising mean_a |e - e[j -> a]| - |e - e[j -> concept]| (distances averaged over positions):
    where putting the concept changes the prompt least and the anchors most. ``prompt_embeds`` (L, D),
    ``substituted`` (J, 1 + K, L, D): per word, the concept's then the anchors' substitutions."""
    dist = (substituted - prompt_embeds).norm(dim=-1).mean(-1)
    return int((dist[:, 1:].mean(1) - dist[:, 0]).argmax())


def word_positions(prompt_ids: Sequence[int], words: Sequence[Sequence[int]]) -> list[int]:
    """Positions of ``prompt_ids`` covered by an occurrence of any of ``words`` (token id sequences)."""
    found: set[int] = set()
    for word in (list(w) for w in words if len(w)):
        for start in range(len(prompt_ids) - len(word) + 1):
            if list(prompt_ids[start:start + len(word)]) == word:
                found.update(range(start, start + len(word)))
    return sorted(found)


FUNCTION_WORDS = frozenset(
    "a an the and or of on in at to with by for from as into onto over under near next is are".split()
    + list(",.;:!?-&()[]{}\"'"))
"""Words that name nothing in the image: neither the concept's nor another thing's claim on a pixel (:func:`phrase_positions`)."""


CLAUSE_BREAKS = frozenset({"and", ",", ";", "with"})
"""Tokens that separate the phrases of a prompt ("a tomato and a lime", "a cat, a dog")."""
DETERMINERS = frozenset("a an the one two three four five some another".split())
"""Words that open a phrase naming a thing ("a lime"), unlike style phrases (", highly detailed, 4k")."""


def names_one_thing(prompt: str) -> bool:
    """Whether the prompt names one thing (or none): at most one of its :func:`thing_phrases` ("a tomato, highly
    detailed" and "a red star on a white background" do; "a tomato and a lime" does not)."""
    return len(thing_phrases(prompt)) <= 1


def thing_phrases(prompt: str) -> list[str]:
    """The phrases of a prompt that name a thing, as text: split at :data:`CLAUSE_BREAKS` ("a starfish and a lime,
    highly detailed" -> ["a starfish", "a lime"]); the first phrase, and each later one that opens with one of
    :data:`DETERMINERS` (style phrases are dropped)."""
    phrases: list[list[str]] = [[]]
    for word in re.sub(r"([,;])", r" \1 ", prompt).split():
        if word.lower() in CLAUSE_BREAKS:
            phrases.append([])
        else:
            phrases[-1].append(word)
    return [" ".join(p) for i, p in enumerate(phrases) if p and (i == 0 or p[0].lower() in DETERMINERS)]


def phrase_positions(tokens: Sequence[str], carriers: Sequence[int]) -> tuple[list[int], list[int]]:
    """The content words (not :data:`FUNCTION_WORDS`) of the phrases (split at :data:`CLAUSE_BREAKS`) that
    hold one of ``carriers``, and those of the other phrases that name a thing (open with one of
    :data:`DETERMINERS`; style phrases are neither): positions between BOS and EOS (the first and last
    token); a CLIP tokenizer's end-of-word mark ``</w>`` is ignored."""
    words = [t.removesuffix("</w>").lower() for t in tokens]
    phrases: list[list[int]] = [[]]
    for i, word in enumerate(words[1:-1], start=1):
        if word in CLAUSE_BREAKS:
            phrases.append([])
        else:
            phrases[-1].append(i)
    held = set(carriers)
    own = [i for phrase in phrases if held.intersection(phrase) for i in phrase if words[i] not in FUNCTION_WORDS]
    others = [i for phrase in phrases if phrase and not held.intersection(phrase) and words[phrase[0]] in DETERMINERS
              for i in phrase if words[i] not in FUNCTION_WORDS]
    return own, others


def counterfactual_positions(prompt_ids: Sequence[int], variant_ids: Sequence[int], seq_len: int) -> torch.Tensor:
    """(seq_len,) for each position of the prompt, the counterfactual's position that holds the same content.

    Both id lists are unpadded (BOS ... EOS). Tokens both texts share map to each other; a replaced
    span maps right-aligned onto its replacement (the last replacement token has read it whole); a
    deleted span maps to the token before it; padding after EOS keeps its distance from EOS.
    """
    pos = list(range(seq_len))
    n_p, n_v = len(prompt_ids), len(variant_ids)
    for tag, i1, i2, j1, j2 in SequenceMatcher(None, list(prompt_ids), list(variant_ids), autojunk=False).get_opcodes():
        for k, i in enumerate(range(i1, min(i2, seq_len))):
            if tag == "equal":
                pos[i] = j1 + k
            elif j2 > j1:  # replace
                pos[i] = j1 + min(max(k + (j2 - j1) - (i2 - i1), 0), j2 - j1 - 1)
            elif tag == "delete":
                pos[i] = max(j1 - 1, 0)
    for i in range(n_p, seq_len):
        pos[i] = i - n_p + n_v
    return torch.tensor(pos).clamp(0, seq_len - 1)
