"""Data-parallel consistency: every rank uses rank 0's topology.

Random choices are seeded from ``(seed, layer, step)``, so ranks agree by construction; rank 0's masks are
still broadcast after every topology update (a rank whose gradients differed in the last bits could
otherwise choose differently), and entries that had to be corrected are counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def dist_world() -> tuple[bool, int, int]:
    """``(distributed, rank, world size)``: distributed only with an initialised group of >= 2 processes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_masks(masks: Mapping[str, torch.Tensor], names: Sequence[str]) -> int:
    """Overwrite ``masks[name]`` (in place) with rank 0's on every rank; returns the entries corrected here
    (0 without a process group of two or more)."""
    distributed, _, _ = dist_world()
    if not distributed:
        return 0
    import torch.distributed as dist

    device = _collective_device()
    local = torch.cat([masks[n].reshape(-1).to(device=device, dtype=torch.uint8) for n in names])
    received = local.clone()
    dist.broadcast(received, src=0)
    mismatch = int((received != local).sum())
    if mismatch:
        offset = 0
        for n in names:
            numel = masks[n].numel()
            chunk = received[offset : offset + numel].view(masks[n].shape)
            masks[n].copy_(chunk.to(device=masks[n].device, dtype=masks[n].dtype))
            offset += numel
    return mismatch


def average_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the data-parallel ranks, in place (as data-parallel training averages
    gradients); unchanged without a process group of two or more."""
    distributed, _, world = dist_world()
    if not distributed:
        return tensor
    import torch.distributed as dist

    device = _collective_device()
    buf = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(buf)
    buf.div_(world)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor
