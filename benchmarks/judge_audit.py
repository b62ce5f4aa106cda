"""Audit the toy judge on generated images against labels read by eye (issue #3).

The detector is trained and scored on VAE round trips of renders; the benchmarks use it on generated
images, whose objects carry textures no render has. This script checks it where it is used:

* ``make`` generates the quality report's prompts with the bundled model (seeds outside the report's) and
  writes contact sheets of the images *without* their prompts or any detector reading, so that a person can
  label each object's pattern blind (left to right, then top to bottom: the detector's order).
* ``score`` compares detectors with those labels: pattern agreement on the labelled objects, and each prompt
  group's "all attributes correct" as read and with the eye's pattern.
* ``brightness`` counts the dotted objects a detector reads on fresh round trips whose objects are made a few
  percent darker or brighter: whether its pattern head reads marks or mean brightness.

Labels (``benchmarks/judge-audit/labels.json``): ``{"<image index>": ["plain", "dotted"], ...}``, one entry
per object; ``"?"`` where the eye cannot tell, left out of the agreement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

AUDIT = Path(__file__).parent / "judge-audit"


def audit_prompts(groups: list[str] | None = None) -> list[str]:
    """The quality report's prompts, of ``groups`` (all where None)."""
    from eiup.toy.quality import quality_prompts

    known = quality_prompts()
    unknown = sorted(set(groups or []) - set(known))
    if unknown:
        raise SystemExit(f"--group: unknown {unknown}; one of {sorted(known)}")
    return [p for name, group in known.items() if groups is None or name in groups for p in group]


def guidance_scale(text: str) -> float:
    """argparse type of ``--guidance``: a finite, non-negative number."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite guidance scale >= 0 (e.g. 7.5)")
    return value


def model_folder(text: str) -> Path:
    """argparse type of ``--model``: a diffusers pipeline folder."""
    path = Path(text)
    if not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a pipeline folder (no model_index.json)")
    return path


def make(args) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    from eiup.models import load_pipeline
    from eiup.toy.quality import seed_generators

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = audit_prompts(args.group)
    items = [(p, s) for s in args.seeds for p in prompts]
    images = []
    for i in range(0, len(items), 16):
        chunk = items[i:i + 16]
        result = pipe([p for p, _ in chunk], num_inference_steps=25, guidance_scale=args.guidance,
                      generator=seed_generators([s for _, s in chunk]), output_type="np")
        images.extend((result.images * 255).round().astype(np.uint8))
    np.savez_compressed(out / "images.npz", images=np.stack(images))
    (out / "settings.json").write_text(json.dumps({"model": str(args.model or "bundled"), "steps": 25,
                                                   "guidance": args.guidance, "seeds": args.seeds}))
    (out / "items.json").write_text(json.dumps([{"prompt": p, "seed": s} for p, s in items], indent=1))
    template = out / "labels-template.json"  # one "?" per image: replace by each object's pattern, left to right
    template.write_text(json.dumps({str(i): ["?"] for i in range(len(items))}, indent=0))
    zoom, per_sheet, cols = 4, 20, 5
    for sheet in range(0, len(images), per_sheet):
        batch = images[sheet:sheet + per_sheet]
        rows = (len(batch) + cols - 1) // cols
        canvas = Image.new("RGB", (cols * (64 * zoom + 8), rows * (64 * zoom + 24)), (200, 200, 200))
        draw = ImageDraw.Draw(canvas)
        for k, im in enumerate(batch):
            x, y = (k % cols) * (64 * zoom + 8), (k // cols) * (64 * zoom + 24)
            canvas.paste(Image.fromarray(im).resize((64 * zoom, 64 * zoom), Image.NEAREST), (x, y + 20))
            draw.text((x + 2, y + 4), str(sheet + k), fill=(0, 0, 0))
        canvas.save(out / f"sheet-{sheet // per_sheet:02d}.png")
    print(f"{len(images)} images, sheets in {out}")


@dataclass
class Audit:
    """What one detector's readings of labelled images come to."""

    confusion: Counter = field(default_factory=Counter)  # (eye's pattern, detector's pattern) -> objects
    miscounted: int = 0  # images whose detected object count differs from the eye's: left out of `confusion`
    unsure: int = 0  # images with an object the eye could not tell: left out of `confusion`
    shown: Counter = field(default_factory=Counter)  # prompt group -> images
    read_ok: Counter = field(default_factory=Counter)  # prompt group -> all attributes correct as read
    eye_ok: Counter = field(default_factory=Counter)  # the same with the eye's pattern in place of the detector's

    def agreement(self) -> tuple[int, int]:
        return sum(n for (a, b), n in self.confusion.items() if a == b), sum(self.confusion.values())


def audit(detections, prompts: list[str], eye: list[list[str]], group_of: dict[str, str]) -> Audit:
    """Compare detections of images of ``prompts`` with the eye's patterns (one list per image, the detector's
    object order; "?" where the eye cannot tell). An image whose count differs, or with a "?", keeps the
    detector's reading for the per-group figures (a miscount is wrong for both)."""
    from eiup.toy.quality import scene_correct
    from eiup.toy.world import parse_caption

    result = Audit()
    for detection, prompt, said in zip(detections, prompts, eye, strict=True):
        expected, group = parse_caption(prompt), group_of[prompt]
        result.shown[group] += 1
        correct = scene_correct(expected, detection)
        result.read_ok[group] += correct
        if len(detection.objects) != len(said) or "?" in said:
            result.miscounted += len(detection.objects) != len(said)
            result.unsure += len(detection.objects) == len(said)
            result.eye_ok[group] += correct
            continue
        seen = dataclasses.replace(detection, objects=[dataclasses.replace(o, pattern=p)
                                                       for o, p in zip(detection.objects, said)])
        result.eye_ok[group] += scene_correct(expected, seen)
        for p, read in zip(said, detection.objects):
            result.confusion[p, read.pattern] += 1
    return result


def score(args) -> None:
    import numpy as np

    from eiup.toy.detect import ConceptDetector
    from eiup.toy.quality import quality_prompts

    groups = quality_prompts()
    group_of = {p: g for g, prompts in groups.items() for p in prompts}
    images, prompts, eye = [], [], []
    for folder, labels_path in zip(args.images, args.labels, strict=True):
        stack = np.load(Path(folder) / "images.npz")["images"]
        items = json.loads((Path(folder) / "items.json").read_text())
        labels = {int(k): v for k, v in json.loads(Path(labels_path).read_text()).items()}
        unknown = sorted(set(labels) - set(range(len(items))))
        if unknown:
            raise SystemExit(f"{labels_path}: no image {unknown[:5]} in {folder}; were the labels written for it?")
        images.extend(stack[i] for i in sorted(labels))
        prompts.extend(items[i]["prompt"] for i in sorted(labels))
        eye.extend(labels[i] for i in sorted(labels))
    for path in args.detector or [None]:
        result = audit(ConceptDetector.load(path).detect(np.stack(images)), prompts, eye, group_of)
        agree, judged = result.agreement()
        print(f"{path or 'bundled detector'}: pattern agrees with the eye on {agree}/{judged} objects "
              f"({100 * agree / max(judged, 1):.1f}%); {result.miscounted} images with another object count, "
              f"{result.unsure} with an object the eye could not tell (both left out)")
        for eye_value in ("plain", "striped", "dotted"):
            row = {read: result.confusion[eye_value, read] for read in ("plain", "striped", "dotted")}
            print(f"  eye {eye_value:8s} -> read {row}")
        print("  all attributes correct: as read | with the eye's pattern")
        for group in groups:
            if result.shown[group]:
                print(f"  {group:28s} {100 * result.read_ok[group] / result.shown[group]:5.1f}% | "
                      f"{100 * result.eye_ok[group] / result.shown[group]:5.1f}%  ({result.shown[group]} images)")


def brightness(args) -> None:
    """How many dotted objects the detector reads on fresh round trips with their objects made darker or brighter."""
    import torch

    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector, make_detector_data, scale_objects

    images, _, scenes = make_detector_data(load_pipeline(None).vae, args.scenes, seed=4321, processes=1)
    truth = Counter(o.pattern for s in scenes for o in s.objects)
    print(f"{args.scenes} fresh round trips: {truth['dotted']} dotted, {truth['striped']} striped objects")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for path in args.detector or [None]:
        detector = ConceptDetector.load(path)
        for factor in args.factors:
            scaled = scale_objects(x, factor)
            found = detector.detect(((scaled + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
            read = Counter(o.pattern for d in found for o in d.objects)
            print(f"  {path or 'bundled detector'}, objects x {factor}: read {read['dotted']} dotted, "
                  f"{read['striped']} striped")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="generate the audit images and their blind contact sheets")
    m.add_argument("--seeds", type=int, nargs="+", default=[2000, 2001])
    m.add_argument("--group", action="append", default=None, help="a quality report prompt group (repeat; default: all)")
    m.add_argument("--guidance", type=guidance_scale, default=7.5, help="classifier-free guidance (default 7.5)")
    m.add_argument("--model", type=model_folder, default=None, help="toy pipeline folder (default: the bundled model)")
    m.add_argument("--out", default="runs/judge-audit")
    s = sub.add_parser("score", help="agreement of detectors with the labels")
    s.add_argument("--images", action="append", required=True, help="a folder `make` wrote (repeat, one per --labels)")
    s.add_argument("--labels", action="append", required=True, help="its labels (repeat, in the order of --images)")
    s.add_argument("--detector", action="append", default=None, help="detector weights (repeat; default: bundled)")
    b = sub.add_parser("brightness", help="dotted reads on round trips with objects made darker or brighter")
    b.add_argument("--scenes", type=int, default=400)
    b.add_argument("--factors", type=float, nargs="+", default=[0.93, 1.0, 1.07])
    b.add_argument("--detector", action="append", default=None, help="detector weights (repeat; default: bundled)")
    args = ap.parse_args()
    {"make": make, "score": score, "brightness": brightness}[args.command](args)


if __name__ == "__main__":
    main()
