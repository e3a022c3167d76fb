"""Recording the model's own log p of each token ``model.generate`` picks (greedy decoding).

transformers runs custom logits processors after its built-in ones, so the recorder is given
no built-in processor that changes scores: the repetition penalty, when there is one, is passed
as a later custom processor (:func:`processors`), and the recorder sees the raw logits.
"""

from __future__ import annotations

import torch


class ChosenLogprobs:
    """A logits processor recording the model's own log p of every token ``generate`` picks.

    Custom processors run after transformers' built-in ones, so this one is given no built-in
    processor that changes scores (greedy, repetition penalty passed as a later custom
    processor) and sees the raw logits. The chosen token is only known at the next step (it is
    the last of ``input_ids``), so one step's log-softmax is held until then; :meth:`finish`
    takes the last step's choice from the output.
    """

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _take(self, chosen: torch.Tensor) -> None:
        if self.pending is not None:
            picked = self.pending.gather(-1, chosen[:, None].to(self.pending.device))[:, 0]
            self.steps.append(picked.cpu())
            self.pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = scores.float().log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        self._take(sequences[:, -1])
        return torch.stack(self.steps, 1)


def processors(penalty: float, recorder: ChosenLogprobs | None) -> list:
    from transformers import RepetitionPenaltyLogitsProcessor

    if recorder is None:
        return []
    # the penalty goes after the recorder, which must see the raw logits
    return [recorder] + ([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else [])
