"""C++ extension specifics: the CMake build and its ctest program, and clear errors.

The numerical checks of backend="cpp" run in the shared matrix of test_op.py / test_modules.py.
"""
import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FUSED_BACKENDS
from dcft_kernels import autograd, structured_delta_linear
from helpers import make_problem

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
needs_cpp = pytest.mark.skipif("cpp" not in FUSED_BACKENDS, reason="the C++ extension could not be built here")


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = torch.utils.cmake_prefix_path
    build = tmp_path / "build"

    def run(*cmd):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("cmake", "-S", root, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}")
    run("cmake", "--build", str(build), "-j2")
    out = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in out


@needs_cpp
def test_ops_are_registered_with_torch_library():
    pb = make_problem((5,), 20, 12, 4, 2, core=True)
    x, W, b, A, B, C, K = (t.detach() for t in pb.args())
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.dcft_kernels.cpp_forward.default, (x, W, b, A, B, C, K, 0.5, 0.1, 3),
                          test_utils=utils)
    y, T, keep = torch.ops.dcft_kernels.cpp_forward(x, W, b, A, B, C, K, 0.5, 0.1, 3)
    assert keep.shape == (x.shape[0], 1) and keep.dtype == torch.int64  # 20 features: one word of keep-bits
    args = (torch.randn_like(y), x, W, A, B, C, K, T, keep, 0.5, 0.1, True, True, True, True, False)
    torch.library.opcheck(torch.ops.dcft_kernels.cpp_backward.default, args, test_utils=utils)
    no_bits = args[:8] + (torch.empty(0, 1, dtype=torch.int64),) + args[9:]
    with pytest.raises(RuntimeError, match="keep must be the keep-bits"):  # dropout needs the forward's bits
        torch.ops.dcft_kernels.cpp_backward(*no_bits)


@pytest.fixture
def broken_cpp(monkeypatch):
    """The C++ backend fails to load (as with no compiler); availability is re-probed around it."""
    real_load = autograd._load

    def broken(name):
        if name == "cpp":
            raise OSError("no compiler")
        return real_load(name)

    autograd.is_available.cache_clear()
    monkeypatch.setattr(autograd, "_load", broken)
    yield monkeypatch
    monkeypatch.undo()
    autograd.is_available.cache_clear()


def test_unavailable_backend_is_a_clear_error(broken_cpp):
    broken_cpp.setattr(autograd, "STRICT", False)  # the default for users; CI runs strict
    pb = make_problem((3,), 8, 8, 2, 1)
    with pytest.warns(UserWarning, match="'cpp' is unavailable"):
        with pytest.raises(RuntimeError, match="backend='cpp' was requested but is not available"):
            structured_delta_linear(*pb.args(), backend="cpp")
    # "auto" falls back to the torch backend instead of failing.
    assert autograd.resolve_backend("auto", "cpu") == "torch"


@needs_cpp
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_reference(dtype):
    from dcft_kernels.ops import cpp_backend
    from helpers import check_against_reference

    assert cpp_backend.has_cuda_kernels(), "a CUDA build of torch with a toolkit must build the CUDA kernels"
    for d, r, p in [(8, 1, 0.0), (3, 2, 0.2), (1, 8, 0.1)]:
        pb = make_problem((64,), 300, 200, d, r, core=(r == 2), dtype=dtype, device="cuda")
        check_against_reference(
            pb, lambda q, p=p: structured_delta_linear(*q.args(), scaling=q.scaling, dropout=p, seed=3, backend="cpp"),
            dtype, p=p, seed=3)


def test_compiles_on_first_use_without_the_prebuilt_extension(tmp_path):
    """Installed without the setup.py build, the extension is compiled (and cached) on first use."""
    import os

    code = (
        "import dcft_kernels.ops.cpp_backend as cb\n"
        "cb._PACKAGE_DIR = '/nonexistent'  # hide dcft_kernels/_C*.so\n"
        "assert cb.is_available()\n"
        "import torch\n"
        "from dcft_kernels import DCFTLinear\n"
        "m = DCFTLinear(16, 8, kernel_size=4, backend='cpp', init='paper')\n"
        "x = torch.randn(3, 16)\n"
        "torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight + m.delta_weight(), m.bias))\n"
        "print('jit ok')\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0 and "jit ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90_without_warnings(tmp_path):
    """The .cu compiles for Ampere and Hopper against the installed torch's headers, and nvcc/gcc
    report no warning in our own files (torch's headers may warn; that is not ours to fix)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    # The CPU wheel of torch lacks this generated header; its content only matters for CUDA builds of torch.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{tmp_path / 'stub'}"] + [f"-I{p}" for p in include_paths()] + \
        [f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["nvcc", "-c", os.path.join(CSRC, "structured_delta_cuda.cu"), "-o", str(tmp_path / "cuda.o"),
           "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall,-Wextra",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", *includes]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = [line for line in proc.stderr.splitlines()
            if "warning" in line.lower() and ("structured_delta" in line or "philox" in line)]
    assert not ours, "\n".join(ours)


def test_strict_mode_turns_a_broken_backend_into_an_error(broken_cpp):
    """With DCFT_KERNELS_STRICT=1 (CI) a backend that fails to load cannot hide behind the fallback."""
    broken_cpp.setattr(autograd, "STRICT", True)
    with pytest.raises(RuntimeError, match="'cpp' failed to load.*no compiler"):
        autograd.resolve_backend("auto", "cpu")


def test_default_build_flags_are_portable(monkeypatch):
    """-march=native only on request: a build copied to an older CPU must not die of an illegal instruction."""
    import importlib

    from dcft_kernels.ops import cpp_backend

    monkeypatch.delenv("DCFT_KERNELS_CPU_FLAGS", raising=False)
    try:
        assert not any(f.startswith("-march") for f in importlib.reload(cpp_backend).CPU_FLAGS)
        with open(os.path.join(os.path.dirname(CSRC), "setup.py")) as f:
            setup_py = f.read()
        assert '"DCFT_KERNELS_CPU_FLAGS", "-O3")' in setup_py
    finally:
        importlib.reload(cpp_backend)


_STREAM_CHECK = (
    "import torch\n"
    "from dcft_kernels.dropout import dropout_mask\n"
    "from dcft_kernels.ops import cpp_backend\n"
    "cpp_backend.is_available()\n"
    "x = torch.ones(37, 129)\n"  # odd sizes: every row starts at a different place in a Philox window
    "T = torch.ops.dcft_kernels.cpp_shrink(x, torch.eye(129), 1, 1.0, 0.3, 123456789012)\n"
    "want = dropout_mask(x.shape, 0.3, 123456789012, x.device, x.dtype)\n"
    "assert torch.equal(T.view(37, 129), want), (T.view(37, 129) != want).sum()\n"
    "out = torch.zeros(5, 4099)\n"  # rows longer than one block of 32 mask words
    "torch.ops.dcft_kernels.cpp_expand_(out, torch.ones(5, 1, 1), torch.ones(4099, 1), 1.0, 0.3, 42)\n"
    "assert torch.equal(out, dropout_mask(out.shape, 0.3, 42, out.device, out.dtype))\n"
)


@needs_cpp
def test_dropout_stream_matches_dropout_py():
    """The mask the C++ code draws on this machine (AVX2 where the CPU has it) is dropout.py's."""
    exec(_STREAM_CHECK, {})


@needs_cpp
def test_scalar_and_avx2_dropout_streams_agree():
    """The CPU draws masks with AVX2 where the CPU has it, else with scalar code: both give the stream
    of dropout.py (here the scalar one, forced)."""
    env = {**os.environ, "DCFT_KERNELS_NO_AVX2": "1"}
    proc = subprocess.run([sys.executable, "-c", _STREAM_CHECK], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# Shapes for the rank-r kernels of the LoRA path (low_rank_cpu.cpp): tokens past every token tile (3 in
# shrink, 8 and 4 in expand), features past the 8-wide vectors, ranks past every rank tile (8, 4, 2, 1).
RANK_PASS_SHAPES = [  # (tokens, in, out, r)
    (1, 1, 1, 1), (2, 7, 9, 3), (5, 8, 16, 4), (11, 23, 17, 5), (37, 130, 41, 8), (20, 33, 64, 13),
    (12, 9, 70, 16),
]


def _cpp_run(p, seed=3):
    return lambda q: structured_delta_linear(*q.args(), scaling=q.scaling, dropout=p, seed=seed, backend="cpp")


@needs_cpp
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("tokens,in_f,out_f,r", RANK_PASS_SHAPES)
def test_rank_pass_matches_reference_on_ragged_shapes(tokens, in_f, out_f, r, p):
    from helpers import check_against_reference

    for core in (False, True):
        pb = make_problem((tokens,), in_f, out_f, 1, r, kernel=False, core=core, bias=not core, seed=r + tokens)
        check_against_reference(pb, _cpp_run(p), torch.float32, p=p, seed=3)


_GEMM_PATH_CHECK = (
    "import sys, torch\n"
    "sys.path.insert(0, {tests!r})\n"
    "from helpers import check_against_reference, make_problem\n"
    "from dcft_kernels import structured_delta_linear\n"
    "for p in (0.0, 0.2):\n"
    "    for core in (False, True):\n"
    "        pb = make_problem((37,), 130, 41, 1, 8, kernel=False, core=core, seed=5)\n"
    "        check_against_reference(pb, lambda q: structured_delta_linear(*q.args(), scaling=q.scaling, dropout=p,\n"
    "                                seed=3, backend='cpp'), torch.float32, p=p, seed=3)\n"
)


@needs_cpp
def test_gemm_path_without_avx2_matches_reference():
    """Without AVX2 (forced here) the LoRA path runs its rank-r products as ATen GEMMs instead."""
    env = {**os.environ, "DCFT_KERNELS_NO_AVX2": "1"}
    script = _GEMM_PATH_CHECK.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@contextlib.contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@needs_cpp
@pytest.mark.parametrize("kernel", [True, False])
def test_gradients_repeat_bit_for_bit_from_call_to_call(kernel):
    """Work is handed to threads on demand, but partial sums are kept per fixed slice of tokens: two
    calls give the same bits, whichever thread ran which slice."""
    with _torch_threads(2):
        pb = make_problem((1024,), 256, 256, 8 if kernel else 1, 1 if kernel else 8, kernel=kernel, seed=4)
        trained = [t for t in pb.tensors() if t.requires_grad]
        grad_y = torch.randn(1024, 256, generator=torch.Generator().manual_seed(0))
        first = torch.autograd.grad(_cpp_run(0.1)(pb), trained, grad_y)
        for _ in range(3):
            again = torch.autograd.grad(_cpp_run(0.1)(pb), trained, grad_y)
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@needs_cpp
@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="the extension is built with OpenMP on Linux, where torch runs on it")
def test_the_cpu_passes_run_on_several_threads():
    """at::parallel_for is a header template: in an extension compiled without OpenMP it runs every
    pass on one thread, silently (setup.py adds -fopenmp where torch runs on OpenMP)."""
    with _torch_threads(2):
        assert torch.ops.dcft_kernels.cpp_threads_used(2) == 2
        assert torch.ops.dcft_kernels.cpp_threads_used(1) == 1
