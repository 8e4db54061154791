"""ONNX Runtime sessions of a verified model directory: provider choice, checks, warm-up."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.calibration import Calibration
from vae_core.host import cores
from vae_core.manifest import MANIFEST
from vae_core.onnx_model import ModelDirectory, Provider
from vae_core.ort import ort
from vae_server.batcher import RunFn
from vae_server.binding import BoundRunner

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ENCODER_OUTPUTS = ["mu", "logvar"]


class ProviderError(RuntimeError):
    """The execution provider asked for is not the one ONNX Runtime can run the model on."""


def choose_providers(provider: str) -> list[str]:
    available = ort.get_available_providers()
    if provider == "cpu":
        return [CPU]
    if provider == "cuda" and CUDA not in available:
        raise ProviderError(f"--provider cuda, but this onnxruntime offers only {available}")
    if provider in ("cuda", "auto") and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def with_options(providers: list[str], cuda_graphs: bool = False) -> list[Provider]:
    """`providers` with the CUDA provider's options: float32 matrix products in float32 (ONNX
    Runtime's default, TF32 on Ampere and later, rounds their inputs to 10 bits of mantissa,
    which moves pixels by about 1e-3 from what the CPU computes for the same model), and,
    with `cuda_graphs`, graph capture."""
    options = {"use_tf32": "0"}
    if cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return [(p, dict(options)) if p == CUDA else p for p in providers]


def _plain(session: ort.InferenceSession, outputs: list[str], name: str) -> RunFn:
    def run(x: np.ndarray) -> Sequence[np.ndarray]:
        return session.run(outputs, {name: x})
    return run


class ModelRuntime(ModelDirectory):
    """Encoder and decoder sessions; `run_encoder` / `run_decoder` are what the batchers call
    (from worker threads: InferenceSession.run is thread-safe).

    On the CPU each model has a second session with one intra-op thread (`run_*_small`): the
    batchers run small batches on it on the event loop's thread (for a few rows, waking ONNX
    Runtime's worker threads costs more than the work they share), and large batches that
    run beside each other in worker threads (`instances`). On CUDA the one session serves
    all, unless the runs are bound.

    Bound runs (`io_binding`: "auto" = on CUDA only, "on", "off") pad each batch to one of a
    few fixed sizes and run it on buffers preallocated on the device (`binding.BoundRunner`),
    up to `max_rows` rows at a time; the small runs then get sessions and buffers of their own
    (up to `small_rows`), so that the event loop's thread never waits for a large run.
    `cuda_graphs` (CUDA only) captures each fixed size as a CUDA graph.
    """

    # x [N, D] float32 -> [mu, logvar]; z [N, k] float32 -> [x_mean] (Gaussian) or
    # [x_mean, logits] (Bernoulli). Set in __init__: plain session runs, or bound ones.
    run_encoder: RunFn
    run_decoder: RunFn
    run_encoder_small: RunFn
    run_decoder_small: RunFn

    def __init__(self, model_dir: str | Path, provider: str = "auto", threads: int = 0,
                 spinning: bool = False, io_binding: str = "auto", cuda_graphs: bool = False,
                 max_rows: int = 2048, small_rows: int = 64) -> None:
        super().__init__(model_dir)
        self.manifest_text = (self.model_dir / MANIFEST).read_text()
        self.calibration = Calibration(self.manifest.get("calibration"))

        if io_binding not in ("auto", "on", "off"):
            raise ValueError(f"io_binding must be auto, on or off, not {io_binding!r}")
        providers = choose_providers(provider)
        if cuda_graphs and providers[0] != CUDA:
            raise RuntimeError(f"CUDA graphs need the CUDA provider; this onnxruntime offers "
                               f"{ort.get_available_providers()}")
        if cuda_graphs and io_binding == "off":
            raise RuntimeError("CUDA graphs need IO binding (--io-binding auto or on)")
        chosen = with_options(providers, cuda_graphs)

        models = self.read_models()  # read and checked once, for each pair of sessions
        self.encoder, self.decoder = self.open_sessions(chosen, threads, spinning, models)
        # What ONNX Runtime actually uses: onnxruntime-gpu without a usable CUDA (no driver,
        # a CUDA or cuDNN it was not built for) falls back to CPU with only a logged error.
        self.provider = self._provider_in_use([self.encoder, self.decoder], provider,
                                              cuda_graphs)
        self.bound = io_binding == "on" or (io_binding == "auto" and self.provider == CUDA)
        self.cuda_graphs = cuda_graphs
        self.encoder_small, self.decoder_small = self.encoder, self.decoder
        if self.provider == CPU and threads != 1:
            self.encoder_small, self.decoder_small = self.open_sessions([CPU], 1, False, models)
        elif self.bound:
            self.encoder_small, self.decoder_small = self.open_sessions(chosen, threads, spinning,
                                                                       models)
            self._provider_in_use([self.encoder_small, self.decoder_small], provider,
                                  cuda_graphs)
        self._decoder_outputs = [o.name for o in self.decoder.get_outputs()]
        # The small sessions' batches: at most small_rows, and never past a batch.
        self.small_rows = small = max(1, min(small_rows, max_rows))
        specs = [(self.encoder, ENCODER_OUTPUTS, "x", max_rows),
                 (self.decoder, self._decoder_outputs, "z", max_rows),
                 (self.encoder_small, ENCODER_OUTPUTS, "x", small),
                 (self.decoder_small, self._decoder_outputs, "z", small)]
        self._runners: list[BoundRunner] = []
        runs: list[RunFn]
        if self.bound:
            device = "cuda" if self.provider == CUDA else "cpu"
            self._runners = [BoundRunner(sess, outputs, rows, device, cuda_graphs)
                             for sess, outputs, _, rows in specs]
            runs = [*self._runners]
        else:
            runs = [_plain(sess, outputs, name) for sess, outputs, name, _ in specs]
        self.run_encoder, self.run_decoder, self.run_encoder_small, self.run_decoder_small = runs
        # The decoder output that log p(x|z) needs.
        self.likelihood_output = (self._decoder_outputs.index("x_mean")
                                  if self.likelihood == lk.GAUSSIAN
                                  else self._decoder_outputs.index("logits"))
        log.info("model %s (k=%d, %s) on %s%s", self.spec.version, self.latent_dim,
                 self.likelihood, self.provider,
                 (" with IO binding" + (" and CUDA graphs" if cuda_graphs else ""))
                 if self.bound else "")

    @staticmethod
    def _provider_in_use(sessions: Sequence[ort.InferenceSession], provider: str,
                         cuda_graphs: bool) -> str:
        """The provider `sessions` run on. Where CUDA was asked for by name (`--provider
        cuda`, or CUDA graphs) and a session fell back to the CPU, a ProviderError: a GPU
        server that served on the CPU would report SERVING at a fraction of its rate. `auto`
        serves on the CPU with a warning."""
        used = [s.get_providers()[0] for s in sessions]
        fell_back = [p for p in used if p != CUDA]
        if provider != "cpu" and CUDA in ort.get_available_providers() and fell_back:
            why = (f"ONNX Runtime fell back to {fell_back[0]}: it cannot use CUDA here (its "
                   "log above says why: no GPU or driver, or a CUDA or cuDNN other than the "
                   "one this onnxruntime-gpu was built for)")
            if provider == "cuda":
                raise ProviderError(f"--provider cuda, but {why}")
            if cuda_graphs:
                raise ProviderError(f"CUDA graphs were asked for, but {why}")
            log.warning("CUDA was requested but %s", why)
        return used[-1]

    def instances(self, requested: int = 0) -> int:
        """Large batches of each model that may run at once: `requested`, or for 0 one per
        core on the CPU (each on the one-thread session) and 1 on CUDA. Bound runs: 1, since
        a model's bound runs take turns (and a second instance would run its large batches
        on the small runner, which the event loop's thread waits for)."""
        if self.bound:
            if requested > 1:
                log.warning("--instances %d: bound runs (--io-binding) take turns, so 1 "
                            "instance per model", requested)
            return 1
        if requested:
            return requested
        return cores() if self.provider == CPU else 1

    def warm_up(self, batch_sizes: Sequence[int], small_sizes: Sequence[int] = ()) -> None:
        """Run each batch size once so that first calls do not pay for allocation; bound
        runs, each of their fixed sizes (which captures the CUDA graphs)."""
        if self._runners:
            for r in self._runners:
                r.warm_up()
            return
        rng = np.random.default_rng(0)
        for n in batch_sizes:
            self.run_encoder(rng.random((n, self.pixels), dtype=np.float32))
            self.run_decoder(rng.standard_normal((n, self.latent_dim), dtype=np.float32))
        for n in small_sizes:
            self.run_encoder_small(rng.random((n, self.pixels), dtype=np.float32))
            self.run_decoder_small(rng.standard_normal((n, self.latent_dim), dtype=np.float32))
