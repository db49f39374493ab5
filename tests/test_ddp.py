"""DistributedDataParallel: 2 CPU processes (gloo) give the adapter gradients of one process
training on the same global batch."""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dcft_kernels import inject_adapters

from distributed_helpers import WORLD, init_gloo, requires_gloo, spawn


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
    init_gloo(rank, store_path)
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


@requires_gloo
def test_ddp_gradients_match_single_process(tmp_path):
    out_path = str(tmp_path / "grads.pt")
    spawn(_worker, (str(tmp_path / "store"), out_path))
    ddp_grads = torch.load(out_path)

    model = _model()
    x, y = _data()
    F.mse_loss(model(x), y).backward()
    single = _trainable_grads(model)
    assert set(ddp_grads) == set(single) == {"0.A", "0.B", "0.kernel", "2.A", "2.B", "2.kernel"}
    for name, grad in single.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-5, atol=1e-6)
