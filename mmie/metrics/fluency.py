"""Fluency that does not punish the language switch unlearning asks for.

**Measure.** Each continuation's mean per-token NLL under the *base* model (interventions
detached) given only the BOS token: no prompt. Scoring a continuation after its Hindi prompt
(the old definition) made an English answer to a Hindi prompt look disfluent, because the base
model expects Hindi there; with no prompt an English, Hindi or Urdu continuation is judged only
as text. This is the reference-model perplexity used to check generation quality in the
unlearning literature (e.g. Eldan & Russinovich 2023, "Who's Harry Potter?"; Zhang et al. 2024,
NPO), scored unconditionally so that the target language does not matter.

**Reference.** What fluent text scores: the same measure on the base model's continuations of
the retain prompts. They come from the ``--baseline`` artifact when it was evaluated with this
definition (its retain rows' ``fluency_nll``); without one, from this run's retain
continuations: for the base arm those are the base model's own, for an intervened arm they are
the arm's (recorded as ``source`` in the manifest; pass ``--baseline`` for a fixed reference).

**Flag.** A continuation is ``fluent`` when it is not degenerate and its fluency NLL is at most
the reference's median plus ``tolerance`` nats per token (default 1.0: a per-token perplexity
at most e times that of the base model's typical English continuation). A repetition loop has
a low NLL but is degenerate (:func:`mmie.lid.detect.degeneracy`), so it is never fluent; an empty
continuation (no score) is not fluent either.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

DEFINITION = "base-model NLL per token of the continuation after BOS only (no prompt)"


def fluency_items(lm, generations: Sequence) -> list:
    """Each continuation as a sequence to score after BOS alone (all its tokens scored); with
    no BOS token its first token is the context and goes unscored."""
    from mmie.core.generation import ScoreItem

    bos = lm.tokenizer.bos_token_id
    head = () if bos is None else (int(bos),)
    return [ScoreItem(head + tuple(g.new_ids), 1) for g in generations]


@dataclass(frozen=True)
class FluencyReference:
    """The threshold ``fluent`` compares with, and where it came from."""

    median: float | None
    tolerance: float
    n: int
    source: str

    @property
    def threshold(self) -> float | None:
        return None if self.median is None else self.median + self.tolerance

    def to_dict(self) -> dict:
        return {"definition": DEFINITION, "median": self.median, "tolerance": self.tolerance,
                "threshold": self.threshold, "n": self.n, "source": self.source}


def reference(values: Sequence[float | None], tolerance: float,
              source: str) -> FluencyReference:
    """Median fluency NLL of the reference continuations (nulls left out)."""
    kept = [float(v) for v in values if v is not None]
    return FluencyReference(statistics.median(kept) if kept else None, tolerance, len(kept),
                            source)


def is_fluent(nll: float | None, degenerate: bool, ref: FluencyReference) -> bool:
    """Not degenerate, scored, and within the reference's tolerance; with no reference
    nothing is fluent (a missing reference must not pass a replacement gate)."""
    threshold = ref.threshold
    return not degenerate and nll is not None and threshold is not None and nll <= threshold
