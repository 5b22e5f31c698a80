"""Independent experiment runs on several processes: how the demo uses both cores.

A training step of the tiny model is a chain of small matrix products, which one core runs about as
fast as two (threads cost more than they save at these sizes). Whole runs, on the other hand, are
independent: a (method, seed) run of scenario A shares nothing with another. So the suite hands each
run to a worker process, each worker single-threaded, and gets ~n× the throughput on n cores.

    results, seconds, used = run_jobs([Job("er seed 0", fn, args), …], base_model, workers=2)

``fn(base_model, *args)`` must be a module-level function (workers import it by name). Every run is
seeded by its own arguments (docs/methods.md §0 streams) and uses one kernel thread (the C kernels sum dA,
dB per thread, so the thread count changes the last bits), so the results are bit-identical whatever
the number of workers and the order in which runs finish (with workers=1, when this process's NumPy
also runs on one BLAS thread, as `make demo` sets: OpenBLAS's results change with its thread count). Workers are started with "spawn" and
OPENBLAS_NUM_THREADS=1 in their environment, so NumPy in the worker starts single-threaded whatever
the parent was given; workers=1 runs everything in this process, with progress bars. Spawned workers
re-import the caller's main module: from a script, call run_jobs under ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Job", "run_jobs", "default_workers"]

_BASE = None  # the base model, set once in each worker


@dataclass
class Job:
    label: str  # e.g. "continual er seed 0": the key of its result and its progress line
    fn: Callable  # fn(base_model, *args) -> result; module-level
    args: tuple = ()


def default_workers() -> int:
    """One worker per core (the machine's cores as this process may use them), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _main_is_importable() -> bool:
    """Spawned workers re-import the parent's __main__ by its file (or module name); code typed at an
    interactive prompt or piped through `python -` has neither, and a worker would die at start."""
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    path = getattr(main, "__file__", None)
    return spec is not None or (path is not None and os.path.exists(path))


def _init_worker(base_model) -> None:
    global _BASE
    from .. import kernels

    kernels.set_num_threads(1)  # the C kernels too: one thread per worker
    _BASE = base_model


def _call(fn, args):
    t0 = time.perf_counter()
    return fn(_BASE, *args), time.perf_counter() - t0


def run_jobs(jobs: list[Job], base_model, workers: int = 1, log=print,
             progress: bool = True) -> tuple[dict, dict, int]:
    """({job.label: fn(base_model, *job.args)}, {job.label: seconds}, the number of processes that ran
    them) for every job, on `workers` processes (1: here, in order)."""
    from tqdm.auto import tqdm

    labels = [j.label for j in jobs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"job labels must be unique, got {labels}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out, seconds = {}, {}
    if workers > 1 and len(jobs) > 1 and not _main_is_importable():
        log("note: running in this process (workers = 1): worker processes need a main module they can "
            "import (a script or `python -m`), not an interactive session or `python -`")
        workers = 1
    if workers == 1 or len(jobs) <= 1:
        from .. import kernels

        threads = kernels.get_num_threads()
        kernels.set_num_threads(1)  # as in a worker: the same bits whatever `workers` is
        try:
            for i, job in enumerate(jobs):
                t0 = time.perf_counter()
                out[job.label] = job.fn(base_model, *job.args)
                seconds[job.label] = time.perf_counter() - t0
                log(f"[{i + 1}/{len(jobs)}] {job.label}: {seconds[job.label]:.0f} s")
        finally:
            kernels.set_num_threads(threads)
        return out, seconds, 1

    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(workers, len(jobs))
    single = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TINYSLIM_NUM_THREADS": "1"}
    saved = {k: os.environ.get(k) for k in single}
    os.environ.update(single)  # inherited by the spawned workers, read by NumPy when they import it
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(base_model,)) as pool:
            futures = {pool.submit(_call, job.fn, job.args): job.label for job in jobs}
            bar = tqdm(total=len(jobs), unit="run", desc=f"{workers} workers", leave=False,
                       disable=not progress)
            for future in as_completed(futures):
                label = futures[future]
                out[label], seconds[label] = future.result()  # a worker's exception is raised here
                bar.update(1)
                (tqdm.write if log is print else log)(f"[{len(out)}/{len(jobs)}] {label}: {seconds[label]:.0f} s")
            bar.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # in the jobs' order, whatever order they finished in
    return {label: out[label] for label in labels}, seconds, workers
