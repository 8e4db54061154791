"""The CUDA execution provider path: runs only where onnxruntime-gpu sees a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serving import cuda_usable
from vae_server.runtime import CPU, CUDA, ModelRuntime, choose_providers

has_cuda = CUDA in ort.get_available_providers()


def test_cpu_is_chosen_when_asked_or_when_cuda_is_absent():
    assert choose_providers("cpu") == [CPU]
    if not has_cuda:
        assert choose_providers("auto") == [CPU]
        with pytest.raises(RuntimeError, match="only"):
            choose_providers("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda, reason="no CUDA execution provider (onnxruntime-gpu + GPU)")
def test_cuda_provider_is_used_and_agrees_with_cpu(model_dir):
    if not cuda_usable(model_dir):
        pytest.skip("onnxruntime-gpu without a GPU: it fell back to the CPU")
    gpu = ModelRuntime(model_dir, provider="cuda")
    cpu = ModelRuntime(model_dir, provider="cpu")
    assert gpu.provider == CUDA, "a GPU is present, but onnxruntime-gpu fell back to the CPU"
    z = np.random.default_rng(0).standard_normal((256, gpu.latent_dim), dtype=np.float32)
    np.testing.assert_allclose(gpu.run_decoder(z)[0], cpu.run_decoder(z)[0], atol=1e-4)
