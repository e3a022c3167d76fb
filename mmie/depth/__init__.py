"""Depth of forgetting: comprehension (retrieval, probe), relearning attack, steering."""
