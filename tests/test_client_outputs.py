"""The client's outputs are written whole or not at all, and its refusals come as the README
promises: a disk that fills up (a small tmpfs) or a file size limit (RLIMIT_FSIZE) leaves the
file already at the path as it was, with no part file beside it and one line naming the file;
a bulk job, a bench and the library's constructors and calls refuse what cannot work in one
line, before anything is allocated or sent. The CLI runs as a subprocess against a real
vae-server subprocess."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from prometheus_harness import need_module
from serving import run_cli, served_process
from vae_client import VaeClient, VaeError
from vae_client.aio import AsyncVaeClient
from vae_client.cli_io import ImageSink
from vae_core.ports import free_port

pytestmark = pytest.mark.e2e

# Small per-call limits: a bench of one image more is refused, one of the limit runs cheaply.
LIMITS = {"max_images_per_request": 16, "max_sample_n": 24, "max_chunk_size": 32}
TMPFS_BYTES = 4 << 20


@pytest.fixture(scope="module")
def target(model_dir):
    flags = [a for name, value in LIMITS.items()
             for a in ("--" + name.replace("_", "-"), str(value))]
    with served_process(model_dir, "--log-level", "WARNING", "--warmup-rounds", "1", *flags,
                        "--default-chunk-size", str(LIMITS["max_chunk_size"]),
                        timeout=30) as (target, _):
        yield target


Cli = Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def cli(target) -> Cli:
    def run(*args: str, expect: int = 0, setup: str | None = None) -> subprocess.CompletedProcess:
        return run_cli(target, *args, expect=expect, timeout=120, setup=setup)

    return run


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A tmpfs of 4 MiB: a disk that fills up. Skipped where mounting is not permitted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                           str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True, timeout=30)


def fill(disk: Path) -> None:
    """Write zeros to `disk` until it is full."""
    block = bytes(4096)
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def file_size_limit(nbytes: int) -> str:
    """A `setup` of run_cli: the child may write no file past `nbytes` bytes (EFBIG after them;
    Python ignores SIGXFSZ). It fails as a full disk does, without root."""
    return f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({nbytes}, {nbytes}))"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "filler"}


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("vae-client: error: "), proc.stderr
    return proc.stderr


# -- .npy: its space is reserved before a page is written ------------------------------------


def test_an_npy_larger_than_the_disk_is_one_line_not_sigbus(cli, small_disk):
    """Before: the memory-mapped .npy was a sparse file, so the first page that found the disk
    full killed the CLI with SIGBUS (exit 135, no message) and left 60 MB of part file."""
    out = small_disk / "x.npy"
    cli("sample", "--n", "2", "--seed", "1", "--out", str(out))
    before = snapshot(small_disk)
    proc = cli("sample", "--n", "20000", "--seed", "1", "--out", str(out), expect=1)
    line = one_line(proc)
    assert f"{out}: No space left on device" in line, line
    assert snapshot(small_disk) == before  # the old file as it was, no part file


def test_an_npy_over_the_file_size_limit_is_one_line_and_leaves_no_part(cli, tmp_path):
    """Before: the sink's constructor failed (EFBIG) after creating its part file, which
    nothing removed, and the message named no file."""
    out = tmp_path / "x.npy"
    cli("sample", "--n", "2", "--seed", "1", "--out", str(out))
    before = snapshot(tmp_path)
    proc = cli("sample", "--n", "4", "--seed", "2", "--out", str(out), expect=1,
               setup=file_size_limit(4096))
    assert f"{out}: File too large" in one_line(proc)
    assert snapshot(tmp_path) == before


def test_a_sink_that_cannot_reserve_its_file_removes_it(target, tmp_path, monkeypatch, capsys):
    """The space is reserved (posix_fallocate) when the sink is made; a refusal is an OSError
    that names the file, printed in one line, and the part file is gone."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system")
    from vae_client import __main__ as main_module

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "x.npy"
    with pytest.raises(OSError) as err:
        ImageSink(str(out), 10, "float32")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)
    assert not list(tmp_path.iterdir())
    code = main_module.main(["--target", target, "sample", "--n", "4", "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 1 and message.count("\n") == 1, message
    assert message.startswith(f"vae-client: error: {out}: No space left on device"), message
    assert not list(tmp_path.iterdir())


# -- every other output: a part file beside it, renamed when whole ---------------------------


# Each output written small first, then larger by a command that fails to write it: larger,
# since writing in place frees the old file's blocks first.
OUTPUTS = [
    ("a.png", lambda x, n, out: ("sample", "--n", n, "--seed", "1", "--out", out)),
    ("z.npz", lambda x, n, out: ("encode", "--in", x, "--out", out)),
    ("z.npy", lambda x, n, out: ("encode", "--in", x, "--out", out)),
    ("s.json", lambda x, n, out: ("score", "--in", x, "--k", "2", "--json", out)),
    ("s.csv", lambda x, n, out: ("score", "--in", x, "--k", "2", "--csv", out)),
]


@pytest.mark.parametrize("how", ["full disk", "file size limit"])
def test_an_output_that_cannot_be_written_leaves_the_old_file(cli, tmp_path, request, how):
    """Before: .png, .npz, latent .npy and score files were truncated in place, so a full
    disk destroyed the previous file and left a corrupt one."""
    rng = np.random.default_rng(0)
    inputs = {}
    for n in (3, 1000):
        inputs[n] = str(tmp_path / f"x{n}.npy")
        np.save(inputs[n], rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    folder = request.getfixturevalue("small_disk") if how == "full disk" else tmp_path / "o"
    folder.mkdir(exist_ok=True)
    for name, args in OUTPUTS:
        cli(*args(inputs[3], "3", str(folder / name)))
    before = snapshot(folder)
    assert all(before.values())
    limit = None
    if how == "full disk":
        fill(folder)
    else:
        limit = file_size_limit(16)
    lines = {name: one_line(cli(*args(inputs[1000], "1000", str(folder / name)), expect=1,
                                setup=limit))
             for name, args in OUTPUTS}
    assert snapshot(folder) == before  # every file as it was, no part file left
    for name, line in lines.items():  # and the message names the file
        assert f"{folder / name}: " in line, line


# -- refusals in one line, before anything is allocated or sent ------------------------------


def bulk_refused(cli: Cli, out: Path, address: str) -> str:
    """The one line of a small bulk job on the Ray cluster at `address`, which fails."""
    need_module("ray")
    return one_line(cli("bulk", "--n", "10", "--shard-size", "10", "--format", "npz",
                        "--no-progress", "--out", str(out), "--ray-address", address,
                        expect=1))


def test_bulk_with_an_address_ray_cannot_read_is_one_line(cli, tmp_path):
    """Before: ray.init's ValueError ('Invalid address format') came out as a traceback."""
    line = bulk_refused(cli, tmp_path / "d", "garbage")
    assert "--ray-address garbage" in line and "Invalid address format" in line, line


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_bulk_with_a_ray_address_nothing_answers_at_is_one_line(cli, tmp_path, address):
    """Before: ray.init retried a port that nobody listens on for minutes (cut here at 120 s
    by the test's own timeout)."""
    address = address.format(port=free_port())
    line = bulk_refused(cli, tmp_path / "d", address)
    assert f"--ray-address {address}: no connection to 127.0.0.1:" in line, line
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").glob("*.npz"))


@pytest.mark.parametrize("method,limit", [
    ("decode", "max_images_per_request"), ("encode", "max_images_per_request"),
    ("loglik", "max_images_per_request"), ("sample", "max_sample_n"),
    ("stream", "max_chunk_size"),
])
def test_bench_refuses_a_batch_over_the_server_s_limit(cli, method, limit):
    """Before: `--method decode --batch 4294967295` asked numpy for 512 GiB of latents (a
    MemoryError traceback); sample and stream sent calls that were all refused."""
    for batch in (str(2**32 - 1), str(LIMITS[limit] + 1)):
        proc = cli("bench", "--method", method, "--batch", batch, "--k", "2", "--duration",
                   "0.2", "--warmup", "0", expect=1)
        per = "chunk" if method == "stream" else "call"
        assert one_line(proc) == (f"vae-client: error: INVALID_ARGUMENT: batch: {batch} "
                                  f"images per {per}, more than the server's {limit} "
                                  f"({LIMITS[limit]})\n")
    # The limit itself is sent, and served.
    proc = cli("bench", "--method", method, "--batch", str(LIMITS[limit]), "--k", "2",
               "--stream-n", "64", "--duration", "0.2", "--warmup", "0")
    assert "errors: none" in proc.stdout, proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "loglik", "--batch", "1", "--k", "10001"],
     "k: 10001 importance samples, more than the server's max_k (10000)"),
    (["--method", "loglik", "--batch", "16", "--k", "5000"],
     "batch x k: 16 x 5000 = 80000 decoder rows, more than the server's max_queue_images "
     "(65536)"),
    (["--method", "stream", "--batch", "32", "--stream-n", "10000001"],
     "stream_n: 10000001 images, more than the server's max_stream_n (10000000)"),
], ids=["k", "rows", "stream_n"])
def test_bench_refuses_a_load_the_server_would_refuse_every_call_of(cli, args, message):
    """Before: the whole --duration of calls, every one INVALID_ARGUMENT, and status 0."""
    proc = cli("bench", *args, "--duration", "0.2", "--warmup", "0", expect=1)
    assert one_line(proc) == f"vae-client: error: INVALID_ARGUMENT: {message}\n"


@pytest.mark.parametrize("client", [VaeClient, AsyncVaeClient])
def test_a_message_limit_grpc_cannot_take_is_a_value_error(client):
    """Before: max_message_mb=2048 raised OverflowError from deep in gRPC; 0 made a client
    whose every reply was refused."""
    for mb in (2048, 0):
        with pytest.raises(ValueError) as err:
            client(f"127.0.0.1:{free_port()}", max_message_mb=mb)
        assert str(err.value) == f"max_message_mb: {mb}; it must be 1 .. 2047 (gRPC's limit)"
    with VaeClient(f"127.0.0.1:{free_port()}", max_message_mb=2047):
        pass


def test_a_dtype_the_server_does_not_send_is_invalid_argument():
    """Before: a ValueError, where the README promises a VaeError of every failed call.
    Refused before anything is sent (no server listens at the target)."""
    z = np.zeros((1, 4), np.float32)
    calls = [lambda c: c.decode(z, dtype="float64"), lambda c: c.sample(2, dtype="float64"),
             lambda c: next(c.sample_stream(2, dtype="float64"))]
    with VaeClient(f"127.0.0.1:{free_port()}") as c:
        for call in calls:
            with pytest.raises(VaeError) as err:
                call(c)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details == "dtype: 'float64'; it must be 'float32' or 'uint8'"

    async def main() -> list[VaeError]:
        errors = []
        async with AsyncVaeClient(f"127.0.0.1:{free_port()}") as c:
            for call in (c.decode(z, dtype="float64"), c.sample(2, dtype="float64")):
                try:
                    await call
                except VaeError as exc:
                    errors.append(exc)
            try:
                await anext(c.sample_stream(2, dtype="float64"))
            except VaeError as exc:
                errors.append(exc)
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 3
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in errors)


def test_the_output_check_leaves_another_write_s_part_file_alone(tmp_path):
    # The check wrote and removed `.NAME.part`, the very file another command writing the
    # same output at that moment was filling.
    from vae_core.files import check_writable

    part = tmp_path / ".out.npz.part"
    part.write_bytes(b"another run's images")
    check_writable(tmp_path / "out.npz")
    assert part.read_bytes() == b"another run's images"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.npz.part"]
    with pytest.raises(FileNotFoundError) as err:
        check_writable(tmp_path / "missing" / "out.npz")
    assert err.value.filename == str(tmp_path / "missing" / "out.npz")
    with pytest.raises(IsADirectoryError):
        check_writable(tmp_path)


# -- outputs that are not regular files: followed, or written in place ------------------------


@pytest.fixture(params=["named pipe", "device"])
def special_file(request, tmp_path) -> Iterator[tuple[Path, Callable[[], bytes | None]]]:
    """A path that is no regular file, and a function returning what was written to it: a
    named pipe (read by a thread), or a character device like /dev/null (made here, so that a
    regression replaces this one and not the machine's; needs CAP_MKNOD), which keeps
    nothing (None)."""
    import stat
    import threading

    path = tmp_path / "out.csv"
    if request.param == "named pipe":
        os.mkfifo(path)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(path.read_bytes()), daemon=True)
        reader.start()

        def read() -> bytes | None:
            reader.join(30)
            return got[0]
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("making a device file needs CAP_MKNOD")

        def read() -> bytes | None:
            assert path.lstat().st_rdev == os.makedev(1, 3)
            return None
    yield path, read
    assert not stat.S_ISREG(path.lstat().st_mode)  # still what it was, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]  # no part file left


def test_an_output_that_is_a_pipe_or_a_device_is_written_in_place(special_file):
    """Renaming a file over /dev/null replaced the device for every program of the machine;
    over a named pipe, its reader got nothing."""
    from vae_core.files import check_writable, replacing

    path, read = special_file
    check_writable(path)
    with replacing(path, "w") as f:
        f.write("index,elbo\n0,1.5\n")
    assert read() in (b"index,elbo\n0,1.5\n", None)


def test_two_writers_of_one_path_leave_one_whole_file(tmp_path):
    """Before: both wrote the one part file, `.NAME.part`, each truncating the other's: the
    first rename published a mix of the two (seen: 10,000 bytes of one, 20,000 of the other),
    and the second writer failed with FileNotFoundError naming the file it had asked for.
    Two `eval` runs training the one cached classifier are such writers."""
    import threading

    from vae_core.files import replacing

    path = tmp_path / "out.bin"
    both_open, errors = threading.Barrier(2), []

    def write(byte: bytes) -> None:
        try:
            with replacing(path) as f:
                both_open.wait(10)
                for _ in range(30):
                    f.write(byte * 1000)
                    f.flush()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(b,)) for b in (b"A", b"B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert path.read_bytes() in (b"A" * 30_000, b"B" * 30_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_link_at_the_part_file_s_name_is_not_written_through(tmp_path):
    """Before: the part file had one fixed name, `.NAME.part`, opened as any file: a link
    planted there (in a folder others can write) had the output written into the file it
    named, and the output became that link."""
    from vae_core.files import replacing

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.json.part").symlink_to(victim)
    with replacing(tmp_path / "out.json", "w") as f:
        f.write("{}")
    assert victim.read_text() == "precious"
    assert (tmp_path / "out.json").read_text() == "{}"
    assert not (tmp_path / "out.json").is_symlink()


def test_a_replaced_file_keeps_its_mode_and_a_new_one_follows_the_umask(tmp_path):
    """Before: a file of mode 0600 (a private score table) became 0644 once replaced."""
    from vae_core.files import replacing

    private = tmp_path / "scores.csv"
    private.write_text("old")
    private.chmod(0o600)
    with replacing(private, "w") as f:
        f.write("new")
    assert (private.read_text(), stat.S_IMODE(private.stat().st_mode)) == ("new", 0o600)
    umask = os.umask(0o022)
    os.umask(umask)
    with replacing(tmp_path / "new.csv", "w") as f:
        f.write("new")
    assert stat.S_IMODE((tmp_path / "new.csv").stat().st_mode) == 0o666 & ~umask


def test_an_output_of_a_name_as_long_as_the_filesystem_allows(tmp_path):
    """Before: `.NAME.part` is 6 characters longer than NAME: a name of 250 characters, which
    open() takes, failed with ENAMETOOLONG."""
    from vae_core.files import check_writable, replacing

    for name in ("x" * 250, "é" * 127):  # 250 and 254 bytes
        path = tmp_path / name
        check_writable(path)  # its probe file's name, too, had the name and more
        with replacing(path, "w") as f:
            f.write("ok")
        assert path.read_text() == "ok"


def test_a_read_only_npy_output_is_replaced_as_other_outputs_are():
    """Before: the sink's part file took the replaced file's mode (0444) when made, and numpy
    opening it again by its name was refused: `sample --out x.npy` over a read-only x.npy
    failed with 'Permission denied: x.npy' in a folder its user could write, where a PNG, CSV
    or JSON output was replaced. Run without root's right to open any file (setpriv drops it
    where the tests run as root)."""
    import tempfile

    plain: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to run without its right to open any file")
        plain = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    folder = Path(tempfile.mkdtemp(prefix="vae-ro-"))
    try:
        folder.chmod(0o777)
        target = folder / "x.npy"
        np.save(target, np.zeros((2, 28, 28), np.uint8))
        target.chmod(0o444)
        script = ("import numpy as np, sys; from vae_client.cli_io import ImageSink; "
                  "s = ImageSink(sys.argv[1], 2, 'uint8'); "
                  "s.put(0, np.full((2, 28, 28), 7, np.uint8)); s.close()")
        done = subprocess.run([*plain, sys.executable, "-c", script, str(target)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (np.load(target) == 7).all()
        assert stat.S_IMODE(target.stat().st_mode) == 0o444
        assert sorted(p.name for p in folder.iterdir()) == ["x.npy"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_an_output_through_a_symbolic_link_replaces_the_file_it_names(tmp_path):
    from vae_core.files import check_writable, replacing

    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "scores.json"
    real.write_text("old")
    link = tmp_path / "scores.json"
    link.symlink_to(real)
    check_writable(link)
    with replacing(link, "w") as f:
        f.write("new")
    assert link.is_symlink() and real.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "scores.json"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["scores.json"]


def test_the_cli_writes_through_links_and_into_pipes(cli, tmp_path):
    """An .npy of images (written through a memory map beside the file), a PNG and a CSV."""
    import threading

    (tmp_path / "real").mkdir()
    for name in ("a.npy", "a.png"):
        (tmp_path / "real" / name).write_bytes(b"old")
        (tmp_path / name).symlink_to(tmp_path / "real" / name)
        cli("sample", "--n", "3", "--seed", "1", "--out", str(tmp_path / name))
        assert (tmp_path / name).is_symlink()
    assert np.load(tmp_path / "real" / "a.npy").shape == (3, 28, 28)
    assert (tmp_path / "real" / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    for name in ("s.csv", "i.npy"):
        os.mkfifo(tmp_path / name)
    got: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda n=n: got.setdefault(n, (tmp_path / n).read_bytes()),
                                daemon=True) for n in ("s.csv", "i.npy")]
    for r in readers:
        r.start()
    cli("score", "--in", str(tmp_path / "x.npy"), "--k", "2", "--csv", str(tmp_path / "s.csv"))
    cli("sample", "--n", "2", "--seed", "1", "--out", str(tmp_path / "i.npy"))
    for r in readers:
        r.join(30)
    assert got["s.csv"].startswith(b"index,elbo,") and got["s.csv"].count(b"\n") == 3
    assert got["i.npy"].startswith(b"\x93NUMPY")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.npy", "a.png", "i.npy", "real", "s.csv", "x.npy"]


@pytest.mark.parametrize("stdout", ["pipe", "file appended to"])
def test_dev_stdout_is_written_through_whatever_stdout_is(target, tmp_path, stdout):
    """/dev/stdout is a link to the pipe or file behind the process's stdout: followed, it
    named a pipe that no path reaches ("No such file or directory"), or a file that a rename
    replaced, losing what was in it and the summary printed after."""
    from serving import VENV_BIN

    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    cmd = [str(VENV_BIN / "vae-client"), "--target", target, "score", "--in",
           str(tmp_path / "x.npy"), "--k", "2", "--csv", "/dev/stdout"]
    if stdout == "pipe":
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = proc.stdout
    else:
        log = tmp_path / "log.csv"
        log.write_text("earlier line\n")
        with open(log, "a") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True,
                                  timeout=120)
        out = log.read_text()
        assert out.startswith("earlier line\nindex,elbo,"), out
    assert proc.returncode == 0, proc.stderr
    assert out.count("\n") == (3 if stdout == "pipe" else 4), out  # the CSV alone
    assert "mean" in proc.stderr  # the summary, out of the CSV's way


def test_an_output_through_a_link_loop_is_refused_and_left_alone(tmp_path):
    from vae_core.files import check_writable, replacing

    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    with pytest.raises(OSError) as err:
        check_writable(tmp_path / "a.csv")
    assert err.value.errno == errno.ELOOP and err.value.filename == str(tmp_path / "a.csv")
    with pytest.raises(OSError) as err, replacing(tmp_path / "a.csv", "w") as f:
        f.write("x")
    assert err.value.errno == errno.ELOOP
    assert (tmp_path / "a.csv").is_symlink() and (tmp_path / "b.csv").is_symlink()
