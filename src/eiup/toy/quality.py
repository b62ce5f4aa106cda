"""Quality report of the bundled toy model: does it draw what its captions say, and does its
cross-attention localise concepts the way Stable Diffusion's does?"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .detect import ConceptDetector, Detection, match_objects
from .world import COLORS, IMPLICIT_NOUNS, SHAPES, Scene, article, parse_caption


def quality_prompts() -> dict[str, list[str]]:
    """Prompt groups of the report (fixed, so reports are comparable across models)."""
    explicit = [f"{article(c)} {c} {s}" for c, s in zip(COLORS * 2, SHAPES[::-1] + SHAPES)]
    detailed = [
        "a striped blue circle", "a dotted green square", "a striped purple heart",
        "a dotted orange cross", "a red triangle on a black background", "a yellow star on a gray background",
        "a dotted blue star on a gray background", "a striped green triangle on a black background",
        "a photo of a striped red square", "a drawing of a dotted purple circle",
        "an image of an orange heart on a black background", "a dotted yellow cross",
    ]
    two = [
        "a red circle and a blue square", "a green star and a yellow heart", "a purple triangle and an orange cross",
        "a blue heart and a red star", "a yellow square and a green circle", "a tomato and a sapphire",
        "a lemon and a grape", "a starfish and a lime", "an orange circle and a purple star",
        "a red cross and a yellow triangle",
    ]
    return {
        "implicit": [f"a {n}" if n[0] not in "aeiou" else f"an {n}" for n in IMPLICIT_NOUNS],
        "explicit": explicit,
        "explicit+pattern/background": detailed,
        "two objects": two,
    }


# Issue #3's targets per prompt group: the share of images that must be right, and by which measure
# ("all": every attribute the prompt names; "colour and shape": the report's "pattern not judged", which also
# asks for the object count and the background).
QUALITY_TARGETS: dict[str, tuple[float, str]] = {
    "implicit": (0.90, "all"),
    "explicit": (0.90, "all"),
    "explicit+pattern/background": (0.80, "all"),
    "two objects": (0.70, "colour and shape"),
}


def seed_generators(seeds: list[int], device: str = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def scene_correct(expected: Scene, detection: Detection, attributes=("color", "shape", "pattern")) -> bool:
    """All expected objects found with the right attributes, no extra object, right background."""
    if len(detection.objects) != len(expected.objects) or detection.background != expected.background:
        return False
    pairs = match_objects(list(expected.objects), detection.objects)
    return all(all(getattr(expected.objects[i], a) == getattr(detection.objects[j], a) for a in attributes)
               for i, j in pairs)


class CrossAttentionRecorder:
    """Per-call recorder of head-averaged cross-attention maps of the conditional rows.

    Install with `unet.set_attn_processor(recorder.processors(unet))`; `recorder.step` is advanced
    by the pipeline's `callback_on_step_end`. Maps are summed per step window.
    """

    def __init__(self, steps: int, window: tuple[float, float] = (0.25, 0.75)):
        self.step = 0
        self.lo, self.hi = int(steps * window[0]), max(int(steps * window[0]) + 1, int(steps * window[1]))
        self.sum: dict[int, torch.Tensor] = {}  # tokens count -> (B, N, 77) summed maps at that resolution
        self.count = 0

    def processors(self, unet):
        from diffusers.models.attention_processor import AttnProcessor2_0

        from .train import RecordingCrossAttnProcessor

        return {name: RecordingCrossAttnProcessor(self) if name.endswith("attn2.processor") else AttnProcessor2_0()
                for name in unet.attn_processors}

    def append(self, maps: torch.Tensor) -> None:
        """Called by the recording processors with (B, N, 77) head-averaged maps; keeps the cond rows."""
        if self.lo <= self.step < self.hi:
            cond = maps[maps.shape[0] // 2:]
            self.sum[maps.shape[1]] = self.sum.get(maps.shape[1], 0) + cond

    def callback(self, pipe, step, timestep, kwargs):
        self.step = step + 1
        return kwargs

    def token_maps(self, size: int) -> torch.Tensor:
        """(B, 77, size, size): mean over layers/steps, each resolution upsampled to `size`."""
        maps = []
        for n, m in self.sum.items():
            side = int(np.sqrt(n))
            m = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], side, side)
            maps.append(torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0)


def localisation(pipe, detector: ConceptDetector, prompts: list[str], seeds: list[int], steps: int,
                 guidance: float) -> dict:
    """Correlation between each colour word's attention map and its object's region (two-object prompts)."""
    tok = pipe.tokenizer
    corrs = []
    for prompt in tqdm(prompts, desc="localisation"):
        scene = parse_caption(prompt)
        rec = CrossAttentionRecorder(steps)
        original = pipe.unet.attn_processors
        pipe.unet.set_attn_processor(rec.processors(pipe.unet))
        try:
            images = pipe([prompt] * len(seeds), generator=seed_generators(seeds), num_inference_steps=steps,
                          guidance_scale=guidance, callback_on_step_end=rec.callback).images
        finally:
            pipe.unet.set_attn_processor(original)
        maps = rec.token_maps(16)
        ids = tok(prompt).input_ids
        dets = detector.detect(images)
        for b, det in enumerate(dets):
            for i, j in match_objects(list(scene.objects), det.objects):
                obj = scene.objects[i]
                word = obj.noun.split()[-1] if obj.noun else obj.color
                if det.objects[j].mask is None or (obj.noun is None and det.objects[j].color != obj.color):
                    continue
                pos = ids.index(tok.convert_tokens_to_ids(word + "</w>"))
                a = maps[b, pos].flatten().numpy()
                r = det.objects[j].mask.astype(np.float32).flatten()
                if a.std() > 0 and r.std() > 0:
                    corrs.append(float(np.corrcoef(a, r)[0, 1]))
    return {"mean_correlation": float(np.mean(corrs)) if corrs else float("nan"), "n_maps": len(corrs)}


@dataclass
class QualityReport:
    accuracy: dict[str, float]
    per_prompt: dict[str, float]
    localisation: dict
    seconds_per_image: float
    settings: dict
    # colour, shape, object count and background right, the pattern not judged: the detector's pattern head
    # (93.8% on round trips) reads plain generated objects dotted (benchmarks/judge_audit.py)
    accuracy_without_pattern: dict[str, float]

    def target_rows(self) -> dict[str, tuple[float, float, str]]:
        """Per group with a target: (measured by the target's own measure, target, measure)."""
        return {group: ((self.accuracy if measure == "all" else self.accuracy_without_pattern)[group], target, measure)
                for group, (target, measure) in QUALITY_TARGETS.items() if group in self.accuracy}

    def to_markdown(self, grid_name: str) -> str:
        lines = ["# Toy model quality report", "",
                 f"Settings: {json.dumps(self.settings)}", "",
                 "| prompt group | all attributes correct | pattern not judged | target (issue #3) |", "|---|---|---|---|"]
        targets = self.target_rows()
        for group, value in self.accuracy.items():
            target = ""
            if group in targets:
                measured, bar, measure = targets[group]
                target = (f"met: {measured:.1%} >= {bar:.0%}" if measured >= bar else f"not met: {measured:.1%} < {bar:.0%}")
                target += f" ({measure})"
            lines.append(f"| {group} | {value:.1%} | {self.accuracy_without_pattern[group]:.1%} | {target} |")
        lines += ["", f"Localisation (two-object prompts, colour/noun word vs its object's region): "
                  f"mean correlation **{self.localisation['mean_correlation']:.2f}** over "
                  f"{self.localisation['n_maps']} maps.", "",
                  f"One 64x64 image, {self.settings['steps']} steps with guidance, batch 1: "
                  f"**{self.seconds_per_image:.2f} s** on this CPU.", "",
                  f"![grid]({grid_name})", "", "## Per prompt", "", "| prompt | correct |", "|---|---|"]
        lines += [f"| {p} | {v:.0%} |" for p, v in self.per_prompt.items()]
        return "\n".join(lines) + "\n"


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 2) -> Image.Image:
    """Rows of equally sized images as one picture (optional row labels on the left)."""
    from PIL import ImageDraw

    w, h = rows[0][0].size
    pad = 150 if labels else 0
    grid = Image.new("RGB", (pad + w * scale * max(len(r) for r in rows), h * scale * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (pad + x * w * scale, y * h * scale))
        if labels:
            lines = wrap_label(labels[y], 24)[: max(1, h * scale // 12)]
            top = y * h * scale + max(0, (h * scale - 12 * len(lines)) // 2)
            draw.multiline_text((4, top), "\n".join(lines), fill="black", spacing=2)
    return grid


def wrap_label(label: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters, broken after '+', '@', ',' or a space where possible."""
    lines, line = [], ""
    for part in re.split(r"(?<=[+@, ])", label):
        while len(part) > width:  # a part too long for any line: hard breaks
            room = width - len(line)
            line, part = line + part[:room], part[room:]
            lines.append(line)
            line = ""
        if len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return [*lines, line] if line else lines


def quality_report(pipe, detector: ConceptDetector, seeds: list[int], steps: int = 25, guidance: float = 7.5,
                   out_dir: str | Path | None = None) -> QualityReport:
    groups = quality_prompts()
    per_prompt, accuracy, without_pattern, grid_rows, labels = {}, {}, {}, [], []
    for group, prompts in groups.items():
        ok = ok_shape_colour = 0
        for prompt in tqdm(prompts, desc=group):
            images = pipe([prompt] * len(seeds), generator=seed_generators(seeds), num_inference_steps=steps,
                          guidance_scale=guidance).images
            scene = parse_caption(prompt)
            detections = detector.detect(images)
            hits = [scene_correct(scene, d) for d in detections]
            per_prompt[prompt] = float(np.mean(hits))
            ok += sum(hits)
            ok_shape_colour += sum(scene_correct(scene, d, ("color", "shape")) for d in detections)
            if len(grid_rows) < 40 and prompt in prompts[:10]:
                grid_rows.append(images[:10])
                labels.append(prompt)
        accuracy[group] = ok / (len(prompts) * len(seeds))
        without_pattern[group] = ok_shape_colour / (len(prompts) * len(seeds))
    loc = localisation(pipe, detector, groups["two objects"], seeds[:10], steps, guidance)
    t0 = time.perf_counter()
    for s in range(3):
        pipe("a tomato", generator=seed_generators([s]), num_inference_steps=steps, guidance_scale=guidance)
    sec = (time.perf_counter() - t0) / 3
    report = QualityReport(accuracy, per_prompt, loc, sec,
                           {"steps": steps, "guidance": guidance, "seeds": f"{seeds[0]}..{seeds[-1]} ({len(seeds)})"},
                           without_pattern)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        image_grid(grid_rows, labels).save(out / "toy-quality-grid.png")
        (out / "toy-quality.md").write_text(report.to_markdown("toy-quality-grid.png"))
        (out / "toy-quality.json").write_text(json.dumps(report.__dict__, indent=2))
    return report
