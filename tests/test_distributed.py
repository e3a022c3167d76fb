"""The shared distributed helpers, in one process (the launched behaviour is tested per stage)."""

from __future__ import annotations

import pytest
import torch

from mmie.core import distributed
from mmie.core.distributed import World, shard, unshard


def test_world_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    here = distributed.world()
    assert (here.rank, here.size, here.local_rank) == (2, 4, 0)
    assert here.distributed and not here.main


def test_world_defaults_to_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == World(0, 1, 0)


def test_world_refuses_a_rank_outside_the_world(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="outside"):
        distributed.world()


@pytest.mark.parametrize("n,size", [(7, 2), (8, 3), (1, 4), (0, 2)])
def test_unshard_inverts_shard(n, size):
    items = list(range(n))
    parts = [shard(items, World(r, size, r)) for r in range(size)]
    assert sorted(len(p) for p in parts)[-1] - sorted(len(p) for p in parts)[0] <= 1
    assert unshard(parts) == items


def test_single_process_collectives_are_no_ops():
    assert distributed.gather({"a": 1}) == [{"a": 1}]
    distributed.barrier()


def test_local_device_picks_the_local_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert distributed.local_device(torch.device("cuda:0")) == torch.device("cuda", 0)
    assert distributed.local_device(torch.device("cpu")) == torch.device("cpu")


def test_an_explicit_gpu_index_under_a_launcher_is_refused(monkeypatch):
    from mmie.core.errors import ModelError
    from mmie.core.models import ModelSpec

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ModelError, match="cuda:LOCAL_RANK"):
        ModelSpec(name="tiny:llama", device="cuda:0").torch_device()
    assert ModelSpec(name="tiny:llama", device="cuda").torch_device() == torch.device("cuda", 1)
