"""Data-parallel training under torchrun: one process group, each rank a shard of every batch.

`python -m train` (and `train.stage2`, `train.distill`) runs as one process exactly as before.
Under `torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d ...] -m train ...` (torchrun
sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address) `init` joins the group: gloo on CPU,
NCCL on CUDA (each rank on `cuda:LOCAL_RANK`). Then:
- every rank draws the same seeded permutation and negatives, and takes its own contiguous part of
  every global batch (`shard`), so the config's batch size is the global batch at any N and the
  ranks' parts are disjoint; `DistributedDataParallel` averages the gradients, and each rank's loss
  is weighted by its share of the batch (`shard_weight`), so a step equals the single-process
  step on the whole batch up to the order of float additions;
- evaluation gives each rank every N-th batch of users and gathers the per-batch sums, which are
  then added in batch order: exactly the single-process figures on the same weights (`gather`);
- feature extraction encodes each rank's slice of the catalogue and gathers it (train/features.py);
- stage 2 averages its gradients explicitly (`average_grads`: which parameters a step reaches
  changes from step to step) and shares the tuning batch's encoded items (`gather_rows`);
- only rank 0 writes the run directory (`is_main`); the others read its checkpoint on `--resume`.
"""
from __future__ import annotations

import datetime
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a slow rank


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is in a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and logs progress."""
    return rank() == 0


def is_local_main() -> bool:
    """The first rank of this machine (it writes machine-local caches)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group when launched by it; returns the device this rank trains on
    (cuda:LOCAL_RANK on CUDA). A single process returns `device` unchanged."""
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # torchrun keeps one store across `--max-restarts` rounds; without a per-round prefix the new
    # ranks read the dead ranks' addresses from it and gloo's connect is refused (pytorch/pytorch
    # issue 167288), so each round's group lives under its own prefix
    store, rank_, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            store=dist.PrefixStore(f"ptmrec/round{restart}/", store),
                            rank=rank_, world_size=size)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)  # one rank tells the story
    log.info("rank %d of %d on %s (%s)", rank(), world_size(), device, dist.get_backend())
    return device


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if active():
        dist.barrier()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] when not distributed)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_float(value: float) -> float:
    """The sum of a float over all ranks, in float64."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def part(n: int) -> slice:
    """This rank's contiguous part of n things (the first n % N ranks get one more)."""
    size, r = world_size(), rank()
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def shard(n: int) -> tuple[slice, float]:
    """(this rank's slice of a global batch of n, its loss weight N * n_rank / n); a rank whose
    part is empty gets the first element with weight 0, so every rank runs the same collective
    backward."""
    s = part(n)
    if s.stop > s.start:
        return s, world_size() * (s.stop - s.start) / n
    return slice(0, 1), 0.0


class LossStep(torch.nn.Module):
    """`forward(*args)` is `loss_fn(*args)`: the step DDP wraps, so the modules' gradients are
    averaged across ranks."""

    def __init__(self, modules: torch.nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.modules_ = modules
        self.loss_fn = loss_fn

    def forward(self, *args) -> torch.Tensor:
        """The loss of this rank's part of a batch."""
        return self.loss_fn(*args)


def wrap(modules: torch.nn.Module, loss_fn: Callable[..., torch.Tensor],
         device: torch.device) -> torch.nn.Module:
    """LossStep(modules, loss_fn), inside DistributedDataParallel when distributed; gradients of
    parameters a step does not reach are zeros on every rank (find_unused_parameters); buffers
(graphs built from the same seed on every rank) are not broadcast."""
    step = LossStep(modules, loss_fn)
    if not active() or not any(p.requires_grad for p in modules.parameters()):
        return step
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():  # its replacement would broadcast the sparse graph buffers
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        return torch.nn.parallel.DistributedDataParallel(step, device_ids=ids, static_graph=True,
                                                         broadcast_buffers=False)


def average_grads(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` over the ranks in place (stage 2's explicit form of
    DDP's all-reduce, for steps whose set of reached parameters changes from step to step); a
    parameter no rank reached keeps no gradient (Adam skips it), one some rank reached gets the
    average with zeros for the others."""
    if not active() or not params:
        return
    device = params[0].device
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(reached)
    used = [p for p, r in zip(params, reached.tolist()) if r]
    if not used:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in used])
    dist.all_reduce(flat)
    flat /= world_size()
    for p, g in zip(used, flat.split([p.numel() for p in used])):
        p.grad = g.view_as(p).to(p.dtype)


def gather_rows(mine: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Every rank's rows (None: none) concatenated in rank order on `device`; this rank's keep
    their autograd graph, the others' arrive detached (each rank's backward reaches its own)."""
    parts = gather(None if mine is None else mine.detach().cpu())
    return torch.cat([mine if r == rank() else p.to(device)
                      for r, p in enumerate(parts) if p is not None])
