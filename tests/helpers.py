"""Random problems and comparisons against reference.py, shared by the test files."""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass

import torch

from dcft_kernels import reference
from dcft_kernels.dropout import dropout_mask

# Max error allowed relative to the reference's magnitude, per dtype. fp16/bf16 round
# inputs of the small matmuls; tf32 on GPUs is within the fp32 bound here.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    core: torch.Tensor | None
    kernel: torch.Tensor | None
    scaling: float

    def tensors(self):
        return [t for t in (self.x, self.weight, self.bias, self.A, self.B, self.core, self.kernel) if t is not None]

    def args(self):
        return (self.x, self.weight, self.bias, self.A, self.B, self.core, self.kernel)


def make_problem(lead, in_f, out_f, d, r, *, bias=True, core=False, kernel=True, dtype=torch.float32,
                 device="cpu", seed=0, trainable_weight=False):
    """A random problem; d is ignored (taken as 1) when ``kernel`` is False."""
    g = torch.Generator().manual_seed(seed)
    d = d if kernel else 1

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device).requires_grad_()

    n_in, n_out = math.ceil(in_f / d), math.ceil(out_f / d)
    return Problem(
        x=rnd(*lead, in_f),
        weight=rnd(out_f, in_f, std=in_f**-0.5).requires_grad_(trainable_weight),
        bias=rnd(out_f) if bias else None,
        A=rnd(r, n_in, std=n_in**-0.5),
        B=rnd(n_out, r, std=r**-0.5),
        core=rnd(r, r, std=r**-0.5) if core else None,
        kernel=rnd(d, d, std=d**-0.5) if kernel else None,
        scaling=0.75,
    )


def reference_outputs(problem: Problem, grad_y: torch.Tensor, p=0.0, seed=0):
    """Reference y and gradients, computed in float64 from the same (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in problem.args() if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in problem.args()]
    mask = dropout_mask(problem.x.shape, p, seed, device=problem.x.device, dtype=torch.float64) if p else None
    y = reference.structured_delta_linear(*args, scaling=problem.scaling, dropout_mask=mask)
    wanted = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad_y.double())
    return y, grads


def assert_close_to_reference(got: torch.Tensor, want: torch.Tensor, dtype, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1.0)
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} > {TOLERANCE[dtype]:.1g} × {scale:.3g}"


def check_against_reference(problem: Problem, run, dtype, p=0.0, seed=0):
    """Run ``run(problem)`` forward and backward and compare y and every gradient with the reference."""
    y = run(problem)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype=y.dtype, device=y.device)
    wanted = [t for t in problem.tensors() if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad_y)
    ref_y, ref_grads = reference_outputs(problem, grad_y, p, seed)
    assert_close_to_reference(y, ref_y, dtype, "y")
    names = [n for n, t in zip(("x", "weight", "bias", "A", "B", "core", "kernel"), problem.args())
             if t is not None and t.requires_grad]
    for name, got, want in zip(names, grads, ref_grads):
        assert_close_to_reference(got, want, dtype, f"d{name}")


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(filename: str):
    """Import ``examples/<filename>`` as a module (registered in sys.modules, so its
    dataclasses and pickling work), for tests that call its functions."""
    name = os.path.splitext(filename)[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, filename))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
