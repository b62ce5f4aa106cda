"""Anchored token projection (eiup.anchors): the maths, and its place in the pipeline call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eiup import EraseConfigError
from eiup.anchors import (aligned_concept_and_anchors, aligned_padding, concept_directions, counterfactual_positions,
                          implying_word, nearest_to_concept, project_tokens, protect_directions, word_positions,
                          word_substitutions)
from eiup.testing import ModelCalls

KW = dict(num_inference_steps=3, output_type="np")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_aligned_padding_takes_each_rows_own_padding():
    e = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1)
    out = aligned_padding(e, torch.tensor([2, 4]), 6)[..., 0]
    assert out[0].tolist() == [2, 2, 2, 3, 4, 5] and out[1].tolist() == [10, 10, 10, 10, 10, 11]


def test_projection_removes_the_component_along_the_concept_after_bos():
    torch.manual_seed(0)
    seq, dim = 8, 5
    concept, anchors = torch.randn(seq, dim), torch.randn(3, seq, dim)
    mean, d = concept_directions(*aligned_concept_and_anchors(concept, 3, anchors, torch.tensor([3, 3, 4])))
    assert torch.allclose(d.norm(dim=-1), torch.ones(seq))
    prompt = mean + 2.0 * d + 0.1 * torch.randn(seq, dim)  # leans towards the concept everywhere
    coef = lambda e: ((e - mean) * d).sum(-1)  # noqa: E731
    out = project_tokens(prompt[None], mean, d, 1.0)[0]
    assert torch.equal(out[0], prompt[0])  # BOS untouched
    assert torch.allclose(coef(out)[1:], torch.zeros(seq - 1), atol=1e-5)  # component removed
    assert torch.allclose(out[1:] - prompt[1:], -coef(prompt)[1:, None] * d[1:], atol=1e-5)  # moved along d only
    strong = project_tokens(prompt[None], mean, d, 3.0)[0]
    assert torch.allclose(coef(strong)[1:], -2 * coef(prompt)[1:], atol=1e-4)  # (1 - s) * coefficient


def test_tokens_leaning_away_from_the_concept_are_untouched():
    torch.manual_seed(1)
    seq, dim = 6, 4
    mean, d = torch.randn(seq, dim), torch.nn.functional.normalize(torch.randn(seq, dim), dim=-1)
    away = mean - 1.5 * d
    away[2] = mean[2] + 0.5 * d[2]  # one token leans towards it: only that one moves
    out = project_tokens(away[None], mean, d, 2.0)[0]
    assert torch.equal(out[[0, 1, 3, 4, 5]], away[[0, 1, 3, 4, 5]]) and not torch.equal(out[2], away[2])



def test_protected_directions_cannot_move_a_prompt_along_the_protected_differences():
    torch.manual_seed(2)
    seq, dim = 7, 6
    concept, anchors, protected = torch.randn(seq, dim), torch.randn(3, seq, dim), torch.randn(3, seq, dim)
    mean, d = concept_directions(concept, anchors)
    kept = protect_directions(d, mean, concept, protected)
    diffs = protected - protected.mean(0)  # (3, L, D): two independent directions per position
    assert torch.allclose(kept.norm(dim=-1), torch.ones(seq))
    assert torch.allclose((kept[None] * diffs).sum(-1), torch.zeros(3, seq), atol=1e-5)  # orthogonal to them
    assert (kept * d).sum(-1).min() > 0  # still the concept's side
    prompt = mean + 2.0 * d + torch.randn(seq, dim)
    moved = project_tokens(prompt[None], mean, kept, 3.0)[0] - prompt
    assert torch.allclose((moved[None] * diffs).sum(-1), torch.zeros(3, seq), atol=1e-4)  # protected parts kept
    assert moved[1:].norm() > 0
    # the concept's difference inside the protected span entirely: nothing left, the plain direction stays
    inside = mean + diffs[0]
    assert torch.allclose(protect_directions(d, mean, inside, protected), d)


BAD = [
    (dict(anchors=""), "anchors"),
    (dict(anchors=["blue", " "]), r"anchors\[1\]"),
    (dict(anchors=[3]), r"anchors\[0\]"),
    (dict(anchors=["blue"], anchor_strength=float("nan")), "anchor_strength"),
    (dict(anchors=["blue"], anchor_strength=0.0), "anchor_strength"),
    (dict(anchors=["blue"], anchor_strength=9.0), "anchor_strength"),
    (dict(anchors=["blue"], anchor_gate="yes"), "anchor_gate"),
    (dict(anchors=[" ".join(["blue"] * 80)]), r"anchors\[0\]"),
    (dict(anchors=["blue"], anchor_protect="red"), "anchor_protect"),
    (dict(anchors=["blue"], anchor_protect=["red"]), "anchor_protect"),
    (dict(anchors=["blue"], anchor_protect=["red", " "]), r"anchor_protect\[1\]"),
    (dict(anchors=["blue"], anchor_protect=["red", " ".join(["blue"] * 80)]), r"anchor_protect\[1\]"),
    (dict(anchors=["blue"], anchor_in_context="yes"), "anchor_in_context"),
    (dict(anchors=["blue"], anchor_region=1), "anchor_region"),
    (dict(anchors=["blue"], anchor_region="box"), "anchor_region"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_anchor_arguments_are_refused_before_model_work(sd1, kwargs, match):
    kwargs = {"prompt": "a red star", **kwargs}
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match=match):
        sd1(erase="red", concept_context="separate", generator=gen(), **KW, **kwargs)
    assert model.calls == []


def shifted_positions(tok, prompt, concept, variant, seq_len):
    """Where the variant holds each prompt position's content, for a one-token concept word: the same
    before it, the anchor's last token for it, shifted by the length difference after it."""
    ids, word = tok(prompt).input_ids, tok(concept, add_special_tokens=False).input_ids
    assert len(word) == 1
    start, shift = ids.index(word[0]), len(tok(variant).input_ids) - len(ids)
    return torch.tensor([i if i < start else i + shift for i in range(seq_len)]).clamp(0, seq_len - 1)


def projected_embeds(pipe, prompts, concept, anchors, strength, gate):
    """The projection computed by hand from the pipeline's own encoder (what the call must feed the UNet)."""
    enc = lambda t: pipe.encode_prompt(t, "cpu", 1, False)[0]  # noqa: E731
    tok = pipe.tokenizer
    c, a = aligned_concept_and_anchors(enc(concept)[0], len(tok(concept).input_ids), torch.cat([enc(a) for a in anchors]),
                                       torch.tensor([len(ids) for ids in tok(anchors).input_ids]))
    e = enc(prompts)
    out = project_tokens(e, *concept_directions(c, a), strength)
    if gate:  # nearer the concept than every anchor, or naming it
        near = nearest_to_concept(e, c, a) | torch.tensor([concept in p.split() for p in prompts])
        out[~near] = e[~near]
    for r, p in enumerate(prompts):  # a prompt naming the concept: away from its counterfactuals
        if concept in p.split():
            variants = [" ".join(w if w != concept else x for w in p.split()) for x in anchors]
            aligned = [enc(v)[0][shifted_positions(tok, p, concept, v, e.shape[1])] for v in variants]
            out[r] = e[r] - strength * (e[r] - torch.stack(aligned).mean(0))
    return out


def test_counterfactual_positions_pair_shared_tokens_and_right_align_replacements():
    # BOS a red star EOS | pad...  ->  BOS a light blue star EOS | pad...
    assert counterfactual_positions([0, 5, 7, 9, 1], [0, 5, 7, 9, 1], 8).tolist() == list(range(8))  # same text
    assert counterfactual_positions([0, 5, 7, 9, 1], [0, 5, 3, 4, 9, 1], 8).tolist() == [0, 1, 3, 4, 5, 6, 7, 7]
    # two concept tokens for one anchor token: both read the anchor; a deleted word reads the token before it
    assert counterfactual_positions([0, 5, 7, 8, 9, 1], [0, 5, 3, 9, 1], 8).tolist() == [0, 1, 2, 2, 3, 4, 5, 6]
    assert counterfactual_positions([0, 5, 7, 9, 1], [0, 5, 9, 1], 8).tolist() == [0, 1, 1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_call_feeds_the_unet_the_projected_prompt(sd1, mode):
    prompts, anchors = ["a red star", "a blue circle on a gray background"], ["blue", "green", "yellow"]
    kw = dict(erase="red", erase_scale=-2.0, erase_mode=mode, concept_context="separate", anchor_gate=False, **KW)
    if mode == "dual":
        kw["cross_attn_fraction"] = 1.0  # the whole run in the window: the projection acts through V(E_P) alone
    out = sd1(prompts, anchors=anchors, anchor_strength=2.0, generator=[gen(0), gen(1)], return_original=True, **kw)
    without = sd1(prompts, generator=[gen(0), gen(1)], **kw)
    assert not np.allclose(out.images, without.images, atol=1e-3)  # the projection changed something here
    if mode == "single":  # (dual's erased branch also reads the original branch, which keeps the plain prompt)
        pe = projected_embeds(sd1, prompts, "red", anchors, 2.0, gate=False)
        ne = sd1.encode_prompt([""] * 2, "cpu", 1, False)[0]
        ref = sd1(prompt_embeds=pe, negative_prompt_embeds=ne, generator=[gen(0), gen(1)], **kw)
        assert np.allclose(out.images, ref.images, atol=1e-5)
    plain = sd1(prompts, generator=[gen(0), gen(1)], **KW).images
    assert np.allclose(out.original_images, plain, atol=1e-5)  # the original branch / pass stays plain


def test_processors_restored_and_prompt_embeds_path_untouched_after_anchors(sd1):
    before = dict(sd1.unet.attn_processors)
    sd1("a red star", erase="red", anchors=["blue"], generator=gen(), **KW)
    assert dict(sd1.unet.attn_processors) == before


def test_prompt_embeds_are_projected_like_the_prompt_text(sd1):
    """Without the text, a prompt is projected along the concept's direction whether or not it names
    the concept (the counterfactuals of a naming prompt need its words)."""
    kw = dict(erase="red", erase_scale=-2.0, anchors=["blue", "green"], anchor_strength=2.0, anchor_gate=False,
              concept_context="separate", **KW)
    pe = sd1.encode_prompt("a tree in the fog", "cpu", 1, False)[0]
    a = sd1("a tree in the fog", generator=gen(), **kw).images
    b = sd1(prompt_embeds=pe, generator=gen(), **kw).images
    assert np.allclose(a, b, atol=1e-6) and not np.allclose(a, sd1("a tree in the fog", generator=gen(), **KW).images, atol=1e-4)
    projected = projected_embeds(sd1, ["a red star"], "red", ["blue", "green"], 2.0, gate=False)
    pe = sd1.encode_prompt("a red star", "cpu", 1, False)[0]
    along = project_tokens(pe, *concept_directions(*aligned_concept_and_anchors(
        sd1.encode_prompt("red", "cpu", 1, False)[0][0], len(sd1.tokenizer("red").input_ids),
        torch.cat([sd1.encode_prompt(x, "cpu", 1, False)[0] for x in ["blue", "green"]]),
        torch.tensor([len(ids) for ids in sd1.tokenizer(["blue", "green"]).input_ids]))), 2.0)
    ne = sd1.encode_prompt("", "cpu", 1, False)[0]
    kw2 = {k: v for k, v in kw.items() if not k.startswith("anchor")}
    b = sd1(prompt_embeds=pe, generator=gen(), **kw).images
    assert np.allclose(b, sd1(prompt_embeds=along, negative_prompt_embeds=ne, generator=gen(), **kw2).images, atol=1e-5)
    assert not torch.allclose(projected, along, atol=1e-3)


def test_users_negative_prompt_embeds_are_kept_with_anchors(sd1):
    ne = sd1.encode_prompt("blurry", "cpu", 1, False)[0]
    kw = dict(erase="red", anchors=["blue", "green"], concept_context="separate", **KW)
    a = sd1("a red star", negative_prompt_embeds=ne, generator=gen(), **kw).images
    b = sd1("a red star", negative_prompt="blurry", generator=gen(), **kw).images
    c = sd1("a red star", generator=gen(), **kw).images
    assert np.allclose(a, b, atol=1e-6) and not np.allclose(a, c, atol=1e-4)


def test_nearest_concept_gate_compares_mean_cosine_after_bos():
    seq, dim = 6, 3
    concept = torch.tensor([1.0, 0.0, 0.0]).expand(seq, dim)
    anchors = torch.stack([torch.tensor([0.0, 1.0, 0.0]).expand(seq, dim), torch.tensor([0.0, 0.0, 1.0]).expand(seq, dim)])
    near_concept = torch.tensor([1.0, 0.8, 0.1]).expand(seq, dim).clone()
    near_anchor = torch.tensor([0.5, 0.1, 1.0]).expand(seq, dim).clone()
    bos_only = near_anchor.clone()
    bos_only[0] = near_concept[0]  # BOS does not count
    gate = nearest_to_concept(torch.stack([near_concept, near_anchor, bos_only]), concept, anchors)
    assert gate.tolist() == [True, False, False]


def test_gate_leaves_prompts_nearer_an_anchor_untouched(sd1):
    """With the gate, every prompt is either projected exactly as without it, or left as it was."""
    prompts, anchors = ["a red star", "a blue circle on a gray background"], ["blue", "green", "yellow"]
    gated = projected_embeds(sd1, prompts, "red", anchors, 2.0, gate=True)
    ungated = projected_embeds(sd1, prompts, "red", anchors, 2.0, gate=False)
    plain = sd1.encode_prompt(prompts, "cpu", 1, False)[0]
    for g, u, p in zip(gated, ungated, plain):
        assert torch.equal(g, u) or torch.equal(g, p)
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchors=anchors, anchor_strength=2.0, **KW)
    out = sd1(prompts, generator=[gen(0), gen(1)], **kw).images
    ne = sd1.encode_prompt([""] * 2, "cpu", 1, False)[0]
    ref = sd1(prompt_embeds=gated, negative_prompt_embeds=ne, generator=[gen(0), gen(1)],
              **{k: v for k, v in kw.items() if not k.startswith("anchor")}).images
    assert np.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("anchors", [[], None])
def test_region_without_a_projection_is_refused_before_model_work(sd1, sdxl, anchors):
    """anchor_region confines the projection: asked for without one (no anchors; SDXL's default), it is an error,
    not a silent no-op."""
    for pipe in (sd1, sdxl) if anchors is None else (sd1,):
        kw = {} if anchors is None else {"anchors": anchors}
        with ModelCalls(pipe) as model, pytest.raises(EraseConfigError, match="anchor_region"):
            pipe("a red star", erase="red", anchor_region=True, concept_context="separate", generator=gen(), **KW, **kw)
        assert model.calls == []


def test_anchors_refused_on_sdxl_before_model_work(sdxl):
    with ModelCalls(sdxl) as model, pytest.raises(EraseConfigError, match="anchors are supported on SD 1.x/2.x"):
        sdxl("a red star", erase="red", anchors=["blue"], generator=gen(), **KW)
    assert model.calls == []


def test_auto_anchors_come_from_the_model_folder(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text('{"Red": ["blue", "green"]}')
    kw = dict(erase="red", erase_scale=-2.0, anchor_gate=False, concept_context="separate", **KW)
    auto = sd1("a red star", anchors="auto", generator=gen(), **kw).images
    explicit = sd1("a red star", anchors=["blue", "green"], generator=gen(), **kw).images
    assert np.array_equal(auto, explicit)
    kw["erase"] = "star"
    with pytest.warns(UserWarning, match="lists no anchors for \\['star'\\]"):
        unlisted = sd1("a red star", anchors="auto", generator=gen(), **kw).images
    assert np.array_equal(unlisted, sd1("a red star", generator=gen(), **kw).images)  # concept term alone


@pytest.mark.parametrize("content", ['["blue"]', '{"red": "blue"}', '{"red": ["blue", " "]}', "{not json"])
def test_malformed_anchor_file_is_refused_before_model_work(sd1, model_folder, content):
    (model_folder / "eiup_anchors.json").write_text(content)
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match="eiup_anchors.json"):
        sd1("a red star", erase="red", anchors="auto", generator=gen(), **KW)
    assert model.calls == []


def test_default_auto_is_quiet_without_an_anchor_file_and_used_with_one(sd1, model_folder, monkeypatch):
    import warnings

    import eiup.config as config_module

    monkeypatch.setattr(config_module, "DEFAULT_ANCHORS", "auto")
    kw = dict(erase="red", erase_scale=-2.0, anchor_gate=False, concept_context="separate", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no anchor file: the default stays quiet
        quiet = sd1("a red star", generator=gen(), **kw).images
    assert np.array_equal(quiet, sd1("a red star", anchors=[], generator=gen(), **kw).images)
    with pytest.warns(UserWarning, match="lists no anchors"):  # asked for explicitly: said
        sd1("a red star", anchors="auto", generator=gen(), **kw)
    (model_folder / "eiup_anchors.json").write_text('{"red": ["blue", "green"]}')
    default = sd1("a red star", generator=gen(), **kw).images
    assert np.array_equal(default, sd1("a red star", anchors=["blue", "green"], generator=gen(), **kw).images)


def test_model_presets_give_strength_and_scale_unless_the_call_does(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(
        '{"red": {"anchors": ["blue", "green"], "strength": 2.0, "scale": -1.5}}')
    kw = dict(erase="red", anchor_gate=False, concept_context="separate", **KW)
    preset = sd1("a red star", generator=gen(), **kw).images
    spelled = sd1("a red star", anchors=["blue", "green"], anchor_strength=2.0, erase_scale=-1.5, generator=gen(), **kw).images
    assert np.array_equal(preset, spelled)
    own = sd1("a red star", anchor_strength=1.0, erase_scale=-3.0, generator=gen(), **kw).images
    spelled = sd1("a red star", anchors=["blue", "green"], anchor_strength=1.0, erase_scale=-3.0, generator=gen(), **kw).images
    assert np.array_equal(own, spelled) and not np.array_equal(own, preset)


def test_model_presets_may_give_prompts_naming_the_concept_their_own_strength(sd1, model_folder):
    (model_folder / "eiup_anchors.json").write_text(
        '{"red": {"anchors": ["blue", "green"], "strength": 2.0, "named_strength": 3.0, "scale": -1.5}}')
    kw = dict(erase="red", erase_scale=-1.5, anchor_gate=False, prompt_gate=False, concept_context="separate", **KW)

    def one(prompt, **extra):
        return sd1(prompt, generator=gen(), **kw, **extra).images[0]

    preset = sd1(["a red star", "a tree in the fog"], generator=[gen(), gen()], **kw).images
    # a batch of two against single images: float noise of batched kernels only (differs by CPU), far below 1e-4
    assert np.allclose(preset[0], one("a red star", anchors=["blue", "green"], anchor_strength=3.0), atol=2e-5)
    assert np.allclose(preset[1], one("a tree in the fog", anchors=["blue", "green"], anchor_strength=2.0), atol=2e-5)
    assert not np.allclose(preset[0], one("a red star", anchors=["blue", "green"], anchor_strength=2.0), atol=1e-4)
    own = one("a red star", anchor_strength=1.0)  # the call's strength is for every prompt
    assert np.allclose(own, one("a red star", anchors=["blue", "green"], anchor_strength=1.0), atol=1e-6)


def test_model_presets_may_give_prompts_naming_one_thing_their_own_anchors(sd1, model_folder):
    """{"one_thing": {...}}: prompts of one thing are projected along its anchors and strengths, prompts of two
    along the concept's own; a strength the call gives (one, or one per image as the guard gives) is for both."""
    (model_folder / "eiup_anchors.json").write_text(
        '{"red": {"anchors": ["blue", "green"], "strength": 2.0, "named_strength": 3.0, '
        '"one_thing": {"anchors": ["purple"], "strength": 1.0, "named_strength": 1.5}}}')
    kw = dict(erase="red", erase_scale=-1.5, anchor_gate=False, prompt_gate=False, concept_context="separate", **KW)
    prompts = ["a red star", "a red star and a tree", "a tree in the fog", "a tree, the red sun"]

    def one(prompt, **extra):
        return sd1(prompt, generator=gen(), **kw, **extra).images[0]

    preset = sd1(prompts, generator=[gen() for _ in prompts], **kw).images
    expected = [one(prompts[0], anchors=["purple"], anchor_strength=1.5), one(prompts[1], anchors=["blue", "green"], anchor_strength=3.0),
                one(prompts[2], anchors=["purple"], anchor_strength=1.0), one(prompts[3], anchors=["blue", "green"], anchor_strength=3.0)]
    for got, want in zip(preset, expected):
        assert np.allclose(got, want, atol=2e-5)
    assert not np.allclose(preset[0], one(prompts[0], anchors=["blue", "green"], anchor_strength=3.0), atol=1e-4)
    given = sd1(prompts[:2], anchor_strength=[1.25, 0.5], generator=[gen(), gen()], **kw).images
    assert np.allclose(given[0], one(prompts[0], anchors=["purple"], anchor_strength=1.25), atol=2e-5)
    assert np.allclose(given[1], one(prompts[1], anchors=["blue", "green"], anchor_strength=0.5), atol=2e-5)
    spelled = sd1(prompts[0], anchors=["blue", "green"], anchor_strength=1.5, generator=gen(), **kw).images[0]
    assert not np.allclose(spelled, preset[0], atol=1e-4)  # anchors the call gives replace the preset, for every prompt
    # the gate of a model without prompt probes compares the prompt with the concept's own anchors, also when
    # every prompt of the call gets the one-thing anchors; "a red star" names red, so it is projected
    gate_on = {**kw, "anchor_gate": True}
    gated = sd1(prompts[0], generator=gen(), **gate_on).images[0]
    spelled = sd1(prompts[0], anchors=["purple"], anchor_strength=1.5, generator=gen(), **gate_on).images[0]
    assert np.allclose(gated, spelled, atol=1e-6)


def test_thing_phrases_split_a_prompt_into_the_things_it_names():
    from eiup.anchors import thing_phrases

    assert thing_phrases("a starfish and a lime, highly detailed") == ["a starfish", "a lime"]
    assert thing_phrases("an image of a starfish and a lime in the fog") == ["an image of a starfish", "a lime in the fog"]
    assert thing_phrases("a cat with a hat; a dog") == ["a cat", "a hat", "a dog"]
    assert thing_phrases("a red star on a white background") == ["a red star on a white background"]
    assert thing_phrases("") == []


def test_the_probe_gate_also_asks_each_thing_of_a_prompt_of_several_alone():
    """A prompt of several things is gated in where one of its thing phrases alone clears PHRASE_PROBE_LOGIT;
    prompts of one thing are not split, and each phrase is encoded once."""
    from eiup.config import PHRASE_PROBE_LOGIT
    from eiup.pipeline import EIUPMixin

    class Probe:  # the logit is the embedding's first number
        def logits(self, embeds):
            return embeds[:, 0, 0]

    scores = {"a starfish": 7.0, "a lime": -3.0, "a pear": PHRASE_PROBE_LOGIT - 0.5, "a plum": PHRASE_PROBE_LOGIT + 0.5}
    encoded_texts = []

    def encode(texts):
        encoded_texts.extend(texts)
        return torch.tensor([scores[t] for t in texts])[:, None, None].expand(-1, 3, 2)

    prompts = ["a starfish and a lime", "a lime and a pear", "a pear and a plum", "a starfish", "a lime, a starfish"]
    whole = torch.tensor([-1.0, -1.0, -1.0, -1.0, 0.5])[:, None, None].expand(-1, 3, 2)
    gate = EIUPMixin._probe_gate(Probe(), whole, prompts, {}, encode)
    assert gate.tolist() == [True, False, True, False, True]
    assert sorted(encoded_texts) == ["a lime", "a pear", "a plum", "a starfish"]  # once each; "a starfish" alone is not split
    assert EIUPMixin._probe_gate(Probe(), whole, None, {}, encode).tolist() == [False] * 4 + [True]


def test_one_thing_is_one_phrase_naming_a_thing():
    from eiup.anchors import names_one_thing

    for text in ("a red star on a white background", "a tomato, highly detailed", "a tomato at night", "tomato", ""):
        assert names_one_thing(text), text
    for text in ("a tomato and a lime", "a lime, the red sun", "a cat with a hat", "a tomato and a lime, 4k"):
        assert not names_one_thing(text), text


@pytest.mark.parametrize("entry", ['{"anchors": ["blue"], "named_strength": -1}', '{"anchors": ["blue"], "strength": 0}', '{"anchors": ["blue"], "scale": 0.5}',
                                   '{"anchors": ["blue"], "scale": "strong"}', '{"strength": 1.0, "anchors": "blue"}',
                                   '{"anchors": ["blue"], "aliases": "crimson"}', '{"anchors": ["blue"], "aliases": [""]}',
                                   '{"anchors": ["blue"], "protect": ["star"]}', '{"anchors": ["blue"], "protect": "star"}',
                                   '{"anchors": ["blue"], "in_context": "yes"}', '{"anchors": ["blue"], "region": 1}',
                                   '{"anchors": ["blue"], "region": "box"}', '{"anchors": ["blue"], "one_thing": ["green"]}',
                                   '{"anchors": ["blue"], "one_thing": {"anchors": []}}',
                                   '{"anchors": ["blue"], "one_thing": {"anchors": ["green"], "scale": -1}}',
                                   '{"anchors": ["blue"], "one_thing": {"anchors": ["green"], "strength": 0}}'])
def test_malformed_presets_are_refused_before_model_work(sd1, model_folder, entry):
    (model_folder / "eiup_anchors.json").write_text('{"red": %s}' % entry)
    with ModelCalls(sd1) as model, pytest.raises(EraseConfigError, match="eiup_anchors.json"):
        sd1("a red star", erase="red", generator=gen(), **KW)
    assert model.calls == []


def test_a_prompt_naming_the_concept_moves_away_from_its_counterfactuals(sd1):
    """"a red star" -> e - s (e - mean(e("a blue star"), e("a green star"))): the tokens before "red"
    are unchanged (causal encoder), the rest move away from the prompt with red replaced."""
    anchors = ["blue", "green"]
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchors=anchors, anchor_strength=2.0,
              prompt_gate=False, **KW)
    expected = projected_embeds(sd1, ["a red star"], "red", anchors, 2.0, gate=True)
    e = sd1.encode_prompt("a red star", "cpu", 1, False)[0]
    n_before = len(sd1.tokenizer("a", add_special_tokens=False).input_ids) + 1  # BOS + "a"
    assert torch.allclose(expected[0, :n_before], e[0, :n_before], atol=1e-5)
    assert not torch.allclose(expected[0, n_before:], e[0, n_before:], atol=1e-3)
    out = sd1("a red star", generator=gen(), **kw).images
    ne = sd1.encode_prompt("", "cpu", 1, False)[0]
    ref = sd1(prompt_embeds=expected, negative_prompt_embeds=ne, generator=gen(),
              **{k: v for k, v in kw.items() if not k.startswith("anchor")}).images
    assert np.allclose(out, ref, atol=1e-5)


def test_a_prompt_naming_the_concept_is_gated_in(sd1):
    kw = dict(erase="red", erase_scale=-2.0, anchors=["blue", "green"], concept_context="separate", **KW)
    named = sd1(["a red star", "a RED, star"], generator=[gen(0), gen(1)], **kw).images
    ungated = sd1(["a red star", "a RED, star"], generator=[gen(0), gen(1)], anchor_gate=False, **kw).images
    assert np.array_equal(named, ungated)
    from eiup.pipeline import _concepts_named, _row_prompts

    call = {"prompt": ["a red star", "a reddish star", "Red!", "a tomato"], "num_images_per_prompt": 2}
    assert _concepts_named(_row_prompts(call), ["red", "tomato"]) == [[True, True, False, False, True, True, False, False],
                                                         [False, False, False, False, False, False, True, True]]
    assert _concepts_named(_row_prompts({"prompt": None}), ["red"]) is None


def test_an_anchor_of_another_token_count_is_read_through_the_alignment(sd1):
    tok = sd1.tokenizer
    anchors = ["light blue", "green"]
    assert len(tok("a light blue star").input_ids) != len(tok("a red star").input_ids)
    kw = dict(erase="red", erase_scale=-2.0, concept_context="separate", anchors=anchors, anchor_strength=2.0,
              prompt_gate=False, **KW)
    expected = projected_embeds(sd1, ["a red star"], "red", anchors, 2.0, gate=True)
    out = sd1("a red star", generator=gen(), **kw).images
    ne = sd1.encode_prompt("", "cpu", 1, False)[0]
    ref = sd1(prompt_embeds=expected, negative_prompt_embeds=ne, generator=gen(),
              **{k: v for k, v in kw.items() if not k.startswith("anchor")}).images
    assert np.allclose(out, ref, atol=1e-5)


def test_preset_aliases_name_the_concept_and_are_replaced_by_the_anchors(sd1, model_folder):
    """{"aliases": ["black background"]}: "a star on a black background" names night and moves away
    from "a star on a white background"; without the alias it is projected along night's direction."""
    preset = '{"night": {"anchors": ["white background"], "strength": 1.5, "named_strength": 1.0%s}}'
    kw = dict(erase="night", erase_scale=-1.0, concept_context="separate", anchor_gate=False, prompt_gate=False, **KW)
    (model_folder / "eiup_anchors.json").write_text(preset % ', "aliases": ["black background"]')
    with_alias = sd1("a star on a black background", generator=gen(), **kw).images
    ne = sd1.encode_prompt("", "cpu", 1, False)[0]
    away = sd1.encode_prompt("a star on a white background", "cpu", 1, False)[0]  # strength 1: the counterfactual
    ref = sd1(prompt_embeds=away, negative_prompt_embeds=ne, generator=gen(),
              **{k: v for k, v in kw.items() if not k.startswith("anchor")}).images
    assert np.allclose(with_alias, ref, atol=1e-5)
    (model_folder / "eiup_anchors.json").write_text(preset % "")
    without = sd1("a star on a black background", generator=gen(), **kw).images
    assert not np.allclose(with_alias, without, atol=1e-4)
    from eiup.pipeline import _concepts_named

    assert _concepts_named(["a star at NIGHT", "on a black background", "blackbackground"], ["night"],
                           [("black background",)]) == [[True, True, False]]


def test_preset_protect_projects_along_the_direction_kept_clear_of_the_protected_words(sd1, model_folder):
    """{"protect": [...]}: a prompt that does not name the concept is projected along the concept's
    direction with the protected words' differences removed (hand-built reference), and differently
    from without it; prompts naming the concept keep their counterfactual path."""
    preset = '{"red": {"anchors": ["blue", "green"], "strength": 2.0%s}}'
    protect = ["circle", "square", "star"]
    kw = dict(erase="red", erase_scale=-1.0, concept_context="separate", anchor_gate=False, prompt_gate=False, **KW)
    (model_folder / "eiup_anchors.json").write_text(preset % (', "protect": %s' % str(protect).replace("'", '"')))
    out = sd1("a tree in the fog", generator=gen(), **kw).images
    enc = lambda t: sd1.encode_prompt(t, "cpu", 1, False)[0]  # noqa: E731
    tok = sd1.tokenizer
    lengths = lambda words: torch.tensor([len(ids) for ids in tok(words).input_ids])  # noqa: E731
    c, a = aligned_concept_and_anchors(enc("red")[0], len(tok("red").input_ids), torch.cat([enc(w) for w in ["blue", "green"]]),
                                       lengths(["blue", "green"]))
    _, p = aligned_concept_and_anchors(enc("red")[0], len(tok("red").input_ids), torch.cat([enc(w) for w in protect]),
                                       lengths(protect))
    mean, d = concept_directions(c, a)
    pe = project_tokens(enc("a tree in the fog"), mean, protect_directions(d, mean, c, p), 2.0)
    ref = sd1(prompt_embeds=pe, negative_prompt_embeds=enc(""), generator=gen(),
              **{k: v for k, v in kw.items() if not k.startswith("anchor")}).images
    assert np.allclose(out, ref, atol=1e-5)
    named = sd1("a red star", generator=gen(), **kw).images
    (model_folder / "eiup_anchors.json").write_text(preset % "")
    assert not np.allclose(sd1("a tree in the fog", generator=gen(), **kw).images, out, atol=1e-4)
    assert np.allclose(sd1("a red star", generator=gen(), **kw).images, named, atol=1e-6)
    assert np.array_equal(sd1("a tree in the fog", anchor_protect=protect, generator=gen(), **kw).images, out)  # the call's
    (model_folder / "eiup_anchors.json").write_text(preset % (', "protect": %s' % str(protect).replace("'", '"')))
    unprotected = sd1("a tree in the fog", anchor_protect=[], generator=gen(), **kw).images  # [] switches the preset's off
    assert not np.allclose(unprotected, out, atol=1e-4)
    explicit = dict(kw, anchors=["blue", "green"], anchor_strength=2.0)  # explicit anchors take the call's words too
    assert np.array_equal(sd1("a tree in the fog", anchor_protect=protect, generator=gen(), **explicit).images, out)


def test_word_substitutions_replace_each_word_by_each_given_word():
    assert word_substitutions("a tomato  on ice", ["red", "blue"]) == [
        "red tomato on ice", "blue tomato on ice", "a red on ice", "a blue on ice",
        "a tomato red ice", "a tomato blue ice", "a tomato on red", "a tomato on blue"]
    assert word_substitutions("   ", ["red"]) == []


def test_the_implying_word_is_where_the_concept_fits_and_the_anchors_do_not():
    torch.manual_seed(0)
    e = torch.randn(6, 4)
    near, far = e + 0.01, e + 1.0
    substituted = torch.stack([torch.stack([far, far, far]),     # the concept changes word 0's prompt as much as anchors
                               torch.stack([near, far, far]),    # word 1: the concept barely changes it, anchors do
                               torch.stack([near, near, near])])  # word 2: nothing changes it
    assert implying_word(e, substituted) == 1


def test_in_context_anchors_project_an_implying_prompt_along_its_substituted_variants(sd1, model_folder):
    """{"in_context": true}: a prompt that the probe says implies the concept, after the projection along the
    bare words' direction, is projected along the direction its variants give (the implying word replaced
    by the concept and by each anchor) with named_strength: a hand-built reference; the call's
    anchor_in_context=False and a probe that says no leave that step out."""
    from eiup.probe import PROBE_DIR, PromptProbe, probe_path

    dim = sd1.text_encoder.config.hidden_size
    preset = '{"red": {"anchors": ["blue", "green"], "strength": 1.0, "named_strength": 2.0, "in_context": true}}'
    (model_folder / "eiup_anchors.json").write_text(preset)
    PromptProbe("red", torch.zeros(2 * dim), 50.0).save(probe_path(model_folder / PROBE_DIR, "red"))
    kw = dict(erase="red", erase_scale=-1.0, concept_context="separate", prompt_gate=False, **KW)
    prompt, tok = "a tree in the fog", sd1.tokenizer
    enc = lambda t: sd1.encode_prompt(t, "cpu", 1, False)[0]  # noqa: E731
    plain_kw = {k: v for k, v in kw.items() if not k.startswith("anchor")}

    def ref(pe):
        return sd1(prompt_embeds=pe, negative_prompt_embeds=enc(""), generator=gen(), **plain_kw).images

    e = enc(prompt)
    c, a = aligned_concept_and_anchors(enc("red")[0], len(tok("red").input_ids), torch.cat([enc(w) for w in ["blue", "green"]]),
                                       torch.tensor([len(ids) for ids in tok(["blue", "green"]).input_ids]))
    first = project_tokens(e, *concept_directions(c, a), 1.0)
    texts = word_substitutions(prompt, ["red", "blue", "green"])
    ids = tok(prompt).input_ids
    variants = torch.stack([enc(t)[0][counterfactual_positions(ids, tok(t).input_ids, e.shape[1])] for t in texts])
    variants = variants.view(-1, 3, *e.shape[1:])
    j = implying_word(e[0], variants)
    second = project_tokens(first, *concept_directions(variants[j, 0], variants[j, 1:]), 2.0)

    with ModelCalls(sd1) as model:
        out = sd1(prompt, generator=gen(), **kw).images
    assert np.allclose(out, ref(second), atol=1e-5)
    with ModelCalls(sd1) as batch:  # rows repeating the prompt share its variants' encoding
        three = sd1([prompt] * 3, generator=[gen(), gen(), gen()], **kw).images
    assert batch.calls.count("text_encoder") == model.calls.count("text_encoder")
    assert all(np.allclose(im, out[0], atol=1e-5) for im in three)
    off = sd1(prompt, anchor_in_context=False, generator=gen(), **kw).images
    assert np.allclose(off, ref(first), atol=1e-5) and not np.allclose(off, out, atol=1e-4)
    PromptProbe("red", torch.zeros(2 * dim), -50.0).save(probe_path(model_folder / PROBE_DIR, "red"))
    gated_out = sd1(prompt, anchor_gate=False, generator=gen(), **kw).images  # projected, but the probe says no
    assert np.allclose(gated_out, ref(first), atol=1e-5)


def test_in_context_anchors_of_a_long_prompt_read_its_window_and_warn_once(sd1, model_folder, caplog):
    """A prompt past the encoder's window: only the words the encoder reads are tried, and the
    variants (as long as the prompt) do not repeat the truncation warning the prompt itself gave."""
    import logging

    from eiup.probe import PROBE_DIR, PromptProbe, probe_path

    dim = sd1.text_encoder.config.hidden_size
    (model_folder / "eiup_anchors.json").write_text('{"red": {"anchors": ["blue", "green"], "strength": 1.0}}')
    PromptProbe("red", torch.zeros(2 * dim), 50.0).save(probe_path(model_folder / PROBE_DIR, "red"))
    prompt = "a tree in the fog, " + ", ".join(["highly detailed", "sharp focus"] * 30)
    assert len(sd1.tokenizer(prompt).input_ids) > sd1.tokenizer.model_max_length
    kw = dict(erase="red", erase_scale=-1.0, concept_context="separate", prompt_gate=False, **KW)
    diffusers_log = logging.getLogger("diffusers")  # diffusers does not propagate to the root logger
    diffusers_log.addHandler(caplog.handler)
    try:
        without = sd1(prompt, anchor_in_context=False, generator=gen(), **kw).images
        warned_without = sum("truncated" in r.getMessage() for r in caplog.records)
        caplog.clear()
        with ModelCalls(sd1) as model:
            with_ = sd1(prompt, anchor_in_context=True, generator=gen(), **kw).images
        warned_with = sum("truncated" in r.getMessage() for r in caplog.records)
    finally:
        diffusers_log.removeHandler(caplog.handler)
    assert warned_with == warned_without >= 1
    assert not np.allclose(with_, without, atol=1e-4)
    assert model.calls.count("text_encoder") >= 2


# ---- anchor_region: the projection confined to the concept's region ----------------------------------------


def test_word_positions_cover_every_occurrence_of_every_word():
    assert word_positions([0, 5, 7, 8, 5, 7, 1], [[5, 7]]) == [1, 2, 4, 5]
    assert word_positions([0, 5, 7, 8, 1], [[8], [9, 9], []]) == [3]
    assert word_positions([0, 1], [[5]]) == []


def test_region_weights_ramp_between_the_thresholds_of_the_images_own_maximum():
    from eiup.attention import region_blend, region_weights

    m = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.5, 1.0]])
    w = region_weights(m, 0.25, 0.75)
    assert torch.allclose(w, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.5, 1.0]]))
    original, edited = torch.zeros(2, 5, 3), torch.ones(2, 5, 3)
    assert torch.allclose(region_blend(original, edited, w[..., None]), w[..., None].expand(2, 5, 3))


def region_of_call(pipe, prompt, **kw):
    """The RegionGate the call built (read from the erase context at the first step) and the images."""
    seen = {}

    def capture(p, i, t, cb_kwargs):
        seen.setdefault("region", p.erase_context.region)
        return cb_kwargs

    images = pipe(prompt, generator=gen(), callback_on_step_end=capture, **kw).images
    return seen["region"], images


def test_region_carriers_are_the_named_word_or_the_implying_word(sd1, model_folder):
    """A prompt naming the concept is confined to the concept word's map; one that (by the probe) implies it,
    to the implying word's (the one the in-context anchors replace); a prompt the projection leaves is not
    confined at all."""
    from eiup.probe import PROBE_DIR, PromptProbe, probe_path

    dim, tok = sd1.text_encoder.config.hidden_size, sd1.tokenizer
    (model_folder / "eiup_anchors.json").write_text('{"red": {"anchors": ["blue", "green"], "region": true}}')
    PromptProbe("red", torch.zeros(2 * dim), 50.0).save(probe_path(model_folder / PROBE_DIR, "red"))
    kw = dict(erase="red", erase_scale=-1.0, concept_context="separate", prompt_gate=False, **KW)
    region, _ = region_of_call(sd1, "a big red star", **kw)
    named = tok("a big red star").input_ids.index(tok("red", add_special_tokens=False).input_ids[0])
    assert region.carriers[0].nonzero().flatten().tolist() == [named]
    region, _ = region_of_call(sd1, "a tree in the fog", **kw)
    enc = lambda t: sd1.encode_prompt(t, "cpu", 1, False)[0]  # noqa: E731
    prompt, ids = "a tree in the fog", tok("a tree in the fog").input_ids
    texts = word_substitutions(prompt, ["red", "blue", "green"])
    e = enc(prompt)
    variants = torch.stack([enc(t)[0][counterfactual_positions(ids, tok(t).input_ids, e.shape[1])] for t in texts])
    j = implying_word(e[0], variants.view(-1, 3, *e.shape[1:]))
    start = 1 + sum(len(tok(w, add_special_tokens=False).input_ids) for w in prompt.split()[:j])
    width = len(tok(prompt.split()[j], add_special_tokens=False).input_ids)
    assert region.carriers[0].nonzero().flatten().tolist() == list(range(start, start + width))
    PromptProbe("red", torch.zeros(2 * dim), -50.0).save(probe_path(model_folder / PROBE_DIR, "red"))
    region, images = region_of_call(sd1, "a tree in the fog", **kw)
    assert region is None  # not projected: nothing to confine
    assert np.array_equal(images, region_of_call(sd1, "a tree in the fog", anchor_region=False, **kw)[1])


def test_phrase_rule_carries_the_named_words_phrase_against_the_other_phrases(sd1, model_folder):
    """With the "phrases" rule (the preset's, or asked per call) the carriers are the content words of the named word's
    phrase and the rivals those of the other phrases; True takes the preset's rule, "map" overrides it."""
    (model_folder / "eiup_anchors.json").write_text('{"red": {"anchors": ["blue", "green"], "region": "phrases"}}')
    kw = dict(erase="red", erase_scale=-1.0, concept_context="separate", prompt_gate=False, **KW)
    n = lambda text: len(sd1.tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    words = lambda before, upto: list(range(1 + n(before), 1 + n(upto)))  # noqa: E731  the tokens after BOS + before
    for asked in (None, True, "phrases"):
        region, _ = region_of_call(sd1, "a big red star and a blue circle", anchor_region=asked, **kw)
        assert region.carriers[0].nonzero().flatten().tolist() == words("a", "a big red star")
        assert region.rivals[0].nonzero().flatten().tolist() == words("a big red star and a", "a big red star and a blue circle")
    region, _ = region_of_call(sd1, "a big red star and a blue circle", anchor_region="map", **kw)
    assert region.rivals is None and region.carriers[0].nonzero().flatten().tolist() == words("a big", "a big red")


@pytest.mark.parametrize("mode", ["single", "dual"])
def test_region_weights_of_one_and_zero_give_the_projected_and_the_plain_output(sd1, model_folder, monkeypatch, mode):
    """Weights 1 everywhere reproduce the unconfined projection; weights 0 everywhere the layer's output for
    the prompt as given, so the image of a call without erasure: the confined layer recomputes it exactly."""
    import eiup.attention as attention

    (model_folder / "eiup_anchors.json").write_text('{"red": {"anchors": ["blue", "green"], "strength": 2.0}}')
    kw = dict(erase="red", erase_scale=-1.0, erase_mode=mode, concept_context="separate", prompt_gate=False,
              anchor_gate=False, **KW)
    if mode == "dual":
        kw["cross_attn_fraction"] = 0.5
    unconfined = sd1("a red star", generator=gen(), **kw).images
    monkeypatch.setattr(attention, "region_weights", lambda m, low, high: torch.ones_like(m))
    assert np.allclose(sd1("a red star", anchor_region=True, generator=gen(), **kw).images, unconfined, atol=1e-5)
    monkeypatch.setattr(attention, "region_weights", lambda m, low, high: torch.zeros_like(m))
    plain = sd1("a red star", generator=gen(), **KW).images
    confined = sd1("a red star", anchor_region=True, generator=gen(), **kw).images
    assert not np.allclose(unconfined, plain, atol=1e-3) and np.allclose(confined, plain, atol=1e-5)


def test_phrases_split_at_and_and_commas_and_rivals_name_a_thing():
    from eiup.anchors import phrase_positions

    tokens = ["<s>", "a</w>", "tomato</w>", "and</w>", "a</w>", "lime</w>", ",</w>", "h", "ig", "h", "l", "y</w>",
              "on</w>", "a</w>", "gray</w>", "background</w>", "</s>"]
    # the style phrase after the comma names no thing (no determiner first): neither the concept's nor a rival
    assert phrase_positions(tokens, [2]) == ([2], [5])
    assert phrase_positions(tokens, [5]) == ([5], [2])
    assert phrase_positions(tokens, [2, 5]) == ([2, 5], [])
    assert phrase_positions(tokens, [8]) == ([7, 8, 9, 10, 11, 14, 15], [2, 5])
    listed = ["<s>", "a</w>", "lime</w>", ",</w>", "the</w>", "red</w>", "sun</w>", "</s>"]
    assert phrase_positions(listed, [5]) == ([5, 6], [2])
    one = ["<s>", "a</w>", "big</w>", "red</w>", "star</w>", "</s>"]
    assert phrase_positions(one, [3]) == ([2, 3, 4], [])  # one phrase: no rivals
    assert phrase_positions(one, []) == ([], [2, 3, 4])


def test_region_share_is_the_carriers_part_and_one_where_nothing_attends():
    from eiup.attention import region_share

    c, o = torch.tensor([[0.3, 0.1, 0.0, 0.0]]), torch.tensor([[0.1, 0.3, 0.2, 0.0]])
    assert torch.allclose(region_share(c, o), torch.tensor([[0.75, 0.25, 0.0, 1.0]]))


def test_phrase_rule_rows_ramp_the_share_and_rows_without_rivals_are_not_confined():
    """Per row: the phrase rule ramps the carriers' share between its thresholds; a phrase-rule row whose prompt has
    no other phrase gets weight 1 everywhere; a map-rule row keeps the relative-map ramp."""
    from eiup.attention import RegionGate, region_weights

    carriers = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    rivals = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    gate = RegionGate(torch.zeros(3, 4, 8), carriers, 0.25, 0.75, rivals=rivals,
                      by_phrase=torch.tensor([True, True, False]), phrase_thresholds=(0.2, 0.6))
    probs = torch.zeros(3, 2, 4, 4)  # (rows, heads, pixels, tokens): pixel p puts c_p on token 1, o_p on token 2
    c, o = torch.tensor([0.1, 0.2, 0.4, 0.5]), torch.tensor([0.4, 0.3, 0.2, 0.0])
    probs[:, :, :, 1], probs[:, :, :, 2] = c, o
    w = gate.weights(0, probs, (2, 2))
    assert torch.allclose(w[0], ((c / (c + o) - 0.2) / 0.4).clamp(0, 1))
    assert torch.equal(w[1], torch.ones(4))
    assert torch.allclose(w[2], region_weights(c[None], 0.25, 0.75)[0])


def test_region_map_averages_the_finished_steps_layers():
    from eiup.attention import RegionGate

    gate = RegionGate(torch.zeros(1, 4, 8), torch.tensor([[0.0, 1.0, 0.0, 0.0]]), 0.1, 0.3)
    first = torch.arange(16.0).view(1, 1, 16)  # a 4x4 layer of an 8x8 latent
    assert torch.equal(gate.region_map(0, first, (8, 8)), first)  # first step: the layer's own map
    gate.region_map(0, torch.zeros(1, 1, 64), (8, 8))  # an 8x8 layer, same step
    later = gate.region_map(1, torch.full((1, 1, 16), 99.0), (8, 8))
    expected = (torch.nn.functional.interpolate(first.view(1, 1, 4, 4), size=(8, 8), mode="bilinear",
                                                align_corners=False) + 0).flatten(2)
    expected = torch.nn.functional.adaptive_avg_pool2d(expected.view(1, 1, 8, 8), (4, 4)).flatten(2)
    assert torch.allclose(later, expected)  # the sum of step 0's maps (the zero map adds nothing), not step 1's own
    with pytest.raises(ValueError, match="low"):
        RegionGate(torch.zeros(1, 4, 8), torch.zeros(1, 4), 0.3, 0.3)
