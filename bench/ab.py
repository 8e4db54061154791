"""Interleaved A/B of two checkouts of this repository under the same loads: the server of each
tree, started fresh for every figure, driven by this tree's load generator, in rounds A B, B A,
A B ... so that the machine's drift hits both alike. Prints each round's ratio B / A and their
median.

    python bench/ab.py --a ../base --b . --model-dir models/default --rounds 3

A tree's server runs as `python -m vae_server` with that tree's packages first on PYTHONPATH
(the venv's editable install points at this checkout), on the same model directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from run import Process, median_ratio, ratios_text, vae_server_cmd  # bench/run.py

from vae_client.bench import run_bench

PACKAGES = ("proto", "core", "export", "server", "client")
LOADS = {  # name: run_bench arguments
    "Decode, 1 image per call, c=64": {"method": "decode", "concurrency": 64},
    "SampleStream float32, chunk 1024": {"method": "stream", "batch": 1024,
                                         "dtype": "float32", "stream_n": 200_000},
    "Sample, 1 image per call, c=64": {"method": "sample", "concurrency": 64},
    "Sample, 64 images per call, c=8": {"method": "sample", "batch": 64, "concurrency": 8},
    "Sample, 1024 images per call, c=4": {"method": "sample", "batch": 1024, "concurrency": 4},
}


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a server of `tree`'s packages: its checkout first on PYTHONPATH."""
    path = [str(tree / p) for p in PACKAGES if (tree / p).is_dir()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


SERVED = ("vae_server", "vae_core", "vae_proto")  # the packages a server runs


def check_tree(tree: Path) -> None:
    """Refuse a tree whose server would import a package from elsewhere (an older tree
    without core/, say, would run this checkout's vae_core through the editable install)."""
    found = subprocess.run(
        [sys.executable, "-c", f"import {', '.join(SERVED)}; "
         f"print('\\n'.join(m.__file__ for m in ({', '.join(SERVED)})))"],
        env=tree_env(tree), cwd=tree, capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"ab.py: {tree}'s server cannot import its packages:\n"
                         f"{found.stderr.strip()}")
    for name, file in zip(SERVED, found.stdout.split(), strict=True):
        if not Path(file).resolve().is_relative_to(tree):
            raise SystemExit(f"ab.py: {tree}'s server would import {name} from {file}")


def measure(tree: Path, model_dir: Path, load: dict[str, object], seconds: float) -> float:
    """The load's rate on a server of `tree`'s packages (its checkout on PYTHONPATH)."""
    with Process(vae_server_cmd(model_dir), env=tree_env(tree), cwd=tree) as srv:
        result = asyncio.run(run_bench(srv.target, duration=seconds, warmup=1.0,
                                       **load))  # type: ignore[arg-type]
    if result.errors:
        raise RuntimeError(f"{tree}: errors {result.errors}")
    return result.calls_per_s if load["method"] == "decode" else result.images_per_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="the tree measured first (the base)")
    p.add_argument("--b", type=Path, required=True, help="the tree compared with it")
    p.add_argument("--model-dir", type=Path, default=Path("models/default"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--json", type=Path, default=Path("bench-results/ab.json"))
    p.add_argument("--only", choices=sorted(LOADS), action="append",
                   help="measure only this load (repeatable)")
    args = p.parse_args()
    a, b, model_dir = args.a.resolve(), args.b.resolve(), args.model_dir.resolve()
    loads = {n: LOADS[n] for n in (args.only or LOADS)}
    for tree in (a, b):
        check_tree(tree)
    figures: dict[str, dict[str, list[float]]] = {n: {"a": [], "b": []} for n in loads}
    for r in range(1, args.rounds + 1):
        for name, load in loads.items():
            # The order alternates, so that neither tree always runs after the other.
            order = (("a", a), ("b", b)) if r % 2 else (("b", b), ("a", a))
            for side, tree in order:
                value = measure(tree, model_dir, load, args.seconds)
                figures[name][side].append(value)
                print(f"round {r}  {name:<36} {side}: {value:12,.0f}", flush=True)
    summary = {}
    print()
    for name, f in figures.items():
        ratio, per_round = median_ratio(f["a"], f["b"])
        summary[name] = {**f, "median_round_ratio": ratio, "round_ratios": per_round}
        print(f"{name:<36} b / a = {ratios_text(ratio, per_round)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "a": str(a), "b": str(b), "model_dir": str(model_dir), "seconds": args.seconds,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "figures": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
