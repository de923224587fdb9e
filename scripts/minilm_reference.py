#!/usr/bin/env python3
"""Reference vectors for crates/isotope-sentinel/tests/minilm.rs, from
sentence-transformers itself (not part of the test run: it needs torch).

    python3 -m venv /tmp/st && /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/minilm_reference.py models/all-MiniLM-L6-v2

Prints, per text, the first 8 coordinates of its unit vector, and the cosines of
the listed pairs; the test pins these numbers.
"""
import sys

from sentence_transformers import SentenceTransformer

TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Write a haiku about the ocean at night.",
    "Compose a short Japanese-style poem describing the sea after dark.",
    "Ünïcödé — naïve café résumé: 東京タワー!",
    "x",
    " ".join(["The quick brown fox jumps over the lazy dog while counting sheep."] * 30),
]
PAIRS = [(0, 1), (2, 3), (0, 2), (4, 5), (3, 6)]

model = SentenceTransformer(sys.argv[1], device="cpu")
print("max_seq_length", model.max_seq_length)
vecs = model.encode(TEXTS, normalize_embeddings=True, batch_size=len(TEXTS))
for t, v in zip(TEXTS, vecs):
    print(repr(t[:40]), ", ".join(f"{x:.6f}" for x in v[:8]))
for i, j in PAIRS:
    print(i, j, f"{float(vecs[i] @ vecs[j]):.6f}")
