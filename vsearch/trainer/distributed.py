"""Training on several processes: ``torchrun`` (PyTorch DDP), ``gloo`` on CPU, ``nccl`` on GPU.

    torchrun --nproc-per-node 2 .venv/bin/vsearch train --data ... --out runs/x     # as written
    vsearch train --nproc-per-node 2 --data ... --out runs/x                       # launches torchrun

``--batch-size`` is the global batch: each rank takes its slice of every batch (the same
images, in the same order, as one process would see), so a run on W processes computes the
same loss and gradients as one process on the same data, and a checkpoint resumes on any W.
What keeps that true:

* the contrastive losses compare each rank's rows with the columns of every rank
  (:func:`gather`, an all-gather whose backward sums the gradients of every rank's loss into
  each slice: torch.distributed.nn.functional.all_gather), each rank's loss is the mean over its
  own rows, and DDP averages the gradients: the mean of W local means is the global mean;
* batch norm takes its statistics over the global batch (:func:`sync_batchnorm`): SimCLR's
  negatives must not be told apart by per-rank statistics, and one process sees them whole.
  ``nn.SyncBatchNorm`` refuses CPU tensors, so this module carries its own (two all-reduces of
  per-channel sums accumulated in float64, with gradients), used on CPU and GPU alike;
* rank 0 alone writes the run log, the checkpoints and the exported model; the others wait.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)
# torch.distributed.nn.functional (the public collectives with autograd) warns that it is
# deprecated in favour of the private torch.distributed._functional_collectives; it works.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated",
                        category=FutureWarning)
TIMEOUT = datetime.timedelta(minutes=30)   # a collective (the others wait while rank 0 exports)
STORE_TIMEOUT = datetime.timedelta(minutes=5)   # the rendezvous of the processes


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the env:// rendezvous variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks() -> Ranks:
    if not active():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init(device: str | None) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun set up (nothing to join in a plain process); the device
    of this rank: ``cuda:LOCAL_RANK`` when CUDA is there (unless ``device`` says cpu)."""
    if not launched():
        return Ranks(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, store=_store(),
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                **({"device_id": dev} if cuda else {}))
    r = ranks()
    log.info("rank %d of %d (%s, %s)", r.rank, r.world, dist.get_backend(), dev)
    return r, dev


def _store() -> dist.Store:
    """The rendezvous store torchrun's agent hosts (MASTER_ADDR:MASTER_PORT), under a prefix of
    its own per restart: keys a killed attempt left behind (gloo's peer addresses) must not be
    read by the next one, which then waits forever for a peer that is gone."""
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=int(os.environ["RANK"]) == 0
                          and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
                          timeout=STORE_TIMEOUT)
    return dist.PrefixStore(f"vsearch/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def gather(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's ``t`` (same shape on every rank) concatenated along dim 0, with gradients
    flowing back to each rank's own slice from every rank's loss; and where this rank's rows
    start. The identity in a plain process."""
    if not active():
        return t, 0
    parts = dist_nn.all_gather(t.contiguous())
    return torch.cat(parts), dist.get_rank() * t.shape[0]


def gather_varying(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather` for tensors whose first dimension differs between ranks (hard
    negatives: not every item has one): padded to the largest, gathered, unpadded."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    if top == 0:
        return t
    padded = torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))]) if t.shape[0] < top else t
    parts = dist_nn.all_gather(padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def mean_over_ranks(value: float) -> float:
    """The mean of a number over the ranks (the logged loss is the global batch's)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


# --------------------------------------------------------------------------- global batch norm

class _GlobalBatchNorm:
    """Mixed into a BatchNorm class: in training under DDP, the statistics of the global batch
    (sum and count, then the centred sum of squares, all-reduced with gradients); otherwise the
    class's own forward. Parameters, buffers and state-dict keys are those of the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([x.numel() // c], dtype=torch.float64, device=x.device)
        sums = dist_nn.all_reduce(torch.cat([xf.sum(dims, dtype=torch.float64), count]))
        n = sums[c]
        mean = (sums[:c] / n).float()
        centred = xf - mean.view(shape)
        var = (dist_nn.all_reduce(centred.pow(2).sum(dims, dtype=torch.float64)) / n).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                unbiased = var * float(n) / max(float(n) - 1, 1.0)
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = (centred * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_GLOBAL: dict[type, type] = {}


def sync_batchnorm(module: nn.Module) -> int:
    """Turn every batch-norm layer of ``module`` into its global-batch twin, in place (same
    parameters and buffers, same state dict); :func:`unsync_batchnorm` turns them back.
    Returns how many layers changed."""
    changed = 0
    for m in module.modules():
        cls = type(m)
        if isinstance(m, _BatchNorm) and not isinstance(m, _GlobalBatchNorm):
            if cls not in _GLOBAL:
                _GLOBAL[cls] = type(f"Global{cls.__name__}", (_GlobalBatchNorm, cls), {})
            m.__class__ = _GLOBAL[cls]
            changed += 1
    return changed


def unsync_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, _GlobalBatchNorm):
            m.__class__ = type(m).__mro__[2]


# --------------------------------------------------------------------------- the launcher

def launch(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """``torchrun --standalone --nproc-per-node N --max-restarts R -m vsearch <argv>`` in this
    process (torch.distributed.run); returns its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    args = ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--module", "vsearch", *argv]
    log.info("torchrun %s", " ".join(args))
    try:
        torchrun(args)
    except ChildFailedError as exc:
        print(f"vsearch train: a training process failed:\n{exc.format_msg()}", file=sys.stderr)
        return 1
    return 0
