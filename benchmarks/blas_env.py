"""Benchmark start-up shared by the benchmark scripts: BLAS reads its settings when NumPy is first
imported, so a script that needs other settings re-runs itself with the environment changed.

Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE to force an old kernel (Haswell) because old
OpenBLAS builds misbehave on their CPU; with a current NumPy that halves its GEMM speed, which would
make every NumPy baseline look slower than it is. Benchmarks drop both; the tests keep them.
"""
import os
import sys
from pathlib import Path

FORCED = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ROOT = Path(__file__).resolve().parent.parent


def reexec_if_needed(script: str, argv: list, threads: int | None = None) -> None:
    """Re-run `script` with the forced-kernel variables removed (and thread counts set, if given).

    Never from inside a test run: exec would replace the pytest process itself."""
    if "pytest" in sys.modules:
        return
    forced = [k for k in FORCED if k in os.environ]
    want = None if threads is None else str(threads)
    threads_ok = want is None or (os.environ.get("OMP_NUM_THREADS") == want
                                  and os.environ.get("OPENBLAS_NUM_THREADS") == want)
    if not forced and threads_ok:
        return
    if forced:
        print(f"(benchmark: unsetting {', '.join(forced)} so that OpenBLAS picks its own kernel)", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k not in forced}
    if want is not None:
        env.update(OMP_NUM_THREADS=want, OPENBLAS_NUM_THREADS=want, MKL_NUM_THREADS=want)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(script).resolve()), *argv], env)
