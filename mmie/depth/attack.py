"""The relearning attack and what is measured at each of its checkpoints.

The attack fine-tunes a fresh LoRA (on every block's attention and MLP projections) with the
plain next-token loss on a small forget-language set, on top of whatever the arm did (see
:mod:`mmie.depth.arms` for how an arm is kept in place). It is the relearning attack of Lucki
et al. 2024 ("An adversarial perspective on machine unlearning for AI safety": a few unrelated
examples undo RMU) and Deeb & Roger 2024 ("Do unlearning methods remove information from
language model weights?": fine-tuning on a disjoint split recovers most of the removed
accuracy), made light by default (rank 8, lr 2e-4, batch 8, Lucki et al. used rank 128): the
recovery it finds is a floor on what a determined attacker recovers, not a ceiling.

At each checkpoint (step 0 = before any update) every scored text gets, under teacher forcing:
the summed next-token NLL and token count, and the summed probability that the next token is in
the forget script (the share of the vocabulary's mass on tokens whose decoded text is in that
script; byte-level tokenizers whose tokens are partial characters have none, and the metric is
then recorded as missing).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from mmie.core.activations import tokenize
from mmie.core.losses import (
    head_params,
    logprobs_and_subset_mass,
    masked_mean,
    shift_labels,
    token_logprobs,
)
from mmie.core.models import LoadedModel, get_decoder, input_device
from mmie.core.progress import SILENT, Progress
from mmie.edits.adapters import LORA_TARGETS, AdapterSpec, LoraAdapter
from mmie.lid.backends import script_of


@dataclass(frozen=True)
class AttackSpec:
    """The attack (module docstring). steps: checkpoints; 0 (before any update) is always
    added, since the recovery fraction needs the arm's value before the attack."""

    steps: tuple[int, ...] = (0, 5, 10, 20, 50)
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-4
    batch_size: int = 8
    target_modules: tuple[str, ...] = LORA_TARGETS
    max_length: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        steps = tuple(sorted({0, *(int(s) for s in self.steps)}))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if steps[0] < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.rank < 1 or self.alpha <= 0 or self.lr <= 0:
            raise ValueError("rank >= 1, alpha > 0 and lr > 0 are required")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch_size >= 1 and max_length >= 2 are required")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TextScore:
    """One text at one checkpoint: summed NLL over ``n_tokens`` predicted tokens, summed
    forget-script probability over the same positions."""

    nll_sum: float
    n_tokens: int
    mass_sum: float


def script_token_ids(lm: LoadedModel, script: str) -> torch.Tensor:
    """Ids of the vocabulary entries whose decoded text is dominantly in ``script``."""
    n = min(len(lm.tokenizer), lm.identity.vocab_size)
    pieces = lm.tokenizer.batch_decode([[i] for i in range(n)])
    return torch.tensor([i for i, p in enumerate(pieces) if script_of(p) == script],
                        dtype=torch.long)


def _forward(lm: LoadedModel, texts: Sequence[str], max_length: int):
    enc = tokenize(lm, texts, max_length)
    device = input_device(lm.model)
    ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    hidden = get_decoder(lm.model)(input_ids=ids, attention_mask=attn,
                                   use_cache=False).last_hidden_state
    labels, mask = shift_labels(ids, attn)
    return hidden, labels, mask


@torch.no_grad()
def score_texts(lm: LoadedModel, texts: Sequence[str], script_ids: torch.Tensor,
                max_length: int, batch_size: int) -> list[TextScore]:
    """:class:`TextScore` of every text, in input order."""
    out: list[TextScore] = []
    for start in range(0, len(texts), batch_size):
        hidden, labels, mask = _forward(lm, texts[start:start + batch_size], max_length)
        logp, log_mass = logprobs_and_subset_mass(hidden, labels=labels, ids=script_ids,
                                                  mask=mask, **head_params(lm.model))
        real = mask.to(logp.dtype)
        nll, count = (-logp * real).sum(1), real.sum(1)
        mass = (log_mass.exp() * real).sum(1)
        out += [TextScore(float(a), int(b), float(c)) for a, b, c in zip(nll, count, mass)]
    return out


def _batches(texts: Sequence[str], size: int, seed: int):
    """Endless batches: a fresh seeded shuffle every pass over the texts."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(texts)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield [texts[i] for i in order[start:start + size]]


def attack_lora(lm: LoadedModel, spec: AttackSpec) -> LoraAdapter:
    """A fresh attack LoRA on every block (seeded init), injected into ``lm.model``."""
    torch.manual_seed(spec.seed)
    adapter_spec = AdapterSpec("lora", layers=tuple(range(lm.n_layers)), rank=spec.rank,
                               alpha=spec.alpha, target_modules=spec.target_modules)
    return LoraAdapter.create(lm, adapter_spec)


def run_attack(lm: LoadedModel, adapter: LoraAdapter, texts: Sequence[str], spec: AttackSpec,
               measure: Callable[[], dict], progress: Progress = SILENT,
               desc: str = "relearn") -> tuple[dict[int, dict], list[float]]:
    """Train ``adapter`` for ``max(steps)`` steps; ``measure()`` at every checkpoint.

    Returns ``({step: measure()}, [training loss per step])``.
    """
    params = list(adapter.trainable().values())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    batches, results, losses = _batches(texts, spec.batch_size, spec.seed), {}, []
    with progress.task(desc, spec.steps[-1]) as task:
        for step in range(spec.steps[-1] + 1):
            if step in spec.steps:
                results[step] = measure()
            if step == spec.steps[-1]:
                break
            hidden, labels, mask = _forward(lm, next(batches), spec.max_length)
            logp = token_logprobs(hidden, labels=labels, mask=mask, **head_params(lm.model))
            loss = -masked_mean(logp, mask)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            task.advance(loss=losses[-1])
    return results, losses
