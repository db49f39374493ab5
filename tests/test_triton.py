"""Triton-specific checks: multi-block shapes, registration, fallback, GPU sizes.

On the CPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest);
the shared backend matrix in test_op.py covers the rest.
"""
import pytest
import torch

from conftest import FUSED_BACKENDS, requires_cuda
from dcft_kernels import structured_delta_linear
from helpers import check_against_reference, make_problem

pytestmark = pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(pb, **kw):
    return structured_delta_linear(*pb.args(), scaling=pb.scaling, backend="triton", **kw)


@pytest.mark.parametrize("d,r", [(8, 10), (16, 8), (1, 64), (5, 3)])
def test_shapes_spanning_several_blocks(d, r):
    """More tokens, features and r·d columns than one block of each kernel holds."""
    pb = make_problem((70,), 150, 140, d, r, core=(r == 3), device=DEVICE)
    check_against_reference(pb, lambda p: _run(p, dropout=0.25, seed=99), torch.float32, p=0.25, seed=99)


def test_ops_are_registered_with_schema_and_fake_kernels():
    from dcft_kernels.ops import triton_backend as tb

    pb = make_problem((6,), 20, 12, 4, 2, core=True, device=DEVICE)
    x, W, b, A, B, C, K = (t.detach() for t in pb.args())
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(tb.triton_forward, (x, W, b, A, B, C, K, 0.5, 0.1, 3), test_utils=utils)
    y, T = tb.triton_forward(x, W, b, A, B, C, K, 0.5, 0.1, 3)
    args = (torch.randn_like(y), x, W, A, B, C, K, T, 0.5, 0.1, 3, True, True, True, True, False)
    torch.library.opcheck(tb.triton_backward, args, test_utils=utils)


def test_float64_falls_back_to_torch_with_a_warning():
    pb = make_problem((3,), 20, 12, 4, 2, dtype=torch.float64, device=DEVICE)
    from dcft_kernels.ops import triton_backend as tb

    tb._warned.clear()
    with pytest.warns(UserWarning, match="float64.*torch backend"):
        check_against_reference(pb, _run, torch.float64)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("in_f,out_f,d,r", [(4096, 4096, 8, 1), (4096, 11008, 8, 1), (1000, 3001, 3, 4),
                                            (4096, 4096, 1, 16)])
def test_gpu_real_sizes(dtype, in_f, out_f, d, r):
    pb = make_problem((2048,), in_f, out_f, d, r, dtype=dtype, device="cuda")
    check_against_reference(pb, lambda p: _run(p, dropout=0.1, seed=5), dtype, p=0.1, seed=5)


@requires_cuda
def test_auto_picks_triton_on_cuda():
    from dcft_kernels.autograd import resolve_backend

    assert resolve_backend("auto", "cuda") == "triton"


@pytest.mark.parametrize("d,r,core,p", [(8, 2, False, 0.0), (3, 2, True, 0.3), (1, 4, False, 0.2)])
def test_fused_gemm_path(monkeypatch, d, r, core, p):
    """The one-kernel GEMM whose accumulator starts at the delta, forward and dx."""
    from dcft_kernels.ops import triton_backend as tb

    monkeypatch.setattr(tb, "GEMM_PATH", "fused")
    pb = make_problem((40,), 70, 50, d, r, core=core, device=DEVICE, trainable_weight=True)
    check_against_reference(pb, lambda q: _run(q, dropout=p, seed=4), torch.float32, p=p, seed=4)
    pb16 = make_problem((40,), 70, 50, d, r, core=core, dtype=torch.float16, device=DEVICE)
    check_against_reference(pb16, lambda q: _run(q, dropout=p, seed=4), torch.float16, p=p, seed=4)


def test_non_contiguous_core_and_kernel():
    """Transposed views as core and kernel: same outputs and gradients as contiguous ones."""
    pb = make_problem((9,), 24, 20, 4, 3, core=True, device=DEVICE)
    x, W, b, A, B, C, K = (t.detach() for t in pb.args())
    C_leaf, K_leaf = C.t().contiguous().requires_grad_(), K.t().contiguous().requires_grad_()
    assert not C_leaf.t().is_contiguous()
    y = structured_delta_linear(x, W, b, A, B, C_leaf.t(), K_leaf.t(), backend="triton")
    C2, K2 = C.clone().requires_grad_(), K.clone().requires_grad_()
    want = structured_delta_linear(x, W, b, A, B, C2, K2, backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(C_leaf.grad, C2.grad.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K_leaf.grad, K2.grad.t(), rtol=1e-4, atol=1e-4)
