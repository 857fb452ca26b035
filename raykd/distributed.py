"""The one check for a running ``torch.distributed`` process group."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """The process group's size: 1 when ``torch.distributed`` has none running (one process)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
