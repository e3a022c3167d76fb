"""Text filters that need script detection (core.data sits below lid, so they live here)."""

from __future__ import annotations

from collections.abc import Sequence

from mmie.core.data import filter_texts
from mmie.lid.backends import script_shares


def filter_script(texts: Sequence[str], script: str, source: str,
                  min_share: float = 0.5) -> list[str]:
    """Texts whose letters are at least ``min_share`` in ``script``; none left is an error."""
    return filter_texts(texts, lambda t: script_shares(t).get(script, 0.0) >= min_share,
                        source, f"script={script} (>= {min_share:.0%} of letters)")
