"""The few ``torch.distributed`` collectives recalibration needs, no-ops when not distributed."""

from __future__ import annotations

import torch

__all__ = ["coll_device", "dist_max", "dist_sum", "dist_world"]


def dist_world() -> int:
    """Ranks in the default process group (1 when ``torch.distributed`` is not initialised)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def coll_device(device: torch.device | None = None) -> torch.device:
    """Where collective tensors live: the current CUDA device for NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dist_sum(value: int, device: torch.device | None = None) -> int:
    """``value`` summed over the ranks."""
    import torch.distributed as dist

    if dist_world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=coll_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def dist_max(values: list[int]) -> list[int]:
    """The elementwise maximum of ``values`` over the ranks."""
    import torch.distributed as dist

    if dist_world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=coll_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]
