"""cffi (API mode) builder of the C/OpenMP kernel module ``tinyslim.kernels._lowrank_cpu``.

Used by setup.py through ``cffi_modules=["ext/build_cpu.py:ffibuilder"]``; ``python ext/build_cpu.py``
builds it in place by hand. The compiler flags come from try-compiling tiny programs with the same
compiler setuptools will use, so a flag the compiler rejects is simply left out:

    -O3                  always
    -march=native        if accepted (the module is built on the machine that runs it);
                         TINYSLIM_NO_NATIVE=1 leaves it out (portable builds)
    -fopenmp             if <omp.h> compiles and links; TINYSLIM_NO_OPENMP=1 leaves it out

``probe()`` returns what was found; setup.py prints it as the ✓/✗ build report.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADER = os.path.join(HERE, "lowrank.h")
SOURCES = [os.path.join(HERE, name) for name in ("lowrank_cpu.c", "lowrank_cpu_f32.c", "lowrank_cpu_f64.c")]
KERNELS = [os.path.join(HERE, name) for name in ("lowrank_v1.h", "lowrank_v2.h", "lowrank_v3.h")]  # included by the f32 / f64 files
MODULE = "tinyslim.kernels._lowrank_cpu"

_HELLO = "int main(void) { return 0; }\n"
_OPENMP = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
_VECTORS = ("typedef float v __attribute__((vector_size(16)));\n"
            "int main(void) { v a = {1, 2, 3, 4}; a = a * a; return (int)a[0] - 1; }\n")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _compiler():
    """The C compiler object setuptools' build_ext would use (honours CC, CFLAGS)."""
    try:
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler
    except ImportError:  # pragma: no cover - very old setuptools
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler
    cc = new_compiler()
    customize_compiler(cc)
    return cc


def try_build(code: str, cflags=(), ldflags=(), link: bool = True) -> bool:
    """True if `code` compiles (and links) with the build's C compiler and these flags; silent."""
    try:
        cc = _compiler()
        compile_cmd, link_cmd = list(cc.compiler_so), list(cc.linker_exe)
    except Exception:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, exe = (os.path.join(tmp, name) for name in ("probe.c", "probe.o", "probe"))
        with open(src, "w") as f:
            f.write(code)
        try:
            steps = [compile_cmd + list(cflags) + ["-c", src, "-o", obj]]
            if link:
                steps.append(link_cmd + [obj, "-o", exe] + list(ldflags))
            for cmd in steps:
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode != 0:
                    return False
        except (OSError, subprocess.SubprocessError):
            return False
    return True


@functools.lru_cache(maxsize=None)
def probe() -> dict:
    """What this machine's C toolchain can do, and the flags the build will use."""
    found = {"cc": try_build(_HELLO)}
    found["vectors"] = found["cc"] and try_build(_VECTORS)
    found["native"] = found["cc"] and not _flag("TINYSLIM_NO_NATIVE") and try_build(_HELLO, ["-march=native"])
    found["openmp_disabled"] = _flag("TINYSLIM_NO_OPENMP")
    found["openmp"] = (found["cc"] and not found["openmp_disabled"]
                       and try_build(_OPENMP, ["-fopenmp"], ["-fopenmp"]))
    cflags = ["-O3"] + (["-march=native"] if found["native"] else [])
    cflags += ["-fopenmp"] if found["openmp"] else ["-Wno-unknown-pragmas"]
    found["cflags"] = cflags
    found["ldflags"] = ["-fopenmp"] if found["openmp"] else []
    return found


CUDA_SECTION = "/* ---- CUDA library"


def _cdef() -> str:
    """The header's CPU part minus its preprocessor lines: what cffi's parser accepts."""
    with open(HEADER) as f:
        text = f.read().split(CUDA_SECTION)[0]
    return "".join(line for line in text.splitlines(True) if not line.lstrip().startswith("#"))


def _rel(path: str) -> str:
    # setuptools prefers source paths relative to setup.py's directory (the cwd during a build)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # different drive (Windows)
        return path
    return path if rel.startswith("..") else rel


def make_builder() -> FFI:
    found = probe()
    ffi = FFI()
    ffi.cdef(_cdef())
    ffi.set_source(
        MODULE,
        '#include "lowrank.h"\n',
        sources=[_rel(path) for path in SOURCES],
        include_dirs=[_rel(HERE)],
        depends=[_rel(path) for path in [HEADER] + KERNELS],
        extra_compile_args=found["cflags"],
        extra_link_args=found["ldflags"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # by hand: python ext/build_cpu.py  → tinyslim/kernels/_lowrank_cpu*.so
    os.chdir(ROOT)
    print("probe:", probe(), file=sys.stderr)
    ffibuilder = make_builder()
    ffibuilder.compile(tmpdir=".", verbose=True)
