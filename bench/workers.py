"""What `vae-server --workers N` buys: single-image Decode calls per second from several client
processes (each its own channel, so the kernel can spread their connections over the workers),
against servers of 1 and N workers started in turn, in alternating rounds.

    python bench/workers.py --model-dir models/default --workers 2 --clients 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from run import Process, median_ratio, ratios_text, vae_server_cmd  # bench/run.py

BIN = Path(sys.executable).parent


def measure(model_dir: Path, workers: int, clients: int, concurrency: int,
            seconds: float) -> float:
    # Two seconds after SERVING: every worker warmed up.
    with Process(vae_server_cmd(model_dir, "--workers", str(workers)), settle=2.0) as srv:
        loads = [subprocess.Popen([str(BIN / "vae-client"), "bench", "--target", srv.target,
                                   "--method", "decode", "--concurrency", str(concurrency),
                                   "--duration", str(seconds), "--json"],
                                  stdout=subprocess.PIPE, text=True) for _ in range(clients)]
        total = 0.0
        for p in loads:
            out, _ = p.communicate(timeout=seconds + 120)
            result = json.loads(out)
            if result.get("errors"):
                raise RuntimeError(f"errors under load: {result['errors']}")
            total += result["calls_per_s"]
        return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models/default"))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--clients", type=int, default=4, help="client processes")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight per client")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("bench-results/workers.json"))
    args = p.parse_args()
    figures: dict[int, list[float]] = {1: [], args.workers: []}
    for r in range(1, args.rounds + 1):
        order = (1, args.workers) if r % 2 else (args.workers, 1)
        for w in order:
            value = measure(args.model_dir, w, args.clients, args.concurrency, args.seconds)
            figures[w].append(value)
            print(f"round {r}  workers {w}: {value:10,.0f} Decode calls/s "
                  f"({args.clients} clients x {args.concurrency} in flight)", flush=True)
    ratio, rounds = median_ratio(figures[1], figures[args.workers])
    print(f"\n{args.workers} workers / 1: {ratios_text(ratio, rounds)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "clients": args.clients, "concurrency": args.concurrency,
        "seconds": args.seconds, "figures": {str(k): v for k, v in figures.items()},
        "median_round_ratio": ratio, "round_ratios": rounds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
