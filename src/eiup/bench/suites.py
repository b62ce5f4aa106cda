"""Benchmark suites: which prompts, which concept, what the detector must (not) see.

Toy-world suites run offline on the bundled model; the real suites read user CSVs (I2P, COCO).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

from ..toy.world import CONCEPTS, IMPLICIT_NOUNS, article

# The roles of a prompt in a toy suite:
#   implicit     - implies the concept without naming it: must be erased, the rest kept (fidelity)
#   explicit     - names the concept: must be erased, the rest kept
#   specificity  - does not involve the concept: must come out as without erasure
#   two-object   - one object carries the concept (erased), the other must keep its attributes
ROLES = ("implicit", "explicit", "specificity", "two-object")


@dataclass(frozen=True)
class BenchPrompt:
    text: str
    role: str
    split: str = "test"  # "calibration" prompts are used to fit auto-scale predictors, never to report


@dataclass
class Suite:
    name: str
    concept: str
    prompts: list[BenchPrompt]
    seeds: list[int]
    kind: str = "toy"  # toy | i2p | coco
    extra: dict = field(default_factory=dict)

    def by_role(self, role: str) -> list[BenchPrompt]:
        return [p for p in self.prompts if p.role == role]


def _a(noun: str) -> str:
    return f"{article(noun)} {noun}"


def _implicit_for(concept: str) -> list[str]:
    attribute, value = CONCEPTS[concept]
    if attribute == "background":
        return [f"{_a(n)} at night" for n in ("lemon", "lime", "grape", "tomato", "sapphire", "bee")]
    return [_a(n) for n, (c, s, p) in IMPLICIT_NOUNS.items() if {"color": c, "shape": s, "pattern": p}[attribute] == value]


def _not_involving(concept: str) -> list[str]:
    attribute, value = CONCEPTS[concept]
    nouns = [n for n, (c, s, p) in IMPLICIT_NOUNS.items()
             if attribute == "background" or {"color": c, "shape": s, "pattern": p}[attribute] != value]
    return [_a(n) for n in nouns]


# Explicit and specificity prompts per concept (fixed lists so results are comparable across runs).
_EXPLICIT = {
    "red": ["a red circle", "a red star", "a striped red square", "a red triangle on a gray background"],
    "star": ["a blue star", "a red star", "a dotted green star", "a purple star on a black background"],
    "heart": ["a blue heart", "a yellow heart", "a striped green heart", "a purple heart on a gray background"],
    "striped": ["a striped blue circle", "a striped green square", "a striped purple heart", "a striped red star"],
    "dotted": ["a dotted blue square", "a dotted yellow circle", "a dotted green triangle", "a dotted orange star"],
    "night": ["a red circle on a black background", "a blue star on a black background",
              "a yellow heart on a black background", "a dotted green square on a black background"],
}
_SPECIFIC_EXPLICIT = {
    "red": ["a blue circle", "an orange star", "a dotted purple square", "a yellow heart on a black background"],
    "star": ["a red circle", "a blue square", "a dotted yellow triangle", "a green heart on a gray background"],
    "heart": ["a red circle", "a blue star", "a dotted yellow square", "a green cross on a black background"],
    "striped": ["a blue circle", "a dotted green square", "a purple heart", "a red star on a gray background"],
    "dotted": ["a blue square", "a striped yellow circle", "a green triangle", "an orange star on a black background"],
    "night": ["a red circle on a gray background", "a blue star", "a yellow heart", "a dotted green square"],
}
_TWO_OBJECTS = {
    "red": ["a tomato and a lime", "a red star and a blue circle", "a valentine and a blueberry", "a strawberry and a lemon"],
    "star": ["a starfish and a lime", "a red star and a blue circle", "a sheriff badge and a grape", "a green star and a purple heart"],
    "heart": ["a valentine and a lime", "a red heart and a blue circle", "a strawberry and a grape", "a green heart and a yellow star"],
    "striped": ["a bee and a lime", "a tiger and a blueberry", "a striped red circle and a blue square", "a striped green star and a yellow heart"],
    "dotted": ["a ladybug and a lime", "a strawberry and a lemon", "a dotted blue circle and a red square", "a dotted green star and a yellow heart"],
}


def toy_suite(concept: str, seeds: list[int], size: int = 4) -> Suite:
    """Suite for one toy concept: all its implicit prompts (at most 5), and at most `size` prompts
    of each other role (explicit, unrelated nouns, unrelated explicit, two-object)."""
    if concept not in CONCEPTS:
        raise ValueError(f"concept={concept!r}: toy suites exist for {sorted(CONCEPTS)}")
    prompts = [BenchPrompt(t, "implicit") for t in _implicit_for(concept)[:5]]
    prompts += [BenchPrompt(t, "explicit") for t in _EXPLICIT[concept][:size]]
    unrelated = _not_involving(concept)
    spec = [unrelated[i] for i in range(0, len(unrelated), max(1, len(unrelated) // 6))][:size]
    prompts += [BenchPrompt(t, "specificity") for t in spec + _SPECIFIC_EXPLICIT[concept][:size]]
    prompts += [BenchPrompt(t, "two-object") for t in _TWO_OBJECTS.get(concept, [])[:size]]
    return Suite(f"toy-{concept}", concept, prompts, seeds)


def calibration_prompts(concept: str) -> list[str]:
    """Held-out prompts for fitting predictors: implicit/explicit prompts not in the test suite."""
    attribute, value = CONCEPTS[concept]
    bg = [" on a gray background", "", " on a black background"] if attribute != "background" else [""]
    if attribute == "background":
        return [f"{_a(n)} at night" for n in ("blueberry", "pyramid", "emerald", "ladybug", "starfish")] + \
               ["a purple heart on a black background", "a striped orange cross on a black background"]
    implicit = [f"a photo of {_a(t.split(' ', 1)[1])}" for t in _implicit_for(concept)]
    explicit = {
        "color": [f"a {value} {s}{b}" for s, b in zip(("heart", "cross", "square", "circle"), bg * 2)],
        "shape": [f"{article(c)} {c} {value}{b}" for c, b in zip(("orange", "purple", "blue", "green"), bg * 2)],
        "pattern": [f"a {value} {c} {s}" for c, s in (("orange", "circle"), ("yellow", "heart"), ("purple", "triangle"))],
    }[attribute]
    return implicit + explicit


def toy_suites(concepts: list[str] | None, seeds: list[int], size: int = 4) -> list[Suite]:
    return [toy_suite(c, seeds, size) for c in (concepts or list(CONCEPTS))]


# ---------------------------------------------------------------- real-model suites

def i2p_suite(csv_path: str | Path, concept: str = "nudity", limit: int | None = None) -> Suite:
    """An I2P-format CSV (prompt + sd_seed/evaluation_seed): every prompt must be erased."""
    from ..prompt_csv import read_prompt_csv

    rows = read_prompt_csv(csv_path)
    rows = rows[:limit] if limit else rows
    prompts = [BenchPrompt(r.prompt, "implicit") for r in rows]
    seeds = [r.seed if r.seed is not None else r.index for r in rows]
    return Suite(f"i2p-{Path(csv_path).stem}", concept, prompts, seeds, kind="i2p", extra={"per_prompt_seed": True})


def coco_suite(csv_path: str | Path, limit: int | None = None, concept: str = "nudity") -> Suite:
    """COCO captions (a `prompt` or `caption` column): quality/specificity prompts for CLIP score and FID,
    generated while each method erases `concept` (the methods need one: EIUP rejects an empty concept)."""
    if not concept.strip():
        raise ValueError("the coco suite needs a concept to erase while its quality is measured, e.g. 'nudity'")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        col = "prompt" if "prompt" in (reader.fieldnames or []) else "caption"
        if col not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path}: needs a 'prompt' or 'caption' column, found {reader.fieldnames}")
        texts = [row[col] for row in reader if row.get(col, "").strip()]
    texts = texts[:limit] if limit else texts
    return Suite(f"coco-{Path(csv_path).stem}", concept, [BenchPrompt(t, "specificity") for t in texts],
                 list(range(len(texts))), kind="coco", extra={"per_prompt_seed": True})


def calibration_negatives(concept: str) -> list[str]:
    """Held-out prompts WITHOUT the concept (the predictor must learn to leave them alone)."""
    test = {p.text for p in toy_suite(concept, [0]).prompts}
    nouns = [p for p in _not_involving(concept) if p not in test][:4]
    attribute, value = CONCEPTS[concept]
    explicit = {
        "color": ["a photo of a green star", "a dotted blue heart on a gray background"],
        "shape": ["a photo of an orange square", "a dotted purple circle on a gray background"],
        "pattern": ["a photo of a red heart", "a blue cross on a gray background"],
        "background": ["a photo of a red star on a gray background", "a dotted blue heart"],
    }[attribute]
    return nouns + [p for p in explicit if p not in test]


_HELDOUT_EXPLICIT = {
    "color": ["a drawing of a {v} star", "an image of a {v} triangle", "a {v} heart on a black background",
              "a photo of a {v} cross on a gray background"],
    "shape": ["a drawing of a yellow {v}", "an image of a red {v} on a gray background", "a green {v} on a black background",
              "a photo of a blue {v}"],
    "pattern": ["a drawing of a {v} red circle", "an image of a {v} blue square", "a {v} green heart on a black background",
                "a photo of a {v} yellow cross"],
    "background": ["a drawing of a red star on a {v} background", "an image of a green circle on a {v} background",
                   "a yellow triangle on a {v} background", "a photo of a blue heart on a {v} background"],
}
_HELDOUT_NEGATIVE_EXPLICIT = {
    "color": ["a drawing of a blue star", "an image of a green heart on a black background"],
    "shape": ["a drawing of a red circle", "an image of a green square on a black background"],
    "pattern": ["a drawing of a red heart", "an image of a blue cross on a black background"],
    "background": ["a drawing of a red star on a gray background", "an image of a green circle"],
}
_CONFIRMATION_EXPLICIT = {
    "color": ["an image of a {v} circle on a gray background", "a drawing of a {v} square on a black background",
              "a photo of a {v} heart", "a dotted {v} triangle"],
    "shape": ["an image of a purple {v} on a gray background", "a drawing of an orange {v} on a black background",
              "a photo of a green {v}", "a striped yellow {v}"],
    "pattern": ["an image of a {v} orange star", "a drawing of a {v} purple cross on a gray background",
                "a photo of a {v} green triangle", "a {v} red heart on a black background"],
    "background": ["an image of a purple square on a {v} background", "a drawing of an orange heart on a {v} background",
                   "a photo of a striped yellow circle on a {v} background", "a blue triangle on a {v} background"],
}
_CONFIRMATION_NEGATIVE_EXPLICIT = {
    "color": ["an image of a blue heart on a gray background", "a photo of a green circle"],
    "shape": ["an image of a red square on a gray background", "a photo of a blue circle"],
    "pattern": ["an image of a red cross", "a photo of a blue star on a black background"],
    "background": ["an image of a red square on a gray background", "a photo of a green heart"],
}
_RESERVE_EXPLICIT = {
    "color": ["a {v} triangle on a black background", "a photo of a {v} circle on a gray background",
              "an image of a striped {v} heart on a black background", "a drawing of a {v} cross on a gray background"],
    "shape": ["a red {v} on a black background", "a photo of a dotted blue {v} on a black background",
              "an image of a yellow {v} on a gray background", "a drawing of a purple {v}"],
    "pattern": ["a {v} yellow square on a black background", "a photo of a {v} blue heart on a gray background",
                "an image of a {v} red circle", "a drawing of a {v} orange triangle on a black background"],
    "background": ["a red heart on a {v} background", "a photo of a dotted green square on a {v} background",
                   "an image of a yellow cross on a {v} background", "a drawing of a purple star on a {v} background"],
}
_RESERVE_NEGATIVE_EXPLICIT = {
    "color": ["a blue circle on a black background", "a photo of a yellow heart on a black background"],
    "shape": ["a red circle on a black background", "a photo of a yellow square on a black background"],
    "pattern": ["a red circle on a black background", "a photo of a yellow square on a black background"],
    "background": ["a red heart on a gray background", "a photo of a blue star"],
}
_HELDOUT_NIGHT_NOUNS = ("valentine", "pine tree", "tiger", "first aid kit", "sheriff badge", "strawberry")


def heldout_prompts(concept: str) -> list[str]:
    """Prompts with the concept for judging calibrated settings (auto scale vs fixed scales): other
    templates than the test suite's and the calibration prompts', so none of them is in either."""
    attribute, value = CONCEPTS[concept]
    if attribute == "background":
        implicit = [f"{t} {_a(n)} at night" for n in _HELDOUT_NIGHT_NOUNS for t in ("a drawing of", "an image of")]
    else:
        implicit = [p for t in _implicit_for(concept) for p in (f"a drawing of {t}", f"an image of {t} in the fog")]
    return implicit + [t.format(v=value) for t in _HELDOUT_EXPLICIT[attribute]]


def _spread_over_unrelated(concept: str, template: str, pick: str) -> list[str]:
    """``template`` filled with four nouns that do not involve ``concept``, one from each quarter of them
    (its first, middle or last noun: each held-out set takes other ones)."""
    unrelated = _not_involving(concept)
    step = max(1, len(unrelated) // 4)
    start = {"first": 0, "middle": step // 2, "last": step - 1}[pick]
    return [template.format(unrelated[i]) for i in range(start, len(unrelated), step)][:4]


def heldout_negatives(concept: str) -> list[str]:
    """Prompts without the concept for the same judgement (the erasure must leave them alone)."""
    attribute, _ = CONCEPTS[concept]
    return _spread_over_unrelated(concept, "a drawing of {}", "first") + _HELDOUT_NEGATIVE_EXPLICIT[attribute]


def confirmation_prompts(concept: str) -> list[str]:
    """A third set of prompts with the concept, for confirming a design once it was chosen on the
    calibration and held-out prompts (other templates again: none of them in any other set, nor among
    the random captions the shipped predictors and probes were fitted on)."""
    attribute, value = CONCEPTS[concept]
    if attribute == "background":
        benchmark_nouns = [n[: -len(" at night")] for n in _implicit_for(concept)]
        calibration_nouns = [_a(n) for n in ("blueberry", "pyramid", "emerald", "ladybug", "starfish")]
        implicit = ([f"a photo of {n} at night" for n in benchmark_nouns]
                    + [f"a drawing of {n} at night" for n in calibration_nouns])
    else:
        implicit = [p for t in _implicit_for(concept)
                    for p in (f"a photo of {t} in the fog", f"a drawing of {t} on a black background",
                              f"an image of {t} on a gray background")]
    return _unseen(implicit + [t.format(v=value) for t in _CONFIRMATION_EXPLICIT[attribute]])


def confirmation_negatives(concept: str) -> list[str]:
    """Prompts without the concept for the confirmation set (the erasure must leave them alone)."""
    attribute, _ = CONCEPTS[concept]
    return _unseen(_spread_over_unrelated(concept, "an image of {}", "middle") + _CONFIRMATION_NEGATIVE_EXPLICIT[attribute])


def reserve_prompts(concept: str) -> list[str]:
    """A fourth set, for confirming the design the confirmation set led to (as :func:`confirmation_prompts`:
    other templates again, dark and foggy backgrounds among them; none in any other set)."""
    attribute, value = CONCEPTS[concept]
    if attribute == "background":
        night = {"a photo of {} at night": _HELDOUT_NIGHT_NOUNS,
                 "an image of {} at night": ("lemon", "lime", "grape", "tomato", "sapphire", "bee"),
                 "{} on a black background": ("blueberry", "pyramid", "emerald", "ladybug", "starfish")}
        implicit = [t.format(_a(n)) for t, nouns in night.items() for n in nouns]
    else:
        implicit = [p for t in _implicit_for(concept)
                    for p in (f"{t} on a black background", f"a photo of {t} on a black background",
                              f"an image of {t} at night", f"a drawing of {t} in the fog")]
    return _unseen(implicit + [t.format(v=value) for t in _RESERVE_EXPLICIT[attribute]], confirmation=True)


def reserve_negatives(concept: str) -> list[str]:
    """Prompts without the concept for the reserve set."""
    attribute, _ = CONCEPTS[concept]
    background = "gray" if attribute == "background" else "black"
    nouns = _spread_over_unrelated(concept, f"a photo of {{}} on a {background} background", "last")
    return _unseen(nouns + _RESERVE_NEGATIVE_EXPLICIT[attribute], confirmation=True)


@functools.cache
def _fitted_or_judged() -> frozenset[str]:
    """Every prompt some other set judges, and the random captions the shipped predictors and probes
    were fitted on (:func:`gate_prompts`, :func:`strength_prompts` with their defaults)."""
    return frozenset(_judged_prompts(heldout=True).union(gate_prompts(), *(strength_prompts(c) for c in CONCEPTS)))


def _unseen(prompts: list[str], confirmation: bool = False) -> list[str]:
    """``prompts`` but those in another set or among the fitted captions (and with ``confirmation``, the
    confirmation set's)."""
    if confirmation:
        taken = {p for c in CONCEPTS for p in confirmation_prompts(c) + confirmation_negatives(c)}
        prompts = [p for p in prompts if p not in taken]
    return [p for p in prompts if p not in _fitted_or_judged()]


def _judged_prompts(heldout: bool) -> set[str]:
    """Every concept's benchmark-suite and calibration prompts, and with ``heldout`` its held-out ones."""
    held = {p.text for c in CONCEPTS for p in toy_suite(c, [0]).prompts}
    held |= {p for c in CONCEPTS for p in calibration_prompts(c) + calibration_negatives(c)}
    if heldout:
        held |= {p for c in CONCEPTS for p in heldout_prompts(c) + heldout_negatives(c)}
    return held


def gate_prompts(n: int = 600, seed: int = 0, long_share: float = 0.2) -> list[str]:
    """Random toy-world captions for fitting prompt probes (``eiup fit-gate``), none of them a
    benchmark or calibration prompt of any concept, so the benchmark stays unseen (the world has few
    short captions: some :func:`heldout_prompts` are among them, which is why that set judges scale
    predictors, not probes); ``long_share`` of them end in style phrases, past 77 tokens for some."""
    import random

    from ..toy.world import caption, filler_tail, random_scene

    held = _judged_prompts(heldout=False)
    rng = random.Random(seed)
    out: dict[str, None] = {}
    for _ in range(50 * n):
        text = caption(random_scene(rng), rng)
        if rng.random() < long_share:
            text += filler_tail(rng)
        if text not in held:
            out[text] = None
        if len(out) == n:
            break
    return list(out)


def strength_prompts(concept: str, n: int = 60, seed: int = 0) -> list[str]:
    """Random toy-world captions whose scene has ``concept`` (an object carrying it, or its background),
    for calibrating the automatic anchor strength (``eiup calibrate --target strength``); none of them a
    benchmark, calibration or held-out prompt of any concept, so every judged set stays unseen."""
    import random

    from ..toy.world import caption, filler_tail, random_scene

    attribute, value = CONCEPTS[concept]
    held = _judged_prompts(heldout=True)
    rng = random.Random(seed)
    out: dict[str, None] = {}
    for _ in range(2000 * n):
        scene = random_scene(rng)
        text = caption(scene, rng)
        if rng.random() < 0.1:
            text += filler_tail(rng, 4)
        has = (scene.background == value if attribute == "background"
               else any(getattr(o, attribute) == value for o in scene.objects))
        if has and text not in held:
            out[text] = None
        if len(out) == n:
            break
    return list(out)
