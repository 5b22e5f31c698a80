"""CUDA kernels of the low-rank mixture op (select with `pytest -k cuda`).

Without nvcc the compile test skips; without a GPU (or driver) the runtime tests skip with the reason
the backend gives. Shape legend as in test_kernels.py: x (N, D), A (E, r, D), B (E, O, r), y (N, O).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tinyslim import kernels
from tinyslim.kernels import cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
needs_gpu = pytest.mark.skipif(not cuda.available, reason=f"cuda backend: {cuda.reason}")


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_cuda_source_compiles(tmp_path):
    """A broken ext/lowrank_cuda.cu fails CI wherever nvcc exists (a GPU is not needed to compile)."""
    arch = os.environ.get("TINYSLIM_CUDA_ARCH", "80").replace(",", ";").split(";")[0]
    cmd = [NVCC, "-O1", "-std=c++17", "-Xcompiler", "-fPIC", "-I", os.path.join(ROOT, "ext"),
           f"-arch=sm_{arch}", "-c", os.path.join(ROOT, "ext", "lowrank_cuda.cu"), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"nvcc failed:\n{out.stderr[-4000:]}"


def _normalise(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"\s+", " ", text).strip()


def test_cuda_binding_matches_header():
    """cuda.py's cdef is the CUDA section of ext/lowrank.h, word for word."""
    with open(os.path.join(ROOT, "ext", "lowrank.h")) as f:
        section = f.read().split("/* ---- CUDA library")[1].split("*/", 1)[1]
    section = "\n".join(line for line in section.splitlines() if not line.lstrip().startswith("#"))
    assert _normalise(section) == _normalise(cuda.CDEF)


def test_cuda_import_reports_why_when_unavailable():
    ok, why = kernels.available_backends()["cuda"]
    assert isinstance(why, str) and why
    if not ok:
        x = np.ones((2, 3), np.float32)
        with pytest.raises(RuntimeError, match="unavailable"):
            kernels.forward(x, np.ones((1, 2, 3), np.float32), np.ones((1, 4, 2), np.float32),
                            np.zeros(2, np.int32), backend="cuda")


@needs_gpu
@pytest.mark.parametrize("form", ["dense", "topk", "index"])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 5, 1, 1), (37, 100, 72, 5, 3), (300, 64, 129, 16, 8), (0, 8, 8, 2, 2)])
def test_cuda_numpy_inputs_match_reference(form, masks, shape):
    from test_kernels import check, make_gates
    rng = np.random.default_rng(0)
    N, D, O, r, E = shape
    f = np.float32
    args = dict(x=rng.standard_normal((N, D)).astype(f), A=rng.standard_normal((E, r, D)).astype(f),
                B=rng.standard_normal((E, O, r)).astype(f), gates=make_gates(rng, form, N, E, f),
                scale=rng.uniform(0.5, 2, E).astype(f),
                in_mask=(rng.random((E, D)) < 0.7).astype(f) if masks else None,
                out_mask=(rng.random((E, O)) < 0.7).astype(f) if masks else None)
    dy = rng.standard_normal((N, O)).astype(f)
    want = (kernels.forward(**args, backend="numpy"),) + kernels.backward(dy, **args, backend="numpy")
    got = (kernels.forward(**args, backend="cuda"),) + kernels.backward(dy, **args, backend="cuda")
    for name, g, w in zip(("y", "dx", "dA", "dB", "dgate"), got, want):
        check(f"cuda {name}", g, w, 1e-4)


@needs_gpu
def test_cuda_torch_tensors_stay_on_device():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    from test_kernels import check
    rng = np.random.default_rng(1)
    N, D, O, r, E = 200, 48, 40, 8, 4
    x, A, B = (rng.standard_normal(s).astype(np.float32) for s in ((N, D), (E, r, D), (E, O, r)))
    idx = np.argsort(rng.random((N, E)), axis=1)[:, :2].astype(np.int32)
    w = rng.random((N, 2)).astype(np.float32)
    dy = rng.standard_normal((N, O)).astype(np.float32)
    dev = [torch.from_numpy(a).cuda() for a in (x, A, B, w, dy)]
    y = kernels.forward(dev[0], dev[1], dev[2], (idx, dev[3]), 0.5)
    assert isinstance(y, torch.Tensor) and y.is_cuda
    grads = kernels.backward(dev[4], dev[0], dev[1], dev[2], (idx, dev[3]), 0.5)
    want = (kernels.forward(x, A, B, (idx, w), 0.5, backend="numpy"),) + \
        kernels.backward(dy, x, A, B, (idx, w), 0.5, backend="numpy")
    for name, g, ref in zip(("y", "dx", "dA", "dB", "dw"), (y,) + grads, want):
        assert g.is_cuda, f"{name} left the GPU"
        check(f"cuda torch {name}", g.cpu().numpy(), ref, 1e-4)


@needs_gpu
def test_cuda_zero_rows_are_exact_zero():
    rng = np.random.default_rng(2)
    N, D, O, r, E = 64, 32, 16, 4, 3
    x = rng.standard_normal((N, D)).astype(np.float32)
    idx = rng.integers(0, E, N).astype(np.int32)
    idx[::4] = -1
    x[::4] = np.nan
    y = kernels.forward(x, rng.standard_normal((E, r, D)).astype(np.float32),
                        rng.standard_normal((E, O, r)).astype(np.float32), idx, 1.0, backend="cuda")
    assert np.array_equal(y[::4], np.zeros_like(y[::4]))
