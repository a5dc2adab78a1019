"""Files shipped with the package (see README.md beside this file)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLE_IMAGE = str(ASSETS_DIR / "sample.jpg")
BERT_UNCASED_VOCAB = str(ASSETS_DIR / "bert-base-uncased-vocab.txt")
