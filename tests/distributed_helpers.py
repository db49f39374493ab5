"""Run a test's worker in 2 CPU processes (gloo), bounded in time."""
import datetime
import os
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
requires_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                   reason="torch without gloo")


def init_gloo(rank: int, store_path: str) -> None:
    # Rendezvous through a file and traffic over loopback only: no ports to race for, no
    # hostname lookups that a sandboxed machine may not answer.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def spawn(worker, args, seconds: float = 180) -> None:
    """``worker(rank, *args)`` in WORLD processes; the test fails if they take over ``seconds``."""
    context = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + seconds
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{WORLD} workers did not finish within {seconds:.0f} s")
