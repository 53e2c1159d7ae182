"""Broadcasting BatchNorm statistics from rank 0: two real gloo processes (torch.multiprocessing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fortify.training import distributed


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
        model(torch.randn(8, 3) + 10 * rank)  # each rank's statistics from its own slice
        weight, before = model[0].weight.detach().clone(), model[1].running_mean.clone()
        distributed.DistributedContext(rank, 2, rank, torch.device("cpu")).broadcast_buffers(model)
        assert torch.equal(model[0].weight, weight)  # parameters are DDP's business, left alone
        saved = {k: v.clone() for k, v in model.state_dict().items()} | {"before": before}
        torch.save(saved, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_buffers_gives_every_rank_rank_zeros_statistics(tmp_path: Path) -> None:
    # Execute: two ranks whose running statistics differ, then the broadcast
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # Assert: rank 1 holds rank 0's buffers exactly; the ranks had drifted apart before
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(rank0[name], rank1[name]), name
    assert torch.equal(rank0["1.running_mean"], rank0["before"])
    assert not torch.allclose(rank1["before"], rank0["before"])


def _release_rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        context = distributed.DistributedContext(rank, 2, rank, torch.device("cpu"))
        model = nn.BatchNorm1d(4)
        held = [b._use_count() for b in model.buffers()]
        late = 0
        for _ in range(100):
            late += context.sum(torch.ones(3))._use_count() > 1
            context.broadcast_buffers(model)
            late += sum(b._use_count() > count for b, count in zip(model.buffers(), held, strict=True))
        (Path(out) / f"late{rank}.txt").write_text(str(late))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collectives_return_only_once_gloo_has_let_go_of_their_tensors(tmp_path: Path) -> None:
    # gloo's worker thread drops a collective's tensors a moment after the result is ready, and takes
    # the GIL to do so; one that did it while the interpreter shut down aborted the rank
    # ("terminate called without an active exception")
    mp.spawn(_release_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    # Assert: right after each sum and broadcast, no tensor is still held by the worker, on either rank
    assert [(tmp_path / f"late{r}.txt").read_text() for r in (0, 1)] == ["0", "0"]
