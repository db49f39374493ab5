"""FSDP2 (``fully_shard``) over adapted layers: 2 CPU processes (gloo), each on half the batch,
give the gradients and the optimiser step of one process on the whole batch, eagerly and under
``torch.compile``, without FSDP2's warning about modules that return views, and within bf16's
tolerance under a bf16 mixed-precision policy; ``save_adapter`` from the sharded model writes the
unsharded model's file. (FSDP2's CPU offload policy needs an accelerator: not testable here.)"""
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_helpers import WORLD, init_gloo, requires_gloo, spawn
from helpers import TOLERANCE
from torch import nn

from dcft_kernels import DCFTLinear, DeLoRALinear, LoRALinear, inject_adapters, orthogonality_loss, save_adapter

pytestmark = requires_gloo
if dist.is_available():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def _mixed_model():
    """One layer of each adapter (shards of uneven size included: DeLoRA's 3×3 core), a trained head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(),
                          nn.Linear(40, 8))
    model.requires_grad_(False)
    model[0] = DCFTLinear.from_linear(model[0], kernel_size=4, rank=2, init="paper")
    model[2] = LoRALinear.from_linear(model[2], rank=4)
    nn.init.normal_(model[2].B, std=0.02)  # LoRA starts with B = 0, which would leave A's gradient 0
    model[4] = DeLoRALinear.from_linear(model[4], rank=3)
    model[6].requires_grad_(True)
    return model


def _injected_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 8))
    return inject_adapters(model, "dcft", target_modules=["0"], modules_to_save=["2"], kernel_size=4, rank=2,
                           init="paper")


def _shard(model, **policy):
    for module in model:
        if any(p.requires_grad for p in module.parameters()):
            fully_shard(module, **policy)
    fully_shard(model, **policy)
    return model


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, generator=g), torch.randn(8, 3, 8, generator=g)  # leading dims (batch, seq)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_step(model, x, y, compile=False):
    """Gradients after one backward and parameters after one AdamW step, as full tensors."""
    forward = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # With the regulariser, which reads the (sharded) factors outside the modules' forward.
        (F.mse_loss(forward(x), y) + 0.1 * orthogonality_loss(model)).backward()
    # FSDP2 names the module class in its warning: "FSDP2-wrapped module (FSDPLoRALinear) returned a view".
    views = sorted({cls for w in caught if "view tensor" in str(w.message)
                    for cls in ("FSDPLinear", "FSDPDCFTLinear", "FSDPLoRALinear", "FSDPDeLoRALinear")
                    if f"({cls})" in str(w.message)})
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    params = {n: _full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, params, views


def _worker(rank, store_path, out_dir):
    init_gloo(rank, store_path)
    x, y = _data()
    shard = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    results = {compile: _train_step(_shard(_mixed_model()), x[shard], y[shard], compile) for compile in (False, True)}
    # FSDP2 mixed precision: bf16 compute (DeLoRA's frozen fp32 buffers follow its bf16 core), fp32 reduce.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    results["bf16"] = _train_step(_shard(_mixed_model(), mp_policy=policy), x[shard], y[shard])
    save_adapter(_shard(_injected_model()), f"{out_dir}/adapter-rank{rank}")
    if rank == 0:
        torch.save(results, f"{out_dir}/results.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_matches_single_process_and_saves_the_same_adapter(tmp_path):
    spawn(_worker, (str(tmp_path / "store"), str(tmp_path)), seconds=240)
    sharded = torch.load(tmp_path / "results.pt")
    x, y = _data()
    want_grads, want_params, _ = _train_step(_mixed_model(), x, y)
    assert set(want_grads) == {"0.A", "0.B", "0.kernel", "2.A", "2.B", "4.core", "6.weight", "6.bias"}
    bf16_grads, _, _ = sharded.pop("bf16")
    for name, want in want_grads.items():
        err = (bf16_grads[name].float() - want).abs().max() / want.abs().max()
        assert err < TOLERANCE[torch.bfloat16], f"bf16 mixed precision: grad {name} off by {err:.2e} of its max"
    for compile, (grads, params, views) in sharded.items():
        # The plain nn.Linear head does return a view for a 3-D input (F.linear reshapes its 2-D
        # result), so the warning is seen; none of the adapted layers may.
        assert views == ["FSDPLinear"], f"compile={compile}: FSDP2 view warnings from {views}"
        assert set(grads) == set(want_grads)
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, c=compile: f"grad {n}, compile={c}: {m}")
            torch.testing.assert_close(params[name], want_params[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, c=compile: f"param {n}, compile={c}: {m}")

    save_adapter(_injected_model(), str(tmp_path / "unsharded"))
    assert not (tmp_path / "adapter-rank1").exists(), "only rank 0 writes"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter-rank0" / name).read_bytes() == (tmp_path / "unsharded" / name).read_bytes()


@pytest.mark.parametrize("method", ["lora", "delora"])
def test_inject_twice_is_refused(method):
    model = _injected_model()
    with pytest.raises(ValueError, match="already has 'dcft' adapters"):
        inject_adapters(model, method, target_modules=["2"], rank=2)
