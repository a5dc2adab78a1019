"""CLIP's BPE tokenizer (data/clip_tokenizer.py): the packing rules, the three file layouts
giving the same ids, the bundled synthetic vocabulary, the pipeline's re-encoding, errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from magnet_jax.data import synthetic
from magnet_jax.data.clip_tokenizer import (END_TOKEN, SYNTHETIC_VOCAB_DIR, START_TOKEN,
                                            bytes_to_unicode, load_clip_tokenizer,
                                            vocab_from_merges)

SENTENCES = ["the first diamond from the bottom!", "The Rightmost purple star, left of it",
             "a zebra"]


def test_packing_rules():
    tok = load_clip_tokenizer(None, 8)
    one = tok.encode("the red circle")
    assert one.ids[0] == tok.start_id and one.ids[4] == tok.end_id
    assert one.ids[5:].tolist() == [0, 0, 0] and one.attention_mask.tolist() == [1] * 5 + [0] * 3
    assert tok.convert_ids_to_tokens(one.ids[1:4]) == ["the</w>", "red</w>", "circle</w>"]
    assert not one.truncated and one.num_pieces == 3
    long = tok.encode("the second small purple triangle to the left of the star", warn=False)
    assert long.truncated and long.num_pieces == 11
    assert long.ids[-1] == tok.end_id and long.attention_mask.all()     # ends in end-of-text
    assert tok.decode(long.ids, long.attention_mask) == "the second small purple triangle to"
    # The end-of-text id is the largest: the text tower pools at argmax(ids).
    assert tok.end_id == tok.vocab_size - 1 and tok.end_id > tok.start_id


def test_every_synthetic_word_is_one_piece():
    tok = load_clip_tokenizer(None, 20)
    words = set()
    for i in range(200):
        for raw in synthetic.make_example(1, "train", i, 32)["raw"]:
            words.update(raw.lower().replace("!", " ").replace(",", " ").replace(".", " ").split())
    for word in sorted(words):
        assert tok.encode(word).num_pieces == 1, word
    # A word the vocabulary never saw still encodes, as byte pieces (no unknown token).
    assert tok.encode("zebra").num_pieces > 1


def test_vocab_json_tokenizer_json_and_openai_merges_give_the_same_ids(tmp_path):
    merges = [tuple(l.split()) for l in
              (SYNTHETIC_VOCAB_DIR / "merges.txt").read_text().splitlines()[1:]]
    vocab = json.loads((SYNTHETIC_VOCAB_DIR / "vocab.json").read_text())
    assert vocab == vocab_from_merges(merges)       # the bundled files follow OpenAI's layout
    assert len(bytes_to_unicode()) == 256 and vocab[START_TOKEN] == 256 * 2 + len(merges)
    gz = tmp_path / "bpe_simple_vocab.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("#version: test\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    reference = load_clip_tokenizer(None, 12).batch_encode(SENTENCES, warn=False)
    from_gz = load_clip_tokenizer(gz, 12).batch_encode(SENTENCES, warn=False)
    np.testing.assert_array_equal(from_gz.ids, reference.ids)
    # A directory with only a tokenizer.json (what save_pretrained writes).
    from transformers import CLIPTokenizer
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "vocab.json").unlink(missing_ok=True)
    (tmp_path / "hf" / "merges.txt").unlink(missing_ok=True)
    from_json = load_clip_tokenizer(tmp_path / "hf", 12).batch_encode(SENTENCES, warn=False)
    np.testing.assert_array_equal(from_json.ids, reference.ids)
    np.testing.assert_array_equal(from_json.attention_mask, reference.attention_mask)


def test_pipeline_re_encodes_the_raw_sentence(tmp_path):
    from magnet_jax.data import pipeline
    synthetic.generate(tmp_path, num_train=4, num_val=2, num_heldout=0, image_size=32, seed=0)
    tok = load_clip_tokenizer(None, 12)
    plain = pipeline.eval_dataset(tmp_path, "val", image_size=32, global_batch=2)[0]
    clip = pipeline.eval_dataset(tmp_path, "val", image_size=32, global_batch=2,
                                 tokenizer=tok)[0]
    np.testing.assert_array_equal(clip["image"], plain["image"])
    assert plain["ids"].shape == (2, 20) and clip["ids"].shape == (2, 12)
    from magnet_jax.data.records import RecordSource
    first = RecordSource(tmp_path, "val")[0]
    np.testing.assert_array_equal(clip["ids"][0], tok.encode(first["raw"][0]).ids)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP tokenizer not found: .*nowhere"):
        load_clip_tokenizer(tmp_path / "nowhere", 12)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks merges.txt"):
        load_clip_tokenizer(tmp_path / "half", 12)
    # A vocabulary whose end-of-text token is not the largest id.
    vocab = vocab_from_merges([])
    vocab[END_TOKEN], vocab[START_TOKEN] = vocab[START_TOKEN], vocab[END_TOKEN]
    (tmp_path / "swapped").mkdir()
    (tmp_path / "swapped" / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "swapped" / "merges.txt").write_text("#version: 0\n")
    with pytest.raises(ValueError, match="<\\|endoftext\\|> must have the largest id"):
        load_clip_tokenizer(tmp_path / "swapped", 12)
    with pytest.raises(ValueError, match="empty expression"):
        load_clip_tokenizer(None, 12).encode("   ")
