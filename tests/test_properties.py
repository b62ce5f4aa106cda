"""Property-based test of EIUPPipeline on bad and odd input (issue #6).

Over random prompts (unicode, empty, > 77 tokens), concept lists (0-3, random words, empty,
whitespace, over-long), scales (0, negative, positive, nan, inf, per-concept lists), modes
(single, dual, invalid) and fractions, every call must either

* succeed, with finite images (and finite originals when asked for), or
* raise :class:`EraseConfigError` (a ``ValueError``) whose message names an argument that the
  oracle below found invalid, without running any model;

and in both cases the UNet's attention processors are the very same objects as before and
``pipe.erase_context`` is back to ``None``. The oracle says when a call must succeed, so a
valid input refused is a failure too.

Finite scales reach |w| <= 1e3, past the library's bound (``MAX_ABS_SCALE``) that refuses
magnitudes which only destroy the image or overflow float16 (``test_reliability.py::test_huge_scale_*``).
"""

from __future__ import annotations

from eiup.config import MAX_ABS_SCALE

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from eiup.config import EraseConfigError
from eiup.toy.world import words

KW = dict(num_inference_steps=2, height=16, width=16, output_type="np")
LIMIT = 75  # tokens a concept (or all concepts together) may use: 77 minus BOS/EOS
VOCAB = sorted(words())
FRACTIONS = ("cross_attn_fraction", "self_attn_fraction")
MISSING = object()  # argument not passed at all

# ---- strategies ------------------------------------------------------------------------------


def _vocab_run(n_min: int, n_max: int) -> st.SearchStrategy[str]:
    """Space-joined vocabulary words (one token each), cheap to draw even when long."""
    return st.tuples(st.integers(n_min, n_max), st.integers(0, len(VOCAB) - 1)).map(
        lambda t: " ".join(VOCAB[(t[1] + 7 * i) % len(VOCAB)] for i in range(t[0]))
    )


blank = st.sampled_from(["", " ", "\t\n", "\u3000", " \u00a0 "])
prompts = st.one_of(
    st.text(max_size=30),  # any unicode
    blank,
    _vocab_run(1, 12),
    _vocab_run(80, 130),  # longer than the encoder's 77 tokens
)
word = st.sampled_from(VOCAB)
good_concept = st.one_of(word, word.map(lambda w: f"  {w}\t"), _vocab_run(2, 20))  # padding is stripped
any_concept = st.one_of(
    good_concept,
    st.text(min_size=1, max_size=12),  # any unicode: valid unless blank or token-less
    blank,
    _vocab_run(30, 40),  # fine alone; three of them are too many tokens together
    _vocab_run(76, 90),  # over-long on its own
)
negative = st.floats(min_value=-1e3, max_value=0.0, allow_nan=False)
any_float = st.one_of(
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, -1.0, 1.0, math.nan, math.inf, -math.inf]),
)
unit = st.floats(0.0, 1.0)


def erase_arguments(only_valid: bool) -> st.SearchStrategy[dict]:
    """The erasure arguments; ``only_valid`` draws valid values only (half of the examples),
    so that a good share of the examples reaches an erasing generation."""
    if only_valid:
        concepts = st.lists(good_concept, max_size=3)
        scales = st.one_of(st.just(MISSING), st.none(), negative)  # per-concept lists: below
        modes = st.sampled_from([MISSING, None, "single", "dual"])
        contexts = st.sampled_from([MISSING, None, "separate", "prompt"])
        fractions = st.one_of(st.just(MISSING), unit, st.sampled_from([0.0, 1.0]))
        anchors = st.one_of(st.just(MISSING), st.lists(good_concept, max_size=3))
        strengths = st.one_of(st.just(MISSING), st.floats(0.01, 8.0))
    else:
        concepts = st.lists(any_concept, max_size=3)
        scales = st.one_of(st.just(MISSING), st.none(), any_float, st.lists(any_float, max_size=4))
        modes = st.sampled_from([MISSING, None, "single", "dual", "triple", "", "Dual", " single"])
        contexts = st.sampled_from([MISSING, None, "separate", "prompt", "sentence", ""])
        fractions = st.one_of(st.just(MISSING), unit, st.floats(-0.5, 1.5), st.sampled_from([math.nan, math.inf]))
        anchors = st.one_of(st.just(MISSING), st.lists(any_concept, max_size=3))
        strengths = st.one_of(st.just(MISSING), any_float)

    def with_scales(concepts: list[str]) -> st.SearchStrategy[dict]:
        per_concept = st.lists(negative if only_valid else any_float, min_size=len(concepts), max_size=len(concepts))
        return st.fixed_dictionaries({
            "concepts": st.just(concepts),
            "scale": st.one_of(scales, per_concept),
            "mode": modes,
            "context": contexts,
            "cross_attn_fraction": fractions,
            "self_attn_fraction": fractions,
            "allow_amplify": st.sampled_from([MISSING, False, True]),
            "anchors": anchors,
            "anchor_strength": strengths,
        })

    return concepts.flatmap(with_scales)


erase_args = st.booleans().flatmap(erase_arguments)
ARGS = dict(concepts=["red"], scale=MISSING, mode=MISSING, context=MISSING, cross_attn_fraction=MISSING,
            self_attn_fraction=MISSING, allow_amplify=MISSING, anchors=MISSING, anchor_strength=MISSING)  # base of the explicit examples

# ---- oracle --------------------------------------------------------------------------------


def invalid_arguments(tok, concepts, scale, mode, fracs, amplify, context=MISSING, anchors=MISSING,
                      strength=MISSING) -> set[str]:
    """Names of the arguments this call gets wrong (empty: the call must succeed).

    "erase" problems: an empty/whitespace concept, one without tokens, one over the 75-token
    limit, or all of them together over it. Scale problems are checked even without concepts
    (a nan scale is wrong on its own) except the sign, which only matters with concepts.
    """
    bad = set()
    stripped = [c.strip() for c in concepts]
    if any(not c for c in stripped):
        bad.add("erase")
    else:
        counts = [len(tok(c, add_special_tokens=False).input_ids) for c in stripped]
        total = len(tok(" ".join(stripped), add_special_tokens=False).input_ids) if stripped else 0
        if any(n == 0 or n > LIMIT for n in counts) or total > LIMIT:
            bad.add("erase")
    n = len(concepts)
    if scale is not MISSING and scale is not None:
        values = list(scale) if isinstance(scale, list) else [scale] * max(n, 1)
        if isinstance(scale, list) and len(scale) != n:
            bad.add("erase_scale")
        if not all(math.isfinite(v) for v in values) or (n and any(abs(v) > MAX_ABS_SCALE for v in values)):
            bad.add("erase_scale")
        elif n and any(v > 0 for v in values) and not amplify:
            bad.update({"erase_scale", "allow_amplify"})
    if mode is not MISSING and mode is not None and mode not in ("single", "dual"):
        bad.add("erase_mode")
    if context is not MISSING and context is not None and context not in ("separate", "prompt"):
        bad.add("concept_context")
    for name, value in fracs.items():
        if value is not MISSING and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            bad.add(name)
    if anchors is not MISSING and any(not a.strip() for a in anchors):
        bad.add("anchors")
    elif anchors is not MISSING and n and any(len(tok(a.strip(), add_special_tokens=False).input_ids) > LIMIT for a in anchors):
        bad.add("anchors")  # (the token budget is checked when there is something to erase)
    if strength is not MISSING and not (math.isfinite(strength) and 0.0 < strength <= 8.0):
        bad.add("anchor_strength")
    return bad


def names_in(message: str) -> set[str]:
    """Argument names mentioned in an error message ("erase" alone, not as in "erase_scale")."""
    found = {n for n in ("erase_scale", "erase_mode", "allow_amplify", "concept_context", "anchor_strength", *FRACTIONS)
             if n in message}
    if re.search(r"\banchors\b", message):
        found.add("anchors")
    if re.search(r"\berase(?![_a-z])", message):
        found.add("erase")
    return found


# ---- the property --------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompt=prompts, args=erase_args, as_string=st.booleans(), return_original=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
@example(prompt="a red star", args=dict(ARGS, scale=math.nan), as_string=True, return_original=True, seed=0)
@example(prompt="a red star", args=dict(ARGS, mode="dual", cross_attn_fraction=math.inf), as_string=False,
         return_original=False, seed=0)
@example(prompt=" ".join(VOCAB * 2), args=dict(ARGS, concepts=["red", " blue heart ", "日本"], scale=[-1.0, -0.0, -5.5],
         mode="dual"), as_string=False, return_original=True, seed=1)
@example(prompt="", args=dict(ARGS, concepts=["\u3000"]), as_string=True, return_original=False, seed=0)
@example(prompt="a red star", args=dict(ARGS, anchors=["blue", "green"], anchor_strength=2.0, mode="dual"), as_string=True,
         return_original=True, seed=3)
@example(prompt="a red star", args=dict(ARGS, anchors=["blue", " "], anchor_strength=math.nan), as_string=True,
         return_original=False, seed=0)
@example(prompt=" ".join(VOCAB * 2), args=dict(ARGS, concepts=["red", "blue heart"], context="prompt", mode="dual"),
         as_string=False, return_original=True, seed=2)
def test_any_input_erases_or_refuses_cleanly(sd1, prompt, args, as_string, return_original, seed):
    pipe = sd1
    concepts = args["concepts"]
    fracs = {name: args[name] for name in FRACTIONS}
    kwargs = {"erase_scale": args["scale"], "erase_mode": args["mode"], "allow_amplify": args["allow_amplify"],
              "concept_context": args["context"], "anchors": args["anchors"], "anchor_strength": args["anchor_strength"],
              **fracs}
    kwargs = {k: v for k, v in kwargs.items() if v is not MISSING}
    if concepts or not as_string:  # erase="x", erase=["x", ...], erase=[] or no erase argument at all
        kwargs["erase"] = concepts[0] if (as_string and len(concepts) == 1) else list(concepts)
    expected = invalid_arguments(pipe.tokenizer, concepts, args["scale"], args["mode"], fracs,
                                 args["allow_amplify"] is True, args["context"], args["anchors"], args["anchor_strength"])

    before = dict(pipe.unet.attn_processors)
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda *a, _n=name: calls.append(_n))
             for name, m in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder), ("vae", pipe.vae.decoder))]
    try:
        try:
            out = pipe(prompt, generator=torch.Generator().manual_seed(seed), return_original=return_original,
                       **KW, **kwargs)
        except EraseConfigError as e:
            msg = str(e)
            assert expected, f"a valid call was refused: {msg}"
            assert names_in(msg) & expected, f"message names none of {sorted(expected)}: {msg}"
            assert calls == [], f"models ran before the refusal: {calls}"
            event(f"refused: {sorted(names_in(msg) & expected)}")
        else:
            assert not expected, f"invalid {sorted(expected)} accepted"
            event(f"generated: {len(concepts)} concept(s), mode {kwargs.get('erase_mode')}")
            assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
            if return_original:
                assert out.original_images.shape == (1, 16, 16, 3) and np.isfinite(out.original_images).all()
            else:
                assert out.original_images is None
    finally:
        for h in hooks:
            h.remove()
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before), "attention processors not restored"
    assert pipe.erase_context is None


def test_oracle_sanity(sd1):
    """The oracle itself: a few hand-checked verdicts."""
    tok = sd1.tokenizer
    none = {"cross_attn_fraction": MISSING, "self_attn_fraction": MISSING}
    assert invalid_arguments(tok, ["red"], -1.0, "dual", none, False) == set()
    assert invalid_arguments(tok, [], 2.0, MISSING, none, False) == set()  # sign irrelevant without concepts
    assert invalid_arguments(tok, [], math.nan, MISSING, none, False) == {"erase_scale"}
    assert invalid_arguments(tok, [" "], MISSING, MISSING, none, False) == {"erase"}
    assert invalid_arguments(tok, ["red " * 80], MISSING, MISSING, none, False) == {"erase"}
    assert invalid_arguments(tok, ["red"], [-1.0, -2.0], MISSING, none, False) == {"erase_scale"}
    assert invalid_arguments(tok, ["red"], 1.0, "x", {**none, "self_attn_fraction": 1.5}, False) == {
        "erase_scale", "allow_amplify", "erase_mode", "self_attn_fraction"}
    assert names_in("erase_scale=nan is not finite") == {"erase_scale"}
    assert names_in("erase[1]='' is empty") == {"erase"}
    with pytest.raises(EraseConfigError):
        sd1("x", erase="red", erase_mode="triple", **KW)
