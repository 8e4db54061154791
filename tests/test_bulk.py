"""`vae-client bulk` on a local Ray cluster started by the tests, against two local servers:
the same shard bytes with 1 and 3 workers and without Ray, every format readable by what ML
code loads it with, and a job killed midway that resumes without remaking whole shards."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from prometheus_harness import need_module
from serving import VENV_BIN, metric_total, replicas, served_process, target_of
from vae_client import VaeClient
from vae_client.bulk import BulkSpec, make_shard, shard_items
from vae_client.images import decode_png
from vae_core.onnx_model import OnnxVAE
from vae_core.ports import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def servers(model_dir):
    with replicas(model_dir, 2) as rs:
        yield rs


# The cluster's token: Ray authenticates its clients, and the jobs below are its clients.
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A Ray head on this machine, as `ray start` makes one; its address."""
    need_module("ray")
    port = free_port()
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--port={port}",
                    "--num-cpus=3", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, env=RAY_ENV, timeout=180, capture_output=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=RAY_ENV, timeout=120,
                       capture_output=True)


def bulk(target: str, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "vae-client"), "--target", target, "bulk",
                           "--out", str(out), "--no-progress", *args], env=RAY_ENV,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def digests(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "_manifest.json").read_text())
    return {s["name"]: s["sha256"] for s in manifest["shards"]}


def test_labelled_items_take_the_classes_in_turn(servers, model_dir):
    """Item i is image i // 10 of the stream of class i % 10, whatever the shard."""
    reference = OnnxVAE(model_dir, threads=1)
    spec = BulkSpec(n=95, seed=4, shard_size=40, format="npz", digits=tuple(range(10)),
                    model_version="x", chunk_size=7)
    with VaeClient(target_of(servers)) as client:
        images, labels = shard_items(client, spec, 40, 80)
    assert labels.tolist() == [i % 10 for i in range(40, 80)]
    for row, i in enumerate(range(40, 80)):
        want = reference.sample(i // 10 + 1, 4, digit=i % 10)[-1]
        np.testing.assert_array_equal(images[row].reshape(-1),
                                      np.rint(want * 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "npz"])
def test_the_same_bytes_with_1_and_3_ray_workers_and_without_ray(servers, ray_cluster, tmp_path,
                                                                 fmt):
    if fmt == "parquet":
        need_module("pyarrow")
    target = target_of(servers)
    common = ["--n", "2300", "--shard-size", "500", "--seed", "9", "--format", fmt]
    bulk(target, tmp_path / "one", *common, "--workers", "1", "--ray-address", ray_cluster)
    bulk(target, tmp_path / "three", *common, "--workers", "3", "--ray-address", ray_cluster)
    bulk(f"127.0.0.1:{servers[0].port}", tmp_path / "local", *common, "--no-ray")
    one = digests(tmp_path / "one")
    assert len(one) == 5 and one == digests(tmp_path / "three") == digests(tmp_path / "local")
    for name, digest in one.items():  # the manifest's hashes are those of the files
        import hashlib

        assert hashlib.sha256((tmp_path / "three" / name).read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(tmp_path / "one")) == sorted(
        ["_bulk.json", "_bulk.lock", "_manifest.json", *one, *(f"_{n}.sha256" for n in one)])
    _check_loadable(tmp_path / "one", fmt, 2300)


def _check_loadable(out: Path, fmt: str, n: int) -> None:
    """Each format as its users load it; every item once, labelled, in order."""
    names = sorted(json.loads((out / "_manifest.json").read_text())["shards"],
                   key=lambda s: s["first"])
    index, labels, first = [], [], None
    for shard in names:
        path = out / shard["name"]
        if fmt == "parquet":
            pq = need_module("pyarrow.parquet")
            table = pq.read_table(path)
            assert table.column_names == ["index", "seed", "label", "image"]
            index += table.column("index").to_pylist()
            labels += table.column("label").to_pylist()
            image = decode_png(table.column("image")[0].as_py())
        elif fmt == "webdataset":
            with tarfile.open(path) as tar:
                members = tar.getnames()
                keys = sorted({m.split(".")[0] for m in members})
                assert members[:3] == [f"{keys[0]}.png", f"{keys[0]}.cls", f"{keys[0]}.json"]
                for key in keys:
                    meta = json.loads(tar.extractfile(f"{key}.json").read())
                    assert int(tar.extractfile(f"{key}.cls").read()) == meta["label"]
                    index.append(meta["index"])
                    labels.append(meta["label"])
                image = decode_png(tar.extractfile(f"{keys[0]}.png").read())
        else:
            with np.load(path) as f:
                assert f["images"].dtype == np.uint8 and f["images"].shape[1:] == (28, 28)
                index += f["index"].tolist()
                labels += f["label"].tolist()
                image = f["images"][0]
        first = image if first is None else first
    assert index == list(range(n))
    assert labels == [i % 10 for i in range(n)]
    assert first.shape == (28, 28) and first.dtype == np.uint8 and first.max() > 0


def stream_counts(servers) -> tuple[float, float]:
    """SampleStreams started and ended, on all `servers`."""
    return tuple(sum(metric_total(s.metrics_port, name, grpc_method="SampleStream")
                     for s in servers)
                 for name in ("grpc_server_started_total", "grpc_server_handled_total"))


def shard_tasks_running() -> bool:
    """Whether a worker of this module's Ray cluster is running make_shard: Ray titles a
    worker's process after the task it runs (its command line reads ray::make_shard
    meanwhile), and the cluster's workers inherit its token (not another cluster's)."""
    token = f"RAY_AUTH_TOKEN={RAY_ENV['RAY_AUTH_TOKEN']}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if ((proc / "cmdline").read_bytes().startswith(b"ray::make_shard")
                    and token in (proc / "environ").read_bytes().split(b"\0")):
                return True
        except OSError:  # the process ended meanwhile, or is another user's
            continue
    return False


def quiet(servers, quiet_s: float = 3.0, timeout: float = 120.0) -> None:
    """Waits until no Ray worker runs make_shard, no SampleStream is running on `servers`, and
    none has started for `quiet_s` seconds."""
    deadline = time.monotonic() + timeout
    last, since = stream_counts(servers), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = stream_counts(servers)
        if now != last or shard_tasks_running():
            last, since = now, time.monotonic()
        elif now[0] == now[1] and time.monotonic() - since >= quiet_s:
            return
    raise AssertionError(f"shards still being made after {timeout} s: streams {last}, "
                         f"make_shard running: {shard_tasks_running()}")


def test_a_job_killed_midway_resumes_without_remaking_whole_shards(servers, ray_cluster,
                                                                   tmp_path):
    target, out = target_of(servers), tmp_path / "job"
    args = ["--n", "20000", "--shard-size", "1000", "--seed", "3", "--format", "npz",
            "--workers", "1", "--ray-address", ray_cluster]
    proc = subprocess.Popen([str(VENV_BIN / "vae-client"), "--target", target, "bulk",
                             "--out", str(out), "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=RAY_ENV)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("_*.sha256"))) < 3:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The job's Ray worker is not in the killed process group: it can outlive the driver for
    # a moment, start one more stream and even finish a shard. Count only once it has stopped.
    quiet(servers)
    shards = [p.name[1:].removesuffix(".sha256") for p in out.glob("_*.sha256")]
    whole = {name: (out / name).stat() for name in shards}
    assert 3 <= len(whole) < 20, sorted(whole)
    streams_before = stream_counts(servers)[0]
    done = bulk(target, out, *args)
    assert f"({20 - len(whole)} made now)" in done.stdout, done.stdout
    # The whole shards were left as they were; the others took one stream per class each.
    for name, stat in whole.items():
        again = (out / name).stat()
        assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    streams = stream_counts(servers)[0] - streams_before
    assert streams == 10 * (20 - len(whole))
    # And the result is the dataset an unbroken run writes.
    fresh = tmp_path / "fresh"
    bulk(target, fresh, *[a for a in args if a not in (ray_cluster, "--ray-address")],
         "--no-ray", "--workers", "4")
    assert digests(out) == digests(fresh)


def test_sigterm_stops_a_ray_job_as_ctrl_c_does(servers, ray_cluster, tmp_path):
    """Before: ray.init put its own SIGTERM handler (sys.exit(15)) in place of vae-client's,
    so a job stopped by docker stop or Kubernetes exited with status 15, without a word and
    without its clean-up."""
    target, out = target_of(servers), tmp_path / "job"
    proc = subprocess.Popen([str(VENV_BIN / "vae-client"), "--target", target, "bulk",
                             "--out", str(out), "--no-progress", "--n", "20000",
                             "--shard-size", "1000", "--format", "npz", "--workers", "1",
                             "--ray-address", ray_cluster],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RAY_ENV)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(out.glob("_*.sha256")):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "vae-client: error: terminated", err[-2000:]
    quiet(servers)


def test_other_settings_in_a_begun_folder_are_refused(servers, tmp_path):
    target = target_of(servers)
    bulk(target, tmp_path / "d", "--n", "100", "--shard-size", "50", "--format", "npz",
         "--no-ray")
    refused = bulk(target, tmp_path / "d", "--n", "100", "--shard-size", "50", "--format",
                   "npz", "--seed", "2", "--no-ray", check=False)
    assert refused.returncode == 1
    # Before, the message named no setting: a user who "ran the same command" could not
    # tell what differed (a server upgraded to another model, say).
    assert "holds the shards of other settings" in refused.stderr
    assert "seed 0 (this run: 2)" in refused.stderr, refused.stderr
    shutil.rmtree(tmp_path / "d")


def test_shards_without_their_settings_are_never_mixed(servers, tmp_path):
    """Before: with _bulk.json gone, a run of other settings made its shards beside the
    earlier run's: --n 60 then 40 in shards of 20 left the first run's third shard in the
    folder, which `pq.read_table(folder)` reads as one dataset (a helper found 8,000 rows of
    two seeds where 3,000 were asked for). Earlier still, shards whose hashes matched their
    records were kept under another run's manifest. A folder of shards whose settings are
    not recorded is refused now, as it was."""
    target, out = target_of(servers), tmp_path / "d"
    args = ["--shard-size", "20", "--format", "npz", "--no-ray"]
    bulk(target, out, "--n", "60", *args)
    (out / "_bulk.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for other in (["--n", "40"], ["--n", "60", "--seed", "5"]):
        refused = bulk(target, out, *other, *args, check=False)
        assert refused.returncode == 1, refused
        assert "holds shards but no _bulk.json" in refused.stderr, refused.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_manifest_is_only_of_a_whole_job(servers, tmp_path):
    """Before: a rerun that had shards left to make kept the earlier _manifest.json until it
    finished: one stopped meanwhile left a manifest listing shards that were missing."""
    from vae_client.bulk import BulkSpec, locked, prepare

    target, out = target_of(servers), tmp_path / "d"
    bulk(target, out, "--n", "40", "--shard-size", "20", "--format", "npz", "--no-ray",
         "--no-labels")
    assert (out / "_manifest.json").is_file()
    next(out.glob("train-*.npz")).unlink()
    spec = BulkSpec(**{k: v for k, v in json.loads((out / "_bulk.json").read_text()).items()
                       if k in BulkSpec.__dataclass_fields__})
    with locked(out):
        assert len(prepare(out, spec)) == 1
    assert not (out / "_manifest.json").exists()


def test_a_folder_whose_run_made_no_shard_takes_new_settings(servers, tmp_path):
    """Before: _bulk.json was written before anything could fail, so a run that failed at
    once (an unreachable --ray-address) left the folder refusing the corrected command."""
    target, out = target_of(servers), tmp_path / "d"
    failed = bulk(target, out, "--n", "10", "--format", "npz", "--ray-address",
                  "127.0.0.1:1", check=False)
    assert failed.returncode == 1 and (out / "_bulk.json").is_file()
    bulk(target, out, "--n", "20", "--format", "npz", "--no-ray")
    assert json.loads((out / "_bulk.json").read_text())["n"] == 20


def test_a_second_job_on_the_folder_is_refused(servers, tmp_path):
    """Before: two jobs on one folder truncated each other's fixed-name part files and both
    failed with "No such file or directory"."""
    from vae_client.bulk import locked

    out = tmp_path / "d"
    with locked(out):
        refused = bulk(target_of(servers), out, "--n", "10", "--format", "npz", "--no-ray",
                       check=False)
    assert refused.returncode == 1
    assert "another vae-client bulk job writes to this folder" in refused.stderr
    bulk(target_of(servers), out, "--n", "10", "--format", "npz", "--no-ray")


def test_a_link_planted_where_a_part_file_goes_is_not_written_through(servers, tmp_path):
    """Before: a symbolic link at `_<shard>.part` made the job overwrite its target."""
    out, victim = tmp_path / "d", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("important\n")
    (out / "_train-00000-of-00001.npz.part").symlink_to(victim)
    bulk(target_of(servers), out, "--n", "10", "--format", "npz", "--no-ray")
    assert victim.read_text() == "important\n"
    assert not (out / "train-00000-of-00001.npz").is_symlink()


def test_damaged_records_are_remade_and_a_damaged_spec_is_one_line(servers, tmp_path):
    """Before: a record or _bulk.json that is not UTF-8 ended the job with a traceback."""
    target, out = target_of(servers), tmp_path / "d"
    args = ["--n", "20", "--shard-size", "10", "--format", "npz", "--no-ray"]
    bulk(target, out, *args)
    (out / "_train-00000-of-00002.npz.sha256").write_bytes(b"\xff\xfe")
    assert "(1 made now)" in bulk(target, out, *args).stdout
    (out / "_bulk.json").write_bytes(b"\xff\xfe")
    refused = bulk(target, out, *args, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "_bulk.json cannot be read" in refused.stderr


def test_shard_size_is_bounded_by_what_a_shard_holds_in_memory(tmp_path):
    proc = subprocess.run([str(VENV_BIN / "vae-client"), "bulk", "--n", "10", "--out",
                           str(tmp_path), "--shard-size", "10000000"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--shard-size: 10000000 is out of range; it must be 1 .. 1000000" in proc.stderr


def test_a_stream_refused_for_a_full_queue_waits_and_goes_on(monkeypatch):
    """Before: RESOURCE_EXHAUSTED, once gRPC's own retries (about 2 s) were spent, ended the
    whole job within seconds on a busy server. A stream now waits, doubling its wait, and goes
    on from where it stopped, until BUSY_PATIENCE_S pass without a chunk."""
    import grpc

    from vae_client import bulk as bulk_module
    from vae_client.errors import VaeError

    calls, slept = [], []
    busy = grpc.StatusCode.RESOURCE_EXHAUSTED

    class Busy:
        refusals = 3

        def sample_stream(self, n, seed, chunk_size, dtype, offset, digit, timeout):
            calls.append(offset)
            if offset < n:
                yield offset, np.full((2, 28, 28), offset, np.uint8)
            if Busy.refusals:
                Busy.refusals -= 1
                raise VaeError(busy, "queue full", resume_offset=offset + 2)
            for first in range(offset + 2, n, 2):
                yield first, np.full((2, 28, 28), first, np.uint8)

    monkeypatch.setattr(bulk_module.time, "sleep", slept.append)
    spec = BulkSpec(n=10, seed=0, shard_size=10, format="npz", digits=(), model_version="v")
    images, _ = shard_items(Busy(), spec, 0, 10)
    assert [int(x[0, 0]) for x in images[::2]] == [0, 2, 4, 6, 8]
    assert calls == [0, 2, 4, 6]
    assert slept == [0.5, 0.5, 0.5]  # each refusal came after a chunk: no longer waits

    class AlwaysBusy:
        def sample_stream(self, n, seed, chunk_size, dtype, offset, digit, timeout):
            raise VaeError(busy, "queue full", resume_offset=offset)
            yield

    slept.clear()
    with pytest.raises(VaeError):
        shard_items(AlwaysBusy(), spec, 0, 10)
    assert slept[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert sum(slept) >= bulk_module.BUSY_PATIENCE_S > sum(slept[:-1])


def test_servers_of_different_chunk_limits_serve_one_job(servers, model_dir, tmp_path):
    """Before: the chunk size came from the server that answered info(); a server of a
    smaller --max-chunk-size behind the same target refused the streams (INVALID_ARGUMENT),
    or not, by chance. Each stream now asks for its server's default chunk."""
    args = ("--n", "2000", "--shard-size", "500", "--format", "npz", "--no-ray")
    with served_process(model_dir, "--max-chunk-size", "256", "--default-chunk-size", "256",
                        "--warmup-rounds", "1") as (small, _):
        for attempt in range(3):  # whichever server answers info()
            bulk(f"ipv4:127.0.0.1:{servers[0].port},{small}", tmp_path / f"m{attempt}", *args)
    bulk(target_of(servers), tmp_path / "default", *args)
    for attempt in range(3):
        assert digests(tmp_path / f"m{attempt}") == digests(tmp_path / "default")


def test_make_shard_is_what_a_task_runs(servers, model_dir, tmp_path):
    """The task function alone: it writes its shard and its hash, and a second call finds it
    whole and makes nothing."""
    spec = BulkSpec(n=30, seed=1, shard_size=30, format="npz", digits=(),
                    model_version=OnnxVAE(model_dir).spec.version)
    digest = make_shard(target_of(servers), spec, 0, str(tmp_path))
    path = tmp_path / spec.shard_name(0)
    mtime = path.stat().st_mtime_ns
    assert make_shard(target_of(servers), spec, 0, str(tmp_path)) == digest
    assert path.stat().st_mtime_ns == mtime
    with np.load(io.BytesIO(path.read_bytes())) as f:
        assert f["label"].tolist() == [-1] * 30  # unlabelled


def test_bulk_asks_for_chunks_the_server_takes(servers, model_dir, tmp_path):
    """Before: every stream asked for chunks of 1,000 images, and a server with
    --max-chunk-size 256 refused each of them (INVALID_ARGUMENT). The shards are those of
    servers with the default limits, to the byte."""
    args = ("--n", "600", "--shard-size", "300", "--format", "npz", "--no-ray")
    with served_process(model_dir, "--max-chunk-size", "256", "--max-queue-images", "512",
                        "--max-batch-size", "256", "--default-chunk-size", "256",
                        "--max-sample-n", "256", "--max-images-per-request", "256",
                        "--max-k", "512", "--warmup-rounds", "1") as (target, _):
        bulk(target, tmp_path / "small", *args)
    bulk(target_of(servers), tmp_path / "default", *args)
    assert digests(tmp_path / "small") == digests(tmp_path / "default")


def test_a_shard_missing_at_the_end_is_one_line(servers, tmp_path, monkeypatch, capsys):
    """Before: shard_digests' BulkError came out as a traceback (runners whose nodes do not
    share --out leave the driver without the shards)."""
    from vae_client import __main__ as cli
    from vae_client import bulk as bulk_module

    monkeypatch.setattr(bulk_module, "run_local", lambda *args, **kwargs: None)
    code = cli.main(["--target", target_of(servers), "bulk", "--out", str(tmp_path / "e"),
                     "--n", "20", "--shard-size", "10", "--no-ray", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "shard train-00000-of-00002" in err and "is missing" in err and "share" in err


def test_parquet_without_pyarrow_is_refused_before_any_work(monkeypatch, tmp_path):
    # pyarrow comes with the bulk extra only. It was imported when the first shard was
    # written: a traceback, once the images had been made and _bulk.json written.
    from vae_client.bulk import BulkError, prepare

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where it is not installed
    spec = BulkSpec(n=30, seed=1, shard_size=30, format="parquet", digits=(), model_version="x")
    with pytest.raises(BulkError, match=r"parquet needs pyarrow.*vae-serving\[bulk\]"):
        prepare(tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_servers_of_two_models_never_mix_in_one_dataset(servers, bernoulli_model_dir,
                                                         tmp_path):
    """Before: behind a target of servers that serve different models (an upgrade under way),
    every shard held images of both, and _bulk.json named the one model that answered info().
    Now every stream is pinned to that model and a server of the other refuses it
    (FAILED_PRECONDITION). A labelled shard is ten streams, which round_robin spreads over
    both servers: no shard can be made, and the job fails saying why."""
    with served_process(bernoulli_model_dir, "--warmup-rounds", "1") as (other, _):
        mixed = f"ipv4:127.0.0.1:{servers[0].port},{other}"
        proc = bulk(mixed, tmp_path / "mixed", "--n", "400", "--shard-size", "100",
                    "--format", "npz", "--no-ray", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAILED_PRECONDITION: model_version: this server serves model" in proc.stderr, \
        proc.stderr[-3000:]
    assert not list((tmp_path / "mixed").glob("train-*"))


def test_a_resumed_jobs_rate_counts_only_the_items_made_now():
    """Before: the items of the shards kept counted in the rate (108,914 img/s shown against
    about 19,000 made)."""
    from vae_client.cli_io import Progress

    bar = Progress(1000, "bulk", enabled=False, done=900)
    bar._start -= 10.0
    bar.update(100)
    assert bar.line(bar._start + 10.0).endswith(" 1000/1000 100.0% 10 img/s")


@pytest.mark.parametrize("out,words", [("", "--out: an empty path"),
                                       ("file", "a file, not a folder")])
def test_an_out_that_is_no_folder_is_one_line(servers, tmp_path, out, words):
    """Before: --out "" (an unset shell variable) wrote the shards into the current folder,
    and a file gave "File exists"."""
    (tmp_path / "file").write_text("x")
    proc = subprocess.run([str(VENV_BIN / "vae-client"), "--target", target_of(servers), "bulk",
                           "--n", "10", "--no-ray", "--out", out and str(tmp_path / out)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and words in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_shards_are_as_readable_as_any_new_file(servers, tmp_path):
    """Before: the part files of random names were made by mkstemp, mode 0600, which the rename
    kept: a training job of another user could not read the dataset."""
    out = tmp_path / "d"
    old = os.umask(0o022)
    try:
        bulk(target_of(servers), out, "--n", "10", "--format", "npz", "--no-ray")
    finally:
        os.umask(old)
    for name in ("train-00000-of-00001.npz", "_train-00000-of-00001.npz.sha256"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_only_the_jobs_own_part_files_are_cleared(servers, tmp_path):
    """Before: a run removed every `_*.part` file of the folder, a user's own among them."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "_thesis-draft.part").write_text("mine")
    (out / "_train-00000-of-00001.npz.3f2a.part").write_text("left by a job that died")
    bulk(target_of(servers), out, "--n", "10", "--format", "npz", "--no-ray")
    assert (out / "_thesis-draft.part").read_text() == "mine"
    assert not list(out.glob("_train-*.part"))


def test_a_spec_file_that_is_json_but_no_object_is_one_line(servers, tmp_path):
    target, out = target_of(servers), tmp_path / "d"
    args = ["--n", "10", "--format", "npz", "--no-ray"]
    bulk(target, out, *args)
    (out / "_bulk.json").write_text("[1]")
    refused = bulk(target, out, *args, check=False)
    assert refused.returncode == 1 and "_bulk.json cannot be read" in refused.stderr, \
        refused.stderr


def test_a_stopped_job_ends_its_streams_at_their_next_wait(monkeypatch):
    """Before: after a failure or an interrupt, the shards under way went on, a stream waiting
    out a full queue for up to BUSY_PATIENCE_S; and each retry had --timeout anew."""
    import threading

    import grpc

    from vae_client.bulk import Stopped, _stream
    from vae_client.errors import VaeError

    class Busy:
        timeouts: list[float | None] = []

        def sample_stream(self, n, seed, chunk_size, dtype, offset, digit, timeout):
            Busy.timeouts.append(timeout)
            raise VaeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", offset)
            yield

    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        list(_stream(Busy(), 10, 0, 0, 0, None, None, stop))
    waits = []
    monkeypatch.setattr("vae_client.bulk.time.sleep", waits.append)
    clock = iter(range(0, 10**6, 3))
    monkeypatch.setattr("vae_client.bulk.time.monotonic", lambda: float(next(clock)))
    Busy.timeouts.clear()
    with pytest.raises(VaeError):
        list(_stream(Busy(), 10, 0, 0, 0, None, 10.0, None))
    # One deadline for the stream whole: each try gets what is left of it.
    assert Busy.timeouts[0] == 7.0
    assert all(a > b for a, b in zip(Busy.timeouts, Busy.timeouts[1:], strict=False))
    assert len(Busy.timeouts) < 5


def test_a_sigterm_while_ray_starts_is_the_caller_s(monkeypatch, tmp_path):
    """Before: a SIGTERM in the seconds ray.init takes ran Ray's own handler, sys.exit(15):
    `vae-client bulk` ended with status 15 and no word, where it says "terminated" and exits
    143 once Ray has started. The caller's handler now takes it."""
    import signal
    import sys
    import types

    from vae_client.bulk import BulkSpec, run_ray

    class Called(Exception):
        pass

    def ray_init(**kwargs):
        raise SystemExit(signal.SIGTERM)  # what Ray's handler does

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=ray_init)
    monkeypatch.setitem(sys.modules, "ray", fake)

    def caller(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as vae-client's: a second one kills
        raise Called(signum)

    before = signal.signal(signal.SIGTERM, caller)
    try:
        spec = BulkSpec(n=10, seed=0, shard_size=10, format="npz", digits=(), model_version="v")
        with pytest.raises(Called):
            run_ray("127.0.0.1:1", spec, tmp_path, [0], 1, None, lambda i, d: None)
        # What the caller's handler set stays (a review found it undone).
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
