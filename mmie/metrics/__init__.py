"""Metric definitions shared by evaluate (which records them) and gate (which tests them): labels,
rates, substitution, replacement, perplexity ratio, MIA and probe summaries. One definition each.
"""
