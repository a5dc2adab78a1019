"""CLIP's byte-level BPE tokenizer from local files, padded to a static length.

The text pipeline of CLIP-based RIS code (CRIS and its successors):
  1. CLIP's BPE (lower-casing, whitespace clean-up, byte-level pieces ending in `</w>`);
  2. `<|startoftext|> pieces <|endoftext|>`;
  3. a sequence longer than `max_tokens` keeps its first `max_tokens` ids and ends in
     `<|endoftext|>` (the last kept id is replaced), so the pooled end-of-text feature exists;
  4. right-padded with id 0, attention mask 1 for kept ids (OpenAI pads with 0; the text
     tower pools at the end-of-text token, the largest id of the vocabulary).

The backend is `transformers.CLIPTokenizer` (the Rust `tokenizers` BPE), built from
  - a Hugging Face CLIP directory: `vocab.json` + `merges.txt` (or only a `tokenizer.json`);
  - OpenAI's `bpe_simple_vocab_16e6.txt.gz` (the merges list; the vocabulary is derived from it
    the way OpenAI's own tokenizer does: the 256 byte symbols, the same with `</w>`, one entry
    per merge, then the two special tokens);
  - None: the small BPE vocabulary bundled for the synthetic data
    (`magnet_jax/assets/clip-synthetic-bpe/`, built by `tools/make_synthetic_clip_vocab.py`).
Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magnet_jax.data.tokenizer import PaddedTokenizer, TokenizedText

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
PAD_ID = 0
# OpenAI's merges file: a version line, then 49152 - 256 - 2 merges are used.
OPENAI_NUM_MERGES = 49152 - 256 - 2

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
SYNTHETIC_VOCAB_DIR = _ASSETS / "clip-synthetic-bpe"

_log = logging.getLogger(__name__)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character, the mapping of byte-level BPE (GPT-2 and CLIP): printable
    Latin-1 bytes map to themselves, the others to code points from 256 up, in byte order."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(chars.items()))


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary construction: byte symbols, byte symbols + `</w>`, merges, specials."""
    symbols = list(bytes_to_unicode().values())
    entries = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    entries += [START_TOKEN, END_TOKEN]
    vocab = {}
    for e in entries:
        vocab.setdefault(e, len(vocab))
    return vocab


def read_openai_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The merges of OpenAI's `bpe_simple_vocab_16e6.txt.gz` (gzip or plain text)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line is a version header; OpenAI keeps the first OPENAI_NUM_MERGES merges.
    merges = []
    for line in lines[1:OPENAI_NUM_MERGES + 1]:
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    if not merges:
        raise ValueError(f"no BPE merges in {path}")
    return merges


class ClipTokenizer(PaddedTokenizer):
    """CLIP's BPE, packed as the module docstring says (encode, batch_encode, decode)."""

    def __init__(self, backend, source: str, max_tokens: int):
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be at least 3 for CLIP text, got {max_tokens}")
        self._tok = backend
        self.source = source
        self.max_tokens = int(max_tokens)
        ids = {t: backend.convert_tokens_to_ids(t) for t in (START_TOKEN, END_TOKEN)}
        if any(i is None for i in ids.values()) or ids[START_TOKEN] == ids[END_TOKEN]:
            raise ValueError(f"not a CLIP BPE vocabulary (no {START_TOKEN} / {END_TOKEN}): "
                             f"{source}")
        self.start_id = int(ids[START_TOKEN])
        self.end_id = int(ids[END_TOKEN])
        if self.end_id != len(backend) - 1:
            # The text tower finds the end-of-text token by argmax over the ids.
            raise ValueError(f"{END_TOKEN} must have the largest id ({len(backend) - 1}), has "
                             f"{self.end_id}: {source}")
        self.pad_id = PAD_ID

    def decode(self, ids, att=None) -> str:
        """Token ids (and their attention mask) back to the lower-cased sentence."""
        ids = np.asarray(ids).reshape(-1)
        keep = ids if att is None else ids[np.asarray(att).reshape(-1) != 0]
        keep = [int(i) for i in keep if int(i) not in (self.start_id, self.end_id)]
        return self._tok.decode(keep).strip()

    def _pack(self, full: list[int], text: str, warn: bool) -> TokenizedText:
        if not full or full[0] != self.start_id:
            full = [self.start_id] + list(full)
        if full[-1] != self.end_id:
            full = list(full) + [self.end_id]
        num_pieces = len(full) - 2
        if num_pieces <= 0:
            raise ValueError(f"empty expression (no BPE pieces): {text!r}")
        length = self.max_tokens
        truncated = len(full) > length
        if truncated:
            if warn:
                _log.warning("expression has %d BPE pieces; kept the first %d tokens: %r",
                             num_pieces, length, text)
            full = full[:length - 1] + [self.end_id]
        ids = np.full((length,), self.pad_id, np.int32)
        ids[:len(full)] = full
        mask = np.zeros((length,), np.int32)
        mask[:len(full)] = 1
        return TokenizedText(ids=ids, attention_mask=mask, num_pieces=num_pieces,
                             truncated=truncated)


def _backend_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab=vocab, merges=merges)


def load_clip_tokenizer(path: str | os.PathLike | None, max_tokens: int) -> ClipTokenizer:
    """The CLIP tokenizer of a local directory or merges file (module docstring); None = the
    bundled synthetic vocabulary."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    source = Path(SYNTHETIC_VOCAB_DIR if path in (None, "") else path)
    if not source.exists():
        raise FileNotFoundError(f"CLIP tokenizer not found: {source}")
    try:
        if source.is_dir():
            vocab_file, merges_file = source / "vocab.json", source / "merges.txt"
            if vocab_file.is_file() and merges_file.is_file():
                vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
                merges = [tuple(line.split()) for line in
                          merges_file.read_text(encoding="utf-8").splitlines()
                          if line and not line.startswith("#version")]
                backend = _backend_from_vocab(vocab, [m for m in merges if len(m) == 2])
            elif (source / "tokenizer.json").is_file():
                from transformers import CLIPTokenizer
                backend = CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
            else:
                missing = "merges.txt" if vocab_file.is_file() else "vocab.json"
                raise FileNotFoundError(f"CLIP tokenizer directory {source} lacks {missing} "
                                        "(needs vocab.json + merges.txt, or tokenizer.json)")
        else:
            merges = read_openai_merges(source)
            backend = _backend_from_vocab(vocab_from_merges(merges), merges)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # noqa: BLE001 - the Rust backend raises plain `Exception`
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load a CLIP tokenizer from {source}: {first}") from None
    backend.model_max_length = int(1e9)  # truncation to max_tokens is ours
    return ClipTokenizer(backend, str(source), max_tokens)


__all__ = ["ClipTokenizer", "load_clip_tokenizer", "bytes_to_unicode", "vocab_from_merges",
           "read_openai_merges", "SYNTHETIC_VOCAB_DIR", "START_TOKEN", "END_TOKEN"]
