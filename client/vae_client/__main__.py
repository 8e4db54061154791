"""vae-client: call a vae-server from the command line.

    vae-client --target HOST:PORT info [--json]
    vae-client --target HOST:PORT encode --in FILE... --out OUT.npy|OUT.npz [--sample --seed S]
    vae-client --target HOST:PORT decode --in Z.npy|Z.npz --out OUT.npy|OUT.png
    vae-client --target HOST:PORT sample --n N --seed S [--digit D] --out OUT.npy|OUT.png
    vae-client --target HOST:PORT score --in FILE... [--k K] [--json OUT] [--csv OUT]
    vae-client --target HOST:PORT bench --method decode --concurrency 64 --duration 10

Each subcommand is one `add_*` function in COMMANDS: it registers its parser and sets
`run`, which takes the parsed arguments and returns the exit status. Errors print one line,
`vae-client: error: ...`, and exit with status 1 (2 for usage errors, as argparse does).
"""

from __future__ import annotations

from vae_core.host import quiet_grpc_core

quiet_grpc_core()  # before gRPC loads

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeAlias  # noqa: E402

import numpy as np  # noqa: E402

from vae_client import cli_io  # noqa: E402
from vae_client._codec import MAX_TIMEOUT_S, UINT32_MAX, UINT64_MAX  # noqa: E402
from vae_client.channel import (  # noqa: E402
    DEFAULT_MAX_MESSAGE_MB,
    Security,
    check_target,
    read_token_file,
)
from vae_client.cli_io import CliError, ImageSink, Progress  # noqa: E402
from vae_client.client import VaeClient  # noqa: E402
from vae_client.errors import VaeError  # noqa: E402
from vae_client.images import ImageFileError  # noqa: E402
from vae_core.security import SecurityFileError  # noqa: E402
from vae_core.signals import Terminated, sigterm_raises  # noqa: E402
from vae_proto.tensor import images_per_message  # noqa: E402
from vae_proto.vae_pb2 import ModelInfo  # noqa: E402

if TYPE_CHECKING:  # bulk is imported by its command alone
    from vae_client.bulk import BulkSpec

PROG = "vae-client"
DEFAULT_TIMEOUT = 30.0
# Above this many images, `sample` streams (SampleStream) rather than asking for one reply.
STREAM_THRESHOLD = 4096
SEED_MAX = 2**64 - 1
# The bearer token may come from the environment (never a flag: command lines show in ps).
TOKEN_VAR = "VAE_TOKEN"

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# -- argument types -------------------------------------------------------------------------


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"{low} .. {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; it must be {bound}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _timeout(text: str) -> float:
    value = _positive_float(text)
    if value > MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"{value:g} s is more than gRPC can wait "
                                         f"(at most {MAX_TIMEOUT_S:g})")
    return value


def _target(text: str) -> str:
    try:
        return check_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} [--target, else VAE_TARGET]") from None


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


_SEED = _int_at_least(0, SEED_MAX)


def _add_seed(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--seed", type=_SEED, default=0,
                   help=f"seed of {what}, 0 .. 2^64-1 (default: %(default)s)")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="pixel type of the images asked for and written to NPY: float32 in "
                        "[0, 1] or uint8 0..255, round(255 x) (default: %(default)s)")


def _add_cols(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cols", type=_int_at_least(1), default=None,
                   help="columns of the PNG grid (default: ceil(sqrt(N)), a square)")


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: only when stderr is a "
                        "terminal)")


# -- helpers --------------------------------------------------------------------------------


def _connect(args: argparse.Namespace) -> VaeClient:
    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    return VaeClient(args.target, timeout=timeout, security=args.security)


def _pinned(client: VaeClient) -> ModelInfo:
    """The server's info, with every later call of `client` pinned to its model: a command
    whose calls reach several servers (a target of several, a resumed stream) gets one
    model's results or fails (FAILED_PRECONDITION), never a mix."""
    info = client.info()
    client.model_version = info.model_version
    return info


def _security(args: argparse.Namespace) -> Security:
    """TLS and token from the options; the token from --token-file, else from VAE_TOKEN."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CliError("--tls-cert and --tls-key go together (a client certificate and its key)")
    token, source = os.environ.get(TOKEN_VAR) or None, TOKEN_VAR
    if args.token_file is not None:
        try:
            token, source = read_token_file(args.token_file), f"--token-file {args.token_file}"
        except ValueError as exc:
            raise CliError(str(exc)) from None
    try:
        return Security.from_options(tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                                     tls_key=args.tls_key, tls_server_name=args.tls_server_name,
                                     token=token, as_flags=True)
    except SecurityFileError as exc:  # names the option and the file
        raise CliError(str(exc)) from None
    except ValueError as exc:  # only the token is left to be wrong; never print it
        raise CliError(f"{source}: {exc}") from None


def _spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


_OWN_MESSAGE_BYTES = DEFAULT_MAX_MESSAGE_MB * 1024 * 1024  # what _connect's client takes


def _max_images(info: ModelInfo) -> int:
    """Most images per request: the server's per-request limit, no more than its queue holds
    (a call larger than the queue is refused whatever the load), and no more float32 images
    than a message carries, the server's or this client's (VaeClient's 64 MiB)."""
    own = _OWN_MESSAGE_BYTES
    fit = images_per_message(min(info.limits.max_message_bytes or own, own))
    return max(1, min(info.limits.max_images_per_request, info.batching.max_queue_images, fit))


# -- info -----------------------------------------------------------------------------------


def add_info(sub: Subparsers) -> None:
    p = sub.add_parser("info", help="show the model and the server's settings and limits",
                       description="Show the served model (version, latent size, likelihood, "
                       "execution provider), the batching settings and the request limits.")
    p.add_argument("--json", action="store_true",
                   help="print ModelInfo as one JSON object, with the model's manifest parsed "
                        "into `manifest`")
    p.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        info = client.info()
    if args.json:
        print(json.dumps(cli_io.info_dict(info), indent=2))
    else:
        print(cli_io.info_text(args.target, info))
    return 0


# -- encode ---------------------------------------------------------------------------------


def add_encode(sub: Subparsers) -> None:
    p = sub.add_parser(
        "encode", help="images -> latents (mu, logvar, optionally a sample z)",
        description="Encode images into the latent space. Output convention: OUT.npz holds "
        "arrays mu, logvar (and z with --sample), each float32 [N, k]; OUT.npy holds one "
        "array [N, k]: z with --sample, else mu (the latents `decode` takes).")
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
                   help="image files, told apart by content: PNG (one 28x28 digit, any colour "
                        "type, read as 8-bit gray), NPY ([N, 784] or [N, 28, 28], float in "
                        "[0, 1] or uint8) or IDX (idx3-ubyte, gzipped or not); several are "
                        "joined in order")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="OUT.npz (mu, logvar[, z]) or OUT.npy (z with --sample, else mu)")
    p.add_argument("--sample", action="store_true",
                   help="also draw z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from --seed")
    _add_seed(p, "the sampling noise (with --sample)")
    _add_progress(p)
    p.set_defaults(run=run_encode)


def run_encode(args: argparse.Namespace) -> int:
    cli_io.suffix_of(args.out, cli_io.LATENT_SUFFIXES, "--out")
    cli_io.check_writable(args.out)
    images = cli_io.read_images(args.inputs)
    parts: list[tuple[np.ndarray, ...]] = []
    with _connect(args) as client:
        batch = _max_images(_pinned(client))
        with Progress(len(images), "encode", cli_io.progress_wanted(args.progress)) as bar:
            for start, stop in _spans(len(images), batch):
                parts.append(client.encode(images[start:stop], sample=args.sample,
                                           seed=args.seed, offset=start))
                bar.update(stop - start)
    mu, logvar, *z = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    cli_io.write_latents(args.out, mu, logvar, z[0] if z else None)
    return 0


# -- decode ---------------------------------------------------------------------------------


def add_decode(sub: Subparsers) -> None:
    p = sub.add_parser("decode", help="latents -> images",
                       description="Decode latents into the decoder's mean images f(z).")
    p.add_argument("--in", dest="input", required=True, metavar="Z",
                   help="Z.npy (float [N, k]) or Z.npz (its array z, else mu), as `encode` "
                        "writes them")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="OUT.npy (images [N, 28, 28] of --dtype) or OUT.png (one grid of the "
                        "images, white digits on black, with gray gutters)")
    _add_dtype(p)
    _add_cols(p)
    _add_progress(p)
    p.set_defaults(run=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    cli_io.suffix_of(args.out, cli_io.IMAGE_SUFFIXES, "--out")
    cli_io.check_writable(args.out)
    z = cli_io.read_latents(args.input)
    with _connect(args) as client:
        batch = _max_images(_pinned(client))
        sink = ImageSink(args.out, len(z), args.dtype, args.cols)
        try:
            with Progress(len(z), "decode", cli_io.progress_wanted(args.progress)) as bar:
                for start, stop in _spans(len(z), batch):
                    sink.put(start, client.decode(z[start:stop], dtype=args.dtype))
                    bar.update(stop - start)
        except BaseException:
            sink.abort()
            raise
    sink.close()
    return 0


# -- sample ---------------------------------------------------------------------------------


def add_sample(sub: Subparsers) -> None:
    p = sub.add_parser(
        "sample", help="generate digits, of one class with --digit",
        description="Generate n digits f(z), z drawn from --seed by the model's prior (of the "
        "class --digit when given). The same seed and digit give the same images however they "
        "are fetched: image i is the same in one Sample reply and in a stream. "
        f"Above {STREAM_THRESHOLD} images (or the server's "
        "max_sample_n or max_queue_images) the images come by SampleStream, in chunks, "
        "written to the NPY file as they arrive, so memory stays bounded.")
    p.add_argument("--n", type=_int_at_least(1, UINT64_MAX), required=True,
                   help="number of images")
    _add_seed(p, "the latents")
    p.add_argument("--digit", type=_int_at_least(0, UINT32_MAX), default=None,
                   help="generate digits of this class only (one of the model's digits, "
                        "`info`; default: any class)")
    _add_dtype(p)
    p.add_argument("--out", required=True, metavar="OUT",
                   help="OUT.npy (images [n, 28, 28] of --dtype) or OUT.png (one grid of the "
                        "images, white digits on black, with gray gutters)")
    p.add_argument("--chunk-size", type=_int_at_least(0, UINT32_MAX), default=0,
                   help="images per streamed chunk; 0 = the server's default_chunk_size "
                        "(default: %(default)s)")
    p.add_argument("--streams", type=_int_at_least(0), default=0,
                   help="streams at once, each of a contiguous range of the images (by "
                        "offset): a target of several servers spreads them over the servers; "
                        "the file is the same whatever their number. 0 = one per server the "
                        "target lists (ipv4:A:P,B:P), else 1 (default: %(default)s)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help=f"use SampleStream (--stream) or one Sample call (--no-stream); by "
                        f"default, stream when n > min({STREAM_THRESHOLD}, max_sample_n, "
                        "max_queue_images)")
    _add_cols(p)
    _add_progress(p)
    p.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    cli_io.suffix_of(args.out, cli_io.IMAGE_SUFFIXES, "--out")
    cli_io.check_writable(args.out)
    with _connect(args) as client:
        info = _pinned(client)
        stream = args.stream
        if stream is None:
            stream = args.n > min(STREAM_THRESHOLD, info.limits.max_sample_n,
                                  info.batching.max_queue_images)
        # What the server would refuse, refused before a file of n images is made for it.
        limit, name = ((info.limits.max_stream_n, "max_stream_n") if stream
                       else (info.limits.max_sample_n, "max_sample_n"))
        if limit and args.n > limit:
            raise CliError(f"--n {args.n}: more than the server's {name} ({limit})"
                           + ("" if stream else "; let the images stream (--stream)"))
        # A reply this client could not take would come after the server's work.
        fit = images_per_message(_OWN_MESSAGE_BYTES,
                                 28 * 28 * (1 if args.dtype == "uint8" else 4))
        if not stream and args.n > fit:
            raise CliError(f"--n {args.n}: {args.dtype} images in one reply past this client's "
                           f"{DEFAULT_MAX_MESSAGE_MB} MiB message limit ({fit} images); let "
                           "the images stream (--stream)")
        try:
            sink = ImageSink(args.out, args.n, args.dtype, args.cols)
        except (OverflowError, ValueError):  # n x 784 pixels past what numpy can address
            raise CliError(f"--n {args.n}: too many images for one file") from None
        try:
            if stream:
                # The server's default chunk, where this client can take it whole (0: the
                # server says none, and chooses).
                default = info.limits.default_chunk_size
                chunk = args.chunk_size or (min(default, fit) if default else 0)
                _sample_stream(client, args, chunk, sink)
            else:
                sink.put(0, client.sample(args.n, seed=args.seed, dtype=args.dtype,
                                          digit=args.digit))
        except VaeError as exc:
            sink.abort()
            if exc.resume_offset is None:
                raise
            # The library's hint (the same request with offset=N) is for API users: this
            # command has no offset, and the images received are not kept.
            raise CliError(f"{exc.status} (the stream stopped before image "
                           f"{exc.resume_offset}; nothing was written to {args.out})") from None
        except BaseException:
            sink.abort()
            raise
    sink.close()
    return 0


def _sample_stream(client: VaeClient, args: argparse.Namespace, chunk_size: int,
                   sink: ImageSink) -> None:
    """The images by SampleStream: --streams streams at once, each of a contiguous range,
    chunk-aligned; each RPC goes to a server of the target's (round_robin)."""
    streams = args.streams or cli_io.target_addresses(args.target)
    ranges = cli_io.split_range(args.n, streams, chunk_size)
    lock = threading.Lock()
    stop = threading.Event()  # one stream failed, or the user interrupted: the others end

    def fetch(lo: int, hi: int, bar: Progress) -> None:
        # --timeout bounds the whole stream when given; by default a stream has no deadline.
        for offset, images in client.sample_stream(hi, seed=args.seed, chunk_size=chunk_size,
                                                   dtype=args.dtype, offset=lo,
                                                   digit=args.digit, timeout=args.timeout):
            if stop.is_set():
                return  # leaving the loop cancels the call
            sink.put(offset, images)
            with lock:
                bar.update(len(images))

    with Progress(args.n, "sample", cli_io.progress_wanted(args.progress)) as bar:
        if len(ranges) == 1:
            fetch(*ranges[0], bar)
        else:
            with concurrent.futures.ThreadPoolExecutor(len(ranges)) as pool:
                futures = [pool.submit(fetch, lo, hi, bar) for lo, hi in ranges]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        future.result()  # the first to fail raises here, whichever it is
                except BaseException:
                    stop.set()
                    # A stream waiting for a chunk that does not come (a server alive but
                    # stuck) would never see `stop`, and leaving the pool waits for it:
                    # closing the channel cancels every call on it.
                    client.close()
                    raise
    if bar.done != args.n:
        raise CliError(f"the stream ended after {bar.done} of {args.n} images")


# -- score ----------------------------------------------------------------------------------


def add_score(sub: Subparsers) -> None:
    p = sub.add_parser(
        "score", help="log-likelihood, bits/dim and anomaly flags of images",
        description="Score images: per image the ELBO, the importance-sampled log p(x) with "
        "K samples (nats), bits/dim, the percentile among the validation digits and the "
        "anomaly flag. Without --json or --csv a table goes to stdout; a summary line always "
        "follows (on stderr when a result goes to stdout as '-'). Images go in requests of "
        "--batch, fewer where the server's limits ask for it (images x K <= "
        "max_queue_images); each request says where its images start, so the scores do not "
        "depend on how the file was split.")
    p.add_argument("--in", dest="inputs", nargs="+", required=True, metavar="FILE",
                   help="image files: NPY ([N, 784] or [N, 28, 28], float in [0, 1] or "
                        "uint8), IDX (gzipped or not) or PNG; several are joined in order")
    p.add_argument("--k", type=_int_at_least(1, UINT32_MAX), default=100,
                   help="importance samples per image; 1 gives the ELBO (default: %(default)s)")
    _add_seed(p, "the importance sampling and the dequantisation of uint8 pixels")
    p.add_argument("--batch", type=_int_at_least(1), default=256,
                   help="images per request, at most (default: %(default)s)")
    p.add_argument("--json", metavar="OUT.json",
                   help="write a JSON list of one record per image (index, elbo, "
                        "log_likelihood, bits_per_dim, percentile, anomaly); '-' = stdout")
    p.add_argument("--csv", metavar="OUT.csv",
                   help="write the same records as CSV with a header row; '-' = stdout")
    _add_progress(p)
    p.set_defaults(run=run_score)


def run_score(args: argparse.Namespace) -> int:
    images = cli_io.read_images(args.inputs)
    for path in (args.json, args.csv):
        cli_io.check_writable(path)
    parts = []
    with _connect(args) as client:
        info = _pinned(client)
        batch = min(args.batch, _max_images(info),
                    max(1, info.batching.max_queue_images // args.k))
        with Progress(len(images), "score", cli_io.progress_wanted(args.progress)) as bar:
            for start, stop in _spans(len(images), batch):
                parts.append(client.log_likelihood(np.asarray(images[start:stop]), k=args.k,
                                                   seed=args.seed, offset=start))
                bar.update(stop - start)
    scores = cli_io.concat_scores(parts)
    if args.json:
        cli_io.write_scores_json(args.json, scores)
    if args.csv:
        cli_io.write_scores_csv(args.csv, scores)
    if not (args.json or args.csv):
        sys.stdout.write(cli_io.scores_table(scores))
    to_stdout = any(cli_io.is_stdout(path) for path in (args.json, args.csv) if path)
    print(cli_io.scores_summary(scores), file=sys.stderr if to_stdout else sys.stdout)
    return 0


# -- bench ----------------------------------------------------------------------------------


def add_bench(sub: Subparsers) -> None:
    from vae_client.bench import METHODS

    p = sub.add_parser(
        "bench", help="load-test the server: throughput, latency percentiles, errors",
        description="A load generator: closed loop (--concurrency calls always in flight) or "
        "open loop (--rate calls per second, whatever the replies do; latency counted from "
        "the scheduled send time). Reports calls/s, images/s, p50/p90/p99/max latency and "
        "errors by status code. The first --warmup seconds are not counted. Exits 1 when "
        "any counted call failed (the figures are printed all the same).")
    p.add_argument("--method", choices=METHODS, default="decode",
                   help="decode: z -> images; encode: images -> mu, logvar; sample: Sample(n="
                        "batch); stream: SampleStream of --stream-n images in chunks of --batch; "
                        "loglik: LogLikelihood of --batch images with --k samples "
                        "(default: %(default)s)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=_int_at_least(1), default=1,
                      help="calls in flight, closed loop; not with --rate (default: "
                           "%(default)s)")
    loop.add_argument("--rate", type=_positive_float, default=None,
                      help="open loop: start this many calls per second instead (default: "
                           "closed)")
    p.add_argument("--duration", type=_positive_float, default=10.0,
                   help="seconds measured after the warm-up, > 0 (default: %(default)s)")
    p.add_argument("--warmup", type=_non_negative_float, default=1.0,
                   help="seconds of load before measuring, >= 0 (default: %(default)s)")
    p.add_argument("--batch", type=_int_at_least(1, UINT32_MAX), default=1,
                   help="images per call, or per chunk for stream (default: %(default)s)")
    p.add_argument("--k", type=_int_at_least(1, UINT32_MAX), default=1000,
                   help="importance samples for loglik (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="image dtype of decode, sample and stream replies (default: %(default)s)")
    p.add_argument("--stream-n", type=_int_at_least(1, UINT64_MAX), default=100_000,
                   help="images per SampleStream call (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import asyncio

    from vae_client.bench import run_bench as bench

    result = asyncio.run(bench(
        args.target, args.method, concurrency=args.concurrency, duration=args.duration,
        batch=args.batch, rate=args.rate, k=args.k, dtype=args.dtype, stream_n=args.stream_n,
        warmup=args.warmup, security=args.security,
        timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout,
        stream_timeout=args.timeout))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    # A figure with failed calls is no figure of the server: a script must not take it as one.
    return 1 if result.errors else 0


# -- bulk -----------------------------------------------------------------------------------


def add_bulk(sub: Subparsers) -> None:
    from vae_client.bulk import FORMATS, MAX_SHARD_SIZE

    p = sub.add_parser(
        "bulk", help="write N generated digits as dataset shards (Ray, or this process)",
        description="Generate --n digits as shards of --shard-size items in --out, each "
        "shard a task (on a Ray cluster: the bulk extra; --no-ray: threads of this process) "
        "that fetches its range of seeded streams from the target's servers. The bytes of "
        "every shard are the same whatever the number of workers or servers; a run in a "
        "folder that holds whole shards of the same settings skips them (a job that died "
        "resumes). Labelled where the model offers digit classes: item i is of class "
        "digits[i % D]. _manifest.json lists every shard with its sha256.")
    p.add_argument("--n", type=_int_at_least(1), required=True, help="items in all")
    p.add_argument("--out", required=True, help="the dataset folder (shared by every node)")
    p.add_argument("--format", choices=sorted(FORMATS), default="parquet",
                   help="parquet (index, seed, label, PNG image columns; needs pyarrow), "
                        "webdataset (tar of .png/.cls/.json) or npz (images, index, label "
                        "arrays) (default: %(default)s)")
    p.add_argument("--shard-size", type=_int_at_least(1, MAX_SHARD_SIZE), default=100_000,
                   help="items per shard, each held in memory while it is made (about 3 KB "
                        "an item) (default: %(default)s)")
    _add_seed(p, "the latents")
    p.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                   help="items take the model's digit classes in turn, each labelled with "
                        "its class (where the model has classes; default: yes)")
    p.add_argument("--workers", type=_int_at_least(1), default=4,
                   help="shards made at once (default: %(default)s)")
    p.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True,
                   help="run the shards as Ray tasks (default), or in this process")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="the Ray cluster (ray.init's address: auto, ray://HOST:10001); "
                        "default: a local one started for the job")
    _add_progress(p)
    p.set_defaults(run=run_bulk)


def run_bulk(args: argparse.Namespace) -> int:
    from vae_client import bulk

    with _connect(args) as client:
        info = client.info()
    digits = tuple(info.digits) if args.labels else ()
    spec = bulk.BulkSpec(n=args.n, seed=args.seed, shard_size=args.shard_size,
                         format=args.format, digits=digits, model_version=info.model_version)
    longest = -(-args.n // len(digits)) if digits else args.n
    if longest > info.limits.max_stream_n:
        raise CliError(f"--n {args.n}: the streams would reach image {longest}, past the "
                       f"servers' max_stream_n ({info.limits.max_stream_n}); raise "
                       "vae-server --max-stream-n")
    if not args.out.strip():  # an unset shell variable: not the current folder
        raise CliError("--out: an empty path; name the dataset folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out}: a file, not a folder")
    try:
        with bulk.locked(out):
            todo = bulk.prepare(out, spec)
            _make_shards(args, spec, out, todo)
            # Every shard checked against its hash once all are made (Ray tasks may have
            # written them on other nodes of a shared folder), and the manifest written, while
            # the folder is still this job's.
            try:
                digests = dict(bulk.shard_digests(out, spec))
            except bulk.BulkError as exc:
                raise bulk.BulkError(f"{exc} (do the Ray nodes share {out}?)") from None
            manifest = bulk.write_manifest(out, spec, digests)
    except bulk.BulkError as exc:
        raise CliError(str(exc)) from None
    print(f"{args.n} items in {len(manifest['shards'])} {args.format} shards -> {out} "
          f"({len(todo)} made now)")
    return 0


def _make_shards(args: argparse.Namespace, spec: BulkSpec, out: Path, todo: list[int]) -> None:
    from vae_client import bulk

    made = args.n - sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in todo)
    with Progress(args.n, "bulk", cli_io.progress_wanted(args.progress), done=made) as bar:

        def done(i: int, digest: str) -> None:
            lo, hi = spec.shard_range(i)
            bar.update(hi - lo)

        runner = bulk.run_ray if args.ray else bulk.run_local
        kwargs = {"address": args.ray_address} if args.ray else {}
        # Chunks of each server's own default size: a target's servers may differ in their
        # limits, and the bytes do not depend on the size. --timeout, when given, bounds
        # each stream whole, as `sample` takes it.
        runner(args.target, spec, out, todo, args.workers, args.security, done,
               chunk_size=0, timeout=args.timeout, **kwargs)


# -- the command ----------------------------------------------------------------------------

# One registration function per subcommand, in the order `--help` lists them. A new
# subcommand adds its add_* function here.
COMMANDS: list[Callable[[Subparsers], None]] = [add_info, add_encode, add_decode, add_sample,
                                                add_score, add_bench, add_bulk]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Call a vae-server (vae.v1.VaeService over gRPC): model "
        "info, encode, decode, sample and score MNIST-style 28x28 digits.")
    _add_connection(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        _add_connection(command, top=False)
    return p


def _add_connection(p: argparse.ArgumentParser, top: bool) -> None:
    """The options of the connection, accepted before the subcommand (`vae-client --target
    H:P bench`, as DESIGN.md writes it) and after it (`vae-client bench --target H:P`, as
    perf_analyzer users type it). After the subcommand the defaults are suppressed, so
    that only an option given there overrides the one given (or defaulted) before it."""
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    target = os.environ.get("VAE_TARGET", "localhost:50051")
    p.add_argument("--target", type=_target, default=default(target), metavar="HOST:PORT",
                   help="the server's gRPC address [VAE_TARGET] (default: "
                        f"{target.replace('%', '%%')})")
    p.add_argument("--timeout", type=_timeout, default=default(None), metavar="S",
                   help=f"deadline of each call in seconds (default: {DEFAULT_TIMEOUT:g}; a "
                        "sample stream has none unless this is given, and then it bounds the "
                        "whole stream)")
    sec = p.add_argument_group(
        "security", "TLS, mutual TLS and bearer tokens; without them the connection is "
        "plaintext and no token is sent")
    sec.add_argument("--tls", action="store_true", default=default(False),
                     help="connect with TLS, verifying the server's certificate against the "
                          "system's CA certificates (implied by any other --tls-* option)")
    sec.add_argument("--tls-ca", metavar="FILE", default=default(None),
                     help="PEM CA certificate(s) to verify the server's certificate with")
    sec.add_argument("--tls-cert", metavar="FILE", default=default(None),
                     help="PEM client certificate, for a server that asks for one (mutual TLS); "
                          "with --tls-key")
    sec.add_argument("--tls-key", metavar="FILE", default=default(None),
                     help="PEM private key of --tls-cert")
    sec.add_argument("--tls-server-name", metavar="NAME", default=default(None),
                     help="the name the server's certificate must carry, when it is not the "
                          "host of --target")
    sec.add_argument("--token-file", metavar="FILE", default=default(None),
                     help="file holding the bearer token sent with every call (one token; "
                          f"blank lines and # comments ignored) [else the token in {TOKEN_VAR}]")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with sigterm_raises(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        args.security = _security(args)
        return args.run(args)
    except VaeError as exc:
        # Without the library's resume hint (offset=N), which this command has no use for.
        _error(exc.status)
    except (CliError, ImageFileError) as exc:
        _error(str(exc))
    except BrokenPipeError:
        # The reader went away (`vae-client info | head`): not an error worth a message.
        # Point stdout at /dev/null so the interpreter's final flush does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc}")
    except Terminated:
        _error("terminated")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    return 1


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning (a token sent without TLS) on one line, as errors are, not Python's two."""
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
