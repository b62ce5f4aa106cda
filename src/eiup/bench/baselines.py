"""Methods compared by the benchmark, all built on the same pipeline components.

plain, negative prompt, SLD (diffusers' StableDiffusionPipelineSafe, presets WEAK..MAX) and EIUP
(single- and dual-branch, a sweep of suppression scales, options such as gating or auto scale); and,
on the toy world, a reference that is no method: ``rewrite``, each prompt rewritten without the
concept (:func:`eiup.toy.world.rewrite_without`) and drawn plainly, what a perfect prompt-level
erasure would draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SLD_PRESETS = ("WEAK", "MEDIUM", "STRONG", "MAX")


@dataclass(frozen=True)
class Method:
    """One row of the benchmark: a family and its settings."""

    family: str  # plain | negative | sld | eiup | rewrite
    preset: str = ""  # SLD preset
    scale: float | str | None = None  # EIUP scale (float, "auto", or "preset": the model's per-concept preset)
    mode: str = "single"  # EIUP mode
    options: tuple = field(default_factory=tuple)  # extra EIUP keyword arguments as (key, value) pairs

    @property
    def name(self) -> str:
        if self.family == "sld":
            return f"sld-{self.preset.lower()}"
        if self.family != "eiup":
            return self.family
        opts = "".join(f"+{k}" if v is True else f"+{k}={v}" for k, v in self.options)
        scale = self.scale if isinstance(self.scale, str) else f"{self.scale:g}"
        return f"eiup-{self.mode}{opts}@{scale}"


def default_methods(scales: list[float], modes: tuple[str, ...] = ("single", "dual"),
                    sld: bool = True, extra: list[Method] | None = None) -> list[Method]:
    methods = [Method("plain"), Method("negative")]
    if sld:
        methods += [Method("sld", preset=p) for p in SLD_PRESETS]
    methods += [Method("eiup", scale=s, mode=m) for m in modes for s in scales]
    return methods + list(extra or [])


def parse_method(spec: str) -> Method:
    """'plain', 'negative', 'sld-strong', 'eiup-single@-1.5', 'eiup-single+gate@auto', 'eiup-single+anchors=auto@preset' -> Method."""
    spec = spec.strip().lower()
    if spec in ("plain", "negative", "rewrite"):
        return Method(spec)
    if spec.startswith("sld-") and spec[4:].upper() in SLD_PRESETS:
        return Method("sld", preset=spec[4:].upper())
    if spec.startswith("eiup-") and "@" in spec:
        head, scale = spec[5:].split("@", 1)
        mode, *opts = head.split("+")
        options = []
        for o in opts:
            k, _, v = o.partition("=")
            options.append((k, True if not v else _number(v)))
        return Method("eiup", scale=scale if scale in ("auto", "preset") else float(scale), mode=mode, options=tuple(options))
    raise ValueError(f"method {spec!r}: use plain, negative, sld-weak|medium|strong|max, eiup-MODE[+OPTION]@SCALE, "
                     "or rewrite (toy world)")


def _anchors(value, concept: str) -> list[str]:
    """'+anchors' alone: the toy world's other values of the concept's attribute; '+anchors=a|b': those."""
    if value is True:
        from ..toy.world import CONCEPTS, anchor_concepts

        if concept not in CONCEPTS:
            raise ValueError(f"method option +anchors needs a list for concept {concept!r}: +anchors=WORD|WORD|...")
        return anchor_concepts(concept)
    return _words(value)


def _protect(value) -> list[str]:
    """'+anchor_protect=none': no protected words (whatever the model's preset says); '=a|b': those."""
    if value is True:
        raise ValueError("method option +anchor_protect needs a value: +anchor_protect=none or =WORD|WORD|...")
    words = _words(value)
    return [] if words == ["none"] else words


def _words(value) -> list[str]:
    """'a|b|c' -> ['a', 'b', 'c']."""
    return [a.strip() for a in str(value).split("|") if a.strip()]


def _number(v: str):
    try:
        return float(v)
    except ValueError:
        return v


class MethodRunner:
    """Generates images for a method; SLD gets a StableDiffusionPipelineSafe on the same components."""

    def __init__(self, pipe, steps: int, guidance: float):
        self.pipe = pipe
        self.steps = steps
        self.guidance = guidance
        self._sld = None

    def sld_pipeline(self):
        if self._sld is None:
            from diffusers.pipelines.deprecated.stable_diffusion_safe import StableDiffusionPipelineSafe

            p = self.pipe
            self._sld = StableDiffusionPipelineSafe(
                vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet, scheduler=p.scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            self._sld.set_progress_bar_config(disable=True)
        return self._sld

    def sld_settings(self, preset: str) -> dict:
        """The preset; warm-up steps are given for 50 steps and scaled to this run's step count."""
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig

        cfg = dict(getattr(SafetyConfig, preset))
        cfg["sld_warmup_steps"] = int(round(cfg["sld_warmup_steps"] * self.steps / 50))
        return cfg

    def generate(self, method: Method, prompt: str, seeds: list[int], concept: str):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = dict(num_inference_steps=self.steps, guidance_scale=self.guidance, generator=gens)
        prompts = [prompt] * len(seeds)
        if method.family == "plain":
            return self.pipe(prompts, **common).images
        if method.family == "negative":
            return self.pipe(prompts, negative_prompt=[concept] * len(seeds), **common).images
        if method.family == "rewrite":  # the k-th seed draws the k-th other value of the concept's attribute
            from ..toy.world import rewrite_without

            return self.pipe([rewrite_without(prompt, concept, k) for k in range(len(seeds))], **common).images
        if method.family == "sld":
            sld = self.sld_pipeline()
            sld.safety_concept = concept
            return sld(prompts, **common, **self.sld_settings(method.preset)).images
        if method.family == "eiup":
            # a row names every setting that differs from the paper's formulation: the concept
            # encoded alone unless the row says +concept_context=prompt, no anchors unless +anchors,
            # every prompt erased unless +prompt_gate, no guard unless +guard
            options = {"concept_context": "separate", "anchors": (), "prompt_gate": False, "guard": False,
                       **dict(method.options)}
            if options["guard"] is not False:  # '+guard': the model folder's guard (eiup.guard), climbing the strength
                options["guard"] = "auto" if options["guard"] in (True, 1, 1.0, "auto") else False
            if options["anchors"]:
                options["anchors"] = _anchors(options["anchors"], concept)
            if "anchor_protect" in options:  # '+anchor_protect=none' (the preset's words off) or '=a|b|c'
                options["anchor_protect"] = _protect(options["anchor_protect"])
            for flag in ("anchor_gate", "prompt_gate"):
                options[flag] = bool(options.get(flag, True))
            if "anchor_in_context" in options:  # '+anchor_in_context=0': the preset's setting off
                options["anchor_in_context"] = bool(options["anchor_in_context"])
            if "anchor_region" in options:  # '+anchor_region=0' off, '+anchor_region' the preset's rule, '=phrases'
                value = options["anchor_region"]
                options["anchor_region"] = value if isinstance(value, str) else bool(value)
            scale = None if method.scale == "preset" else method.scale
            return self.pipe(prompts, erase=[concept], erase_scale=scale, erase_mode=method.mode,
                             **options, **common).images
        raise ValueError(f"unknown method family {method.family!r}")
