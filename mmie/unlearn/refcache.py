"""The frozen model's reference outputs, computed once and shared by every arm and seed.

What `unlearn` computes before its first step (:mod:`mmie.unlearn.data`: forget and alternative
sequence log-likelihoods, retain top-k targets, the exact KL's reference summary, retain block
activations) depends only on the base model, the token rows and a few settings, never on the
method, objective or seed. So each kind is stored under ``$MMIE_HOME/cache/references/`` in one
safetensors file per key, where the key hashes the model's fingerprint and load settings
(device, dtype, attention), the torch version, *every* token row of the set (and its
scored-span starts) and the settings that change the values (batch and chunk size, which decide
the matmul shapes; the head dtype; ``top_k``; the block read).
Entries are per row: a run fills the rows it visits that the file lacks and adds them, so seeds
that visit different rows share what they have in common. A run that finds every row it needs
computes nothing, and gives the adapter a run computing them would (the values are the
stored fp32/fp64 numbers, bit for bit).

Off with ``MMIE_CACHE=0`` and under a launcher; a damaged file is a miss, recomputed and
rewritten (:mod:`mmie.core.diskcache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmie.core import diskcache
from mmie.core.models import LoadedModel
from mmie.unlearn.data import References

VERSION = 1
enabled = diskcache.enabled
_read, _write = diskcache.read, diskcache.write


def cache_dir() -> Path:
    return diskcache.cache_dir("references")


def key(lm: LoadedModel, kind: str, rows, starts, settings: dict) -> str:
    """sha256 over the model, the kind, the settings and every row (with its start)."""
    header = {"version": VERSION, "kind": kind, "model": diskcache.model_record(lm),
              "settings": settings}
    return diskcache.key(header, rows, starts)


# --- References fields <-> tensors ------------------------------------------------------------

_FLOAT, _INT, _TUPLE, _TENSOR = "float", "int", "tuple", "tensor"
FIELDS = {"forget_logp": _FLOAT, "forget_tokens": _INT, "alternative_logp": _FLOAT,
          "retain_topk": _TUPLE, "retain_klstats": _TUPLE, "retain_acts": _TENSOR}
ARITY = {"retain_topk": 3, "retain_klstats": 3}  # tensors per row of a _TUPLE field


def _encode(name: str, i: int, value) -> dict[str, torch.Tensor]:
    how = FIELDS[name]
    if how == _TUPLE:
        return {f"{name}.{i}.{j}": t for j, t in enumerate(value)}
    if how == _TENSOR:
        return {f"{name}.{i}": value}
    dtype = torch.float64 if how == _FLOAT else torch.int64
    return {f"{name}.{i}": torch.tensor(value, dtype=dtype)}


def _decode(name: str, tensors: dict[str, torch.Tensor]) -> dict[int, object]:
    how, out, parts = FIELDS[name], {}, {}
    for tensor_name, t in tensors.items():
        field_name, i, *part = tensor_name.split(".")
        if field_name != name:
            continue
        if how == _TUPLE:
            parts.setdefault(int(i), {})[int(part[0])] = t
        else:
            out[int(i)] = t if how == _TENSOR else (float(t) if how == _FLOAT else int(t))
    for i, got in parts.items():
        if sorted(got) == list(range(ARITY[name])):  # a partial tuple is a miss
            out[i] = tuple(got[j] for j in range(ARITY[name]))
    return out


@dataclass
class Entry:
    """One cache file and the References fields it holds."""

    path: Path
    names: tuple[str, ...]
    stored: set[str] = field(default_factory=set)


@dataclass
class ReferenceCache:
    entries: list[Entry]
    hits: int = 0

    def fill(self, refs: References) -> None:
        """Put every stored row into ``refs`` (the reference passes skip filled rows)."""
        for entry in self.entries:
            tensors = _read(entry.path)
            entry.stored = set(tensors)
            for name in entry.names:
                got = _decode(name, tensors)
                getattr(refs, name).update(got)
                self.hits += len(got) if name == entry.names[0] else 0

    def store(self, refs: References) -> dict:
        """Write the rows ``refs`` has that a file lacks; returns the manifest record."""
        computed = 0
        for entry in self.entries:
            tensors = {k: v for name in entry.names
                       for i, value in getattr(refs, name).items()
                       for k, v in _encode(name, i, value).items()}
            new = set(tensors) - entry.stored
            if new:
                merged = {**_read(entry.path), **tensors}
                _write(entry.path, merged)
                first = entry.names[0] + "."
                computed += len({k.split(".")[1] for k in new if k.startswith(first)})
        return {"dir": str(cache_dir()), "rows_loaded": self.hits, "rows_computed": computed,
                "files": [e.path.name for e in self.entries]}


def for_run(lm: LoadedModel, forget, forget_starts, alternative, alternative_starts,
            retain, *, top_k: int | None, layer: int | None, settings: dict,
            kl_summary: bool = False) -> ReferenceCache:
    """The cache files of one run's reference targets (``settings``: batch and chunk size and
    anything else that changes the numbers)."""
    root = cache_dir()

    def entry(kind: str, rows, starts, names: tuple[str, ...], extra: dict) -> Entry:
        return Entry(root / f"{kind}-{key(lm, kind, rows, starts, {**settings, **extra})}"
                            f".safetensors", names)

    entries = [entry("forget", forget, forget_starts, ("forget_logp", "forget_tokens"), {})]
    if alternative is not None:
        entries.append(entry("alternative", alternative, alternative_starts,
                             ("alternative_logp",), {}))
    if top_k is not None:
        entries.append(entry("retain_topk", retain, None, ("retain_topk",), {"top_k": top_k}))
    if kl_summary:
        entries.append(entry("retain_klstats", retain, None, ("retain_klstats",), {}))
    if layer is not None:
        entries.append(entry("retain_acts", retain, None, ("retain_acts",), {"layer": layer}))
    return ReferenceCache(entries)


def start(lm: LoadedModel, rows, retain, refs: References, *, top_k: int | None,
          layer: int | None, settings: dict, kl_summary: bool = False) -> ReferenceCache | None:
    """The run's cache with its stored rows already in ``refs`` (``rows``: the forget
    :class:`mmie.unlearn.pairs.Rows`); None when the cache is off."""
    if not enabled():
        return None
    cache = for_run(lm, rows.forget, rows.forget_starts, rows.alternative,
                    rows.alternative_starts, retain, top_k=top_k, layer=layer,
                    settings=settings, kl_summary=kl_summary)
    cache.fill(refs)
    return cache
