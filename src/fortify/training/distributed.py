"""Data-parallel training and sharded evaluation on torch.distributed (launched by torchrun).

torchrun starts N copies of ``fortify``; each finds its rank in the environment and joins one
process group (gloo on CPU, nccl on CUDA). Training wraps the model in DistributedDataParallel:
every rank walks the same shuffled global batches and takes its own share of each (every N-th
example), crafts the adversarial examples for that share, and DDP averages the gradients. Loss
weights make that average equal the gradient of the global batch's mean loss, so N ranks with
batch B/N each step like one process with batch B, except that BatchNorm normalises each share by
its own statistics. Only rank 0 writes files.

Sharded evaluation hands whole attack batches to ranks in turn; each batch's generator is seeded
from the attack's seed and the batch's number, so a batch gives the same points whichever rank runs
it, and the merged per-example outcomes equal those of one process.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fortify.errors import ConfigError

if TYPE_CHECKING:
    from fortify.training.objectives import Objective

# How long a rank waits in a collective for the others; a dead peer is normally noticed sooner by
# torchrun, which stops the whole group.
_TIMEOUT = datetime.timedelta(minutes=10)
# Seeds of successive evaluation batches are spread this far apart so that they do not run into
# the seeds of the following attacks (config.seed + position).
_BATCH_SEED_STRIDE = 1_000_003
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters
# The longest a rank waits for gloo's worker thread to drop a collective's tensor (normally microseconds)
_RELEASE_WAIT_S = 2.0


@dataclass(frozen=True)
class LocalBatch:
    """This rank's share of a global batch.

    ``count`` is the number of real examples (0 when the global batch had fewer examples than there
    are ranks and this rank got a stand-in); ``weight`` scales the share's mean loss so that DDP's
    average over ranks equals the global batch's mean loss.
    """

    x: Tensor
    y: Tensor
    count: int
    weight: float


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the group; ``None`` in place of it means a single process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- training ------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around ``model``; parameters are broadcast from rank 0 so every rank starts equal."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are not broadcast per forward: attack passes differ in number between ranks
        # (early stopping), and a broadcast in each would leave the ranks out of step
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_OPTIONS
                          else {"broadcast_buffers": False})  # the older name, before torch 2.11
        return _TrainingDDP(model, device_ids=device_ids, **no_buffer_sync)

    def local_batches(self, batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[LocalBatch]:
        """Deal each global batch out to the ranks, every ``world_size``-th example from ``rank`` on,
        with their loss weights. Dealing, not cutting contiguous slices, gives each rank its share of
        whatever a batch holds in order: the extra examples appended at its end
        (``train.extra_data``) would otherwise all land on the last ranks, and with them their
        BatchNorm statistics."""
        for x, y in batches:
            total = x.shape[0]
            count = len(range(self.rank, total, self.world_size))
            if count == 0:
                # every rank must run forward and backward; a zero-weight stand-in adds nothing
                yield LocalBatch(x[:1], y[:1], count=0, weight=0.0)
            else:
                share = slice(self.rank, None, self.world_size)
                yield LocalBatch(x[share], y[share], count=count, weight=count * self.world_size / total)

    def reseed(self, objective: Objective, seed: int, epoch: int) -> None:
        """Per-rank, per-epoch seeds for attack noise and torch's global RNG.

        Ranks must not share noise, and a resumed run must draw what an uninterrupted one draws;
        seeding from (seed, epoch, rank) gives both without saving each rank's RNG state.
        """
        # kept below 2**63, inside the range torch's generators take (below 2**64): train.seed
        # alone may be 2**63 - 1, and the mix multiplies it
        mixed = ((seed * 1_000_003 + epoch) * 1_009 + self.rank) % 2**63
        torch.manual_seed(mixed)
        state = torch.Generator(device=self.device).manual_seed(mixed).get_state()
        objective.set_rng_state(state, self.device)

    # -- collectives ---------------------------------------------------------------------------

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all ranks (a new tensor on its device)."""
        total = tensor.detach().clone().to(self.device)
        held = total._use_count()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        self._await_release(total, held)
        return total.to(tensor.device)

    def barrier(self) -> None:
        dist.barrier()

    def leave(self) -> None:
        """The end of a run that every rank reached: wait for the others, then tear the group down.

        The ranks finish at different times (rank 0 still writes the final files); a rank that
        destroyed its group and exited while another still held its connections could die in
        teardown. Call it on the paths every rank takes, never on an error path (see ``leave``).
        """
        leave(together=True)

    def broadcast_buffers(self, model: nn.Module, *more: Tensor) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) and ``more`` tensors on every rank, in place.

        Training updates each rank's statistics with its own shares only, so the ranks drift apart.
        The Trainer calls this before each validation: every rank then validates its share on the
        model rank 0 checkpoints, and a resumed run (every rank loads rank 0's checkpoint) continues
        from the buffers an uninterrupted one holds.
        """
        with torch.no_grad():
            for tensor in (*model.buffers(), *more):
                held = tensor._use_count()
                dist.broadcast(tensor, src=0)
                self._await_release(tensor, held)

    def _await_release(self, tensor: Tensor, held: int) -> None:
        """Wait until gloo's worker thread has let go of ``tensor`` (``held``: its references before).

        A gloo collective returns once its result is ready; the worker thread that ran it drops its
        references a moment later, and dropping one to a tensor Python also holds takes the GIL. Were
        that moment to fall after the interpreter began to shut down, the thread would be ended inside
        a C++ destructor and the rank would abort ("terminate called without an active exception").
        destroy_process_group cannot prevent it: DDP keeps the group, and so its threads, alive to the
        end of the process. Waiting here leaves no collective's tensor to a late release. The wait is
        normally nothing and is bounded; NCCL's works are released by its watchdog and not awaited.
        """
        if self.device.type == "cuda":
            return
        deadline = time.monotonic() + _RELEASE_WAIT_S
        while tensor._use_count() > held and time.monotonic() < deadline:
            time.sleep(0.0002)

    # -- evaluation ----------------------------------------------------------------------------

    def owns(self, batch_number: int) -> bool:
        return batch_number % self.world_size == self.rank

    def merge(self, *tensors: Tensor) -> list[Tensor]:
        """Per-example results where each example was filled in by exactly one rank (zeros
        elsewhere): their sum is the single-process tensor, bit for bit."""
        merged = []
        for tensor in tensors:
            as_number = tensor.to(torch.int32) if tensor.dtype == torch.bool else tensor
            total = self.sum(as_number)
            merged.append(total.bool() if tensor.dtype == torch.bool else total)
        return merged


class _TrainingDDP(DistributedDataParallel):
    """DDP that synchronises only training-mode passes.

    Attacks put the model in eval mode and take input gradients, often a different number of
    times on each rank; those passes must not enter DDP's gradient reducer. The passes whose loss
    the optimiser follows run in training mode and go through DDP as usual.
    """

    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        if not self.training:
            return self.module(*inputs, **kwargs)
        return super().forward(*inputs, **kwargs)


def batch_seed(attack_seed: int, batch_number: int) -> int:
    """The seed of one evaluation batch; batch 0 keeps the attack's own seed, so a one-batch
    evaluation draws exactly what ``attack(model, x, y)`` draws."""
    return (attack_seed + batch_number * _BATCH_SEED_STRIDE) % (2 ** 63)


# -- joining and launching --------------------------------------------------------------------

def under_torchrun() -> bool:
    return all(name in os.environ for name in _ENV)


def join(device: torch.device) -> DistributedContext | None:
    """Join torchrun's process group when launched by it (``None`` otherwise).

    ``device`` is the one the single-process run would use; on CUDA each rank takes the GPU of its
    local rank instead.
    """
    if not under_torchrun():
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}; use at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=_TIMEOUT)
        atexit.register(leave)
    return DistributedContext(rank, world_size, local_rank, device)


def leave(*, together: bool = False) -> None:
    """Destroy the process group, if there is one (a second call does nothing).

    ``together``: first wait at a barrier for every rank; the group is destroyed even when the
    barrier fails. Without it (the atexit fallback, after an error) no rank waits: a rank that failed
    cannot tell which collective the others are in, and torchrun stops them.
    """
    if not dist.is_initialized():
        return
    try:
        if together:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def check_nproc(nproc: int) -> int:
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return nproc


def launch(nproc: int, arguments: Sequence[str]) -> int:
    """Run ``fortify <arguments>`` in ``nproc`` processes on this machine (torchrun's standalone
    launch) and return the first failed rank's exit code, or 0.

    The ranks print their own one-line errors; the launcher's report of a failed child (a Python
    traceback when torchrun runs as a program) is replaced by the exit code.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    if not torch.cuda.is_available() and nproc > (os.cpu_count() or 1):
        print(f"warning: {nproc} processes on {os.cpu_count()} CPUs: each rank waits for the others at "
              "every step, so extra processes slow training down", file=sys.stderr)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: one thread per rank, not N per rank
    _quiet_launcher_logs()
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "fortify", *arguments)
    except ChildFailedError as failed:
        codes = [f.exitcode for _, f in sorted(failed.failures.items())]
        return next((c for c in codes if c > 0), 1)
    except SignalException:  # Ctrl-C: the launcher stopped the ranks, which said how to continue
        return 130
    return 0


def _quiet_launcher_logs() -> None:
    """The launcher's own log lines (a rank failed, a signal arrived) repeat what the ranks say; its
    modules set their loggers' levels themselves, so each is set, not only the parent."""
    from torch.distributed.elastic.agent.server import local_elastic_agent  # noqa: F401 (creates its loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` minus ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept
