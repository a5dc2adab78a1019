"""Host-side data handling: tokenizer, image decoding, REFER records and the grain pipeline."""
