"""``vsearch train`` under torchrun, watched: run as ``torchrun ... ddp_harness.py GRADS KILL_AT
train ...``. On the first attempt rank 0 saves the gradients of the first optimiser step (after
DDP averaged them) to GRADS, and rank 1 kills itself with SIGKILL after optimiser step KILL_AT
(0: never), so torchrun's ``--max-restarts`` has a real dead worker to restart from."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import torch

from vsearch.cli import build_parser
from vsearch.trainer import train as train_module

faulthandler.register(signal.SIGUSR1)
GRADS, KILL_AT = sys.argv[1], int(sys.argv[2])
FIRST_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
RANK = int(os.environ.get("RANK", "0"))
real_step = train_module.optimiser_step


def watched_step(run):
    if FIRST_ATTEMPT and RANK == 0 and run.step == 0:
        torch.save({n: p.grad.detach().clone() for n, p in run.modules.named_parameters()
                    if p.grad is not None}, GRADS)
    norm = real_step(run)
    if FIRST_ATTEMPT and RANK == 1 and run.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return norm


train_module.optimiser_step = watched_step
args = build_parser().parse_args(sys.argv[3:])      # vsearch's main without its logging set-up
sys.exit(args.handler(args))
