"""Fine-tuning in several processes with torch's DistributedDataParallel, launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m missrec_cli.main train --distributed --data ../shared/data/scientific --out run

Each rank holds the whole model; every optimiser step's batch (the same rows on every rank: one seeded epoch order)
is cut into one shard per rank, each rank's loss is scaled by the world size so that DDP's gradient average is the
exact gradient of the whole batch (the loss is a sum over rows divided by the batch size), and the gradient is
all-reduced once per step (the cost-bounded chunks of a shard accumulate under ``no_sync``). Per-epoch work that
is not a gradient (MISSRec's interest clusters) is computed on rank 0 and broadcast. Validation is sharded too and
its metrics all-reduced, so every rank sees the same NDCG@10 and takes the same early-stopping decision. Only rank
0 writes the run (``missrec train``). Backend: NCCL when the device is a GPU, gloo on CPU.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from missrec.data.dataset import Interactions


def init_from_env(device: str) -> str:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); returns this rank's device ("cuda:LOCAL_RANK" when ``device`` is cuda). Raises RuntimeError
    when not launched by torchrun."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed needs torchrun's environment (missing {', '.join(missing)}): launch it as "
            "`torchrun --nproc-per-node N -m missrec_cli.main train --distributed ...`"
        )
    gpu = device.startswith("cuda")
    if gpu:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo")
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _Loss(nn.Module):
    """The training loss as a module, so that DDP sees a forward (its gradient hooks need one)."""

    def __init__(self, model: nn.Module, loss: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *args: Any) -> torch.Tensor:
        return self.loss(self.model, *args)


@dataclass
class Ranks:
    """This process's place in the group and the DDP-wrapped loss of its model."""

    rank: int
    world: int
    ddp: nn.parallel.DistributedDataParallel

    @classmethod
    def of(cls, model: nn.Module, loss: Callable[..., torch.Tensor], seed: int) -> Ranks | None:
        """None when no process group is running (one process: the loop runs unchanged)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        # Buffers (item features, clusters) are not broadcast per forward: features are data every rank loaded,
        # clusters are broadcast once per epoch (sync_buffers). Unused parameters: a frozen or idle branch.
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to skip per-forward syncs
            warnings.simplefilter("ignore", FutureWarning)
            ddp = nn.parallel.DistributedDataParallel(
                _Loss(model, loss), device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
            )
        torch.manual_seed(seed * 1000 + dist.get_rank())  # own dropout draws per rank
        return cls(dist.get_rank(), dist.get_world_size(), ddp)

    def shard(self, batch: np.ndarray) -> np.ndarray:
        return batch[self.rank :: self.world]

    def step_context(self, last: bool) -> AbstractContextManager:
        """Gradient all-reduce on the last chunk of a step only."""
        return nullcontext() if last else self.ddp.no_sync()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's persistent buffers (interest centroids and clusters; same shapes on every rank, computed
        from the same data) to every rank, in place."""
        params = {name for name, _ in model.named_parameters()}
        for name, buf in model.state_dict().items():  # shares storage with the buffers
            if name not in params:
                dist.broadcast(buf, 0)

    def agree(self, metrics_of: Callable[[Interactions], dict[str, float]], rows: Interactions) -> dict[str, float]:
        """Validation metrics over all ``rows``, each rank ranking its shard; the same numbers on every rank."""
        mine = rows.subset(np.arange(self.rank, len(rows), self.world))
        metrics = metrics_of(mine)
        keys = sorted(k for k in metrics if k != "n")
        n = float(len(mine))
        device = next(self.ddp.parameters()).device
        packed = torch.tensor([n, *(metrics[k] * n for k in keys)], dtype=torch.float64, device=device)
        dist.all_reduce(packed)
        total = float(packed[0])
        means = {k: float(v) / max(total, 1.0) for k, v in zip(keys, packed[1:].tolist(), strict=True)}
        return {**means, "n": int(total)}

    def sum(self, value: float) -> float:
        """``value`` summed over the ranks (the epoch's training loss)."""
        packed = torch.tensor([value], dtype=torch.float64, device=next(self.ddp.parameters()).device)
        dist.all_reduce(packed)
        return float(packed[0])
