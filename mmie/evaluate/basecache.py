"""`evaluate`'s base-model fluency pass, computed once per set of continuations.

The fluency pass (:mod:`mmie.metrics.fluency`) scores continuations with the *base* model, all
interventions detached, so its result depends only on the base model, the continuations' tokens
and the scoring settings, never on the arm. Each pass is stored under
``$MMIE_HOME/cache/fluency/`` keyed by all of those (:mod:`mmie.core.diskcache`); evaluating
the same continuations again (the same arm re-run, a re-evaluated baseline, greedy decoding
under another evaluation seed) reads them back: the same numbers, bit for bit (the file holds
the float64 values the pass returned). A set whose continuations differ in any token is a miss.
Off with ``MMIE_CACHE=0`` and under a launcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmie.core import diskcache
from mmie.core.generation import ScoreItem, TokenScores
from mmie.core.models import LoadedModel

VERSION = 1


def _encode(scores: Sequence[TokenScores]) -> dict[str, torch.Tensor]:
    flat = lambda attr: [x for s in scores for x in getattr(s, attr)]  # noqa: E731
    return {"counts": torch.tensor([s.n_tokens for s in scores], dtype=torch.int64),
            "logprobs": torch.tensor(flat("logprobs"), dtype=torch.float64),
            "z_scores": torch.tensor(flat("z_scores"), dtype=torch.float64)}


def _decode(tensors: dict[str, torch.Tensor], n: int) -> list[TokenScores] | None:
    if set(tensors) != {"counts", "logprobs", "z_scores"} or len(tensors["counts"]) != n:
        return None
    counts = tensors["counts"].tolist()
    if sum(counts) != len(tensors["logprobs"]):
        return None
    lp, z = (tensors[k].split(counts) for k in ("logprobs", "z_scores"))
    return [TokenScores(tuple(a.tolist()), tuple(b.tolist())) for a, b in zip(lp, z, strict=True)]


def cached_scores(lm: LoadedModel, items: Sequence[ScoreItem], settings: dict,
                  compute: Callable[[], list[TokenScores]]) -> list[TokenScores]:
    """``compute()``'s result for ``items``, from the cache when it holds them."""
    if not diskcache.enabled() or not items:
        return compute()
    header = {"version": VERSION, "what": "fluency", "model": diskcache.model_record(lm),
              "settings": settings}
    name = diskcache.key(header, [it.ids for it in items], [it.start for it in items])
    path = diskcache.cache_dir("fluency") / f"{name}.safetensors"
    if (hit := _decode(diskcache.read(path), len(items))) is not None:
        return hit
    scores = compute()
    diskcache.write(path, _encode(scores))
    return scores
