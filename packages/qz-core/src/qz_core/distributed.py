"""Training across ``torchrun`` processes and devices: ranks, the process group, device placement.

Task- and family-agnostic helpers of ``qz_core.training``: gloo on the CPU, nccl on CUDA; a process
not launched by ``torchrun`` is rank 0 of 1 and never joins a group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qz_core.errors import QzError, invalid_choice

DEVICES = ("cpu", "cuda")
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)  # other ranks wait at a barrier while rank 0 scores


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a ``torchrun`` launch (one process when not launched by it)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """True on the process that scores, writes and prints."""
        return self.rank == 0


def launch_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """This process's ranks from the variables ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``)."""
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise QzError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (launch with torchrun); got "
            f"{env.get('WORLD_SIZE')!r}, {env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}."
        ) from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise QzError(f"RANK {rank} does not fit WORLD_SIZE {world_size} (launch with torchrun).")
    return Ranks(world_size, rank, local_rank)


def check_device(name: str) -> None:
    """Refuses an unknown device, or 'cuda' where PyTorch sees no CUDA GPU.

    Raises:
        QzError: naming the device and what to use instead.
    """
    if name not in DEVICES:
        raise invalid_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        built = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
        raise QzError(
            f"--device cuda: PyTorch ({torch.__version__}, built {built}) sees no CUDA GPU; use --device cpu."
        )


def training_device(name: str, ranks: Ranks) -> torch.device:
    """The device this process trains on: the CPU, or the GPU of its local rank."""
    check_device(name)
    if name == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Joins the ``torchrun`` process group (gloo on the CPU, nccl on CUDA) for the block, then leaves it.

    A group the caller already started is used and left alone.
    """
    if not ranks.distributed or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(backend, timeout=PROCESS_GROUP_TIMEOUT, device_id=device_id)
    try:
        yield
    finally:
        dist.destroy_process_group()


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (tuples, lists, dicts, dataclasses' fields kept) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        return replace(value, **{k: to_device(getattr(value, k), device) for k in value.__dataclass_fields__})
    return value


def broadcast_buffers(model: nn.Module) -> None:
    """Gives every rank rank 0's buffers (observer ranges, fake-quant scales, BatchNorm statistics)."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def agreed_start(start: int, ranks: Ranks) -> int:
    """The epoch every rank resumes at; ranks that read different checkpoints are an error."""
    if not dist.is_initialized():
        return start
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    bounds = torch.tensor([start, -start], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if int(bounds[0]) != -int(bounds[1]):
        raise QzError(f"The ranks read checkpoints of different epochs ({-int(bounds[1])}..{int(bounds[0])}).")
    return start
