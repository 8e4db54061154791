"""What the process may use of the machine. Imports nothing but the standard library, so that
one_blas_thread() can run before numpy loads."""

from __future__ import annotations

import os


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def one_blas_thread() -> None:
    """Unless set, one thread for numpy's BLAS, which would otherwise start a thread per core
    for every matrix product (the prior's log-density in LogLikelihood) beside ONNX Runtime's
    threads and the server's instances. It takes effect only before numpy loads."""
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
