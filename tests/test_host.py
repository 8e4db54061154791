"""What the process may use of the machine: cores() under a CPU affinity and a cgroup quota,
read from a fake cgroup tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vae_core.host import cores, cpu_quota, quota_cores


@pytest.fixture
def node_of_64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64-core node, as a pod's affinity shows it whatever its CPU limit."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


def test_a_pod_limited_to_2_cpus_counts_2_cores_on_a_64_core_node(tmp_path, node_of_64):
    """Before: cores() counted the affinity alone, so --threads 0 and --instances 0 took 64
    threads in a pod that the kernel throttles to 2 CPUs."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("200000 100000\n")  # cgroup v2, inside the container
    proc = _proc(tmp_path, "0::/\n")
    assert cpu_quota(root, proc) == 2.0
    assert cores(root, proc) == 2
    assert quota_cores(root, proc) == 2  # --threads 0: 2, not ONNX Runtime's 64
    (root / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: one thread's worth
    assert cores(root, proc) == 1
    (root / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one
    assert cores(root, proc) == 1


def test_no_quota_leaves_the_affinity(tmp_path, node_of_64):
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = _proc(tmp_path, "0::/\n")
    assert cores(root, proc) == 64  # no cpu.max at all
    (root / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(root, proc) is None and cores(root, proc) == 64
    assert quota_cores(root, proc) == 0  # ONNX Runtime's own default stays
    (root / "cpu.max").write_text("garbage\n")
    assert cores(root, proc) == 64
    assert cores(tmp_path / "absent", tmp_path / "absent-proc") == 64


def test_the_smallest_quota_on_the_way_up_counts(tmp_path, node_of_64):
    """On a host (no cgroup namespace) the process's cgroup is the path /proc/self/cgroup
    names, and a parent's quota bounds its children's."""
    root = tmp_path / "cgroup"
    leaf = root / "kubepods.slice" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (root / "kubepods.slice" / "cpu.max").write_text("800000 100000\n")
    (root / "kubepods.slice" / "pod1" / "cpu.max").write_text("300000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    proc = _proc(tmp_path, "0::/kubepods.slice/pod1/ctr\n")
    assert cores(root, proc) == 3


def test_cgroup_v1_cfs_quota(tmp_path, node_of_64):
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("400000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    proc = _proc(tmp_path, "4:memory:/\n3:cpu,cpuacct:/\n0::/\n")
    assert cores(root, proc) == 4
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert cores(root, proc) == 64


def test_a_quota_never_raises_the_count_above_the_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("800000 100000\n")
    assert cores(root, _proc(tmp_path, "0::/\n")) == 2
    assert quota_cores(root, _proc(tmp_path, "0::/\n")) == 0


# Each imports onnxruntime through one of the project's packages, then runs a model on it.
ONNXRUNTIME_USERS = {
    "server": "from vae_server.runtime import ModelRuntime; ModelRuntime(model, provider='cpu')",
    "core": "from vae_core.onnx_model import OnnxVAE; OnnxVAE(model).sample(2, seed=0)",
    "export": "import vae_export.onnx_export; from vae_core.onnx_model import OnnxVAE; "
              "OnnxVAE(model)",
}


@pytest.mark.parametrize("package", sorted(ONNXRUNTIME_USERS))
def test_onnxruntime_sends_no_telemetry(package, model_dir, tmp_path):
    """Before: ONNX Runtime's telemetry, on unless ORT_DISABLE_TELEMETRY is set before its
    import, kept a device id under ~/.cache/Microsoft in every process that ran a model (and
    sent usage events from it)."""
    import subprocess
    import sys

    # A bare environment: ONNX Runtime also turns its telemetry off where CI is set, as
    # CI runners do, and the control below would find nothing there.
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    code = f"model = {str(model_dir)!r}\n{ONNXRUNTIME_USERS[package]}"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / ".cache").exists()
    # The control: the same process with the variable turned back on does keep one.
    env["ORT_DISABLE_TELEMETRY"] = "0"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert (tmp_path / ".cache" / "Microsoft").is_dir()
