"""Batched continuation of prompts, and teacher-forced scoring of token sequences.

:func:`generate` runs ``model.generate`` over prompts sorted by token length (so a batch pads
little), left-padded, greedy unless a temperature is given, and returns results in input
order. Every call builds its own ``GenerationConfig`` from :class:`GenerationSettings`: a
checkpoint's ``generation_config`` may turn sampling on (Gemma's does), and transformers fills
every field left unset from it, so the decoding fields are always set explicitly.

On CUDA the KV cache is static by default (``cache_implementation='static'``): it is allocated
once per call at a fixed length, so decode steps keep one shape and, with ``compile=True``,
transformers compiles the decode step once (compiling takes a while, so it pays only over
many batches). The last batch is padded to the full batch size for the same reason. On CPU
the dynamic cache stays the default: for Gemma 3 270M both caches decode at the same speed
there (the 262k-entry LM head dominates); ``static_cache=True`` forces the static one
(bench/bench_generation.py compares them). No cache outlives a call, so memory stays flat
across calls.

:func:`score` computes per-token log-probabilities (and Min-K%++ z-scores) of token sequences
from the decoder's final hidden states, ``chunk_tokens`` real tokens at a time: a ``[batch,
tokens, vocab]`` logits tensor never exists (Gemma's vocabulary has 262,144 entries).

Under ``head_precision("bf16")`` (:mod:`mmie.core.head_precision`) both compute the LM head in
bf16 with the large logits (and the scored label) exact: greedy continuations stay the fp32 ones.

Both can share their batches among launched processes (``here=world()``): each process runs
whole batches of the one-process plan, so N processes return exactly what one returns
(:mod:`mmie.core.sharded`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from mmie.core import decode, profile
from mmie.core.distributed import World
from mmie.core.head_precision import LogitBuffer, fast_head
from mmie.core.logprob_recorder import ChosenLogprobs, processors
from mmie.core.models import LoadedModel, get_decoder, input_device, lm_head, unwrap
from mmie.core.progress import SILENT, Progress
from mmie.core.sharded import length_batches, map_batches

# transformers' own defaults for the sampling fields: it treats these as "not set" and does
# not warn about them under greedy decoding, while None would inherit the checkpoint's values.
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0}


ENGINES = ("auto", "transformers")


@dataclass(frozen=True)
class GenerationSettings:
    """How prompts are continued.

    max_new_tokens: upper bound of new tokens per prompt; a row stops earlier at EOS.
    batch_size: prompts per ``generate`` call (sorted by length, so batches pad little).
    temperature: 0 = greedy (default); > 0 samples at this temperature, seeded by ``seed``.
    top_p: nucleus mass when sampling (1.0 = off); must stay 1.0 for greedy decoding.
    repetition_penalty: CTRL-style penalty on tokens already in the text (1.0 = off); small
        models decoding greedily loop, and a loop says little about which language they use.
    seed: sampling seed; batch ``b`` of the length-sorted batches samples from its own seed
        (:func:`batch_seed`), so a batch's draws do not depend on which batches ran before it
        (or on which process ran it). The global RNG is left untouched.
    max_prompt_tokens: longer prompts keep BOS and their last tokens (what is continued).
    static_cache: None = static KV cache on CUDA only; True / False force it.
    compile: let transformers torch.compile the decode step (static cache, CUDA only).
    record_logprobs: keep the model's own log p of each generated token (greedy only; the
        penalty does not enter it): the continuation's teacher-forced score, without a pass.
    engine: "auto" decodes greedily with :mod:`mmie.core.decode` (the same tokens as
        ``model.generate``, without its per-step copies of the logits) wherever it applies
        (greedy, dynamic cache, a plain linear head); "transformers" always calls
        ``model.generate``.
    """

    max_new_tokens: int = 48
    batch_size: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    max_prompt_tokens: int = 256
    static_cache: bool | None = None
    compile: bool = False
    record_logprobs: bool = False
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for name in ("max_new_tokens", "batch_size", "max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.temperature == 0 and self.top_p != 1:
            raise ValueError("top_p applies to sampling only; set a temperature > 0 with it")
        if self.compile and self.static_cache is False:
            raise ValueError("compile needs the static cache (static_cache=False given)")
        if self.record_logprobs and self.sampling:
            raise ValueError("record_logprobs needs greedy decoding (temperature 0)")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Generation:
    """One continuation: its text (special tokens skipped), token ids and how it ended.

    prompt_ids: the prompt as fed to the model (BOS included, after truncation).
    new_ids: generated tokens before the first EOS.
    finished: True when the model emitted EOS within ``max_new_tokens``.
    logprobs: log p of each of ``new_ids`` when recorded, else None.
    """

    text: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    finished: bool
    logprobs: tuple[float, ...] | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.new_ids)


# Greedy continuations of small models loop without a repetition penalty; evaluate and
# `data continue` generate with this one, so on-policy retain texts match what is evaluated.
EVAL_REPETITION_PENALTY = 1.2


def eos_ids(lm: LoadedModel) -> list[int]:
    """Every id that ends a continuation: the tokenizer's EOS and the checkpoint's list."""
    found = [lm.tokenizer.eos_token_id, getattr(unwrap(lm.model).generation_config,
                                                "eos_token_id", None)]
    ids: list[int] = []
    for item in found:
        for value in item if isinstance(item, (list, tuple)) else [item]:
            if value is not None and int(value) not in ids:
                ids.append(int(value))
    return ids


def use_static_cache(lm: LoadedModel, settings: GenerationSettings) -> bool:
    if settings.static_cache is not None:
        return settings.static_cache
    return lm.device.type == "cuda"


def generation_config(lm: LoadedModel, settings: GenerationSettings):
    """A complete ``GenerationConfig``: nothing is left to the checkpoint's defaults."""
    from transformers import GenerationConfig

    decoding = dict(_NEUTRAL, do_sample=settings.sampling, num_beams=1)
    if not settings.record_logprobs:  # else a custom processor applies it (logprob_recorder)
        decoding["repetition_penalty"] = settings.repetition_penalty
    if settings.sampling:
        decoding.update(temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    static = use_static_cache(lm, settings)
    return GenerationConfig(
        **decoding, max_new_tokens=settings.max_new_tokens, min_new_tokens=0,
        pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=eos_ids(lm),
        cache_implementation="static" if static else None,
        disable_compile=not (static and settings.compile))


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids per prompt; a prompt over ``max_tokens`` keeps BOS and its last tokens."""
    bos = lm.tokenizer.bos_token_id
    out = []
    for ids in lm.tokenizer(list(prompts))["input_ids"]:
        if len(ids) > max_tokens:
            head = ids[:1] if ids and ids[0] == bos else []
            ids = head + ids[len(ids) - (max_tokens - len(head)):]
        out.append(list(ids))
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (padding on the left)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def batch_seed(seed: int, batch: int) -> int:
    """The seed batch ``batch`` samples from: distinct per batch for any seed below 2**32; batch
    0 keeps ``seed`` itself, so a one-batch call samples as before per-batch seeding."""
    return (seed + batch * 2**32) % 2**64


@contextmanager
def _own_rng(settings: GenerationSettings, device: torch.device) -> Iterator[None]:
    """Sampling reseeds the RNG per batch; fork it so the caller's streams are untouched."""
    if not settings.sampling:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


def _finish(lm: LoadedModel, prompt: list[int], new: list[int], stops: set[int],
            logprobs: list[float] | None) -> Generation:
    cut = next((i for i, tok in enumerate(new) if tok in stops), len(new))
    text = lm.tokenizer.decode(new[:cut], skip_special_tokens=True)
    kept = None if logprobs is None else tuple(logprobs[:cut])
    return Generation(text, tuple(prompt), tuple(new[:cut]), cut < len(new), kept)


def own_loop(lm: LoadedModel, config, settings: GenerationSettings) -> bool:
    """Whether :mod:`mmie.core.decode` decodes (see ``GenerationSettings.engine``)."""
    return (settings.engine == "auto" and not settings.sampling
            and config.cache_implementation != "static" and decode.usable(lm))


def _greedy_batch(lm: LoadedModel, rows: list[list[int]], config,
                  settings: GenerationSettings) -> list[Generation]:
    ids, mask = left_pad(rows, lm.tokenizer.pad_token_id)
    device = input_device(lm.model)
    new, logps = decode.greedy(lm, ids.to(device), mask.to(device),
                               max_new_tokens=settings.max_new_tokens,
                               stops=list(config.eos_token_id), pad_id=config.pad_token_id,
                               penalty=settings.repetition_penalty,
                               record=settings.record_logprobs)
    stops = set(config.eos_token_id)
    lps = logps.tolist() if logps is not None else [None] * len(rows)
    return [_finish(lm, row, tokens, stops, lp)
            for row, tokens, lp in zip(rows, new.tolist(), lps, strict=True)]


@torch.inference_mode()
def _generate_batch(lm: LoadedModel, rows: list[list[int]], config,
                    settings: GenerationSettings) -> list[Generation]:
    fill_to = settings.batch_size if config.cache_implementation == "static" else 0
    padded = rows + [rows[-1]] * (fill_to - len(rows))  # fixed shapes for a compiled step
    ids, mask = left_pad(padded, lm.tokenizer.pad_token_id)
    device = input_device(lm.model)
    recorder = ChosenLogprobs() if settings.record_logprobs else None
    out = lm.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                            generation_config=config,
                            logits_processor=processors(settings.repetition_penalty, recorder))
    new = out[:len(rows), ids.shape[1]:].tolist()
    logps = (recorder.finish(out)[:len(rows)].tolist() if recorder is not None
             else [None] * len(rows))
    del out
    stops = set(config.eos_token_id)
    return [_finish(lm, row, tokens, stops, lp)
            for row, tokens, lp in zip(rows, new, logps, strict=True)]


@profile.phase("generate")
def generate(lm: LoadedModel, prompts: Sequence[str],
             settings: GenerationSettings = GenerationSettings(), *,
             progress: Progress = SILENT, desc: str = "generate",
             here: World | None = None) -> list[Generation]:
    """Continue every prompt (see the module docstring); results in input order.

    here: share the batches among this world's processes (:mod:`mmie.core.sharded`); every process
        must call it with the same prompts and gets every result. None: all batches here.
    """
    if not prompts:
        return []
    encoded = encode_prompts(lm, prompts, settings.max_prompt_tokens)
    config = generation_config(lm, settings)

    batch = _greedy_batch if own_loop(lm, config, settings) else _generate_batch

    def run(number: int, chunk: list[int]) -> list[Generation]:
        if settings.sampling:
            torch.manual_seed(batch_seed(settings.seed, number))
        return batch(lm, [encoded[i] for i in chunk], config, settings)

    plan = length_batches([len(ids) for ids in encoded], settings.batch_size)
    # decode computes the head itself; generate's head is shadowed for the same arithmetic
    head = nullcontext() if batch is _greedy_batch else fast_head(lm_head(lm.model))
    with _own_rng(settings, lm.device), head:
        return map_batches(plan, run, len(prompts), here=here, progress=progress, desc=desc)


# --- teacher-forced scoring -------------------------------------------------------------------

@dataclass(frozen=True)
class TokenScores:
    """Per-token log p(x_t | x_<t) and Min-K%++ z-scores of the scored part of one sequence."""

    logprobs: tuple[float, ...]
    z_scores: tuple[float, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.logprobs)

    @property
    def nll_sum(self) -> float:
        return -math.fsum(self.logprobs)

    @property
    def mean_nll(self) -> float | None:
        return self.nll_sum / self.n_tokens if self.logprobs else None


@dataclass(frozen=True)
class ScoreItem:
    """A token sequence; positions ``>= start`` are scored (position 0 never is: no context)."""

    ids: tuple[int, ...]
    start: int = 1


def _target_mask(items: Sequence[ScoreItem], width: int) -> torch.Tensor:
    """Hidden positions whose *next* token is scored, for right-aligned rows."""
    mask = torch.zeros((len(items), width), dtype=torch.bool)
    for row, item in enumerate(items):
        offset = width - len(item.ids)
        first = offset + max(1, item.start)
        if first < width:
            mask[row, first - 1:width - 1] = True
    return mask


@profile.phase("lm_head")
def _token_stats(hidden: torch.Tensor, labels: torch.Tensor, lm: LoadedModel,
                 chunk: int, z: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    softcap = getattr(unwrap(lm.model).config.get_text_config(), "final_logit_softcapping", None)
    logits_of = LogitBuffer(lm_head(lm.model), softcap)  # one buffer for every chunk
    logps, zs = [torch.empty(0)], [torch.empty(0)]
    for start in range(0, hidden.shape[0], chunk):
        rows = labels[start:start + chunk, None].to(hidden.device)
        # under head_precision("bf16"): the label and each row's largest logits stay exact
        logits = logits_of(hidden[start:start + chunk], rows)
        rows = rows.to(logits.device)
        if not z:  # log p only: one logsumexp instead of four more passes over the vocabulary
            picked = logits.gather(-1, rows)[:, 0] - logits.logsumexp(-1)
            logps.append(picked.cpu())
            zs.append(torch.full_like(picked, math.nan).cpu())
            continue
        logp = logits.log_softmax(-1)
        picked = logp.gather(-1, rows)[:, 0]
        probs = logp.exp()
        mu = torch.linalg.vecdot(probs, logp)
        # spread of log p under the model's own distribution (Min-K%++ normaliser); centred
        # first, since E[x^2] - mu^2 loses digits in float32
        sigma = torch.linalg.vecdot(probs, (logp - mu[:, None]).square()).clamp_min(1e-12).sqrt()
        logps.append(picked.cpu())
        zs.append(((picked - mu) / sigma).cpu())
    return torch.cat(logps), torch.cat(zs)


def scored_hidden(lm: LoadedModel, items: Sequence[ScoreItem]) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder pass over a left-padded batch of items: ``(hidden [B, T, d], ids [B, T],
    target [B, T])``, where ``target`` marks the positions whose next token is scored."""
    ids, mask = left_pad([it.ids for it in items], lm.tokenizer.pad_token_id)
    # positions count real tokens only, so a left-padded row sees the same positions alone
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    device = input_device(lm.model)
    hidden = get_decoder(lm.model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   position_ids=positions.to(device),
                                   use_cache=False).last_hidden_state
    return hidden, ids, _target_mask(items, ids.shape[1])


@torch.inference_mode()
def _score_batch(lm: LoadedModel, items: Sequence[ScoreItem], chunk: int,
                 z: bool = True) -> list[TokenScores]:
    hidden, ids, target = scored_hidden(lm, items)
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    logp, zs = _token_stats(hidden[target.to(hidden.device)], labels[target], lm, chunk, z)
    counts = target.sum(1).tolist()
    return [TokenScores(tuple(lp.tolist()), tuple(zz.tolist()))
            for lp, zz in zip(logp.split(counts), zs.split(counts), strict=True)]


@profile.phase("score")
def score(lm: LoadedModel, items: Sequence[ScoreItem], *, batch_size: int = 16,
          chunk_tokens: int = 128, progress: Progress = SILENT, desc: str = "score",
          here: World | None = None, z: bool = True) -> list[TokenScores]:
    """Per-token scores of every item, in input order (no grad, padding masked); ``here`` as
    in :func:`generate`. ``z=False``: log-probabilities only (z-scores NaN), for passes that
    do no Min-K%++ (perplexity, fluency): about half the vocabulary work."""
    plan = length_batches([len(item.ids) for item in items], batch_size)
    return map_batches(plan, lambda _, chunk: _score_batch(lm, [items[i] for i in chunk],
                                                             chunk_tokens, z),
                       len(items), here=here, progress=progress, desc=desc)


def text_items(lm: LoadedModel, texts: Sequence[str], max_length: int) -> list[ScoreItem]:
    """Whole texts to score (every token after the first), truncated to ``max_length``."""
    encoded = lm.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return [ScoreItem(tuple(ids), 1) for ids in encoded]


def continuation_items(generations: Sequence[Generation]) -> list[ScoreItem]:
    """Each continuation scored given its prompt (the prompt's tokens are not scored)."""
    return [ScoreItem(g.prompt_ids + g.new_ids, len(g.prompt_ids)) for g in generations]
