"""Where the time goes: the server under one of make bench's target loads, its threads' CPU
read from /proc and their Python stacks sampled by py-spy over the same window.

    python bench/profile_loads.py [--load decode|echo|stream|loglik ...] [--duration S] [--out DIR]

For each load (by default all: (a) single-image Decode at 64 in flight, on the server and on
make bench's echo server, (b) a FLOAT32 SampleStream of 1,024-image chunks, (c)
LogLikelihood with K = 1000 at 4 in flight) it prints, per thread of the server, the cores it
used and the share of its busy samples by where the innermost Python frame is: gRPC and the
event loop (grpc.aio's Cython and uvloop show as the loop's own frame), ONNX Runtime's runs,
numpy, prometheus_client, our code, and a thread pool's waiting and hand-offs. The client
(this process) and the machine's idle share are given beside them (py-spy's own CPU counts
as busy there). A C function called from Python counts where it was called from: numpy's
C functions called by our code count as our code, ONNX Runtime's run as ONNX Runtime's
Python wrapper. Calls/s come from the load generator's own window, which spans the sampled
one by a second on each side; µs per call divide a thread's cores by that rate. py-spy
samples without pausing the server (--nonblocking), so the load runs at nearly its full
speed; the raw samples are kept in --out for a closer look.

Needs py-spy (the dev extra), Python 3.11 or later (where py-spy names a thread by the id
that /proc knows it by), and the right to trace another process (root, or
kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from run import ROOT, Process, echo_cmd, server_cmd

from vae_client.bench import BenchResult, run_bench
from vae_core.manifest import load_manifest

LOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "decode": ("(a) Decode, 1 image per call, c=64",
               {"method": "decode", "concurrency": 64}),
    # The transport limit of (a): the echo server (make bench's) under the same load.
    "echo": ("(a) the echo server under the same Decode load",
             {"method": "decode", "concurrency": 64}),
    "stream": ("(b) SampleStream FLOAT32, chunks of 1,024",
               {"method": "stream", "batch": 1024, "dtype": "float32", "stream_n": 200_000}),
    "loglik": ("(c) LogLikelihood K=1000, 1 image per call, c=4",
               {"method": "loglik", "batch": 1, "k": 1000, "concurrency": 4}),
}
OTHER = "other"
GRPC = "gRPC and event loop"
# gRPC's poller thread runs Cython from threading's Thread.run: all of it is gRPC's.
GRPC_THREADS = ("_poll_wrapper",)
# Where a sample's innermost Python frame lies (py-spy --full-filenames), first match wins.
CATEGORIES = [
    ("ONNX Runtime", ("/onnxruntime/",)),
    ("prometheus_client", ("/prometheus_client/",)),
    ("numpy", ("/numpy/",)),
    ("our code", ("/vae_server/", "/vae_export/", "/vae_proto/")),
    # A worker waiting for work, or handing its result back (concurrent.futures).
    ("thread pool", ("/concurrent/futures/",)),
    (GRPC, ("/grpc/", "/asyncio/", "/uvloop/", "/grpc_health/", "/grpc_reflection/")),
]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def category(path: str) -> str:
    for name, marks in CATEGORIES:
        if any(m in path for m in marks):
            return name
    return OTHER


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread's name (comm) and CPU seconds so far."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def machine_idle() -> tuple[float, float]:
    """(idle, total) jiffies of all cores so far."""
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in cpu]
    return values[3] + values[4], sum(values)


@dataclass
class Samples:
    names: dict[int, str]  # tid -> Python thread name
    by_thread: dict[int, collections.Counter[str]]  # tid -> category -> samples
    top: dict[int, collections.Counter[str]]  # tid -> innermost frame -> samples


def parse_raw(path: Path) -> Samples:
    """py-spy's raw format: one line per distinct stack, `frame;frame;... count`, the first
    frame `thread (TID): NAME` (--threads), each frame `function (file:line)`."""
    names: dict[int, str] = {}
    by_thread: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    top: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].startswith("thread ("):
            continue
        tid_text, _, name = frames[0][len("thread ("):].partition("): ")
        tid = int(tid_text, 0)
        names[tid] = name
        inner = frames[-1] if len(frames) > 1 else ""
        where = inner[inner.rfind(" (") + 2 : -1] if inner.endswith(")") else ""
        grpc_thread = any(g in name for g in GRPC_THREADS)
        by_thread[tid][GRPC if grpc_thread else category(where)] += int(count)
        top[tid][inner.rsplit(":", 1)[0] + ")" if inner else "-"] += int(count)
    return Samples(names, by_thread, top)


def profile(load: str, model_dir: Path, duration: int, rate: int, out: Path,
            py_spy: str) -> dict[str, Any]:
    title, kw = LOADS[load]
    raw = out / f"{load}.raw"
    cmd = server_cmd(model_dir, True, 0)
    if load == "echo":
        cmd = echo_cmd(load_manifest(model_dir)["latent_dim"])
    with Process(cmd) as srv:
        pid = srv.proc.pid
        result: dict[str, Any] = {}
        # The load runs longer than the window on both sides; the window starts after its
        # warm-up.
        warmup = 1.5

        def drive() -> None:
            try:
                result["r"] = asyncio.run(run_bench(srv.target, duration=duration + 2.0,
                                                    warmup=warmup, **kw))
            except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
                result["error"] = exc

        loader = threading.Thread(target=drive)
        loader.start()
        time.sleep(warmup + 0.2)
        cpu0, idle0, me0 = thread_cpu(pid), machine_idle(), time.process_time()
        t0 = time.monotonic()
        spy = subprocess.run([py_spy, "record", "--pid", str(pid), "--duration",
                              str(duration), "--rate", str(rate), "--format", "raw",
                              "--threads", "--nonblocking", "--full-filenames",
                              "--output", str(raw)], capture_output=True, text=True,
                             timeout=duration + 60)
        wall = time.monotonic() - t0
        cpu1, idle1, me1 = thread_cpu(pid), machine_idle(), time.process_time()
        loader.join()
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}")
    if "error" in result:
        raise RuntimeError(f"the load failed: {result['error']!r}")
    r: BenchResult = result["r"]
    samples = parse_raw(raw)
    if samples.names and not set(samples.names) & set(cpu1):
        raise RuntimeError("py-spy's thread ids are none of /proc's: Python 3.11 or later "
                           "is needed")
    # A stream's images count as they arrive; its "call" here is a chunk's worth of images.
    per_call = r.calls_per_s if load != "stream" else r.images_per_s / kw["batch"]
    unit = f"{kw['batch']:,} images" if load == "stream" else "call"
    threads = []
    for tid, (comm, seconds) in cpu1.items():
        if tid not in cpu0:
            continue
        cores = (seconds - cpu0[tid][1]) / wall
        counts = samples.by_thread.get(tid, collections.Counter())
        total = sum(counts.values())
        threads.append({
            "tid": tid, "name": samples.names.get(tid, comm), "cores": cores,
            "us_per_call": cores / per_call * 1e6 if per_call else None,
            "samples": total,
            "shares": {c: n / total for c, n in counts.most_common()} if total else {},
            "top": samples.top.get(tid, collections.Counter()).most_common(5),
        })
    threads.sort(key=lambda t: -t["cores"])
    idle_j, total_j = idle1[0] - idle0[0], idle1[1] - idle0[1]
    return {
        "load": load, "title": title, "window_s": wall, "load_window_s": r.duration_s,
        "calls_per_s": r.calls_per_s, "images_per_s": r.images_per_s,
        "per_s": per_call, "errors": r.errors, "per_call_unit": unit,
        "client_cores": (me1 - me0) / wall,
        "machine_idle": idle_j / total_j if total_j else None,
        "cores": os.cpu_count(),
        "threads": threads,
    }


def markdown(p: dict[str, Any]) -> str:
    names = [c for c, _ in CATEGORIES] + [OTHER]
    rate = (f"{p['images_per_s']:,.0f} images/s" if p["per_call_unit"] != "call"
            else f"{p['calls_per_s']:,.0f} calls/s")
    idle = f"{p['machine_idle']:.0%}" if p["machine_idle"] is not None else "?"
    lines = [f"**{p['title']}**: {rate} over the load's {p['load_window_s']:.1f} s; over the "
             f"{p['window_s']:.1f} s sampled, the client (this process) "
             f"{p['client_cores']:.2f} cores, the machine {idle} idle "
             f"({p['cores']} cores).", "",
             f"| server thread | cores | µs per {p['per_call_unit']} | "
             + " | ".join(names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for t in p["threads"]:
        if t["cores"] < 0.01:
            continue
        shares = " | ".join(f"{t['shares'][c]:.0%}" if c in t["shares"] else ""
                            for c in names)
        per_call = f"{t['us_per_call']:,.0f}" if t["us_per_call"] is not None else ""
        lines.append(f"| {t['name']} ({t['tid']}) | {t['cores']:.2f} | {per_call} | {shares} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", nargs="+", choices=list(LOADS), default=list(LOADS))
    ap.add_argument("--model-dir", default=str(ROOT / "models/default"))
    ap.add_argument("--duration", type=int, default=8,
                    help="whole seconds sampled per load (py-spy's --duration)")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", default=str(ROOT / "bench-results/profile"))
    args = ap.parse_args()
    if sys.version_info < (3, 11):
        print("Python 3.11 or later is needed: before it, py-spy does not name threads by the "
              "ids that /proc knows them by", file=sys.stderr)
        return 2
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy not found: pip install py-spy (the dev extra)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for load in args.load:
        p = profile(load, Path(args.model_dir), args.duration, args.rate, out, py_spy)
        results.append(p)
        print(markdown(p), flush=True)
    (out / "profile.json").write_text(json.dumps(results, indent=2))
    (out / "profile.md").write_text("\n".join(markdown(p) for p in results))
    print(f"written: {out / 'profile.json'}, {out / 'profile.md'}, raw samples {out}/*.raw")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
