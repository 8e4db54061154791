"""Server settings: the one place they are read. Every flag of `vae-server` is also settable
as an environment variable with the prefix VAE_ (e.g. --max-batch-size / VAE_MAX_BATCH_SIZE);
a flag given on the command line wins over the environment."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Settings:
    model_dir: str = _doc("model directory written by `vae-export onnx` (manifest.json, *.onnx)",
                          default="models/default")
    host: str = _doc("address to bind the gRPC port on", default="[::]")
    port: int = _doc("gRPC port; 0 picks a free one", default=50051)
    metrics_port: int = _doc("Prometheus /metrics port; 0 picks a free one, -1 disables",
                             default=8000)
    provider: str = _doc("execution provider: auto (CUDA where it works, else CPU), cuda or cpu",
                         default="auto")
    threads: int = _doc("ONNX Runtime intra-op threads per session; 0 = one per core",
                        default=0)
    spinning: bool = _doc("let ONNX Runtime's idle worker threads spin (lower latency on cores "
                          "of its own, CPU taken from gRPC on shared ones)", default=False)
    batching: bool = _doc("merge concurrent calls into one model run (dynamic batching)",
                          default=True)
    max_batch_size: int = _doc("most images in one model run", default=2048)
    max_queue_images: int = _doc(
        "most images waiting per model; a call that does not fit gets RESOURCE_EXHAUSTED",
        default=65536)
    max_delay_ms: float = _doc(
        "how long a batch may wait to fill while the model is busy (never when it is idle)",
        default=0.0)
    max_images_per_request: int = _doc("most images in one Encode, Decode or LogLikelihood call",
                                       default=8192)
    max_sample_n: int = _doc("most images in one Sample call", default=8192)
    max_stream_n: int = _doc("most images in one SampleStream call", default=10_000_000)
    max_chunk_size: int = _doc("most images in one SampleStream chunk", default=8192)
    default_chunk_size: int = _doc("SampleStream chunk size when the caller gives 0",
                                   default=1024)
    max_k: int = _doc("most importance samples per image in LogLikelihood", default=10000)
    max_message_mb: int = _doc("largest gRPC message received or sent, MiB", default=64)
    warmup_rounds: int = _doc("passes over the warm-up batch sizes before reporting SERVING",
                              default=3)
    grace_seconds: float = _doc("on SIGTERM, how long calls in flight may take to finish",
                                default=10.0)
    log_level: str = _doc("logging level", default="INFO")

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog="vae-server",
        description="Serve an exported VAE over gRPC (vae.v1.VaeService, health, reflection) "
        "with dynamic batching and Prometheus metrics. Every option can also be set by an "
        "environment variable: VAE_ and the option's name in capitals, e.g. VAE_MODEL_DIR.",
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        var = "VAE_" + f.name.upper()
        parsers: dict[type, Callable[[str], Any]] = {bool: _parse_bool, int: int, float: float,
                                                     str: str}
        kind = parsers[type(f.default) if f.default is not dataclasses.MISSING else str]
        default = kind(env[var]) if var in env else f.default
        p.add_argument(flag, dest=f.name, type=kind, default=default,
                       help=f"{f.metadata['help']} [{var}] (default: %(default)s)")
    return p


def load_settings(argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    args = build_parser(env).parse_args(argv)
    settings = Settings(**vars(args))
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.provider not in ("auto", "cuda", "cpu"):
        raise SystemExit(f"vae-server: --provider must be auto, cuda or cpu, not {s.provider!r}")
    for name in ("max_batch_size", "max_queue_images", "max_images_per_request", "max_sample_n",
                 "max_stream_n", "max_chunk_size", "default_chunk_size", "max_k",
                 "max_message_mb"):
        if getattr(s, name) < 1:
            raise SystemExit(f"vae-server: --{name.replace('_', '-')} must be >= 1")
    # A call that could never fit in the queue would be told "queue full, retry" forever.
    for name in ("max_batch_size", "max_images_per_request", "max_sample_n", "max_chunk_size"):
        if getattr(s, name) > s.max_queue_images:
            raise SystemExit(
                f"vae-server: --{name.replace('_', '-')} ({getattr(s, name)}) must not exceed "
                f"--max-queue-images ({s.max_queue_images})")
