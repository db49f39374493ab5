"""DistributedDataParallel: 2 CPU processes (gloo) give the adapter gradients of one process
training on the same global batch."""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dcft_kernels import inject_adapters

WORLD = 2


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 8))
    inject_adapters(model, "dcft", target_modules=["0", "2"], kernel_size=4, rank=2, init="paper")
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, store_path, out_path):
    # Rendezvous through a file and traffic over loopback only: no ports to race for, no
    # hostname lookups that a sandboxed machine may not answer.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = _data()
    shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    F.mse_loss(ddp(x[shard]), y[shard]).backward()
    if rank == 0:
        torch.save(_trainable_grads(model), out_path)
    # Tear down in order (DDP's reducer before its process group, both ranks together):
    # destroying them the other way round can hang in gloo's destructors.
    del ddp
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
def test_ddp_gradients_match_single_process(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    context = mp.spawn(_worker, args=(str(tmp_path / "store"), out_path), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 180 s")
    ddp_grads = torch.load(out_path)

    model = _model()
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    single = _trainable_grads(model)
    assert set(ddp_grads) == set(single) == {"0.A", "0.B", "0.kernel", "2.A", "2.B", "2.kernel"}
    for name, grad in single.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-5, atol=1e-6)
