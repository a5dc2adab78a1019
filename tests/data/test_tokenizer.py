"""magnet_jax.data.tokenizer: bundled vocabulary, MagNet's 20-token packing, errors, and a
cross-check of every id against a second WordPiece implementation (tokenizers'
BertWordPieceTokenizer)."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
import pytest

from magnet_jax.data import tokenizer as tokenizer_lib

VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"

SENTENCES = [
    "the man on the left",
    "man in red shirt",
    "Woman holding an umbrella, far RIGHT",
    "left-most zebra",
    "guy w/ glasses & hat",
    "the 2nd person from the left",
    "player #23 in white",
    "café table near the window",
    "naïve child with a coöperative dog",
    "Ångström-sized crumb",  # accents on capitals
    "über cool skateboarder",
    "a bowl of phở",
    "sushi 寿司 on a plate",  # CJK characters are split one by one
    "smiley 😀 face",  # not in the vocabulary -> [UNK]
    "don't touch the man's bag!!!",
    '"quoted" (parenthesised) [bracketed] {braced}',
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines",
    "3.14 pies at 12:30pm, 50% off",
    "elephant",
    "a",
    "x",
    "antidisestablishmentarianism",
    "the tall person standing behind the small red car parked next to the big blue bus on the "
    "left side of the street",
    "bottom right corner, second cup from the top, with a handle pointing to the left",
    "giraffe's neck",
    "UPPER CASE ONLY SENTENCE",
    "mIxEd CaSe SeNtEnCe",
    "hyphen-ated--double dash",
    "emoji-free unicode – en dash — em dash … ellipsis",
    "numbers 1234567890 and 007",
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer()


def test_bundled_vocab_is_bert_base_uncased(vocab_path):
    with open(vocab_path, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    words = data.decode("utf-8").split("\n")
    assert words[-1] == ""
    words = words[:-1]
    assert len(words) == 30522
    expected = {
        "[PAD]": 0,
        "[UNK]": 100,
        "[CLS]": 101,
        "[SEP]": 102,
        "[MASK]": 103,
        "the": 1996,
        "man": 2158,
        "left": 2187,
        "right": 2157,
    }
    assert {w: words.index(w) for w in expected} == expected


def test_special_ids_and_size(tok):
    assert tok.vocab_size == 30522
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.max_tokens == 20


def test_known_sentence_has_no_unk(tok):
    out = tok.encode("the man on the left")
    np.testing.assert_array_equal(out.ids[:7], [101, 1996, 2158, 2006, 1996, 2187, 102])
    assert tok.unk_id not in out.ids.tolist()
    assert tok.convert_ids_to_tokens(out.ids[:7]) == [
        "[CLS]",
        "the",
        "man",
        "on",
        "the",
        "left",
        "[SEP]",
    ]


def test_encode_layout(tok):
    out = tok.encode("The Man on the LEFT")
    assert out.ids.shape == (20,) and out.ids.dtype == np.int32
    assert out.attention_mask.shape == (20,) and out.attention_mask.dtype == np.int32
    np.testing.assert_array_equal(out.attention_mask, [1] * 7 + [0] * 13)
    np.testing.assert_array_equal(out.ids[7:], 0)
    assert out.num_pieces == 5 and out.full_length == 7 and not out.truncated


def test_lowercase_and_accent_stripping(tok):
    a = tok.encode("Café NAÏVE Über")
    b = tok.encode("cafe naive uber")
    np.testing.assert_array_equal(a.ids, b.ids)
    assert tok.unk_id not in a.ids.tolist()


@pytest.mark.parametrize("n_words", [17, 18, 19, 25])
def test_truncation_follows_official_loader(tok, n_words, caplog):
    """Encode the whole sentence, then keep the first 20 ids: above 18 pieces [SEP] is cut."""
    text = " ".join(["dog"] * n_words)  # 'dog' is one word piece
    with caplog.at_level(logging.WARNING, logger=tokenizer_lib.__name__):
        out = tok.encode(text)
    full = [101] + [3899] * n_words + [102]
    kept = full[:20]
    np.testing.assert_array_equal(out.ids[: len(kept)], kept)
    np.testing.assert_array_equal(out.ids[len(kept) :], 0)
    assert out.attention_mask.sum() == len(kept)
    assert out.num_pieces == n_words
    assert out.truncated == (n_words > 18)
    assert (102 in out.ids.tolist()) == (n_words <= 18)
    warned = [r.getMessage() for r in caplog.records]
    if n_words > 18:
        assert len(warned) == 1 and f"{n_words} word pieces" in warned[0]
    else:
        assert warned == []


def test_truncation_warning_can_be_silenced(tok, caplog):
    with caplog.at_level(logging.WARNING, logger=tokenizer_lib.__name__):
        out = tok.encode("dog " * 30, warn=False)
    assert out.truncated and caplog.records == []


def test_matches_bert_wordpiece_tokenizer(tok, vocab_path):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.BertWordPieceTokenizer(vocab_path, lowercase=True)
    batch = tok.batch_encode(SENTENCES, warn=False)
    assert batch.ids.shape == (len(SENTENCES), 20)
    for i, text in enumerate(SENTENCES):
        full = reference.encode(text).ids
        assert full[0] == 101 and full[-1] == 102
        kept = full[:20]
        expected = np.zeros(20, np.int32)
        expected[: len(kept)] = kept
        np.testing.assert_array_equal(batch.ids[i], expected, err_msg=text)
        np.testing.assert_array_equal(
            batch.attention_mask[i], (np.arange(20) < len(kept)).astype(np.int32)
        )
        assert batch.num_pieces[i] == len(full) - 2, text
        assert batch.truncated[i] == (len(full) > 20), text
        one = tok.encode(text, warn=False)
        np.testing.assert_array_equal(one.ids, batch.ids[i])
    # The list exercises both sides of the 20-token limit and the unknown-token path.
    assert batch.truncated.any() and not batch.truncated.all()
    assert (batch.ids == tok.unk_id).any()


def test_cjk_split_per_character(tok):
    out = tok.encode("寿司")
    assert out.num_pieces == 2


def test_batch_encode_types(tok):
    batch = tok.batch_encode(["the man", "a dog on the right"])
    assert batch.ids.dtype == np.int32 and batch.attention_mask.dtype == np.int32
    assert batch.num_pieces.tolist() == [2, 5]
    assert batch.truncated.dtype == np.bool_
    empty = tok.batch_encode([])
    assert empty.ids.shape == (0, 20)
    with pytest.raises(TypeError, match="list of strings"):
        tok.batch_encode("the man")


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_expression(tok, text):
    with pytest.raises(ValueError, match="^empty expression$"):
        tok.encode(text)


def test_expression_without_pieces(tok):
    with pytest.raises(ValueError, match="empty expression"):
        tok.encode("\x00\x01")  # control characters are removed by the normaliser


def test_empty_expression_in_batch(tok):
    with pytest.raises(ValueError, match="^empty expression$"):
        tok.batch_encode(["the man", " "])


def test_non_string(tok):
    with pytest.raises(TypeError, match="must be a string"):
        tok.encode(None)


def test_missing_vocab_path(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError) as info:
        tokenizer_lib.load_tokenizer(missing)
    assert str(info.value) == f"vocabulary not found: {missing}"


def test_not_a_vocabulary(tmp_path):
    small = tmp_path / "vocab.txt"
    small.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="not a BERT WordPiece vocabulary") as info:
        tokenizer_lib.load_tokenizer(small)
    assert str(small) in str(info.value) and "\n" not in str(info.value)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="binary.txt") as info:
        tokenizer_lib.load_tokenizer(binary)
    assert "\n" not in str(info.value)


def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no vocab.txt or tokenizer.json"):
        tokenizer_lib.load_tokenizer(tmp_path)


def test_directory_with_vocab_txt(tmp_path, vocab_path, tok):
    shutil.copy(vocab_path, tmp_path / "vocab.txt")
    other = tokenizer_lib.load_tokenizer(tmp_path)
    np.testing.assert_array_equal(other.encode(SENTENCES[2]).ids, tok.encode(SENTENCES[2]).ids)


def test_directory_with_tokenizer_json(tmp_path, tok):
    tok._tok.save_pretrained(str(tmp_path))
    (tmp_path / "vocab.txt").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    other = tokenizer_lib.load_tokenizer(tmp_path)
    for text in SENTENCES[:8]:
        np.testing.assert_array_equal(
            other.encode(text, warn=False).ids, tok.encode(text, warn=False).ids
        )


def test_vocab_file_keyword_trap(vocab_path):
    """Documents the transformers 5 trap the loader avoids: `vocab_file=` builds an empty vocabulary."""
    from transformers import BertTokenizer

    trapped = BertTokenizer(vocab_file=vocab_path)
    if len(trapped) >= 1000:
        pytest.skip("this transformers version reads vocab_file= again")
    assert 1996 not in trapped.encode("the man on the left")
    assert tokenizer_lib.load_tokenizer(vocab_path).encode("the man on the left").ids[1] == 1996


def test_custom_max_tokens(vocab_path):
    short = tokenizer_lib.load_tokenizer(vocab_path, max_tokens=4)
    out = short.encode("the man on the left", warn=False)
    np.testing.assert_array_equal(out.ids, [101, 1996, 2158, 2006])
    assert out.truncated
    with pytest.raises(ValueError, match="max_tokens"):
        tokenizer_lib.load_tokenizer(vocab_path, max_tokens=1)
