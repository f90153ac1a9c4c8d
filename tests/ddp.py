"""What every multi-process (gloo, CPU) test needs: a free loopback port and joining the group."""

from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def init_gloo(rank: int, world_size: int, port: int, *, timeout_s: float = 120.0) -> None:
    """Join a gloo process group on 127.0.0.1; a finite timeout turns a hang into a failure."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def set_torchrun_environment(rank: int, world_size: int, port: int) -> None:
    """The variables torchrun sets for ``rank``, so that code under test joins the group itself
    (as ``look pretrain`` does under torchrun)."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
         "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
    )  # fmt: skip
