"""Which prompt tokens carry a concept? Swap groups of prompt-embedding positions with the empty
prompt's and let the detector say whether the concept survives (toy model).

For each prompt the text encoder's output E(P) has BOS at 0, the words, EOS, then padding. Variants:

    plain       E(P)
    words       the word positions replaced by E("")'s vectors at the same positions
    padding     the positions after EOS replaced by E("")'s
    eos+padding EOS and the padding replaced

If the concept survives "words" but not "padding", the model reads it from the padding, which a
method acting through the concept's *word* (EIUP's concept term) does not reach; this is why
``anchors`` (eiup.anchors) edits the padding.

    python benchmarks/carrier.py --seeds 20 --out docs/carrier.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

CASES = [
    ("a tomato", "color", "red"),
    ("a valentine", "color", "red"),
    ("a valentine", "shape", "heart"),
    ("a starfish", "shape", "star"),
    ("a lemon at night", "background", "black"),
    ("a red square", "color", "red"),
]
VARIANTS = ("plain", "words", "padding", "eos+padding")


def swapped(e: torch.Tensor, empty: torch.Tensor, n: int, variant: str) -> torch.Tensor:
    """E(P) with one group of positions taken from E("") (n = tokens of P including BOS and EOS)."""
    out = e.clone()
    span = {"plain": slice(0, 0), "words": slice(1, n - 1), "padding": slice(n, None), "eos+padding": slice(n - 1, None)}[variant]
    out[:, span] = empty[:, span]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="pipeline folder (default: the bundled toy model)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = ap.parse_args()

    from eiup.models import load_pipeline
    from eiup.toy.detect import ConceptDetector

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    detector = ConceptDetector.load()
    tok = pipe.tokenizer

    def encode(text: str) -> torch.Tensor:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0]

    empty = encode("")
    seeds = list(range(1000, 1000 + args.seeds))
    rows = []
    for prompt, attribute, value in tqdm(CASES, desc="prompts"):
        e, n = encode(prompt), len(tok(prompt).input_ids)
        shares = []
        for variant in VARIANTS:
            images = pipe(prompt_embeds=swapped(e, empty, n, variant).expand(len(seeds), -1, -1),
                          negative_prompt_embeds=empty.expand(len(seeds), -1, -1), num_inference_steps=args.steps,
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images
            shares.append(float(np.mean([d.has(attribute, value) for d in detector.detect(images)])))
        rows.append((prompt, f"{attribute}={value}", shares))
    lines = [f"Share of images where the detector sees the concept ({args.seeds} seeds, {args.steps} steps), with "
             "groups of prompt-embedding positions replaced by the empty prompt's (`python benchmarks/carrier.py`).",
             "", "| prompt | concept | " + " | ".join(f"{v} swapped" if v != "plain" else v for v in VARIANTS) + " |",
             "|---|---|" + "---|" * len(VARIANTS)]
    lines += [f"| {p} | {c} | " + " | ".join(f"{s:.0%}" for s in shares) + " |" for p, c, shares in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
