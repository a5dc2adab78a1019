"""BERT WordPiece tokenizer from a local vocabulary, padded to MagNet's static 20 tokens.

Follows MagNet's text pipeline (`data_formats.md` §3):
  1. bert-base-uncased WordPiece: lower-casing, accent stripping, CJK splitting;
  2. `[CLS] pieces [SEP]`;
  3. keep the first `max_tokens` (20) ids of that sequence: with more than 18 word pieces the
     `[SEP]` is cut, exactly as the official loader does (it encodes the whole sentence, then
     slices);
  4. right-pad with id 0 (`[PAD]`); attention mask 1 for kept ids, 0 for padding.

The tokenizer is the Rust-backed `transformers.BertTokenizer` (transformers 5). It is built with
`vocab=` (transformers 5 silently ignores the v4 keyword `vocab_file=` and builds an empty
vocabulary, `jax_stack.md` §9), or with `from_pretrained(local_dir, local_files_only=True)` for a
directory holding only a `tokenizer.json`. Nothing is downloaded.

With no argument the bert-base-uncased vocabulary bundled in `magnet_jax/assets/` is used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_TOKENS = 20
PAD_ID = 0

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_VOCAB = _ASSETS / "bert-base-uncased-vocab.txt"

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """One expression.

    ids: int32 (max_tokens,), `[CLS] … [SEP]` truncated to max_tokens, right-padded with 0.
    attention_mask: int32 (max_tokens,), 1 for kept ids, 0 for padding.
    num_pieces: word pieces of the whole sentence, without `[CLS]`/`[SEP]` (before truncation).
    truncated: True when `num_pieces + 2 > max_tokens` (some pieces or the `[SEP]` were cut).
    """

    ids: np.ndarray
    attention_mask: np.ndarray
    num_pieces: int
    truncated: bool

    @property
    def full_length(self) -> int:
        """Length of the untruncated `[CLS] … [SEP]` sequence."""
        return self.num_pieces + 2


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
    """N expressions: ids/attention_mask int32 (N, max_tokens), num_pieces int32 (N,), truncated bool (N,)."""

    ids: np.ndarray
    attention_mask: np.ndarray
    num_pieces: np.ndarray
    truncated: np.ndarray


class PaddedTokenizer:
    """Host-side tokenizer producing fixed-length int32 arrays (static shapes for jit): the
    shared encode / batch_encode over a transformers backend; subclasses pack one sequence."""

    _tok: object
    max_tokens: int

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str, warn: bool = True) -> TokenizedText:
        """Tokenise one expression; see the module docstring for the exact rules."""
        return self._pack(self._full_ids([text])[0], text, warn)

    def batch_encode(self, texts: Sequence[str], warn: bool = True) -> TokenizedBatch:
        """Tokenise N expressions into (N, max_tokens) arrays."""
        if isinstance(texts, str):
            raise TypeError("batch_encode expects a list of strings, got a single string")
        texts = list(texts)
        n, length = len(texts), self.max_tokens
        ids = np.zeros((n, length), np.int32)
        mask = np.zeros((n, length), np.int32)
        pieces = np.zeros((n,), np.int32)
        truncated = np.zeros((n,), np.bool_)
        for i, (full, text) in enumerate(zip(self._full_ids(texts), texts)):
            one = self._pack(full, text, warn)
            ids[i], mask[i], pieces[i], truncated[i] = (
                one.ids,
                one.attention_mask,
                one.num_pieces,
                one.truncated,
            )
        return TokenizedBatch(ids=ids, attention_mask=mask, num_pieces=pieces, truncated=truncated)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """Vocabulary strings of `ids` (padding included)."""
        return self._tok.convert_ids_to_tokens([int(i) for i in np.asarray(ids).reshape(-1)])

    def _full_ids(self, texts: list[str]) -> list[list[int]]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"expression must be a string, got {type(text).__name__}")
            if not text.strip():
                raise ValueError("empty expression")
        if not texts:
            return []
        return self._tok(texts, add_special_tokens=True)["input_ids"]

    def _pack(self, full: list[int], text: str, warn: bool) -> TokenizedText:
        raise NotImplementedError


class Tokenizer(PaddedTokenizer):
    """BERT's WordPiece, packed as the module docstring says."""

    def __init__(self, backend, source: str, max_tokens: int = MAX_TOKENS):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
        self._tok = backend
        self.source = source
        self.max_tokens = int(max_tokens)
        ids = {t: backend.convert_tokens_to_ids(t) for t in _SPECIAL_TOKENS}
        unk = ids["[UNK]"]
        missing = [t for t in _SPECIAL_TOKENS if ids[t] is None or (t != "[UNK]" and ids[t] == unk)]
        if missing or len(backend) < 1000:
            lacking = f", lacking {' '.join(missing)}" if missing else ""
            raise ValueError(
                f"not a BERT WordPiece vocabulary ({len(backend)} entries{lacking}): {source}"
            )
        if ids["[PAD]"] != PAD_ID:
            raise ValueError(f"[PAD] must have id {PAD_ID}, has id {ids['[PAD]']}: {source}")
        self.pad_id = PAD_ID
        self.unk_id = unk
        self.cls_id = ids["[CLS]"]
        self.sep_id = ids["[SEP]"]
        self.mask_id = ids["[MASK]"]

    def decode(self, ids, att=None) -> str:
        """Token ids (and their attention mask) back to the lower-cased sentence: word pieces
        joined, special tokens dropped."""
        ids = np.asarray(ids).reshape(-1)
        kept = ids if att is None else ids[np.asarray(att).reshape(-1) != 0]
        words: list[str] = []
        for t in self.convert_ids_to_tokens(kept):
            if t in ("[CLS]", "[SEP]", "[PAD]"):
                continue
            if t.startswith("##") and words:
                words[-1] += t[2:]
            else:
                words.append(t)
        return " ".join(words)

    def _pack(self, full: list[int], text: str, warn: bool) -> TokenizedText:
        length = self.max_tokens
        num_pieces = len(full) - 2
        if num_pieces <= 0:
            raise ValueError(f"empty expression (no word pieces): {text!r}")
        truncated = len(full) > length
        if truncated and warn:
            _log.warning(
                "expression has %d word pieces (%d tokens with [CLS]/[SEP]); kept the first %d "
                "tokens: %r",
                num_pieces,
                len(full),
                length,
                text,
            )
        kept = full[:length]
        ids = np.full((length,), self.pad_id, np.int32)
        ids[: len(kept)] = kept
        mask = np.zeros((length,), np.int32)
        mask[: len(kept)] = 1
        return TokenizedText(
            ids=ids, attention_mask=mask, num_pieces=num_pieces, truncated=truncated
        )


def load_tokenizer(
    vocab_or_dir: str | os.PathLike | None = None, max_tokens: int = MAX_TOKENS
) -> Tokenizer:
    """Build the tokenizer from a `vocab.txt`, a directory, or (None) the bundled vocabulary.

    A directory is read through its `vocab.txt` when it has one (lower-casing and accent
    stripping as bert-base-uncased); otherwise through `from_pretrained(dir,
    local_files_only=True)`, which takes its `tokenizer.json` and settings as they are.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Only the tokenizer is used: silence "PyTorch was not found. Models won't be available".
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers import BertTokenizer  # imported lazily: transformers takes ~2 s to import

    path = DEFAULT_VOCAB if vocab_or_dir is None else Path(vocab_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"vocabulary not found: {path}")
    if path.is_dir():
        if (path / "vocab.txt").is_file():
            path = path / "vocab.txt"
        elif not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no vocab.txt or tokenizer.json in {path}")
    try:
        if path.is_dir():
            backend = BertTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            backend = BertTokenizer(
                vocab=str(path), do_lower_case=True, strip_accents=None, tokenize_chinese_chars=True
            )
    except Exception as e:  # noqa: BLE001 - the Rust backend raises plain `Exception`
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load a tokenizer from {path}: {first_line}") from None
    # No model_max_length warnings: truncation to max_tokens is ours.
    backend.model_max_length = int(1e9)
    return Tokenizer(backend, str(path), max_tokens)
