"""A word-level tokenizer saved in CLIP's BPE format, so `CLIPTokenizer` loads it unchanged.

Every toy-world word is one token; any other text falls back to CLIP's byte-level characters
(as real CLIP does for rare words), so unknown words still take up token positions.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE over `words` (frequency 1 each) until every word is a single symbol."""
    segs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(p for s in segs.values() for p in zip(s, s[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out


def build_clip_tokenizer(words: list[str], save_dir: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json/merges.txt/tokenizer_config.json for `words` and load them with CLIPTokenizer."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = learn_merges(sorted(set(words)))
    vocab_list = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (save_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (save_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    tok = CLIPTokenizer.from_pretrained(save_dir)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} did not become one token: {ids}")
    return tok
