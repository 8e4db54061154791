"""Bound runs (ONNX Runtime's IO binding on preallocated buffers of a few fixed batch sizes).

On CUDA they are the default; here they run on the CPU provider, through the same code: the
padding, the fixed buffers updated in place, the copies out and the locking. The CUDA-only
parts (device buffers, graph capture) are checked at the end, where a GPU is present.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterable

import numpy as np
import onnxruntime as ort
import pytest

from serving import cuda_usable, server_thread
from vae_client import VaeClient
from vae_core import likelihood as lk
from vae_core.manifest import DECODER
from vae_core.onnx_model import OnnxVAE, make_session
from vae_server.binding import BoundRunner, bucket_sizes
from vae_server.config import SettingsError, load_settings
from vae_server.runtime import CUDA, ModelRuntime

has_cuda = CUDA in ort.get_available_providers()


def test_bucket_sizes_pad_a_batch_by_less_than_half():
    assert bucket_sizes(2048) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256,
                                  384, 512, 768, 1024, 1536, 2048]
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(100)[-3:] == [64, 96, 100]
    with pytest.raises(ValueError, match="most must be >= 1"):
        bucket_sizes(0)
    sizes = bucket_sizes(2048)
    for n in range(1, 2049):
        padded = min(s for s in sizes if s >= n)
        assert padded < 1.5 * n or padded == n


@pytest.fixture(scope="module")
def decoder(model_dir):
    return make_session(model_dir / DECODER, ["CPUExecutionProvider"], 1)


def _latents(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)


def test_a_bound_run_equals_a_plain_run_for_every_size(decoder):
    """Padded to its fixed size, or split into pieces of the largest, a batch's rows come back
    as session.run gives them: the same values, its own rows only."""
    run = BoundRunner(decoder, ["x_mean"], 64, device="cpu")
    assert run.sizes == bucket_sizes(64)
    k = run.width
    for n in (1, 2, 5, 7, 33, 64, 65, 200):
        z = _latents(n, k, seed=n)
        (got,) = run(z)
        assert got.shape == (n, 784)
        np.testing.assert_array_equal(got, decoder.run(["x_mean"], {"z": z})[0])
    assert run.bucket_for(5) == 6 and run.bucket_for(33) == 48


def test_outputs_are_the_callers_own_not_the_bound_buffers(decoder):
    run = BoundRunner(decoder, ["x_mean"], 8, device="cpu")
    a, b = _latents(3, run.width, 1), _latents(3, run.width, 2)
    (first,) = run(a)
    kept = first.copy()
    run(b)  # the same fixed size, so the same buffers
    np.testing.assert_array_equal(first, kept)
    first[:] = 0  # and changing a reply changes nothing of the next run
    np.testing.assert_array_equal(run(a)[0], kept)


def in_threads(fn: Callable[[int], None], args: Iterable[int], timeout: float) -> None:
    """fn(a) for each a, each in a thread of its own, all at once; an exception in any (a
    failed run, not only a wrong answer) fails the test, as does one still running."""
    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        for future in [pool.submit(fn, a) for a in args]:
            future.result(timeout=timeout)
    finally:  # a thread still running fails the test now, not at pytest's own timeout
        pool.shutdown(wait=False, cancel_futures=True)


def test_in_threads_fails_on_an_exception_in_a_thread():
    def third_fails(a: int) -> None:
        if a == 2:
            raise RuntimeError("CUDA failure in a thread")

    with pytest.raises(RuntimeError, match="CUDA failure in a thread"):
        in_threads(third_fails, range(4), timeout=10)


def test_a_bound_runner_shared_by_threads_gives_each_its_own_rows(decoder):
    run = BoundRunner(decoder, ["x_mean"], 16, device="cpu")
    failures: list[str] = []

    def worker(t: int) -> None:
        for i in range(40):
            z = _latents(1 + (t + i) % 12, run.width, seed=100 * t + i)
            if not np.array_equal(run(z)[0], decoder.run(["x_mean"], {"z": z})[0]):
                failures.append(f"thread {t} call {i}")

    in_threads(worker, range(4), timeout=60)
    assert not failures


def test_bad_rows_are_refused(decoder):
    run = BoundRunner(decoder, ["x_mean"], 8, device="cpu")
    with pytest.raises(ValueError, match="expected"):
        run(np.zeros((0, run.width), np.float32))
    with pytest.raises(ValueError, match="expected"):
        run(np.zeros((2, run.width + 1), np.float32))
    with pytest.raises(ValueError, match="float32"):  # as session.run refuses it
        run(np.zeros((2, run.width), np.float64))


def test_a_runner_of_its_own_thread_makes_every_run_there(decoder, monkeypatch):
    """With CUDA graphs a runner makes all its runs in one thread of its own (the CUDA
    provider keeps graphs per thread), each size once when it is made, before any call, and
    each size with a graph id of its own (the CPU provider ignores them)."""
    seen: list[tuple[str, str | None]] = []
    plain_run = decoder.run_with_iobinding

    def recording(binding, options=None):
        graph = None if options is None else options.get_run_config_entry("gpu_graph_id")
        seen.append((threading.current_thread().name, graph))
        return plain_run(binding, options)

    monkeypatch.setattr(decoder, "run_with_iobinding", recording)
    run = BoundRunner(decoder, ["x_mean"], 8, device="cpu", cuda_graphs=True)
    # made: every size run once, each under its own id, from 1 (0 would mean no graph)
    assert [g for _, g in seen] == [str(i + 1) for i in range(len(run.sizes))]
    results: list[bool] = []

    def caller(seed: int) -> None:
        z = _latents(5, run.width, seed)
        results.append(np.array_equal(run(z)[0], decoder.run(["x_mean"], {"z": z})[0]))

    in_threads(caller, range(3), timeout=30)
    caller(9)
    run.close()
    assert results == [True] * 4
    assert len(seen) == len(run.sizes) + 4
    assert seen[-1][1] == str(run.sizes.index(6) + 1)  # 5 rows run as the graph of size 6
    assert len({name for name, _ in seen}) == 1 and seen[0][0].startswith("vae-bound")


def test_the_runtime_binds_on_cuda_only_unless_asked(model_dir):
    plain = ModelRuntime(model_dir, provider="cpu")
    assert not plain.bound  # auto: CPU
    bound = ModelRuntime(model_dir, provider="cpu", io_binding="on", max_rows=100,
                         small_rows=8)
    assert bound.bound and not bound.cuda_graphs
    bound.warm_up([1, 16])
    z = _latents(50, bound.latent_dim)
    x = np.random.default_rng(1).random((30, bound.pixels), dtype=np.float32)
    for got, want in ((bound.run_decoder(z), plain.run_decoder(z)),
                      (bound.run_decoder_small(z[:7]), plain.run_decoder_small(z[:7])),
                      (bound.run_encoder(x), plain.run_encoder(x)),
                      (bound.run_encoder_small(x[:3]), plain.run_encoder_small(x[:3]))):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="io_binding"):
        ModelRuntime(model_dir, provider="cpu", io_binding="maybe")
    # A model's bound runs take turns: one instance, whatever was asked for.
    assert (plain.instances(2), bound.instances(0), bound.instances(2)) == (2, 1, 1)


def test_cuda_graphs_are_refused_without_cuda(model_dir):
    if cuda_usable(model_dir):
        pytest.skip("checks the refusal where no GPU is usable")
    # Without onnxruntime-gpu: no CUDA provider; with it but no GPU: it fell back to the CPU.
    with pytest.raises(RuntimeError, match="CUDA graphs (need the CUDA provider|were asked)"):
        ModelRuntime(model_dir, provider="auto", cuda_graphs=True)


def test_settings_refuse_cuda_graphs_without_cuda_or_binding():
    for argv in (["--cuda-graphs", "true", "--provider", "cpu"],
                 ["--cuda-graphs", "true", "--io-binding", "off"]):
        with pytest.raises(SettingsError, match="--cuda-graphs needs"):
            load_settings(argv, env={})
    with pytest.raises(SettingsError, match="--io-binding: 'yes' is not one of"):
        load_settings(["--io-binding", "yes"], env={})
    s = load_settings([], env={})
    assert (s.io_binding, s.cuda_graphs) == ("auto", False)


@pytest.mark.e2e
def test_a_server_with_bound_runs_answers_as_the_model_in_process(model_dir):
    """--io-binding on, end to end: batched and inline runs, stream chunks and LogLikelihood's
    K samples (more rows than the largest fixed size) give the same numbers as in process."""
    reference = OnnxVAE(model_dir)
    with server_thread(model_dir, io_binding="on", max_batch_size=256) as srv, \
            VaeClient(srv.target, timeout=30) as c:
        assert srv.running.servicer.runtime.bound
        z = _latents(300, reference.latent_dim, 3)
        np.testing.assert_array_equal(c.decode(z).reshape(300, -1), reference.decode(z))
        np.testing.assert_array_equal(c.decode(z[:1]).reshape(1, -1), reference.decode(z[:1]))
        x = lk.to_unit(np.random.default_rng(4).integers(0, 256, (5, 784), dtype=np.uint8))
        mu, logvar = c.encode(x)
        np.testing.assert_array_equal(mu, reference.encode(x)[0])
        whole = c.sample(700, seed=2)
        streamed = np.concatenate([im for _, im in c.sample_stream(700, seed=2, chunk_size=300)])
        np.testing.assert_array_equal(streamed, whole)
        got = c.log_likelihood(x[:2], k=600, seed=1)
        want = reference.score(x[:2], 600, 1)
        np.testing.assert_allclose(got.log_likelihood, want.log_likelihood, rtol=1e-5)


# -- CUDA: only where onnxruntime-gpu sees a GPU ------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="no CUDA execution provider (onnxruntime-gpu + GPU)")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_bound_runs_and_graphs_agree_with_the_cpu(model_dir, graphs):
    """On the device: each fixed size (captured as a graph, with `graphs`) replays with new
    inputs, called from threads other than the one that captured it, and answers as the CPU
    does."""
    if not cuda_usable(model_dir):
        pytest.skip("onnxruntime-gpu fell back to the CPU: no usable GPU")
    gpu = ModelRuntime(model_dir, provider="cuda", cuda_graphs=graphs, max_rows=256,
                       small_rows=16)
    cpu = ModelRuntime(model_dir, provider="cpu")
    assert gpu.provider == CUDA and gpu.bound and gpu.cuda_graphs == graphs
    gpu.warm_up([])
    failures: list[str] = []

    def check(first_seed: int) -> None:
        for seed, n in enumerate((1, 5, 16, 100, 256, 600, 5), start=first_seed):
            z = _latents(n, gpu.latent_dim, seed)
            want = cpu.run_decoder(z)[0]
            got = [gpu.run_decoder(z)[0]] + ([gpu.run_decoder_small(z)[0]] if n <= 16 else [])
            if not all(np.allclose(g, want, atol=1e-4) for g in got):
                failures.append(f"seed {seed}, {n} rows")

    in_threads(check, (100 * t for t in range(3)), timeout=120)
    check(1000)
    assert not failures
