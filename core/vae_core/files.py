"""Files written whole or not at all: beside their path, renamed once written and closed, so
that an interrupted or failed write leaves the file that was there (or none), never part of
one, and two writers of one path leave one whole file. Every output of the client, and a
training run's checkpoint and prior, are written so.

A symbolic link is followed (the file it names is replaced, the link kept), and a path that
is no regular file, such as /dev/stdout, /dev/null or a named pipe, is written in place: it
cannot be replaced, and must not be (a device file renamed over is gone)."""

from __future__ import annotations

import errno
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, NamedTuple

# Paths that name a process's open files (/dev/stdout is a link to /proc/self/fd/1): written
# through as they are, never resolved (that names the pipe or file behind them, which a
# rename would replace or, for a pipe, not find).
_OPEN_FILES = ("/dev/stdin", "/dev/stdout", "/dev/stderr", "/dev/fd/", "/proc/")


class Destination(NamedTuple):
    """Where a write to a path lands, and how."""

    target: Path  # the path with its symbolic links followed (as given where `in_place`)
    in_place: bool  # written into, not replaced: a device, a pipe, a process's open file


def destination(path: str | os.PathLike[str]) -> Destination:
    """The file a write to `path` lands in, and whether it is written in place (one of a
    process's open files, or an existing file that is not a regular one: a device, a named
    pipe, a socket) or replaced. A path that loops (symbolic links to each other) raises the
    OSError a write would."""
    if _in_place(path):
        return Destination(Path(path), True)
    return Destination(Path(os.path.realpath(path)), False)


def _in_place(path: str | os.PathLike[str]) -> bool:
    if os.path.abspath(path).startswith(_OPEN_FILES):
        return True
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # ELOOP: as open() would refuse it, not a link replaced by a file
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


# The part file's name keeps this many bytes of the target's, so that a name as long as the
# filesystem allows (255 bytes) still leaves room for the part file's own.
_PART_NAME_BYTES = 200


def _short(name: str) -> str:
    """`name` cut to _PART_NAME_BYTES bytes (at a whole character)."""
    cut = os.fsencode(name)[:_PART_NAME_BYTES]
    return os.fsdecode(cut.decode("utf-8", "ignore").encode())


def _part_name(name: str, prefix: str = ".") -> str:
    return f"{prefix}{_short(name)}.{secrets.token_hex(4)}.part"


def kept_mode(target: Path) -> int | None:
    """The mode of the file a write replaces (None: there is none, and a new one takes 0666
    less the umask)."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return None


def new_part(target: Path, keep_mode: bool = True, prefix: str = ".") -> tuple[Path, int]:
    """A new file beside `target` (which must not be one written in place) to write it in
    before it takes its name: `.NAME.RANDOM.part` (`prefix` in place of the dot: bulk's part
    files begin with "_"), created exclusively and without following a
    link (O_EXCL | O_NOFOLLOW), so that two writers of one path never share a part file and a
    link planted at a guessable name is never written through. Its mode is the replaced
    file's (kept_mode), unless `keep_mode` is false: a caller that opens it again by its name
    (a read-only mode would refuse that) gives it that mode itself before the rename. Returns
    the path and its open descriptor."""
    keep = kept_mode(target) if keep_mode else None
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        part = target.with_name(_part_name(target.name, prefix))
        try:
            fd = os.open(part, flags, 0o666)
        except FileExistsError:  # another writer's, or a planted name: draw again
            continue
        break
    if keep is not None:
        try:
            os.fchmod(fd, keep)
        except BaseException:
            os.close(fd)
            part.unlink(missing_ok=True)
            raise
    return part, fd


def discard_part(path: str | os.PathLike[str], exc: BaseException, part: Path) -> None:
    """After `exc` stopped a write to `part`: the part file removed, and `exc`, an OSError,
    made to name the file asked for (a write's error, ENOSPC, names none, and an open's names
    the part file, which the user never asked for)."""
    with suppress(OSError):  # `exc` is the error to report
        part.unlink(missing_ok=True)
    if isinstance(exc, OSError) and exc.filename in (None, str(part)):
        exc.filename = str(path)


@contextmanager
def replacing(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """open(a new part file beside `path`, mode, **kwargs) (new_part), flushed to the disk
    and renamed to `path` once written and closed: a failure (a full disk, an error of the
    caller's) leaves the file already at `path` as it was, removes the part file, and raises
    an OSError naming `path`. Two writers of one path each write their own part file, and the
    last rename wins, whole. (A link: its file; a device or a pipe: written in place.)"""
    target, in_place = destination(path)
    if in_place:
        try:
            with open(target, mode, **kwargs) as f:
                yield f
        except OSError as exc:
            exc.filename = os.fspath(path)
            raise
        return
    try:
        part, fd = new_part(target)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    try:
        try:
            f = open(fd, mode, **kwargs)  # noqa: SIM115 - closed by the with below, fd here
        except BaseException:
            os.close(fd)
            raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data on the disk before the name points at it
        os.replace(part, target)
    except BaseException as exc:
        discard_part(path, exc, part)
        raise


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse now a file that `replacing` could not write once the work is done: a folder
    that is missing or read-only, or a folder where the file should be. Raises the OSError
    the write would, naming `path`. The probe is a file of a name of its own, so that a
    write of the same path under way is left alone."""
    target, in_place = destination(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    if in_place:
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{_short(target.name)}.", suffix=".probe",
                                     dir=target.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
    os.close(fd)
    os.unlink(probe)
