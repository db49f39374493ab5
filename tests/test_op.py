"""The structured-delta op on every backend that can run here, against reference.py."""
import itertools

import pytest
import torch

from conftest import FUSED_BACKENDS
from dcft_kernels import dcft_linear, delora_linear, lora_linear, structured_delta_linear
from dcft_kernels.dropout import dropout_mask
from helpers import check_against_reference, make_problem

# Small on purpose: the Triton interpreter runs every program instance in Python.
SHAPES = [  # (leading dims, in, out)
    ((5,), 16, 24),
    ((2, 3), 17, 13),
    ((1,), 33, 7),
    ((7,), 9, 40),
]
MATRIX = list(itertools.product([1, 2, 3, 4, 8], [1, 2, 4]))  # (d, r)


def _run(backend, **kw):
    def run(pb):
        return structured_delta_linear(*pb.args(), scaling=pb.scaling, backend=backend, **kw)
    return run


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("d,r", MATRIX)
def test_matches_reference_float32(backend, d, r):
    for i, (lead, in_f, out_f) in enumerate(SHAPES):
        bias, core = (i % 2 == 0), (i % 3 == 1)
        pb = make_problem(lead, in_f, out_f, d, r, bias=bias, core=core, seed=d * 10 + r + i)
        check_against_reference(pb, _run(backend), torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kernel,core", [(False, False), (False, True), (True, True)])
def test_without_kernel_or_core(backend, kernel, core):
    pb = make_problem((6,), 21, 18, 4, 3, kernel=kernel, core=core, trainable_weight=True)
    check_against_reference(pb, _run(backend), torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 is broken in Triton's CPU interpreter; covered by the GPU run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for d, r in [(8, 1), (3, 2), (1, 4)]:
        pb = make_problem((2, 5), 35, 29, d, r, core=(r == 2), dtype=dtype, device=device, seed=d + r)
        check_against_reference(pb, _run(backend), dtype)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_trainable_weight_gets_gradient(backend):
    pb = make_problem((4,), 12, 10, 2, 2, trainable_weight=True)
    check_against_reference(pb, _run(backend), torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_frozen_weight_gets_no_gradient(backend):
    pb = make_problem((4,), 12, 10, 2, 2)
    y = structured_delta_linear(*pb.args(), scaling=1.0, backend=backend)
    y.sum().backward()
    assert pb.weight.grad is None and pb.A.grad is not None


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("kernel", [True, False])
def test_empty_batch(backend, kernel):
    pb = make_problem((0,), 16, 8, 4, 2, kernel=kernel)
    y = structured_delta_linear(*pb.args(), scaling=1.0, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert pb.x.grad.shape == (0, 16) and torch.equal(pb.A.grad, torch.zeros_like(pb.A))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_non_contiguous_x(backend):
    pb = make_problem((6,), 20, 12, 4, 2)
    pb.x = torch.randn(20, 6).T.requires_grad_()  # strides (1, 6)
    assert not pb.x.is_contiguous()
    check_against_reference(pb, _run(backend), torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("d,r,kernel", [(8, 1, True), (3, 2, True), (1, 4, True), (1, 4, False)])
def test_dropout_matches_reference_with_same_mask(backend, d, r, kernel):
    """(1, 4, no kernel): LoRA/DeLoRA, which the C++ CPU pass runs as rank GEMMs on the dropped x."""
    pb = make_problem((3, 4), 19, 23, d, r, core=(d == 1), kernel=kernel)
    check_against_reference(pb, _run(backend, dropout=0.3, seed=1234), torch.float32, p=0.3, seed=1234)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_dropout_zero_equals_no_dropout_and_seed_matters(backend):
    pb = make_problem((8,), 16, 16, 4, 1)
    plain = structured_delta_linear(*pb.args(), scaling=1.0, backend=backend)
    zero = structured_delta_linear(*pb.args(), scaling=1.0, dropout=0.0, seed=7, backend=backend)
    torch.testing.assert_close(plain, zero, rtol=0, atol=0)
    a = structured_delta_linear(*pb.args(), scaling=1.0, dropout=0.5, seed=7, backend=backend)
    b = structured_delta_linear(*pb.args(), scaling=1.0, dropout=0.5, seed=8, backend=backend)
    assert not torch.allclose(a, b)
    again = structured_delta_linear(*pb.args(), scaling=1.0, dropout=0.5, seed=7, backend=backend)
    torch.testing.assert_close(a, again)


def test_dropout_mask_statistics():
    mask = dropout_mask((200, 100), 0.25, seed=3)
    kept = (mask > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01
    assert torch.all((mask == 0) | torch.isclose(mask, torch.tensor(1 / 0.75)))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_saves_x_by_reference_and_only_small_T(backend):
    """Extra activation memory is N·r·d (T) plus O(1): x is saved as itself, no ΔW, and a dropout mask
    at most as bits (the C++ CPU pass keeps one bit per element of x instead of drawing it again)."""
    pb = make_problem((32,), 64, 48, 8, 2)
    pb.x = torch.randn(8, 4, 64).transpose(0, 1).requires_grad_()  # flattening (4, 8) would copy it
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        structured_delta_linear(*pb.args(), scaling=1.0, dropout=0.2, seed=1, backend=backend)
    params = {t.data_ptr() for t in (pb.weight, pb.bias, pb.A, pb.B, pb.kernel)}
    extra = [t for t in saved if t.data_ptr() not in params | {pb.x.data_ptr()}]
    assert any(t.data_ptr() == pb.x.data_ptr() and t.stride() == pb.x.stride() for t in saved), \
        "x must be saved by reference, not as a copy"
    keep_bits = 32 * 64 // 8 if backend == "cpp" else 0  # tokens · in bits
    assert sum(t.numel() * t.element_size() for t in extra) <= 32 * 2 * 8 * 4 + keep_bits  # T: tokens · r · d fp32


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])  # triton: no fp64 kernels
def test_gradcheck_float64(backend):
    for d, r, core, kernel in [(3, 2, True, True), (4, 1, False, True), (1, 3, True, True), (1, 3, True, False)]:
        pb = make_problem((2, 3), 11, 7, d, r, core=core, kernel=kernel, dtype=torch.float64, trainable_weight=True)
        for p in (0.0, 0.4):
            def f(*ts, p=p, scaling=pb.scaling):
                return structured_delta_linear(*ts, scaling=scaling, dropout=p, seed=11, backend=backend)
            assert torch.autograd.gradcheck(f, pb.args())


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_adapter_wrappers(backend):
    pb = make_problem((5,), 16, 8, 2, 2, core=True)
    x, W, b, A, B, C, K = pb.args()
    torch.testing.assert_close(
        dcft_linear(x, W, b, A, B, K, scaling=0.5, backend=backend),
        structured_delta_linear(x, W, b, A, B, None, K, scaling=0.5, backend="reference"),
    )
    A1, B1 = torch.randn(2, 16), torch.randn(8, 2)
    torch.testing.assert_close(
        lora_linear(x, W, b, A1, B1, scaling=2.0, backend=backend),
        torch.nn.functional.linear(x, W + 2.0 * B1 @ A1, b),
    )
    torch.testing.assert_close(
        delora_linear(x, W, b, A1, B1, C, scaling=2.0, backend=backend),
        torch.nn.functional.linear(x, W + 2.0 * B1 @ C @ A1, b),
    )


# ---- bad input: clear errors before any computation -------------------------------------------

def _good():
    pb = make_problem((3,), 16, 8, 4, 2, core=True)
    return dict(zip(("x", "weight", "bias", "A", "B", "core", "kernel"), pb.args()))


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(3, 15)), ValueError, "in_features=16"),
    (dict(x=torch.ones(3, 16, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(x=torch.randn(3, 16, dtype=torch.float64)), TypeError, "dtype"),
    (dict(A=torch.randn(2, 5)), ValueError, r"A must have shape \(rank, ⌈in_features/d⌉\) = \(2, 4\)"),
    (dict(B=torch.randn(3, 2)), ValueError, r"B must have shape \(⌈out_features/d⌉, rank\) = \(2, 2\)"),
    (dict(B=torch.randn(2, 3)), ValueError, "B must have shape"),
    (dict(core=torch.randn(3, 3)), ValueError, "core must have shape"),
    (dict(kernel=torch.randn(4, 3)), ValueError, r"A must have shape \(rank, ⌈in_features/d⌉\) = \(2, 6\)"),
    (dict(kernel=torch.randn(4, 4, 1)), ValueError, r"kernel must be a 2-D \(d_out, d_in\) matrix"),
    (dict(kernel=torch.randn(0, 0)), ValueError, "both sizes >= 1"),
    (dict(A=torch.randn(0, 4)), ValueError, "rank >= 1"),
    (dict(bias=torch.randn(7)), ValueError, "bias must have shape"),
    (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_raises(change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        structured_delta_linear(**args)


def test_bad_options_raise():
    args = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        structured_delta_linear(**args, backend="cuda-magic")
    with pytest.raises(ValueError, match="dropout must be in"):
        structured_delta_linear(**args, dropout=1.0)
