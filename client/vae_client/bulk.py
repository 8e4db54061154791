"""`vae-client bulk`: N generated digits written as dataset shards that ML code loads directly,
by a batch job: on a Ray cluster (the `bulk` extra), or in this process without one.

Every shard is a range of item indices, made from SampleStream calls alone, so its bytes
depend on (seed, labels, index) only: the same whatever the number of workers, servers or
tries. Labelled items (the default where the model offers digit classes) take their classes
in turn: item i is image i // D of the stream of class digits[i % D] (D classes), so each
class is a tenth of every shard.

Shards are written as `_<name>.<random>.part` (a new file, never one that exists) and renamed
when whole; a `_<name>.sha256` beside each records its hash and the settings it was made with
(BulkSpec.key). A run that finds a shard whose hash and settings match skips it, so a job that
died resumes where it stopped. `_bulk.json` holds what the shards are of (the model version,
the seed, the layout); a run with other settings in a folder that holds shards is refused,
naming the settings that differ; `_manifest.json` lists the shards with their hashes when the
job is done. One job at a time writes to a folder: its driver holds a lock (`_bulk.lock`).

Each stream is pinned to the spec's model version (a server of another refuses it), and one
refused for a full queue (RESOURCE_EXHAUSTED, after gRPC's own retries) waits and goes on from
where it stopped, for up to BUSY_PATIENCE_S without progress: a batch job outlasts a busy
server rather than fail with it.

Formats:
- parquet: columns `index` (int64), `seed` (uint64), `label` (int16, -1 unlabelled) and
  `image` (PNG bytes, 28x28 8-bit gray), one row group per shard (needs pyarrow);
- webdataset: tar files of `<index>.png`, `<index>.cls` (the label, as text) and
  `<index>.json` ({"index", "seed", "label"}), as the webdataset package reads them;
- npz: `images` uint8 [n, 28, 28], `index` int64 [n], `label` int16 [n], `seed` uint64 [1].
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from vae_client.channel import Security
from vae_client.client import VaeClient
from vae_client.errors import VaeError
from vae_client.images import encode_png
from vae_core.files import new_part, replacing
from vae_core.manifest import sha256_file

FORMATS = {"parquet": ".parquet", "webdataset": ".tar", "npz": ".npz"}
# Names starting with _ are skipped by the readers of a folder of shards (pyarrow, pandas).
SPEC_FILE = "_bulk.json"
MANIFEST = "_manifest.json"
LOCK_FILE = "_bulk.lock"
NO_LABEL = -1
# Items a shard holds in memory while it is made (images, then their encoding: about 3 KB an
# item as parquet), times the shards made at once.
MAX_SHARD_SIZE = 1_000_000
# How long a stream refused for a full queue keeps trying without getting a chunk.
BUSY_PATIENCE_S = 300.0
BUSY_WAIT_S = (0.5, 10.0)  # its first wait, and the longest (doubling in between)


class BulkError(ValueError):
    """Settings that cannot make the dataset asked for (or not the one already begun)."""


@dataclass(frozen=True)
class BulkSpec:
    """What the shards are of: the same spec always gives the same bytes."""

    n: int
    seed: int
    shard_size: int
    format: str
    digits: tuple[int, ...]  # the classes items take in turn; () = unlabelled
    model_version: str
    chunk_size: int = 1000  # images per SampleStream chunk (the bytes do not depend on it)

    @property
    def shards(self) -> int:
        return -(-self.n // self.shard_size)

    def shard_name(self, i: int) -> str:
        return f"train-{i:05d}-of-{self.shards:05d}{FORMATS[self.format]}"

    def shard_range(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min(self.n, (i + 1) * self.shard_size)

    def to_json(self) -> str:
        d = asdict(self)
        d["digits"] = list(self.digits)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @property
    def key(self) -> str:
        """Names these settings in each shard's record: a shard is kept only by a run of the
        settings that made it, whatever _bulk.json says (it may have been removed)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _record(shard: Path) -> Path:
    return shard.with_name(f"_{shard.name}.sha256")


def shard_done(out: Path, spec: BulkSpec, i: int) -> str | None:
    """The sha256 of shard i when it is whole and of these settings (its file matches the hash
    recorded beside it, with spec.key)."""
    path = out / spec.shard_name(i)
    record = _record(path)
    if not (path.is_file() and record.is_file()):
        return None
    try:
        digest, key = record.read_text(encoding="ascii").split()
    except (UnicodeDecodeError, ValueError):  # damaged, or of an older vae-client: remade
        return None
    return digest if key == spec.key and sha256_file(path) == digest else None


@contextlib.contextmanager
def _new_file(path: Path) -> Iterator[IO[bytes]]:
    """A file of a new name beside `path` (never one that exists: not another job's, nor a
    link planted there), renamed to `path` once written; removed if the writing fails. Its
    mode is that of any new file (0666 less the umask), as readers of the dataset expect."""
    part, fd = new_part(path, keep_mode=False, prefix="_")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(part, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise


# -- one shard -----------------------------------------------------------------------------


class Stopped(BulkError):
    """The job stopped (a shard failed, or an interrupt) while this shard was being made."""


def _stream(client: VaeClient, n: int, seed: int, chunk_size: int, offset: int,
            digit: int | None, timeout: float | None, stop: threading.Event | None = None,
            ) -> Iterator[tuple[int, np.ndarray]]:
    """client.sample_stream, waiting out a full queue (see the module's docstring); `timeout`
    bounds the stream whole, its waits included; `stop`, once set, ends it at its next chunk
    or wait."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wait, waited = BUSY_WAIT_S[0], 0.0
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            for first, x in client.sample_stream(n, seed=seed, chunk_size=chunk_size,
                                                 dtype="uint8", offset=offset, digit=digit,
                                                 timeout=left):
                if stop is not None and stop.is_set():
                    raise Stopped("stopped")
                yield first, x
                offset, wait, waited = first + len(x), BUSY_WAIT_S[0], 0.0
            return
        except VaeError as exc:
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or exc.resume_offset is None \
                    or waited >= BUSY_PATIENCE_S or out_of_time:
                raise
            offset = exc.resume_offset
        if deadline is not None:
            wait = min(wait, max(0.0, deadline - time.monotonic()))
        if stop is None:
            time.sleep(wait)
        elif stop.wait(wait):
            raise Stopped("stopped")
        waited += wait
        wait = min(2 * wait, BUSY_WAIT_S[1])


def shard_items(client: VaeClient, spec: BulkSpec, lo: int, hi: int,
                chunk_size: int | None = None, timeout: float | None = None,
                stop: threading.Event | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Items lo .. hi - 1: (images uint8 [n, 28, 28], labels int16 [n]), in stream chunks of
    `chunk_size` images (None: spec.chunk_size; 0: each server's default; the bytes do not
    depend on it). `timeout` bounds each stream whole (default: none); `stop`: _stream's."""
    n = hi - lo
    images = np.empty((n, 28, 28), np.uint8)
    labels = np.full(n, NO_LABEL, np.int16)
    classes: tuple[int | None, ...] = spec.digits or (None,)  # unlabelled: one stream, any class
    d = len(classes)
    chunk = spec.chunk_size if chunk_size is None else chunk_size
    for p, digit in enumerate(classes):
        # Items i = p (mod d) of the range are images j = i // d of class `digit`'s stream.
        first = lo + (p - lo) % d
        if first >= hi:
            continue
        j_lo, j_hi = first // d, (hi - 1 - p) // d + 1
        rows = np.arange(first - lo, n, d)
        for offset, x in _stream(client, j_hi, spec.seed, chunk, j_lo, digit, timeout, stop):
            images[rows[offset - j_lo : offset - j_lo + len(x)]] = x
        if digit is not None:
            labels[rows] = digit
    return images, labels


def write_shard(f: IO[bytes], spec: BulkSpec, lo: int, images: np.ndarray,
                labels: np.ndarray) -> None:
    index = np.arange(lo, lo + len(images), dtype=np.int64)
    if spec.format == "npz":
        np.savez(f, images=images, index=index, label=labels,
                 seed=np.array([spec.seed], np.uint64))
    elif spec.format == "webdataset":
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i, image, label in zip(index.tolist(), images, labels.tolist(), strict=True):
                meta = json.dumps({"index": i, "seed": spec.seed, "label": label}).encode()
                for suffix, data in ((".png", encode_png(image)),
                                     (".cls", str(label).encode()), (".json", meta)):
                    info = tarfile.TarInfo(f"{i:09d}{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "index": pa.array(index, pa.int64()),
            "seed": pa.array(np.full(len(index), spec.seed, np.uint64), pa.uint64()),
            "label": pa.array(labels, pa.int16()),
            "image": pa.array([encode_png(x) for x in images], pa.binary()),
        })
        pq.write_table(table, f, row_group_size=len(index), compression="zstd")


def make_shard(target: str, spec: BulkSpec, i: int, out: str,
               security: Security | None = None, chunk_size: int | None = None,
               timeout: float | None = None, stop: threading.Event | None = None) -> str:
    """Generate and write shard i (unless it is whole already); its sha256. What a Ray task
    runs, on whichever node: `out` must be a folder every node writes to. `chunk_size` and
    `timeout`: as shard_items takes them (what the servers allow; each stream's deadline)."""
    folder = Path(out)
    done = shard_done(folder, spec, i)
    if done is not None:
        return done
    lo, hi = spec.shard_range(i)
    # Every stream pinned to the model the job began with: a server of another (an upgrade
    # under way behind the target) refuses it rather than mix two models in the dataset.
    with VaeClient(target, security=security, model_version=spec.model_version) as client:
        images, labels = shard_items(client, spec, lo, hi, chunk_size, timeout, stop)
    path = folder / spec.shard_name(i)
    with _new_file(path) as f:
        write_shard(f, spec, lo, images, labels)
    digest = sha256_file(path)
    with _new_file(_record(path)) as f:
        f.write(f"{digest} {spec.key}\n".encode("ascii"))
    return digest


# -- the job -------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` for one job: a second job on the folder is refused (its shards' files would
    be written twice at once)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BulkError(f"{out}: another vae-client bulk job writes to this folder "
                            f"({out / LOCK_FILE} is locked)") from None
        yield


def _begun(out: Path) -> bool:
    """Whether `out` holds any shard or shard record."""
    return any(out.glob("train-*")) or any(out.glob("_train-*.sha256"))


def _differences(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    return ", ".join(f"{k} {theirs.get(k)!r} (this run: {ours.get(k)!r})"
                     for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k))


def prepare(out: Path, spec: BulkSpec) -> list[int]:
    """Check or write _bulk.json; the shards left to make. Call it holding `locked(out)`."""
    if spec.format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise BulkError("--format parquet needs pyarrow: pip install 'vae-serving[bulk]', "
                            "or --format npz or webdataset") from None
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / SPEC_FILE
    wanted = spec.to_json()
    held = spec_path.read_bytes() if spec_path.is_file() else None
    if held is None and _begun(out):
        # Removed: a run of other settings would make its shards beside these, and a reader
        # of the folder take both for one dataset.
        raise BulkError(f"{out} holds shards but no {SPEC_FILE} that says of which settings: "
                        "use another folder, or remove its train-* and _train-* files to "
                        "begin it again")
    if held is not None and held != wanted.encode() and _begun(out):
        try:
            theirs = json.loads(held)
            if not isinstance(theirs, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            raise BulkError(f"{spec_path} cannot be read: use another folder, or remove the "
                            "folder's files to begin it again") from None
        ours = json.loads(wanted)
        if theirs != ours:
            raise BulkError(f"{out} holds the shards of other settings ({spec_path}: "
                            f"{_differences(theirs, ours)}): use another folder, or the same "
                            "settings to resume")
    # No shard yet (a first run, or one that failed before any): these settings are the
    # folder's now.
    if held != wanted.encode():
        with replacing(spec_path, "w", encoding="utf-8") as f:
            f.write(wanted)
    # Left by a job that died (this one holds the folder): a shard's and a record's.
    for part in [*out.glob("_train-*.part"), *out.glob("__train-*.part")]:
        with contextlib.suppress(OSError):
            part.unlink()
    todo = [i for i in range(spec.shards) if shard_done(out, spec, i) is None]
    if todo:  # a manifest says the job is whole: not while shards are missing
        (out / MANIFEST).unlink(missing_ok=True)
    return todo


def run_local(target: str, spec: BulkSpec, out: Path, todo: list[int], workers: int,
              security: Security | None, on_done: Callable[[int, str], None],
              chunk_size: int | None = None, timeout: float | None = None) -> None:
    """The shards by a thread pool of this process (no Ray). A failure or an interrupt stops
    the job: the shards not begun are not started, and those under way end at their next
    chunk or wait (a chunk a stuck server never sends is waited for: --timeout bounds it)."""
    queue = collections.deque(todo)
    workers = max(1, workers)
    stop = threading.Event()  # set on a failure or an interrupt: the shards under way end
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        # Submitted as they finish, `workers` at a time: a job of millions of shards holds a
        # few futures, not millions.
        pending: dict[concurrent.futures.Future[str], int] = {}
        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    i = queue.popleft()
                    pending[pool.submit(make_shard, target, spec, i, str(out), security,
                                        chunk_size, timeout, stop)] = i
                finished, _ = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished:
                    on_done(pending.pop(future), future.result())
        except BaseException:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_ray(target: str, spec: BulkSpec, out: Path, todo: list[int], workers: int,
            security: Security | None, on_done: Callable[[int, str], None],
            chunk_size: int | None = None, address: str | None = None,
            timeout: float | None = None) -> None:
    """The shards as Ray tasks, at most `workers` at once, on the cluster at `address` (a
    local one when None)."""
    try:
        import ray
    except ImportError:
        raise BulkError("Ray is not installed: pip install 'vae-serving[bulk]', or --no-ray"
                        ) from None
    started_here = not ray.is_initialized()
    if started_here:
        if address is not None:
            check_reachable(address)
        # ray.init puts in its own SIGTERM handler (sys.exit), in place of vae-client's, which
        # stops the job as Ctrl-C does: the latter is put back.
        on_sigterm = signal.getsignal(signal.SIGTERM)
        restore = on_sigterm is not None and threading.current_thread() is threading.main_thread()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ValueError, ConnectionError) as exc:  # an address it cannot read, or reach
            where = "a local Ray cluster" if address is None else f"--ray-address {address}"
            raise BulkError(f"{where}: {' '.join(str(exc).split())}") from None
        except SystemExit as exc:
            # A SIGTERM while Ray started ran Ray's handler, sys.exit(15), silent: it was the
            # caller's to handle (vae-client's says "terminated" and exits 143), as if it had
            # come to it, which may set another handler for a second one.
            if restore:
                signal.signal(signal.SIGTERM, on_sigterm)
                restore = False
            if exc.code == signal.SIGTERM and callable(on_sigterm):
                on_sigterm(signal.SIGTERM, None)
            raise
        finally:
            if restore:
                signal.signal(signal.SIGTERM, on_sigterm)
    try:
        task: Any = ray.remote(num_cpus=0.5, max_retries=3)(make_shard)
        pending: dict[Any, int] = {}
        queue = collections.deque(todo)
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                i = queue.popleft()
                pending[task.remote(target, spec, i, str(out.resolve()), security,
                                    chunk_size, timeout)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                try:
                    digest = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    # The task's own error (a VaeError, say), not Ray's report of it with the
                    # worker's traceback in its message.
                    if isinstance(exc.cause, Exception):
                        raise exc.cause from None
                    raise
                on_done(pending.pop(ref), digest)
    finally:
        if started_here:
            ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raises BulkError when `address` names a host and port (HOST:PORT, ray://HOST:PORT)
    that takes no TCP connection within `timeout` seconds: ray.init retries such an address
    for minutes before it gives up. Other forms (auto, local) are ray.init's to read."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    host = host.removeprefix("[").removesuffix("]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, OverflowError) as exc:  # refused, unreachable, timed out, no such host
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise BulkError(f"--ray-address {address}: no connection to {host}:{port} "
                        f"within {timeout:g} s ({reason})") from None


def write_manifest(out: Path, spec: BulkSpec, digests: dict[int, str]) -> dict[str, Any]:
    shards = []
    for i in range(spec.shards):
        lo, hi = spec.shard_range(i)
        shards.append({"name": spec.shard_name(i), "first": lo, "count": hi - lo,
                       "sha256": digests[i]})
    manifest = {**json.loads(spec.to_json()), "shards": shards}
    with replacing(out / MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shard_digests(out: Path, spec: BulkSpec) -> Iterator[tuple[int, str]]:
    for i in range(spec.shards):
        done = shard_done(out, spec, i)
        if done is None:
            raise BulkError(f"shard {spec.shard_name(i)} is missing or does not match its hash")
        yield i, done
