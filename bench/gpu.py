"""`make bench-gpu`: the GPU path measured in one run, on a machine with onnxruntime-gpu and a
GPU (BENCHMARKS.md, "GPU path", says how to measure it).

1. In process, the decoder at a few batch sizes: plain session.run on the CPU and on CUDA,
   CUDA with IO binding (`--io-binding on`), and with CUDA graphs (`--cuda-graphs true`).
2. The server on CUDA with each of the three: single-image Decode at concurrency 1, 16 and 64
   against the echo server; SampleStream against the fastest in-process CUDA stream work;
   LogLikelihood K = 1000 against the estimator in process on CUDA.

Every figure is printed with its ratio, as `make bench` does; the table goes to
--out/gpu.md and gpu.json with the card's name. `--provider cpu` runs the same steps without
a GPU (the CUDA-only variants left out), to check the script itself.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from run import (
    ROOT,
    Process,
    _cpu_name,
    add_row,
    bench,
    callers_rate,
    echo_cmd,
    in_process_loglik_images,
    in_process_stream_images,
    markdown,
    server_cmd,
)

from vae_client.bench import BenchResult
from vae_core.onnx_model import OnnxVAE
from vae_core.ort import ort
from vae_server.runtime import CPU, CUDA, ModelRuntime, ProviderError, with_options

SIZES = (1, 16, 64, 256, 1024, 2048)


class Decoder:
    """What the in-process stream measure needs of a model, over a ModelRuntime's runs."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.latent_dim = runtime.latent_dim
        self.prior = runtime.prior

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.runtime.run_decoder(z)[0]


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "no GPU seen by nvidia-smi"


def decode_rate(runtime: ModelRuntime, n: int, seconds: float) -> float:
    z = np.random.default_rng(0).standard_normal((n, runtime.latent_dim), dtype=np.float32)

    def step(c: int, i: int) -> int:
        runtime.run_decoder(z)
        return n

    step(0, 0)
    return callers_rate(step, seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default=str(ROOT / "models/default"))
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--chunk", type=int, default=1024, help="SampleStream chunk size")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)),
                   help="decoder batch sizes measured in process")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    args = p.parse_args()
    if args.provider == "cuda" and CUDA not in ort.get_available_providers():
        print(f"bench-gpu: no CUDA provider in this onnxruntime "
              f"({ort.get_available_providers()}): install onnxruntime-gpu, or --provider cpu",
              file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = args.duration
    sizes = [int(n) for n in args.sizes.split(",")]
    cuda = args.provider == "cuda"
    # name -> (ModelRuntime options, vae-server flags); the CUDA-only ones only on CUDA.
    variants: dict[str, tuple[dict[str, Any], list[str]]] = {
        "plain": ({"io_binding": "off"}, ["--io-binding", "off"]),
        "IO binding": ({"io_binding": "on"}, ["--io-binding", "on"]),
    }
    if cuda:
        variants["CUDA graphs"] = ({"io_binding": "on", "cuda_graphs": True},
                                   ["--io-binding", "on", "--cuda-graphs", "true"])
    rows: list[dict[str, Any]] = []

    row = functools.partial(add_row, rows)

    # 1. In process: the decoder alone, each batch size.
    cpu_rt = ModelRuntime(model_dir, provider="cpu")
    # Bound runs up to the server's default --max-batch-size, as served.
    runtimes: dict[str, ModelRuntime] = {}
    for name, (kw, _) in variants.items():
        try:  # --provider cuda refuses where onnxruntime-gpu would fall back to the CPU
            runtimes[name] = ModelRuntime(model_dir, provider=args.provider,
                                          max_rows=max(2048, *sizes), **kw)
        except ProviderError as exc:
            print(f"bench-gpu: {exc}", file=sys.stderr)
            return 2
    for rt in runtimes.values():
        rt.warm_up(sizes)
    for n in sizes:
        section = f"decoder in process, N={n}"
        base = decode_rate(cpu_rt, n, d)
        row(section, "CPU, session.run", base, "images/s", None, "compute")
        for name, rt in runtimes.items():
            row(section, f"{rt.provider.removesuffix('ExecutionProvider')}, {name}",
                decode_rate(rt, n, d), "images/s", base, "CPU")

    # 2. The server on the provider, each variant, beside its limits.
    stream_limit = {dtype: max(in_process_stream_images(Decoder(rt), args.chunk, dtype, d)
                               for rt in runtimes.values())
                    for dtype in ("float32", "uint8")}
    for dtype, value in stream_limit.items():
        row(f"SampleStream {dtype}", "in process, fastest variant", value, "images/s", None,
            "compute")
    providers = [CUDA, CPU] if cuda else [CPU]
    # With the servers' provider options: float32 products on CUDA, as they run.
    estimator = OnnxVAE(model_dir, providers=with_options(providers))
    if estimator.decoder.get_providers()[0] != providers[0]:
        print(f"bench-gpu: the estimator fell back to {estimator.decoder.get_providers()[0]}",
              file=sys.stderr)
        return 2
    # Warmed up first, as the servers are: CUDA's first runs pay for its initialisation.
    in_process_loglik_images(estimator, 1000, min(d, 1.0))
    loglik_limit = in_process_loglik_images(estimator, 1000, d)
    row("LogLikelihood K=1000", "in-process estimator", loglik_limit, "images/s", None,
        "compute")
    echo: dict[int, BenchResult] = {}
    with Process(echo_cmd(estimator.latent_dim, args.chunk)) as srv:
        for c in (1, 16, 64):
            r = echo[c] = bench(srv.target, "decode", d, concurrency=c)
            row("decode, 1 image per call", f"echo server, c={c}", r.calls_per_s, "calls/s",
                None, "transport", r)
    for name, (_, flags) in variants.items():
        cmd = server_cmd(model_dir, True, 0, "auto", False, "--provider", args.provider, *flags)
        # `--provider cuda` does not start where ONNX Runtime would fall back to the CPU
        # (Process shows its output): no CPU figure goes out under a CUDA variant's name.
        with Process(cmd) as srv:
            for c in (1, 16, 64):
                r = bench(srv.target, "decode", d, concurrency=c)
                row("decode, 1 image per call", f"{name}, c={c}", r.calls_per_s, "calls/s",
                    echo[c].calls_per_s, f"echo c={c}", r, limit_errors=echo[c].errors)
            for dtype in ("float32", "uint8"):
                r = bench(srv.target, "stream", d, batch=args.chunk, dtype=dtype,
                          stream_n=500_000)
                row(f"SampleStream {dtype}", name, r.images_per_s, "images/s",
                    stream_limit[dtype], "in process", r)
            for c in (1, 4):
                r = bench(srv.target, "loglik", d, batch=1, k=1000, concurrency=c)
                row("LogLikelihood K=1000", f"{name}, c={c}", r.images_per_s, "images/s",
                    loglik_limit, "in process", r)

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": gpu_name() if cuda else f"the CPU only (--provider cpu), {_cpu_name()}",
        "model_dir": str(model_dir),
        "model_version": estimator.manifest["model_version"],
        "command": f"make bench-gpu (bench/gpu.py --provider {args.provider})",
        "duration_s": d, "ort_threads": 0, "ort_spinning": False, "instances": "default",
        "event_loop": "auto", "onnxruntime": ort.__version__,
    }
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2,
                                                        allow_nan=False))
    (out / "gpu.md").write_text(markdown(meta, rows))
    print(f"\nwritten: {out / 'gpu.json'}, {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    t0 = time.monotonic()
    code = main()
    print(f"bench-gpu: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    raise SystemExit(code)
