"""What the process may use of the machine, and how loud its libraries are. Imports nothing
but the standard library, so that one_blas_thread() can run before numpy loads and
quiet_grpc_core() before gRPC does."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"


def cores(cgroup_root: str | Path = CGROUP_ROOT, proc_cgroup: str | Path = "/proc/self/cgroup"
          ) -> int:
    """The cores this process may use: its CPU affinity, which containers narrow, or its
    cgroup's CPU quota where that is smaller (a Kubernetes pod's CPU limit: a pod limited to
    2 CPUs on a 64-core node sees 64 in its affinity). A quota of 1.5 CPUs counts as 1."""
    affinity = _affinity()
    quota = cpu_quota(cgroup_root, proc_cgroup)
    return affinity if quota is None else max(1, min(affinity, math.floor(quota)))


def quota_cores(cgroup_root: str | Path = CGROUP_ROOT,
                proc_cgroup: str | Path = "/proc/self/cgroup") -> int:
    """cores() where the cgroup quota makes it fewer than the affinity, else 0: a thread
    count to set only where a library's own default (ONNX Runtime counts the machine's
    cores) would oversubscribe the quota."""
    limited, affinity = cores(cgroup_root, proc_cgroup), _affinity()
    return limited if limited < affinity else 0


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def cpu_quota(cgroup_root: str | Path = CGROUP_ROOT,
              proc_cgroup: str | Path = "/proc/self/cgroup") -> float | None:
    """The CPUs the cgroup quota allows this process (quota / period), the smallest along its
    cgroup's path up to the root, or None where no quota is set or none can be read. cgroup
    v2: cpu.max ("max 100000", or "200000 100000"); v1: cpu.cfs_quota_us (-1: none) and
    cpu.cfs_period_us under the cpu controller. Inside a container the process's cgroup is
    usually the mount's root; on a host it is the path /proc/self/cgroup names."""
    root = Path(cgroup_root)
    found: list[float] = []
    for v2, relative in _own_cgroups(proc_cgroup):
        for directory in _up_to(root, relative, v2):
            limit = _v2_quota(directory) if v2 else _v1_quota(directory)
            if limit is not None:
                found.append(limit)
    return min(found) if found else None


def _own_cgroups(proc_cgroup: str | Path) -> list[tuple[bool, str]]:
    """(cgroup v2?, path) of each hierarchy that may hold the CPU quota; the root if
    /proc/self/cgroup cannot be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return [(True, "/"), (False, "/")]
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            out.append((True, path))
        elif "cpu" in controllers.split(","):
            out.append((False, path))
    return out or [(True, "/"), (False, "/")]


def _up_to(root: Path, relative: str, v2: bool) -> list[Path]:
    """The cgroup directories from the process's up to the hierarchy's root (v1's: the cpu
    controller's mount, cpu or cpu,cpuacct)."""
    bases = [root] if v2 else [p for p in (root / "cpu", root / "cpu,cpuacct") if p.is_dir()]
    out = []
    for base in bases:
        parts = [p for p in relative.split("/") if p and p != ".."]
        while True:
            out.append(base.joinpath(*parts))
            if not parts:
                break
            parts.pop()
    return out


def _v2_quota(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def one_blas_thread() -> None:
    """Unless set, one thread for numpy's BLAS, which would otherwise start a thread per core
    for every matrix product (the prior's log-density in LogLikelihood) beside ONNX Runtime's
    threads and the server's instances. It takes effect only before numpy loads."""
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def no_onnxruntime_telemetry() -> None:
    """Unless set, ORT_DISABLE_TELEMETRY=1: ONNX Runtime's Linux builds send usage events to
    Microsoft (and keep a device id under ~/.cache/Microsoft) from every process that loads
    it. A server inside someone's network calls no one but whom it is told to, and on a
    read-only root each start logged a warning. Read only when onnxruntime is imported, so
    the project imports it through vae_core.ort, which calls this first;
    ORT_DISABLE_TELEMETRY=0 turns the events back on."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def quiet_grpc_core() -> None:
    """Unless set, GRPC_VERBOSITY=ERROR for the commands (vae-client, vae-server): by default
    gRPC's C core prints its INFO lines (a failed TLS handshake, say) to stderr, above a
    command's one-line error or between the server's formatted log lines. It takes effect
    only before gRPC loads; GRPC_VERBOSITY=INFO shows them again."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
