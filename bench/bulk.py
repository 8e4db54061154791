"""`vae-client bulk` beside one SampleStream: images per second written to disk, from the same
servers, by one stream into one .npy (`vae-client sample --streams 1`) and by the bulk job in
each format, on a local Ray cluster and without Ray.

    python bench/bulk.py --model-dir models/default --n 200000 --servers 2 --workers 4
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from run import Process, vae_server_cmd  # bench/run.py

from vae_core.ports import free_port

BIN = Path(sys.executable).parent
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
       "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models/default"))
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--shard-size", type=int, default=20_000)
    p.add_argument("--json", type=Path, default=Path("bench-results/bulk.json"))
    args = p.parse_args()
    rows: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        ports = [stack.enter_context(Process(vae_server_cmd(args.model_dir), settle=0.0)).port
                 for _ in range(args.servers)]
        time.sleep(2.0)
        ray_port = free_port()
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={ray_port}",
                        "--include-dashboard=false", "--disable-usage-stats"], check=True,
                       env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(subprocess.run, [str(BIN / "ray"), "stop", "--force"], env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one = f"127.0.0.1:{ports[0]}"
        many = "ipv4:" + ",".join(f"127.0.0.1:{q}" for q in ports)
        client = [str(BIN / "vae-client"), "--target"]
        seconds = timed([*client, one, "sample", "--n", str(args.n), "--dtype", "uint8",
                         "--stream", "--streams", "1", "--no-progress", "--out",
                         f"{tmp}/one.npy"])
        rows["one SampleStream, one server, .npy"] = args.n / seconds
        for fmt in ("npz", "webdataset", "parquet"):
            for ray in (True, False):
                out = Path(tmp) / f"{fmt}-{ray}"
                extra = ["--ray-address", f"127.0.0.1:{ray_port}"] if ray else ["--no-ray"]
                seconds = timed([*client, many, "bulk", "--n", str(args.n), "--shard-size",
                                 str(args.shard_size), "--format", fmt, "--workers",
                                 str(args.workers), "--no-progress", "--out", str(out),
                                 *extra])
                name = (f"bulk {fmt}, {args.workers} workers on "
                        f"{'Ray' if ray else 'threads'}, {args.servers} servers")
                rows[name] = args.n / seconds
                shutil.rmtree(out)
    base = rows["one SampleStream, one server, .npy"]
    for name, value in rows.items():
        print(f"{name:<55} {value:>10,.0f} images/s  {value / base:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "n": args.n, "servers": args.servers,
        "workers": args.workers, "images_per_s": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
