"""Files and terminal output of the `vae-client` command: image and latent files, score
tables, and a text progress bar. Nothing here talks to the server."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from vae_client._codec import Scores
from vae_client.images import SIDE, grid, load_images, to_uint8, write_png
from vae_core import files
from vae_core.files import destination, discard_part, kept_mode, new_part, replacing

IMAGE_SUFFIXES = (".npy", ".png")
LATENT_SUFFIXES = (".npy", ".npz")
MAX_PNG_IMAGES = 65536  # a 256 x 256 grid, about 7,700 pixels a side


class CliError(Exception):
    """A problem with the command's inputs or outputs, reported as one line."""


def suffix_of(path: str, allowed: Sequence[str], option: str) -> str:
    """The lower-case suffix of `path`, which must be one of `allowed`."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise CliError(f"{option} {path}: the name must end in {' or '.join(allowed)}")
    return suffix


# -- images ---------------------------------------------------------------------------------

# What posix_fallocate answers where the file system cannot reserve space (and glibc does not
# emulate it): the file then stays sparse, as it was before reserving.
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})


def reserve(path: Path) -> None:
    """Allocate the blocks of the whole file at `path` now. A memory map of a sparse file
    that finds the disk full when it writes a page kills the process with SIGBUS, without a
    word; reserved up front, a full disk is an OSError (ENOSPC) before any page is written."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: left sparse
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as exc:
            if exc.errno in _NO_FALLOCATE:
                return
            raise OSError(exc.errno, f"{exc.strerror} (the file needs {size:,} bytes)"
                          ) from None


def read_images(paths: Sequence[str]) -> np.ndarray:
    """One or more image files (see images.load_images) -> one array, uint8 or float32."""
    parts = [load_images(p) for p in paths]
    if len(parts) == 1:
        return parts[0]
    if len({p.dtype for p in parts}) > 1:
        raise CliError("--in: the files mix uint8 and float pixels; the server reads the two "
                       "differently, so convert them to one kind first")
    return np.concatenate([p.reshape(len(p), SIDE, SIDE) for p in parts])


class ImageSink:
    """Images [n, 28, 28] written by pieces at their offsets: to an NPY file through a
    memory map (memory stays bounded whatever n is), or kept as uint8 and written as one PNG
    grid on close() (a lone image as the 28 x 28 digit alone). The NPY file is written beside
    the path and takes its name on close(), so a file already there is replaced only by a
    whole one; abort() removes the partly written one. Its space is reserved when the sink
    is made: a disk too small refuses then, with an OSError naming the path."""

    def __init__(self, path: str, n: int, dtype: str, cols: int | None = None) -> None:
        self.path, self.n, self.cols = path, n, cols
        self.kind = suffix_of(path, IMAGE_SUFFIXES, "--out")
        if self.kind == ".png":
            if n > MAX_PNG_IMAGES:
                raise CliError(f"--out {path}: a PNG grid of {n} images is too large (at most "
                               f"{MAX_PNG_IMAGES}); write a .npy file")
            self._array: np.ndarray = np.zeros((n, SIDE, SIDE), dtype=np.uint8)
        else:
            # The target named once: a link re-pointed during the run changes nothing. A pipe
            # or a device gets the whole file at close(); its part file is a temporary one.
            self._target, self._in_place = destination(path)
            if self._in_place:
                fd, part = tempfile.mkstemp(prefix=".vae-client-", suffix=".npy.part")
                os.close(fd)
                self._part = Path(part)
            else:
                # numpy opens it again, by its name: the replaced file's mode (read-only,
                # say) is given at close(), not now.
                self._mode = kept_mode(self._target)
                self._part, fd = new_part(self._target, keep_mode=False)
                os.close(fd)
            try:
                array = np.lib.format.open_memmap(self._part, mode="w+", dtype=np.dtype(dtype),
                                                  shape=(n, SIDE, SIDE))
                reserve(self._part)
            except BaseException as exc:
                discard_part(path, exc, self._part)  # the caller has no sink to abort()
                raise
            self._array = array

    def put(self, offset: int, images: np.ndarray) -> None:
        if offset < 0 or offset + len(images) > self.n:
            raise CliError(f"images {offset} .. {offset + len(images) - 1} fall outside the "
                           f"{self.n} requested")
        block = images.reshape(len(images), SIDE, SIDE)
        self._array[offset : offset + len(images)] = (
            to_uint8(block) if self.kind == ".png" else block)

    def close(self) -> None:
        if self.kind == ".png":
            # One image is the digit itself, 28 x 28, so that `encode --in` reads it back.
            write_png(self.path, self._array[0] if self.n == 1 else grid(self._array, self.cols))
        else:
            try:
                self._array.flush()  # type: ignore[attr-defined]
                del self._array
                if self._in_place:  # written through, as replacing does
                    with open(self._part, "rb") as src, open(self._target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    self._part.unlink()
                else:
                    if self._mode is not None:
                        os.chmod(self._part, self._mode)
                    os.replace(self._part, self._target)
            except BaseException as exc:
                discard_part(self.path, exc, self._part)
                raise

    def abort(self) -> None:
        if self.kind == ".npy":
            del self._array
            self._part.unlink(missing_ok=True)


def target_addresses(target: str) -> int:
    """How many servers a target lists: `ipv4:A:P,B:P` (or ipv6:) names several, any other
    target (a host:port, a dns:/// name whose addresses only the resolver knows) counts 1."""
    scheme, _, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6") and rest:
        return len([a for a in rest.split(",") if a])
    return 1


def split_range(n: int, parts: int, chunk: int) -> list[tuple[int, int]]:
    """Images 0 .. n - 1 in at most `parts` contiguous ranges [lo, hi), each but the last a
    whole number of chunks."""
    step = max(1, -(-n // max(1, parts)))
    if chunk > 0:
        step = -(-step // chunk) * chunk
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


# -- latents --------------------------------------------------------------------------------


def _load_latents(path: str, npz: bool) -> np.ndarray:
    if not npz:
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as arrays:
        key = "z" if "z" in arrays.files else "mu" if "mu" in arrays.files else None
        if key is None:
            raise CliError(f"--in {path}: an .npz file needs an array named z or mu; it "
                           f"holds {', '.join(arrays.files) or 'nothing'}")
        return arrays[key]


def read_latents(path: str) -> np.ndarray:
    """Latents from .npy ([N, k] or one [k]) or from .npz (its `z`, else its `mu`): float32."""
    npz = suffix_of(path, LATENT_SUFFIXES, "--in") == ".npz"
    try:
        z = _load_latents(path, npz)
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:  # not NPY/NPZ, or pickled
        raise CliError(f"--in {path}: cannot read it as {'NPZ' if npz else 'NPY'} ({exc})"
                       ) from None
    z = z[None] if z.ndim == 1 else z
    if z.ndim != 2 or len(z) == 0 or z.dtype.kind not in "fiu":
        raise CliError(f"--in {path}: latents of shape {list(z.shape)} and dtype {z.dtype}; "
                       "expected numbers [N, k]")
    return z.astype(np.float32, copy=False)


def check_writable(path: str | None) -> None:
    """vae_core.files.check_writable, before the work whose output `path` is to hold; None
    and '-' (stdout) pass."""
    if path is not None and path != "-":
        files.check_writable(path)


def write_latents(path: str, mu: np.ndarray, logvar: np.ndarray, z: np.ndarray | None) -> None:
    """.npz: arrays mu, logvar (and z when sampled). .npy: z when sampled, else mu."""
    # Through an open file: given a name, numpy adds ".npy" or ".npz" to one that does not
    # end so in lower case (Z.NPY would become Z.NPY.npy).
    npz = suffix_of(path, LATENT_SUFFIXES, "--out") == ".npz"
    with replacing(path) as f:
        if npz:
            if z is None:
                np.savez(f, mu=mu, logvar=logvar)
            else:
                np.savez(f, mu=mu, logvar=logvar, z=z)
        else:
            np.save(f, mu if z is None else z)


# -- scores ---------------------------------------------------------------------------------

_COLUMNS = ("index", "elbo", "log_likelihood", "bits_per_dim", "percentile", "anomaly")


def concat_scores(parts: Sequence[Scores]) -> Scores:
    fields = ("elbo", "log_likelihood", "bits_per_dim", "percentile", "anomaly")
    return Scores(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields},
                  k=parts[0].k)


def is_stdout(path: str) -> bool:
    """Whether `path` is this process's standard output: '-', /dev/stdout, or the very file
    or pipe it writes to."""
    if path == "-":
        return True
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError):  # no such file; no stdout (closed, or not a real file)
        return False


@contextmanager
def _open_out(path: str) -> Iterator[IO[str]]:
    """stdout for '-' or a path to it (/dev/stdout: opened again, it would be truncated,
    where the shell may append), else the file at `path`, written whole or not at all
    (`replacing`)."""
    if is_stdout(path):
        yield sys.stdout
    else:
        with replacing(path, "w", newline="", encoding="utf-8") as f:
            yield f


def write_scores_json(path: str, scores: Scores) -> None:
    """A JSON list of one object per image (Scores.records()), one line each; '-' = stdout."""
    lines = ",\n".join(json.dumps(r) for r in scores.records())
    with _open_out(path) as f:
        f.write(f"[\n{lines}\n]\n")


def write_scores_csv(path: str, scores: Scores) -> None:
    """CSV with a header row, one row per image; '-' = stdout."""
    with _open_out(path) as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(scores.records())


def scores_table(scores: Scores) -> str:
    out = io.StringIO()
    out.write(f"{'index':>7} {'elbo':>12} {'log_likelihood':>15} {'bits_per_dim':>13} "
              f"{'percentile':>11} {'anomaly':>8}\n")
    for r in scores.records():
        out.write(f"{r['index']:>7} {r['elbo']:>12.3f} {r['log_likelihood']:>15.3f} "
                  f"{r['bits_per_dim']:>13.4f} {r['percentile']:>11.2f} "
                  f"{'yes' if r['anomaly'] else 'no':>8}\n")
    return out.getvalue()


def scores_summary(scores: Scores) -> str:
    n, flagged = len(scores.elbo), int(np.count_nonzero(scores.anomaly))
    return (f"{n} images, k={scores.k}: mean elbo {scores.elbo.mean():.3f} nats, mean "
            f"log-likelihood {scores.log_likelihood.mean():.3f} nats, mean bits/dim "
            f"{scores.bits_per_dim.mean():.4f}, {flagged} anomalies ({100.0 * flagged / n:.1f}%)")


# -- model info -----------------------------------------------------------------------------


def message_dict(msg: Any) -> dict[str, Any]:
    """A protobuf message -> a plain dict of every field, defaults included (ints stay ints,
    unlike protobuf's JSON mapping, which writes 64-bit integers as strings)."""
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if hasattr(value, "DESCRIPTOR"):
            out[field.name] = message_dict(value)
        elif isinstance(value, (str, bytes, bool, int, float)):
            out[field.name] = value
        else:  # a repeated field
            out[field.name] = [message_dict(v) if hasattr(v, "DESCRIPTOR") else v for v in value]
    return out


def info_dict(info: Any) -> dict[str, Any]:
    """ModelInfo as a dict, with manifest_json replaced by the parsed `manifest` object."""
    d = message_dict(info)
    text = d.pop("manifest_json")
    d["manifest"] = json.loads(text) if text else None
    return d


def info_text(target: str, info: Any) -> str:
    d = info_dict(info)
    manifest = d.pop("manifest") or {}
    rows: dict[str, Any] = {"target": target}
    for key, value in d.items():
        if isinstance(value, dict):
            rows.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            rows[key] = value
    training = manifest.get("training") or {}
    calibration = manifest.get("calibration") or {}
    rows.update({"manifest.created": manifest.get("created"),
                 "manifest.hidden": manifest.get("hidden"),
                 "manifest.training.data": training.get("data"),
                 "manifest.training.val_elbo": training.get("val_elbo"),
                 "manifest.calibration.mean_log_likelihood":
                     calibration.get("mean_log_likelihood")})
    width = max(len(k) for k in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items() if v is not None)


# -- progress -------------------------------------------------------------------------------


class Progress:
    """A one-line text progress bar on stderr: images done / total, percent, images/s.
    Redrawn at most every `interval` seconds; silent when not enabled. `done`: images done
    before (a job resumed), counted in the total but not in the rate."""

    def __init__(self, total: int, label: str, enabled: bool, stream: IO[str] | None = None,
                 interval: float = 0.1, done: int = 0) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.done = self._before = done
        self._start = self._drawn = time.monotonic()
        self._drawn_done, self._width = -1, 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self._drawn >= self.interval or self.done >= self.total):
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-9)
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        return (f"{self.label} [{bar}] {self.done}/{self.total} {100 * frac:5.1f}% "
                f"{(self.done - self._before) / elapsed:,.0f} img/s")

    def _draw(self, now: float) -> None:
        text = self.line(now)
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._drawn, self._drawn_done, self._width = now, self.done, len(text)

    def close(self) -> None:
        if self.enabled:
            if self._drawn_done != self.done or not self._width:
                self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False


def progress_wanted(flag: bool | None) -> bool:
    """--progress / --no-progress, or by default: only when stderr is a terminal."""
    if flag is not None:
        return flag
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
