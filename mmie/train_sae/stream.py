"""Training activations for `train-sae`: chunked, cached as safetensors shards, shuffled.

Training texts are grouped into length-sorted chunks of ``batch_size`` texts (little padding);
one decoder pass per chunk (:func:`mmie.core.activations.iter_batches`) gives the activations of
every chosen layer, BOS and padding left out. Each chunk is one safetensors shard in a cache
folder keyed by model fingerprint, dtype, layers, max_length and the hash of the chunked texts.
Shards are fp16 (fp32 for a shard fp16 cannot hold) and the stream always hands out what the
shard holds, so cached, uncached and resumed runs train on identical numbers. Before a shard is
reused, ``key.json`` must match and the shard's tensor names and shapes (token count from the
tokenizer) must be the expected ones; a shard failing that is recomputed.

:class:`TokenStream` visits the chunks epoch after epoch in a seeded order through a bounded
shuffle buffer; its whole state is explicit so a checkpoint restores the exact stream.

Which chunks a run will read depends only on their token counts, so :func:`chunks_needed`
finds them with a dry run of the stream on empty ``[tokens, 0]`` stand-ins, and :func:`harvest`
computes the missing ones before training: under a launcher each process computes its share
(every ``world``-th chunk) into the shared cache folder, then all wait, and every process
builds the same stream from the complete cache. The cache folder must therefore be visible to
every process: on several nodes put ``--cache-dir`` on a shared filesystem (a node that cannot
see a shard recomputes it itself, so results stay right, only slower).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmie.core.activations import iter_batches
from mmie.core.artifacts import safetensors_header, sha256_json
from mmie.core.distributed import barrier, shard
from mmie.core.errors import ArtifactError, DataError
from mmie.core.models import LoadedModel
from mmie.core.progress import Progress

CACHE_FORMAT = 1


def make_chunks(lm: LoadedModel, texts: list[str], max_length: int, batch_size: int
                ) -> tuple[list[list[str]], list[int]]:
    """Length-sorted chunks of ``batch_size`` texts and the real (non-BOS) tokens of each."""
    ids = lm.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    bos = lm.tokenizer.bos_token_id
    real = [sum(1 for t in row if t != bos) for row in ids]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [[texts[i] for i in g] for g in groups], [sum(real[i] for i in g) for g in groups]


# --------------------------------------------------------------------------- activation cache
def _to_store(x: torch.Tensor) -> torch.Tensor:
    half = x.half()
    return half if bool(torch.isfinite(half).all()) else x.float()


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class ChunkStore:
    """Activations of each training chunk: read from the cache folder, else computed and saved."""

    def __init__(self, lm: LoadedModel, chunks: list[list[str]], n_real: list[int],
                 layers: list[int], root: Path, max_length: int) -> None:
        self.lm, self.chunks, self.n_real, self.layers = lm, chunks, n_real, layers
        self.root, self.max_length = root, max_length
        self.hits = self.misses = 0

    @property
    def d_model(self) -> int:
        return self.lm.identity.d_model

    def _path(self, index: int) -> Path:
        return self.root / f"chunk{index:06d}.safetensors"

    def ensure(self, index: int) -> None:
        """Compute and save chunk ``index`` unless a valid shard is already there."""
        path = self._path(index)
        if not self._valid(path, self.n_real[index]):
            self._save(index, path)

    def _save(self, index: int, path: Path) -> dict[int, torch.Tensor]:
        self.misses += 1
        acts = self._compute(index)
        _atomic_save_file({f"L{layer}": x for layer, x in acts.items()}, path)
        return acts

    def get(self, index: int) -> dict[int, torch.Tensor]:
        path = self._path(index)
        if self._valid(path, self.n_real[index]):
            try:
                stored = load_file(str(path))
                self.hits += 1
                return {layer: stored[f"L{layer}"] for layer in self.layers}
            except SafetensorError:
                pass  # unreadable shard: recomputed and rewritten below
        return self._save(index, path)

    def _valid(self, path: Path, n_tokens: int) -> bool:
        if not path.is_file():
            return False
        try:
            header = safetensors_header(path)
        except (OSError, ValueError):
            return False
        want = {f"L{layer}": [n_tokens, self.lm.identity.d_model] for layer in self.layers}
        return {name: meta.get("shape") for name, meta in header.items()} == want

    def _compute(self, index: int) -> dict[int, torch.Tensor]:
        texts = self.chunks[index]
        (batch,) = iter_batches(self.lm, texts, self.layers, max_length=self.max_length,
                                batch_size=len(texts), sort=False)
        return {layer: _to_store(batch.states[layer][batch.mask]) for layer in self.layers}


def cache_key(lm: LoadedModel, layers: list[int], chunks: list[list[str]], max_length: int,
              data: dict[str, str | None]) -> dict:
    """What the cached activations depend on; ``data`` maps set names to file sha256s."""
    return {"format": CACHE_FORMAT, "model": lm.identity.name,
            "fingerprint": lm.identity.fingerprint, "dtype": str(next(lm.model.parameters()).dtype),
            "layers": layers, "max_length": max_length, "chunks_sha256": sha256_json(chunks),
            "data": data}


def open_cache(root: Path, key: dict) -> Path:
    """The folder for ``key`` under ``root``; refuses one whose key.json says otherwise."""
    folder = root / f"acts-{sha256_json(key)[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "key.json"
    if key_file.is_file():
        found = json.loads(key_file.read_text(encoding="utf-8"))
        if found != json.loads(json.dumps(key)):
            raise ArtifactError(f"{folder}: cached activations were made for another setup "
                                f"(key.json differs); remove the folder to rebuild it")
    else:
        tmp = folder / f".key.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(key, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, key_file)
    return folder


# --------------------------------------------------------------------------- token stream
class TokenStream:
    """Endless seeded stream of ``{layer: [batch_tokens, d]}`` batches through a shuffle buffer.

    Chunks are added to a pool until it holds ``capacity`` tokens; a seeded random half of the
    pool then moves to the queue, which batches are cut from in order. All state is explicit
    (position, pool, queue, generator), so a checkpoint restores the exact same stream.
    """

    def __init__(self, store: ChunkStore, capacity: int, batch_tokens: int, seed: int) -> None:
        self.store, self.capacity, self.batch_tokens = store, capacity, batch_tokens
        self.seed = seed
        self.epoch = self.pos = self.added = 0
        self.gen = torch.Generator().manual_seed(seed)
        d = store.d_model
        self.pool = {layer: torch.empty(0, d) for layer in store.layers}
        self.queue = {layer: torch.empty(0, d) for layer in store.layers}

    def next_batch(self) -> dict[int, torch.Tensor]:
        while _rows(self.queue) < self.batch_tokens:
            if _rows(self.pool) >= self.capacity:
                self._flush()
            else:
                self._add_chunk()
        batch = {layer: q[:self.batch_tokens] for layer, q in self.queue.items()}
        self.queue = {layer: q[self.batch_tokens:] for layer, q in self.queue.items()}
        return batch

    def _order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + 7919 * (self.epoch + 1))
        return torch.randperm(len(self.store.chunks), generator=gen).tolist()

    def _add_chunk(self) -> None:
        acts = self.store.get(self._order()[self.pos])
        self.pool = {layer: torch.cat([p, acts[layer].float()]) for layer, p in self.pool.items()}
        self.added += next(iter(acts.values())).shape[0]
        self.pos += 1
        if self.pos == len(self.store.chunks):
            if self.added == 0:  # without this an all-empty data set would loop forever
                raise DataError("the training texts hold no tokens (all empty after tokenizing)")
            self.epoch, self.pos, self.added = self.epoch + 1, 0, 0

    def _flush(self) -> None:
        perm = torch.randperm(_rows(self.pool), generator=self.gen)
        half = perm.shape[0] // 2
        self.queue = {layer: torch.cat([q, self.pool[layer][perm[:half]]])
                      for layer, q in self.queue.items()}
        self.pool = {layer: p[perm[half:]] for layer, p in self.pool.items()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "added": self.added,
                "gen": self.gen.get_state(), "pool": dict(self.pool), "queue": dict(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self.added = state["epoch"], state["pos"], state["added"]
        self.gen.set_state(state["gen"])
        self.pool, self.queue = dict(state["pool"]), dict(state["queue"])


def _rows(group: dict[int, torch.Tensor]) -> int:
    return next(iter(group.values())).shape[0]


# --------------------------------------------------------------------------- planning
class _Counts:
    """A stand-in store: each chunk's real token count and no columns; records what is read."""

    def __init__(self, store: ChunkStore) -> None:
        self.chunks, self.layers, self.n_real = store.chunks, store.layers, store.n_real
        self.d_model = 0
        self.read: list[int] = []

    def get(self, index: int) -> dict[int, torch.Tensor]:
        self.read.append(index)
        return {layer: torch.empty(self.n_real[index], 0) for layer in self.layers}


def chunks_needed(stream: TokenStream, batches: int) -> list[int]:
    """Chunks the next ``batches`` batches of ``stream`` read, in first-read order.

    A dry run on token counts alone: the stream's choices depend on counts, never on values.
    """
    counts = _Counts(stream.store)
    dry = TokenStream(counts, stream.capacity, stream.batch_tokens, stream.seed)
    state = stream.state_dict()
    for part in ("pool", "queue"):
        state[part] = {layer: x[:, :0] for layer, x in state[part].items()}
    dry.load_state_dict(state)
    for _ in range(batches):
        dry.next_batch()
    return list(dict.fromkeys(counts.read))


def harvest(store: ChunkStore, stream: TokenStream, batches: int, progress: Progress) -> None:
    """Fill the cache with every chunk the next ``batches`` batches need (shared by processes)."""
    mine = shard(chunks_needed(stream, batches))
    with progress.task("harvest activations", total=len(mine)) as task:
        for index in mine:
            store.ensure(index)
            task.advance()
    barrier()
