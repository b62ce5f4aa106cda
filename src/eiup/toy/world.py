"""The toy world: a fixed vocabulary of measurable concepts, scenes and their captions.

Spec: shared/design/toy-world.md. Tests, benchmarks and the detector rely on these words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = ("white", "black", "gray")

COLOR_RGB = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 50),
    "blue": (30, 70, 220),
    "purple": (140, 40, 180),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

# noun -> (color, shape, pattern)
IMPLICIT_NOUNS: dict[str, tuple[str, str, str]] = {
    "tomato": ("red", "circle", "plain"),
    "ladybug": ("red", "circle", "dotted"),
    "strawberry": ("red", "heart", "dotted"),
    "valentine": ("red", "heart", "plain"),
    "first aid kit": ("red", "cross", "plain"),
    "lemon": ("yellow", "circle", "plain"),
    "bee": ("yellow", "circle", "striped"),
    "pyramid": ("yellow", "triangle", "plain"),
    "sheriff badge": ("yellow", "star", "plain"),
    "starfish": ("orange", "star", "plain"),
    "tiger": ("orange", "square", "striped"),
    "lime": ("green", "circle", "plain"),
    "pine tree": ("green", "triangle", "plain"),
    "emerald": ("green", "square", "plain"),
    "blueberry": ("blue", "circle", "plain"),
    "sapphire": ("blue", "square", "plain"),
    "grape": ("purple", "circle", "plain"),
}
NOUN_BACKGROUND_PHRASES = {"black": "at night", "gray": "in the fog"}
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a drawing of {}")
# Style words of the kind real prompts are padded with; none is a toy-world word, so the tokenizer
# spells them out character by character and a few of them run a caption past CLIP's 77 tokens.
FILLER_PHRASES = (
    "highly detailed", "sharp focus", "trending on artstation", "masterpiece", "best quality",
    "4k", "8k", "digital art", "octane render", "studio lighting", "award winning", "intricate",
    "concept art", "smooth", "illustration",
)

# concept -> (attribute, value): what the detector must no longer report once it is erased.
CONCEPTS: dict[str, tuple[str, str]] = {
    "red": ("color", "red"),
    "star": ("shape", "star"),
    "heart": ("shape", "heart"),
    "striped": ("pattern", "striped"),
    "dotted": ("pattern", "dotted"),
    "night": ("background", "black"),
}

ATTRIBUTES = ("color", "shape", "pattern")


def anchor_concepts(concept: str) -> list[str]:
    """The other values of a toy concept's attribute: anchors for erasing it (``EraseConfig.anchors``)."""
    attribute, value = CONCEPTS[concept]
    if attribute == "background":
        return ["fog", "white background", "gray background"]
    values = {"color": COLORS, "shape": SHAPES, "pattern": PATTERNS}[attribute]
    return [v for v in values if v != value]


def words() -> list[str]:
    """Every word a toy-world caption can contain (the tokenizer's whole-word vocabulary)."""
    vocab = set(COLORS) | set(SHAPES) | set(PATTERNS) | set(BACKGROUNDS)
    vocab |= {"a", "an", "photo", "image", "drawing", "of", "on", "background", "and"}
    vocab |= {"at", "night", "in", "the", "fog"}
    for noun in IMPLICIT_NOUNS:
        vocab |= set(noun.split())
    return sorted(vocab)


@dataclass(frozen=True)
class Obj:
    """One object: its attributes and, for implicit captions, the noun that implies them."""

    color: str
    shape: str
    pattern: str = "plain"
    noun: str | None = None

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "pattern": self.pattern}


@dataclass(frozen=True)
class Scene:
    """One or two objects on a background; placement is sampled by the renderer from the seed."""

    objects: tuple[Obj, ...]
    background: str = "white"
    layout_seed: int = 0
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def noun_object(noun: str) -> Obj:
    color, shape, pattern = IMPLICIT_NOUNS[noun]
    return Obj(color, shape, pattern, noun)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: Obj, implicit: bool) -> str:
    """'a tomato' (implicit) or 'a dotted red circle' (explicit; 'plain' is never named)."""
    if implicit:
        assert obj.noun is not None
        return f"{article(obj.noun)} {obj.noun}"
    parts = ([obj.pattern] if obj.pattern != "plain" else []) + [obj.color, obj.shape]
    return f"{article(parts[0])} {' '.join(parts)}"


def caption_words(scene: Scene, rng: random.Random, implicit_prob: float = 0.5) -> list[tuple[str, int]]:
    """Sample one caption consistent with the scene, as (word, label) pairs.

    label: index of the object the word describes, len(objects) for background words, -1 otherwise.
    """
    implicit = [o.noun is not None and rng.random() < implicit_prob for o in scene.objects]
    out: list[tuple[str, int]] = []
    for k, (obj, imp) in enumerate(zip(scene.objects, implicit)):
        if k:
            out.append(("and", -1))
        first, *rest = object_phrase(obj, imp).split()
        out += [(first, -1)] + [(w, k) for w in rest]
    bg = len(scene.objects)
    if scene.background != "white":
        if all(implicit) and rng.random() < 0.5 or (any(implicit) and rng.random() < 0.25):
            phrase = NOUN_BACKGROUND_PHRASES[scene.background].split()
            out += [(w, bg if w in ("night", "fog") else -1) for w in phrase]
        else:
            out += [("on", -1), (article(scene.background), -1), (scene.background, bg), ("background", bg)]
    elif rng.random() < 0.1:
        out += [("on", -1), ("a", -1), ("white", bg), ("background", bg)]
    template = rng.choice(TEMPLATES).format("").split()
    return [(w, -1) for w in template] + out


def filler_tail(rng: random.Random, max_phrases: int = 12) -> str:
    """A comma-separated run of 1..max_phrases style phrases (", highly detailed, 4k, ...")."""
    return "".join(", " + rng.choice(FILLER_PHRASES) for _ in range(rng.randint(1, max_phrases)))


def caption(scene: Scene, rng: random.Random, implicit_prob: float = 0.5) -> str:
    """Sample one caption consistent with the scene (explicit or implicit, random template)."""
    return " ".join(w for w, _ in caption_words(scene, rng, implicit_prob))


def random_object(rng: random.Random, noun_prob: float = 0.45) -> Obj:
    if rng.random() < noun_prob:
        return noun_object(rng.choice(sorted(IMPLICIT_NOUNS)))
    pattern = rng.choices(PATTERNS, weights=(0.5, 0.25, 0.25))[0]
    obj = Obj(rng.choice(COLORS), rng.choice(SHAPES), pattern)
    # an explicit object that matches a noun exactly may also be called by that noun
    for noun, attrs in IMPLICIT_NOUNS.items():
        if attrs == (obj.color, obj.shape, obj.pattern):
            return replace(obj, noun=noun)
    return obj


def random_scene(rng: random.Random) -> Scene:
    n = 1 if rng.random() < 0.5 else 2
    objects = tuple(random_object(rng) for _ in range(n))
    background = rng.choices(BACKGROUNDS, weights=(0.6, 0.2, 0.2))[0]
    return Scene(objects, background, rng.randrange(2**31))


def parse_object_phrase(phrase: str) -> Obj:
    """Inverse of `object_phrase` for explicit and implicit phrases ('a red circle', 'a tomato')."""
    tokens = phrase.split()
    if tokens and tokens[0] in ("a", "an"):
        tokens = tokens[1:]
    rest = " ".join(tokens)
    if rest in IMPLICIT_NOUNS:
        return noun_object(rest)
    pattern = tokens[0] if tokens and tokens[0] in PATTERNS else "plain"
    if tokens and tokens[0] in PATTERNS:
        tokens = tokens[1:]
    if len(tokens) != 2 or tokens[0] not in COLORS or tokens[1] not in SHAPES:
        raise ValueError(f"not a toy-world object phrase: {phrase!r}")
    return Obj(tokens[0], tokens[1], pattern)


def parse_caption(text: str) -> Scene:
    """Expected scene of a toy-world caption (what the detector should see)."""
    body = text
    for template in TEMPLATES[1:]:
        prefix = template.format("")
        if body.startswith(prefix):
            body = body[len(prefix):]
            break
    background = "white"
    for bg, phrase in NOUN_BACKGROUND_PHRASES.items():
        if body.endswith(" " + phrase):
            body, background = body[: -len(phrase) - 1], bg
    for bg in BACKGROUNDS:
        suffix = f" on {article(bg)} {bg} background"
        if body.endswith(suffix):
            body, background = body[: -len(suffix)], bg
    objects = tuple(parse_object_phrase(p) for p in body.split(" and "))
    return Scene(objects, background)


def rewrite_without(text: str, concept: str, k: int = 0) -> str:
    """The caption as a person would rewrite it to comply: the concept's attribute set to another value.

    Each object that carries the concept is named explicitly with the ``k``-th other value of the
    attribute (round robin; "a tomato" -> "an orange circle", "a yellow circle", ... for red), other objects and the template are
    kept; for a background concept the background becomes the ``k``-th other background (white is the
    world's default and is not named). A background phrase ("in the fog") is kept while an object is
    still named by its noun, as in training captions. A caption without the concept is returned as it is.
    The reference for prompt-level erasure on the toy world: what a perfect rewrite of the prompt draws.
    """
    if concept not in CONCEPTS:
        raise ValueError(f"concept={concept!r} is not a toy-world concept: use one of {sorted(CONCEPTS)}")
    attribute, value = CONCEPTS[concept]
    others = [v for v in {"color": COLORS, "shape": SHAPES, "pattern": PATTERNS, "background": BACKGROUNDS}[attribute]
              if v != value]
    new = others[k % len(others)]
    scene = parse_caption(text)
    template = next((t for t in TEMPLATES[1:] if text.startswith(t.format(""))), "{}")
    objects = [replace(o, noun=None, **{attribute: new}) if attribute != "background" and getattr(o, attribute) == value
               else o for o in scene.objects]
    background = new if attribute == "background" and scene.background == value else scene.background
    if tuple(objects) == scene.objects and background == scene.background:
        return text
    body = " and ".join(object_phrase(o, implicit=o.noun is not None) for o in objects)
    if background != "white":
        phrase = NOUN_BACKGROUND_PHRASES[background]
        kept = any(o.noun for o in objects) and background == scene.background and text.endswith(" " + phrase)
        body += f" {phrase}" if kept else f" on {article(background)} {background} background"
    return template.format(body)
