"""bench/profile_loads.py (`make profile`): where the server's time goes under the benchmark's
target loads. The parser of py-spy's raw samples on a known file, and a short real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import profile_loads  # noqa: E402

SITE = "/venv/lib/python3.11/site-packages"
LOOP = "thread (4101): MainThread;run (/py/asyncio/runners.py:118)"
WORKER = "thread (4102): vae-run_0;_worker (/py/concurrent/futures/thread.py:83)"
RAW = f"""\
{LOOP} 70
{LOOP};Decode (/src/server/vae_server/servicer.py:294) 15
{LOOP};run ({SITE}/onnxruntime/capi/onnxruntime_inference_collection.py:266) 10
thread (4101): MainThread;observe ({SITE}/prometheus_client/metrics.py:640) 5
{WORKER} 3
{WORKER};log_weights (/src/export/vae_export/likelihood.py:90);sum ({SITE}/numpy/sum.py:8) 7
thread (4103): Thread-1 (_poll_wrapper);run (/py/threading.py:975) 4
thread (4104): Thread-9;mystery (/elsewhere/x.py:1) 2
"""


def test_samples_are_sorted_by_thread_and_by_where_their_innermost_frame_lies(
        tmp_path: Path) -> None:
    raw = tmp_path / "decode.raw"
    raw.write_text(RAW)
    s = profile_loads.parse_raw(raw)
    assert s.names == {4101: "MainThread", 4102: "vae-run_0", 4103: "Thread-1 (_poll_wrapper)",
                       4104: "Thread-9"}
    assert s.by_thread[4101] == {"gRPC and event loop": 70, "our code": 15, "ONNX Runtime": 10,
                                 "prometheus_client": 5}
    # The innermost frame decides: numpy called from our code counts as numpy.
    assert s.by_thread[4102] == {"thread pool": 3, "numpy": 7}
    # gRPC's poller runs Cython under threading's Thread.run: all of it is gRPC's.
    assert s.by_thread[4103] == {"gRPC and event loop": 4}
    assert s.by_thread[4104] == {"other": 2}
    assert s.top[4101].most_common(1) == [("run (/py/asyncio/runners.py)", 70)]


def test_thread_cpu_reads_a_threads_user_and_system_time() -> None:
    """The /proc fields are utime + stime: against the thread's own clock, after work in
    both (stat calls spend system time)."""
    # A fixed amount of the thread's own CPU time, not of wall time, which a busy machine
    # may give to other processes.
    t0 = time.thread_time()
    give_up = time.perf_counter() + 30
    while time.thread_time() - t0 < 0.2 and time.perf_counter() < give_up:
        os.stat("/")
    spent = time.thread_time() - t0
    threads = profile_loads.thread_cpu(os.getpid())
    name, seconds = threads[threading.get_native_id()]
    assert name  # comm, e.g. "python"
    assert spent > 0.1
    assert seconds == pytest.approx(time.thread_time(), abs=0.03)


@pytest.mark.e2e
def test_a_short_profile_of_single_image_decode(model_dir: Path, tmp_path: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        pytest.fail("py-spy is missing: it is in the dev extra")
    proc = subprocess.run(
        # The test model's runs are a few per cent of the loop's time: enough samples (3 s at
        # 250 Hz) that some of them land in ONNX Runtime.
        [sys.executable, str(BENCH / "profile_loads.py"), "--load", "decode", "--duration", "3",
         "--rate", "250", "--model-dir", str(model_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "py-spy failed" in proc.stderr and (
            "Permission denied" in proc.stderr or "Operation not permitted" in proc.stderr):
        pytest.skip("this machine does not let py-spy trace another process (ptrace)")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [p] = json.loads((tmp_path / "profile.json").read_text())
    assert p["load"] == "decode" and p["errors"] == {} and p["calls_per_s"] > 0
    assert 1.5 < p["window_s"] < 5 and p["load_window_s"] > p["window_s"]
    assert 0 <= p["machine_idle"] <= 1 and p["client_cores"] > 0
    # py-spy's thread names joined to /proc's threads by their ids.
    loop = next(t for t in p["threads"] if t["name"] == "MainThread")
    # The event loop's thread does the serving: gRPC's part, the inline model runs, ours; a
    # loaded server's loop is busy most of the time.
    assert 0.3 < loop["cores"] <= 1.05 and loop["samples"] > 50
    assert loop["shares"]["gRPC and event loop"] > 0.2
    assert loop["shares"].get("ONNX Runtime", 0) > 0 and loop["shares"].get("our code", 0) > 0
    assert 20 < loop["us_per_call"] < 5000
    md = (tmp_path / "profile.md").read_text()
    assert "| MainThread (" in md and "(a) Decode, 1 image per call, c=64" in md
    assert (tmp_path / "decode.raw").stat().st_size > 0
