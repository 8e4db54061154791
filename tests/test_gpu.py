"""The CUDA execution provider path: runs only where onnxruntime-gpu sees a GPU."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest

from serving import cuda_usable
from vae_server import runtime
from vae_server.runtime import CPU, CUDA, ModelRuntime, ProviderError, choose_providers

has_cuda = CUDA in ort.get_available_providers()


def test_cpu_is_chosen_when_asked_or_when_cuda_is_absent():
    assert choose_providers("cpu") == [CPU]
    if not has_cuda:
        assert choose_providers("auto") == [CPU]
        with pytest.raises(ProviderError, match="only"):
            choose_providers("cuda")


def test_cuda_runs_float32_products_in_float32():
    # ONNX Runtime's CUDA default, TF32, would put pixels about 1e-3 from the CPU's.
    assert runtime.with_options([CUDA, CPU]) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert runtime.with_options([CUDA, CPU], cuda_graphs=True) == [
        (CUDA, {"use_tf32": "0", "enable_cuda_graph": "1"}), CPU]
    assert runtime.with_options([CPU], cuda_graphs=True) == [CPU]


@pytest.fixture
def cuda_that_falls_back(monkeypatch):
    """onnxruntime-gpu where CUDA cannot load (no driver, another CUDA): it lists the CUDA
    provider, and its sessions run on the CPU. The CPU build's sessions do the same when
    asked for a provider it lacks."""
    if has_cuda:
        pytest.skip("this onnxruntime has a CUDA provider of its own")
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA, CPU])


# What the CPU build says of a provider it lacks, the simulated fallback's own warning.
quiet_fallback = pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")


@quiet_fallback
def test_provider_cuda_refuses_to_serve_on_the_cpu(model_dir, cuda_that_falls_back):
    for binding in ("auto", "on", "off"):
        with pytest.raises(ProviderError, match="--provider cuda, but ONNX Runtime fell back "
                                                "to CPUExecutionProvider"):
            ModelRuntime(model_dir, provider="cuda", io_binding=binding)


@quiet_fallback
def test_cuda_graphs_refuse_to_serve_on_the_cpu(model_dir, cuda_that_falls_back):
    with pytest.raises(ProviderError, match="CUDA graphs were asked for, but ONNX Runtime"):
        ModelRuntime(model_dir, provider="auto", cuda_graphs=True)


@quiet_fallback
def test_provider_auto_serves_on_the_cpu_with_a_warning(model_dir, cuda_that_falls_back,
                                                        caplog):
    with caplog.at_level(logging.WARNING, logger="vae_server.runtime"):
        rt = ModelRuntime(model_dir, provider="auto")
    assert rt.provider == CPU and not rt.bound
    assert "CUDA was requested but ONNX Runtime fell back to CPUExecutionProvider" in caplog.text


needs_cuda = pytest.mark.skipif(not has_cuda,
                                reason="no CUDA execution provider (onnxruntime-gpu + GPU)")


@pytest.fixture
def usable_cuda(model_dir):
    if not cuda_usable(model_dir):
        pytest.skip("onnxruntime-gpu without a GPU: it fell back to the CPU")


@pytest.mark.gpu
@needs_cuda
def test_cuda_provider_is_used_and_agrees_with_cpu(model_dir, usable_cuda):
    gpu = ModelRuntime(model_dir, provider="cuda")
    cpu = ModelRuntime(model_dir, provider="cpu")
    assert gpu.provider == CUDA, "a GPU is present, but onnxruntime-gpu fell back to the CPU"
    rng = np.random.default_rng(0)
    z = rng.standard_normal((256, gpu.latent_dim), dtype=np.float32)
    np.testing.assert_allclose(gpu.run_decoder(z)[0], cpu.run_decoder(z)[0], atol=1e-4)
    x = rng.random((256, gpu.pixels), dtype=np.float32)  # the encoder too: its two outputs
    for got, want in zip(gpu.run_encoder(x), cpu.run_encoder(x), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("io_binding", ["on", "off"])
def test_cuda_rows_do_not_depend_on_the_batch(model_dir, usable_cuda, io_binding):
    """DESIGN.md: the same seed gives the same images whatever the batch the server formed.
    On CUDA a batch's size may choose another matrix-product kernel; each row must still come
    out bit for bit the same, alone or among others (bound runs: padded to every size)."""
    gpu = ModelRuntime(model_dir, provider="cuda", io_binding=io_binding)
    z = np.random.default_rng(2).standard_normal((2048, gpu.latent_dim), dtype=np.float32)
    alone = gpu.run_decoder(z[:4])[0]
    for n in (5, 7, 13, 33, 64, 100, 257, 1000, 2048):
        np.testing.assert_array_equal(gpu.run_decoder(z[:n])[0][:4], alone, err_msg=f"n={n}")
