"""Build the small CLIP-format BPE vocabulary of the synthetic data
(magnet_jax/assets/clip-synthetic-bpe/: vocab.json + merges.txt).

CLIP-based methods (CM-MaskSD) read text through CLIP's byte-level BPE. The real vocabulary
comes with a CLIP checkpoint (a local Hugging Face directory or OpenAI's merges file); the
synthetic data needs one that ships with the package, so this tool learns BPE merges over the
synthetic expressions the way BPE is learned (most frequent adjacent pair first, ties broken by
the pair's text) and writes them in CLIP's layout: the 256 byte symbols, the same with `</w>`,
one entry per merge, then <|startoftext|> and <|endoftext|> (the largest id).

    python -m tools.make_synthetic_clip_vocab [--out DIR] [--examples 3000]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

from magnet_jax.data import synthetic
from magnet_jax.data.clip_tokenizer import SYNTHETIC_VOCAB_DIR, vocab_from_merges

# CLIP's pre-tokenisation for ASCII text: letter runs, single digits, other non-space runs.
_WORDS = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def word_counts(num_examples: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for split in ("train", "val", "heldout"):
        for i in range(num_examples):
            for raw in synthetic.make_example(0, split, i, 32)["raw"]:
                counts.update(_WORDS.findall(raw.lower()))
    return counts


def learn_merges(counts: collections.Counter) -> list[tuple[str, str]]:
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): c for w, c in counts.items()}
    merges = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += c
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        merged = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(SYNTHETIC_VOCAB_DIR))
    parser.add_argument("--examples", type=int, default=3000)
    args = parser.parse_args()
    merges = learn_merges(word_counts(args.examples))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab_from_merges(merges), ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: synthetic\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    print(f"{len(merges)} merges, {len(merges) + 514} entries -> {out}")


if __name__ == "__main__":
    main()
