"""Sparse autoencoder architectures (TopK, BatchTopK, Matryoshka), their kernels and sharding.

A library used by train-sae (which trains them) and by edits (the SAE gate applies them)."""
