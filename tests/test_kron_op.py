"""The op generalised: both Kronecker orders, rectangular kernels, row scales and the MPC_n
activation, on every backend, against the dense torch.kron reference, outputs and every gradient."""
import pytest
import torch
from conftest import FUSED_BACKENDS
from helpers import TOLERANCE

from dcft_kernels import reference, structured_delta_linear
from dcft_kernels.dropout import dropout_mask


def _factors(in_f, out_f, d_out, d_in, r, core, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)

    x = rand(3, 4, in_f)
    weight, bias = rand(out_f, in_f, scale=0.2), rand(out_f)
    A, B = rand(r, -(-in_f // d_in), scale=0.3), rand(-(-out_f // d_out), r, scale=0.3)
    C = rand(r, r) if core else None
    K = rand(d_out, d_in)
    return x, weight, bias, A, B, C, K


def _dense_kron(A, B, C, K, out_f, in_f, order):
    small = B @ C @ A if C is not None else B @ A
    full = torch.kron(small, K) if order == "dcft" else torch.kron(K, small)
    return full[:out_f, :in_f]


@pytest.mark.parametrize("order", ["dcft", "lokr"])
def test_reference_is_the_dense_kron(order):
    x, weight, bias, A, B, C, K = _factors(22, 17, 3, 4, 2, True, torch.float64)
    row_scale = torch.rand(17, dtype=torch.float64)
    delta = _dense_kron(A, B, C, K, 17, 22, order) * row_scale[:, None]
    want = torch.nn.functional.linear(x, weight + 0.5 * delta, bias)
    got = reference.kron_delta_linear(x, weight, bias, A, B, C, K, 0.5, None, order, row_scale)
    torch.testing.assert_close(got, want)


CASES = [  # in, out, d_out, d_in, r, core
    (24, 20, 4, 6, 2, False),   # divisible, rectangular K
    (23, 19, 3, 5, 3, True),    # neither divisible, with a core
    (16, 16, 4, 4, 1, False),   # square K
    (12, 30, 5, 1, 2, False),   # K a column
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("order", ["dcft", "lokr"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("c" if c[5] else ""))
@pytest.mark.parametrize("activation", [None, "tanh", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_equals_reference_with_gradients(backend, order, case, activation, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bfloat16 is broken in Triton's CPU interpreter; covered by the GPU run")
    in_f, out_f, d_out, d_in, r, core = case
    x, weight, bias, A, B, C, K = _factors(in_f, out_f, d_out, d_in, r, core, dtype)
    row_scale = torch.linspace(0.5, 1.5, out_f, dtype=dtype)
    tensors = [t for t in (x, weight, bias, A, B, C, K) if t is not None]
    kw = dict(scaling=0.7, order=order, row_scale=row_scale, activation=activation)
    grad_y = torch.randn(3, 4, out_f, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def run(backend, cast):
        y = structured_delta_linear(*(cast(t) if t is not None else None for t in (x, weight, bias, A, B, C, K)),
                                    backend=backend, **{**kw, "row_scale": cast(row_scale)})
        return [y, *torch.autograd.grad(y, tensors, grad_y.to(y.dtype))]

    want = run("reference", lambda t: t.double())  # ground truth in fp64 from the same inputs
    got = run(backend, lambda t: t)
    tol = TOLERANCE[dtype]
    names = ["y", "x", "weight", "bias", "A", "B"] + (["C"] if core else []) + ["K"]
    for name, g, w in zip(names, got, want, strict=True):
        scale = w.abs().max().item() + 1e-12
        err = (g.double() - w).abs().max().item() / scale
        assert err <= tol, f"{name}: max error {err:.2e} relative to {scale:.2e} (tolerance {tol})"


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])  # the kernels: fp32 at most
@pytest.mark.parametrize("order", ["dcft", "lokr"])
@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_gradcheck_float64(backend, order, activation):
    x, weight, bias, A, B, C, K = _factors(10, 9, 3, 2, 2, True, torch.float64)
    row_scale = torch.rand(9, dtype=torch.float64)
    torch.autograd.gradcheck(
        lambda *t: structured_delta_linear(*t, scaling=1.3, order=order, row_scale=row_scale, activation=activation,
                                           backend=backend), (x, weight, bias, A, B, C, K))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("order", ["dcft", "lokr"])
@pytest.mark.parametrize("in_f,out_f", [(12, 10), (11, 9)])  # the second pads both sides of the LoKr view
def test_dropout_uses_the_seeded_mask(backend, order, in_f, out_f):
    x, weight, bias, A, B, C, K = _factors(in_f, out_f, 2, 3, 2, False, torch.float32)
    grad_y = torch.randn(3, 4, out_f, generator=torch.Generator().manual_seed(2))
    mask = dropout_mask(x.shape, 0.3, 11, x.device, x.dtype)
    results = []
    for run in (lambda: structured_delta_linear(x, weight, bias, A, B, None, K, order=order, dropout=0.3, seed=11,
                                                backend=backend),
                lambda: reference.kron_delta_linear(x, weight, bias, A, B, None, K, 1.0, mask, order)):
        y = run()
        results.append([y, *torch.autograd.grad(y, (x, weight, bias, A, B, K), grad_y)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_general_calls_run_on_the_backends_own_primitives(monkeypatch, backend):
    """The plan composes the named backend's shrink, expand and reduce (not torch's in its place),
    and the DCFT order with a square kernel keeps the backend's fused override."""
    from dcft_kernels.autograd import _load

    ops, calls = _load(backend), []
    def counted(name):
        original = getattr(ops, name)
        return lambda *args: calls.append(name) or original(*args)

    for name in ("shrink", "expand_", "reduce"):
        monkeypatch.setattr(ops, name, counted(name))
    x, weight, bias, A, B, C, K = _factors(12, 10, 2, 3, 2, False, torch.float32)
    structured_delta_linear(x, weight, bias, A, B, None, K, order="lokr", backend=backend).sum().backward()
    assert sorted(set(calls)) == ["expand_", "reduce", "shrink"]
    calls.clear()
    x, weight, bias, A, B, C, K = _factors(12, 10, 2, 2, 2, False, torch.float32)
    structured_delta_linear(x, weight, bias, A, B, None, K, backend=backend).sum().backward()
    assert calls == ([] if backend != "torch" else ["shrink", "expand_", "shrink", "reduce", "reduce", "expand_"])


def test_bad_general_arguments_are_named():
    x, weight, bias, A, B, C, K = _factors(12, 10, 2, 3, 2, False, torch.float32)
    with pytest.raises(ValueError, match="order must be"):
        structured_delta_linear(x, weight, bias, A, B, None, K, order="kron")
    with pytest.raises(ValueError, match="activation must be"):
        structured_delta_linear(x, weight, bias, A, B, None, K, activation="silu")
    with pytest.raises(ValueError, match=r"row_scale must have shape \(10,\)"):
        structured_delta_linear(x, weight, bias, A, B, None, K, row_scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"A must have shape \(rank, ⌈in_features/d⌉\) = \(2, 4\)"):
        structured_delta_linear(x, weight, bias, A[:, :3], B, None, K)
