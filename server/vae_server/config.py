"""Server settings: the one place they are read. Every flag of `vae-server` is also settable
as an environment variable with the prefix VAE_ (e.g. --max-batch-size / VAE_MAX_BATCH_SIZE);
a flag given on the command line wins over the environment."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from vae_core.host import cores
from vae_core.ports import grpc_host
from vae_core.security import (
    CERTIFICATE,
    PRIVATE_KEY,
    TOKEN_RULE,
    SecurityFileError,
    check_ca,
    check_pair,
    read_pem,
    read_tokens,
    valid_token,
)
from vae_proto.tensor import images_per_message
from vae_server import loops


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Settings:
    model_dir: str = _doc("model directory written by `vae-export onnx` (manifest.json, *.onnx)",
                          default="models/default")
    host: str = _doc("address to bind the gRPC and metrics ports on ([::]: every IPv6 and "
                     "IPv4 address)", default="[::]")
    port: int = _doc("gRPC port; 0 picks a free one", default=50051)
    metrics_port: int = _doc("Prometheus /metrics port; 0 picks a free one, -1 disables",
                             default=8000)
    provider: str = _doc("execution provider: auto (CUDA where it works, else CPU), cuda (refuse "
                         "to start where ONNX Runtime cannot use it) or cpu", default="auto")
    threads: int = _doc("ONNX Runtime intra-op threads per session; 0 = one per core",
                        default=0)
    spinning: bool = _doc(
        "let the ONNX Runtime threads of the full-width sessions (a large batch running "
        "alone: stream chunks, LogLikelihood's K samples) spin briefly instead of sleeping. "
        "It can help a server that only streams with --instances 1, and takes CPU from gRPC "
        "and from the runs beside it otherwise (BENCHMARKS.md). One-thread sessions never "
        "spin (with --threads 1 or on CUDA one session runs every batch, and this applies to "
        "it)", default=False)
    io_binding: str = _doc(
        "run batches on buffers preallocated on the device, padded to a few fixed sizes "
        "(ONNX Runtime's IO binding): auto (on CUDA only), on or off. A model's runs then "
        "take turns (one instance, as CUDA's default). On the CPU it only costs "
        "(BENCHMARKS.md)", default="auto")
    cuda_graphs: bool = _doc(
        "capture each fixed batch size as a CUDA graph and replay it (CUDA provider and IO "
        "binding only; all of the model must run on CUDA)", default=False)
    event_loop: str = _doc("event loop: auto (uvloop where installed, else asyncio's), uvloop "
                           "or asyncio", default="auto")
    batching: bool = _doc("merge concurrent calls into one model run (dynamic batching)",
                          default=True)
    max_batch_size: int = _doc("most images in one model run", default=2048)
    max_queue_images: int = _doc(
        "most images waiting per model; a call that does not fit gets RESOURCE_EXHAUSTED",
        default=65536)
    max_pending_calls: int = _doc(
        "calls gRPC holds for the server to take when they arrive faster than its event loop "
        "takes them (about 15 KB each, more with large requests); gRPC cancels calls beyond "
        "it (CANCELLED)",
        default=20000)
    max_delay_ms: float = _doc(
        "longest a batch waits to fill: for calls the server already holds, or for as many "
        "calls as the last batch had (so a lone caller does not wait, except the first one "
        "after a burst); small calls beside a large run gather for at most this long",
        default=2.0)
    inline_rows: int = _doc(
        "batches of up to this many images run on the event loop's thread with a one-thread "
        "session; larger ones in worker threads. 0 = always in worker threads", default=64)
    instances: int = _doc(
        "large batches of each model that may run at once, in worker threads (as Triton's "
        "instance count): a large batch alone runs on all --threads, one beside another on "
        "the one-thread session; 0 = one per core on the CPU, 1 on CUDA. Always 1 with "
        "bound runs (--io-binding)", default=0)
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
    grace_seconds: float = _doc(
        "on SIGTERM, how long calls in flight may take to finish, those still waiting in gRPC "
        "for the server included (served for up to half of it, then refused UNAVAILABLE)",
        default=10.0)
    drain_delay_s: float = _doc(
        "on SIGTERM, how long the server keeps taking calls while health says NOT_SERVING, "
        "before it stops: the time load balancers and clients take to stop sending to it",
        default=1.0)
    stream_stall_s: float = _doc(
        "a SampleStream chunk its caller has not taken for this long gives back the queue room "
        "of what the stream made ahead (made again once it reads on): callers that stop "
        "reading must not keep other calls refused; 0 = never", default=10.0)
    max_connection_age_s: float = _doc(
        "close each client connection after this long (gRPC's max connection age, with a "
        "GOAWAY; calls in flight go on), so that clients reconnect, resolve the server's name "
        "again and spread over replicas added since; 0 = never", default=120.0)
    max_connection_age_grace_s: float = _doc(
        "how long calls in flight on an aged connection may go on before it is cut (a cut "
        "stream resumes by offset elsewhere)", default=600.0)
    max_connections: int = _doc(
        "most client connections open at once, per serving process (each of --workers has "
        "its own): one more is closed as it arrives, its caller told UNAVAILABLE, so that "
        "idle connections cannot use up the open-file limit, past which new calls and "
        "metrics scrapes hang. Probes connect too: leave room for them. 0 = no limit",
        default=0)
    workers: str = _doc(
        "serving processes on the port (SO_REUSEPORT), each with its own batchers and model "
        "sessions, one set of metrics for them all; 'auto' = one per core, at most 4 per core. "
        "The kernel spreads connections, not calls, over them: a client on one channel reaches "
        "one worker",
        default="1")
    worker_timeout_s: float = _doc(
        "with --workers: a worker whose event loop has not answered the supervisor for this "
        "long (hung, or stopped) is killed and started again, as one that died; 0 = never, "
        "else at least 1", default=30.0)
    worker_start_timeout_s: float = _doc(
        "with --workers: a worker not ready (its model loaded and warmed up) this long after it "
        "started is killed: at start the server then stops with status 2, as for a worker "
        "that cannot start; a replacement is started again; 0 = never, else at least 1",
        default=600.0)
    log_level: str = _doc("logging level", default="INFO")
    tls_cert: str = _doc("PEM certificate (chain) of the gRPC port; with --tls-key it turns TLS on",
                         default="")
    tls_key: str = _doc("PEM private key of --tls-cert (unencrypted)", default="")
    tls_client_ca: str = _doc(
        "PEM CA certificate(s); setting it turns on mutual TLS: every client must present a "
        "certificate signed by one of them (needs --tls-cert)", default="")
    auth_token_file: str = _doc(
        "file of bearer tokens, one a line (blank lines and lines starting with # ignored); "
        "every vae.v1 call must then send 'authorization: Bearer TOKEN' with one of them "
        "(health and reflection stay open). Tokens may also come from VAE_AUTH_TOKENS",
        default="")
    # Every accepted token, from VAE_AUTH_TOKENS and --auth-token-file; load_settings fills it.
    # Environment only, never a flag: a command line is visible to every user in `ps`. Left
    # out of repr() so that logging the settings never logs a token.
    auth_tokens: tuple[str, ...] = field(default=(), repr=False, metadata={
        "help": "bearer tokens, comma separated", "env_only": True})

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def worker_count(self) -> int:
        """--workers resolved: 'auto' is one per core this process may run on."""
        return cores() if self.workers == "auto" else int(self.workers)


TOKENS_VAR = "VAE_AUTH_TOKENS"


class SettingsError(ValueError):
    """A setting, from a flag or a VAE_ variable, that cannot be used: the message names it
    and says what is wrong (vae-server prints it on one line and exits with status 2)."""


class _Parser(argparse.ArgumentParser):
    # argparse prints its usage and exits; a bad setting is one line that names it instead.
    def error(self, message: str) -> NoReturn:
        raise SettingsError(message)

    # A variable that cannot be read, raised once the flags are parsed: --help still prints.
    env_error: SettingsError | None = None


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


class _NotFinite(ValueError):
    pass


def _parse_float(text: str) -> float:
    """A finite number: inf and nan would pass every range check (nan compares false with
    everything) and then fail where they are used, at the earliest on SIGTERM."""
    value = float(text)
    if not math.isfinite(value):
        raise _NotFinite(text)
    return value


_PARSERS: dict[type, Callable[[str], Any]] = {bool: _parse_bool, int: int, float: _parse_float,
                                              str: str}
_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", float: "a number",
               str: "text"}


def _wanted(kind: type, exc: ValueError) -> str:
    return "a finite number" if isinstance(exc, _NotFinite) else _TYPE_NAMES[kind]


def _typed(kind: type) -> Callable[[str], Any]:
    """argparse's type for a setting: its error names the value and the type wanted."""
    def parse(text: str) -> Any:
        try:
            return _PARSERS[kind](text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_wanted(kind, exc)}") from None
    parse.__name__ = kind.__name__
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(env: Mapping[str, str] | None = None) -> _Parser:
    env = os.environ if env is None else env
    p = _Parser(
        prog="vae-server",
        description="Serve an exported VAE over gRPC (vae.v1.VaeService, health, reflection) "
        "with dynamic batching and Prometheus metrics. Every option can also be set by an "
        "environment variable: VAE_ and the option's name in capitals, e.g. VAE_MODEL_DIR.",
        epilog=f"{TOKENS_VAR}: bearer tokens, comma separated, accepted beside those of "
        "--auth-token-file. It has no flag: a command line is visible to every user in ps.",
    )
    for f in dataclasses.fields(Settings):
        if f.metadata.get("env_only"):
            continue
        flag = _flag(f.name)
        var = "VAE_" + f.name.upper()
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        default = f.default
        if var in env:
            try:
                default = _PARSERS[kind](env[var])
            except ValueError as exc:
                p.env_error = p.env_error or SettingsError(
                    f"{var}: {env[var]!r} is not {_wanted(kind, exc)}")
        p.add_argument(flag, dest=f.name, type=_typed(kind), default=default,
                       help=f"{f.metadata['help']} [{var}] (default: %(default)s)")
    return p


# VAE_ variables that vae-client reads (its target and token) and the test suite's fuzzing
# knobs: a shell or a Compose file may set them beside the server's, and they are no typo.
OTHER_VARIABLES = frozenset({"VAE_TARGET", "VAE_TOKEN", "VAE_FUZZ_SCALE", "VAE_FUZZ_RANDOM"})
# What Kubernetes sets for each Service of a pod's namespace (a Service named vae-...), unless
# the pod's enableServiceLinks is false: VAE_SERVING_SERVICE_HOST, VAE_SERVING_PORT_50051_TCP.
# (Its VAE_SERVING_PORT, which a misspelt setting could be named too, holds a URL.)
SERVICE_LINK = re.compile(r"VAE_\w+_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)"
                          r"(_PROTO|_PORT|_ADDR)?)")
SERVICE_URL = re.compile(r"(tcp|udp|sctp)://\S+")


def _service_link(var: str, value: str) -> bool:
    return bool(SERVICE_LINK.fullmatch(var) or (
        var.endswith("_PORT") and SERVICE_URL.fullmatch(value)))


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each VAE_ variable of `env` (default: the environment) that is no setting,
    naming the setting it may stand for: a misspelt one (VAE_GRACE_SECOND) would otherwise
    change nothing, unseen."""
    env = os.environ if env is None else env
    known = {"VAE_" + f.name.upper() for f in dataclasses.fields(Settings)
             if not f.metadata.get("env_only")} | {TOKENS_VAR} | OTHER_VARIABLES
    names = sorted(k[4:] for k in known)
    warnings = []
    for var in sorted(v for v in env if v.startswith("VAE_") and v not in known
                      and not _service_link(v, env[v])):
        close = difflib.get_close_matches(var[4:], names, n=1)
        hint = f" (did you mean VAE_{close[0]}?)" if close else ""
        warnings.append(f"{var} is not a setting of vae-server{hint}: it is ignored")
    return warnings


def load_settings(argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """The settings of flags `argv` over variables `env` (default: the command line and the
    environment). A bad one raises SettingsError; --help prints and exits."""
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if parser.env_error is not None:
        raise parser.env_error
    args.host = grpc_host(args.host)
    settings = Settings(**vars(args))
    _check(settings)
    _check_tls(settings)
    return dataclasses.replace(settings, auth_tokens=_load_tokens(settings, env))


# The largest --max-message-mb: gRPC's message limits are C ints (2 GiB - 1 byte).
MAX_MESSAGE_MB = 2047
# gRPC takes the connection age and its grace in milliseconds, as C ints: at most 2^31 - 1 ms
# (24.8 days); the age at least 1 ms, as a shorter one would be 0 ms, every connection sent
# away at once.
MAX_CONNECTION_AGE_S = (2**31 - 1) // 1000
MIN_CONNECTION_AGE_S = 0.001


# Upper bounds of counts and waits that nothing else bounds: a mistyped figure is refused at
# start rather than met as threads, memory or an overflow later (a supervisor's join timeout).
WORKERS_PER_CORE = 4
MAX_INSTANCES = 256
MAX_THREADS = 1024
MAX_WAIT_S = 86400  # a day
WAITS = ("grace_seconds", "drain_delay_s", "stream_stall_s", "worker_timeout_s",
         "worker_start_timeout_s")


def _check(s: Settings) -> None:
    for f in dataclasses.fields(Settings):  # whatever built them: no inf or nan
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingsError(f"{_flag(f.name)}: {value} is not a finite number")
    for name in ("max_delay_ms", "inline_rows", "instances", "threads", "warmup_rounds",
                 "grace_seconds", "drain_delay_s", "stream_stall_s", "max_connection_age_s",
                 "max_connection_age_grace_s", "max_connections", "worker_timeout_s",
                 "worker_start_timeout_s"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)} is negative; it must be >= 0")
    for name in ("max_connection_age_s", "max_connection_age_grace_s"):
        if getattr(s, name) > MAX_CONNECTION_AGE_S:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)}; it must be at most "
                                f"{MAX_CONNECTION_AGE_S} (gRPC's limit, 2^31 - 1 ms)")
    if 0 < s.max_connection_age_s < MIN_CONNECTION_AGE_S:
        raise SettingsError(f"--max-connection-age-s: {s.max_connection_age_s} is under "
                            f"{MIN_CONNECTION_AGE_S} (1 ms, gRPC's unit); 0 = never")
    for name in ("port", "metrics_port"):
        low = -1 if name == "metrics_port" else 0
        if not low <= getattr(s, name) <= 65535:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)} is not a port "
                                f"({low} .. 65535)")
    for name, allowed in (("provider", ("auto", "cuda", "cpu")),
                          ("io_binding", ("auto", "on", "off")),
                          ("log_level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))):
        value = getattr(s, name)
        if (value.upper() if name == "log_level" else value) not in allowed:
            raise SettingsError(f"{_flag(name)}: {value!r} is not one of {', '.join(allowed)}")
    for name in ("worker_timeout_s", "worker_start_timeout_s"):
        if 0 < getattr(s, name) < 1:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)} is under 1; 0 = never")
    if s.workers != "auto" and not (s.workers.isascii() and s.workers.isdigit()
                                    and int(s.workers) >= 1):
        raise SettingsError(f"--workers: {s.workers!r} is not a count >= 1 or 'auto'")
    # Each worker holds its own models and threads; past a few per core they only cost memory.
    most = WORKERS_PER_CORE * cores()
    if s.workers != "auto" and int(s.workers) > most:
        raise SettingsError(f"--workers: {s.workers} is more than {WORKERS_PER_CORE} per core "
                            f"this process may use; it must be at most {most} here")
    for name, limit in (("instances", MAX_INSTANCES), ("threads", MAX_THREADS),
                        *((name, MAX_WAIT_S) for name in WAITS)):
        if getattr(s, name) > limit:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)}; it must be at most {limit}")
    if s.cuda_graphs and (s.provider == "cpu" or s.io_binding == "off"):
        raise SettingsError("--cuda-graphs needs the CUDA provider and IO binding "
                            f"(not --provider {s.provider} --io-binding {s.io_binding})")
    try:
        loops.resolve(s.event_loop)
    except (ValueError, RuntimeError) as exc:
        raise SettingsError(f"--event-loop: {exc}") from None
    for name in ("max_batch_size", "max_queue_images", "max_pending_calls",
                 "max_images_per_request", "max_sample_n", "max_stream_n", "max_chunk_size",
                 "default_chunk_size", "max_k", "max_message_mb"):
        if getattr(s, name) < 1:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)}; it must be >= 1")
    # A call that could never fit in the queue would be told "queue full, retry" forever
    # (one image at --max-k is k decoder rows), and a stream that leaves its chunk size to
    # the server would be refused for a size it never sent.
    # Every one named at once: lowering the queue alone would otherwise take a restart each.
    over = [f"{_flag(name)} {getattr(s, name)} exceeds {_flag(limit)} {getattr(s, limit)}"
            for name, limit in (("max_batch_size", "max_queue_images"),
                                ("max_images_per_request", "max_queue_images"),
                                ("max_sample_n", "max_queue_images"),
                                ("max_chunk_size", "max_queue_images"),
                                ("max_k", "max_queue_images"),
                                ("default_chunk_size", "max_queue_images"),
                                ("default_chunk_size", "max_chunk_size"))
            if getattr(s, name) > getattr(s, limit)]
    if over:
        raise SettingsError(f"{'; '.join(dict.fromkeys(over))}: each must be at most its "
                            "bound")
    # GetModelInfo reports the limits in uint32 fields (every per-call limit is at most the
    # queue) and --max-stream-n in a uint64: past them, every GetModelInfo would fail.
    for name, bits in (("max_queue_images", 32), ("max_stream_n", 64)):
        if getattr(s, name) > 2**bits - 1:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)}; it must be at most "
                                f"{2**bits - 1} (GetModelInfo's uint{bits})")
    # gRPC takes these as C ints: past them the server would die at the start.
    for name in ("max_connections", "max_pending_calls"):
        if getattr(s, name) > 2**31 - 1:
            raise SettingsError(f"{_flag(name)}: {getattr(s, name)}; it must be at most "
                                f"{2**31 - 1} (gRPC's limit)")
    if s.max_message_mb > MAX_MESSAGE_MB:
        raise SettingsError(f"--max-message-mb: {s.max_message_mb}; it must be at most "
                            f"{MAX_MESSAGE_MB} (gRPC's limit, 2 GiB)")
    # A reply of float32 images that could not be sent would fail after its work was done.
    fit = images_per_message(s.max_message_bytes)
    for name in ("max_sample_n", "max_chunk_size", "max_images_per_request"):
        if getattr(s, name) > fit:
            raise SettingsError(
                f"{_flag(name)}: {getattr(s, name)} float32 images make a reply over "
                f"--max-message-mb {s.max_message_mb}, which carries {fit}; raise "
                f"--max-message-mb or lower {_flag(name)}")


def _check_tls(s: Settings) -> None:
    """Both halves of the key pair or neither, a client CA only with TLS, and every file
    readable and usable, so that a mistake stops the start rather than the first handshake."""
    if bool(s.tls_cert) != bool(s.tls_key):
        given, missing = ("--tls-cert", "--tls-key") if s.tls_cert else ("--tls-key", "--tls-cert")
        raise SettingsError(f"{given} needs {missing} too (TLS takes a certificate and its "
                            "private key)")
    if s.tls_client_ca and not s.tls_cert:
        raise SettingsError("--tls-client-ca (mutual TLS) needs TLS: give --tls-cert and "
                            "--tls-key too")
    if not s.tls_cert:
        return
    try:
        read_pem(s.tls_cert, "--tls-cert", CERTIFICATE)
        read_pem(s.tls_key, "--tls-key", PRIVATE_KEY)
        if s.tls_client_ca:
            read_pem(s.tls_client_ca, "--tls-client-ca", CERTIFICATE)
        # gRPC would only find a bad pair or CA at the first handshake; OpenSSL checks now.
        check_pair(s.tls_cert, s.tls_key, "--tls-cert", "--tls-key")
        if s.tls_client_ca:
            check_ca(s.tls_client_ca, "--tls-client-ca")
    except SecurityFileError as exc:
        raise SettingsError(str(exc)) from None


def _load_tokens(s: Settings, env: Mapping[str, str]) -> tuple[str, ...]:
    """The tokens of VAE_AUTH_TOKENS and then of --auth-token-file, without repeats. Error
    messages say where a bad token is, never what it is."""
    tokens: list[str] = []
    from_env = env.get(TOKENS_VAR)
    # Set and blank (a Kubernetes secret's empty key, a variable passed on unset): refused,
    # as a list of no token is, rather than serve without tokens while the operator meant
    # some; unset, it is no tokens.
    if from_env is not None:
        for i, item in enumerate(from_env.split(","), 1):
            token = item.strip()
            if token and not valid_token(token):
                raise SettingsError(f"{TOKENS_VAR}: token {i} is not {TOKEN_RULE}")
            if token:
                tokens.append(token)
        if not tokens:
            raise SettingsError(f"{TOKENS_VAR} is set but holds no token (unset it to serve "
                                "without tokens)")
    if s.auth_token_file:
        try:
            tokens += read_tokens(s.auth_token_file, "--auth-token-file")
        except SecurityFileError as exc:
            raise SettingsError(str(exc)) from None
    return tuple(dict.fromkeys(tokens))
