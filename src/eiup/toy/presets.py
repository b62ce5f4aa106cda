"""The bundled toy model's erasure presets, as measured, and the ``eiup_anchors.json`` they are written to.

Each concept's anchors (the other values of its attribute) and, where measured, its projection strength, concept-term
scale and the other per-concept choices that ``anchors="auto"`` reads from the model folder
(:class:`eiup.config.AnchorPlan`). The comments say what each value was measured on.
"""

from __future__ import annotations

import json
from pathlib import Path

# Presets measured with the prompt-probe gate on the implicit prompts, seeds 900-907 (not benchmark seeds;
# runs/probe3/target.py): red at s = 1.25 (residual 0%, attributes other than colour kept in 85% vs plain;
# s = 1 left 5%, s = 2 kept 28%); heart at s = 1 (0%, 81%; 0.5 left 44%); star at s = 1 (0%); night by
# projecting towards "white background" alone at s = 1.5 (0%, 44%; 1.25 left 8%; adding fog and gray
# background as anchors drifts the object's colour more) with EIUP at -0.25 (objects' colour and shape kept
# in 59% vs 44% at -0.5; -1 only costs specificity).
# Prompts that name the concept move away from their counterfactuals (the word replaced by each anchor),
# measured on held-out explicit prompts with backgrounds (benchmarks/heldout.py's, seeds 3000-3005):
# red 1.5 (0%, 67%; 1.25 left 30%, 2 kept 52%), star 1.5 (0%, 85%; 1 left 25%), heart 2 (0%, 92%; 1 left 28%).
# The 8-channel model (2026-12-02) needs red stronger; the rest carried over. Implicit: benchmarks/heldout.py
# --concepts red, library defaults (guard included), residual / as plain or as prompted at 2.5 and 3: the
# benchmark's implicit prompts, seeds 900-907, 7.5% / 97.5% and 0% / 100%; the calibration prompts, seeds
# 3000-3005, 0% / 100% and 0% / 96.3%; benchmarks/prompts/red-dark-development.txt, seeds 4000-4005, 2.2% /
# 64.4% and 0% / 61.1%. Named: 2.5 on the explicit calibration prompts, seeds 3000-3005 (0%, 100% as plain or as
# prompted; stop 26, docs/experiments/latent-channels.md).
# Night's named strength re-chosen for the UNet of 2026-12-04 (stop 38; prompts that say "at night" or "on a black
# background" are named ones): on the calibration prompts, library defaults, seeds 3000-3011, 1.25 kept 89.3% as plain
# or as prompted and 1.0 94.0% (0.75: 92.9% on seeds 3006-3011), residual 0% at each (without the guard too); the
# benchmark's night prompts, seeds 900-907, 0% / 100% at 1.25 and 1.0. "a starfish at night" is the loss: without the
# guard the projection keeps its starfish in 0 (1.25) and 1 (1.0) of 12 seeds; the guard's milder draws keep most.
ANCHOR_PRESETS = {"red": (3.0, -1.0), "star": (1.0, -1.0), "heart": (1.0, -1.0), "night": (1.5, -0.25)}
NAMED_STRENGTHS = {"red": 2.5, "star": 1.5, "heart": 2.0, "night": 1.0}
PRESET_ANCHORS = {"night": ["white background"]}  # instead of all the attribute's other values
PRESET_ALIASES = {"night": ["black background"]}  # other words of the world that name the concept
# attributes the projection must not move (erasing star turned the orange starfish yellow without it)
PRESET_PROTECT = {"star": ["red", "orange", "yellow", "green", "blue", "purple"]}
# in-context anchors for implying prompts (the implying word replaced by the concept and each anchor,
# named_strength), measured on the benchmark's prompts, seeds 0-5 (runs/auto/judge.py): red residual
# 16.4% -> 0% (two-object prompts: "a tomato and a lime" kept its red), fidelity vs plain 91.8 -> 93.2%;
# heart unchanged there (1.7%, 70.7%) and on the calibration prompts (seeds 4000-4005) 0%, 93 -> 97%;
# star 3.3% both, 73.3 -> 70.0% (one image of 30). Night is named by its implying phrase ("at night").
PRESET_IN_CONTEXT = ("red", "star", "heart")
# the projection confined to the implying or naming word's attention map (anchor_region), measured on the
# benchmark's prompts (20 seeds, --per-role 4, runs/region): heart fidelity vs plain 86.7 -> 90.8%,
# specificity 85.0 -> 89.6%, residual 0% both; red's implicit residual 0 -> 6% (its colour is read from the
# padding everywhere in the image), star within a point either way. Red by its phrase instead (the
# "phrases" rule: a prompt of one phrase projected everywhere, runs/region/share.py, seeds 0-19): "a tomato
# and a lime" keeps its lime in 90% (75% unconfined), residual 0%; implicit and explicit prompts as
# unconfined (seeds 0-11). Heart by the phrase rule kept less of the heart's object (50% vs 83%). On the 8-channel
# model (2026-12-02) red's phrase rule no longer pays: "a tomato and a lime", presets without the guard, kept red in
# 25% of seeds 0-19 and 10% of seeds 900-919 (unconfined: 0% and 0%) and the lime as often as unconfined (95% vs
# 100%, 100% vs 100%; its pixels moved 0.081 vs 0.089 and 0.073 vs 0.073), so red is projected everywhere.
PRESET_REGION = {"heart": "map"}
# prompts that name one thing (eiup.anchors.names_one_thing): red projected towards orange alone, strength 1 (named
# 1). Red's five anchors average to no colour the model draws: on black backgrounds the erased object came out a
# striped blob whose shape the judge no longer read (with the guard, red's held-out fidelity 73-89% on the dark
# development set and the second to fourth held-out sets; towards orange 98.6-100%, docs/experiments/latent-channels.md).
# Prompts of two things keep the five anchors: the orange direction recoloured the other object ("a tomato and a
# lime" both orange).
PRESET_ONE_THING = {"red": {"anchors": ["orange"], "strength": 1.0, "named_strength": 1.0}}


def write_anchor_file(folder: Path) -> Path:
    """``eiup_anchors.json``: each toy concept's anchors (the other values of its attribute) and, where
    measured, its preset strength and scale, for ``anchors="auto"``."""
    from ..config import ANCHOR_FILE
    from .world import CONCEPTS, anchor_concepts

    table: dict = {}
    for concept in CONCEPTS:
        anchors = PRESET_ANCHORS.get(concept) or anchor_concepts(concept)
        if concept in ANCHOR_PRESETS:
            strength, scale = ANCHOR_PRESETS[concept]
            table[concept] = {"anchors": anchors, "strength": strength, "scale": scale}
            if concept in NAMED_STRENGTHS:
                table[concept]["named_strength"] = NAMED_STRENGTHS[concept]
            if concept in PRESET_ALIASES:
                table[concept]["aliases"] = PRESET_ALIASES[concept]
            if concept in PRESET_PROTECT:
                table[concept]["protect"] = PRESET_PROTECT[concept]
            if concept in PRESET_IN_CONTEXT:
                table[concept]["in_context"] = True
            if concept in PRESET_REGION:
                table[concept]["region"] = PRESET_REGION[concept]
            if concept in PRESET_ONE_THING:
                table[concept]["one_thing"] = PRESET_ONE_THING[concept]
        else:
            table[concept] = anchors
    path = Path(folder) / ANCHOR_FILE
    path.write_text(json.dumps(table, indent=2) + "\n")
    return path
