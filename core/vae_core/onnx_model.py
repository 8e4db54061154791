"""Exported models under ONNX Runtime: the one place where a model directory becomes a pair of
checked sessions (`open_sessions`), and `OnnxVAE`, the encoder and decoder as numpy functions
(what `vae-export eval` scores, and what the server serves). numpy and onnxruntime only.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vae_core import likelihood as lk
from vae_core.manifest import (
    DECODER,
    ENCODER,
    ManifestError,
    ModelSpec,
    check_manifest,
    check_session_io,
    load_manifest,
)
from vae_core.ort import ort
from vae_core.prior import GaussianMixture, load_prior

# An execution provider's name, or its name and options.
Provider = str | tuple[str, dict[str, str]]


def make_session(model: Path | bytes, providers: Sequence[Provider] | None = None,
                 threads: int = 0, spinning: bool = False) -> ort.InferenceSession:
    """An InferenceSession of an ONNX file, or of its bytes; `threads` = 0 lets ONNX Runtime
    choose (one per core).

    Spinning worker threads answer the next run (and each other, inside a run) a little
    sooner but spin on the cores for a moment instead of sleeping. Off unless asked for; the
    server asks for it for its large-batch sessions only (vae-server --spinning).

    A model given as bytes must hold its weights: ONNX Runtime looks for external data files
    in an empty folder of our own, where there are none.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    chosen = list(providers or ["CPUExecutionProvider"])
    if not isinstance(model, bytes):
        return ort.InferenceSession(str(model), opts, providers=chosen)
    with tempfile.TemporaryDirectory(prefix="vae-no-external-data-") as empty:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      empty)
        return ort.InferenceSession(model, opts, providers=chosen)


def read_model(path: Path, sha256: str) -> bytes:
    """The bytes of an ONNX file of the manifest, read once and checked against its sha256:
    the sessions are made of the very bytes checked, whatever the file holds by then."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: {exc.strerror or exc}") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ManifestError(f"{path}: sha256 does not match the manifest's (changed since it "
                            "was checked?)")
    return data


def read_models(model_dir: str | Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """The encoder's and decoder's bytes, each checked (`read_model`)."""
    return {name: read_model(Path(model_dir) / name, manifest["files"][name]["sha256"])
            for name in (ENCODER, DECODER)}


def open_sessions(model_dir: str | Path, manifest: dict[str, Any],
                  providers: Sequence[Provider] | None = None, threads: int = 0,
                  spinning: bool = False, models: dict[str, bytes] | None = None,
                  ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """The encoder and decoder sessions of a model directory whose manifest was loaded (and
    its hashes checked) by `load_manifest`, of the bytes `models` holds (read_models: pass
    them to open several pairs from one read); each session's inputs and outputs are checked
    against the manifest. A file ONNX Runtime cannot load (not a model; weights in another
    file, which no hash covers) is a ManifestError."""
    model_dir = Path(model_dir)
    if models is None:
        models = read_models(model_dir, manifest)
    sessions = []
    for name in (ENCODER, DECODER):
        path = model_dir / name
        try:
            session = make_session(models[name], providers, threads, spinning)
        except Exception as exc:  # onnxruntime's own: InvalidProtobuf, Fail, ...
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "external data" in why.lower():
                why = ("its weights are in another file (external data), which the manifest's "
                       "hash does not cover: export them inside the model file")
            raise ManifestError(f"{path}: ONNX Runtime cannot load it: {why}") from None
        check_session_io(name, manifest["files"][name], session.get_inputs(),
                         session.get_outputs())
        sessions.append(session)
    return sessions[0], sessions[1]


class ModelDirectory:
    """What a model directory declares, read once and checked: its manifest (with the files'
    hashes), the model's spec and its prior. The base of both ways to run a model, `OnnxVAE`
    and the server's runtime. `manifest`: one not (yet) written to the directory, checked as
    load_manifest checks manifest.json (what `vae-export onnx` calibrates with)."""

    def __init__(self, model_dir: str | Path, manifest: dict[str, Any] | None = None) -> None:
        self.model_dir = Path(model_dir)
        if manifest is None:
            manifest = load_manifest(self.model_dir)
        else:
            check_manifest(manifest, self.model_dir, where="the manifest being written")
        self.manifest: dict[str, Any] = manifest
        self.spec = ModelSpec.of(self.manifest)
        self.latent_dim = self.spec.latent_dim
        self.likelihood = self.spec.likelihood
        self.sigma = self.spec.sigma
        self.pixels = self.spec.pixels
        self.prior: GaussianMixture = load_prior(self.model_dir, self.manifest, self.latent_dim)

    def read_models(self) -> dict[str, bytes]:
        return read_models(self.model_dir, self.manifest)

    def open_sessions(self, providers: Sequence[Provider] | None = None, threads: int = 0,
                      spinning: bool = False, models: dict[str, bytes] | None = None,
                      ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
        return open_sessions(self.model_dir, self.manifest, providers, threads, spinning,
                             models)


class OnnxVAE(ModelDirectory):
    """Encoder and decoder sessions of a verified model directory."""

    def __init__(self, model_dir: str | Path, providers: Sequence[Provider] | None = None,
                 threads: int = 0, spinning: bool = False,
                 manifest: dict[str, Any] | None = None) -> None:
        super().__init__(model_dir, manifest)
        self.encoder, self.decoder = self.open_sessions(providers, threads, spinning)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, logvar = self.encoder.run(["mu", "logvar"], {"x": np.ascontiguousarray(x, np.float32)})
        return mu, logvar

    def decode(self, z: np.ndarray) -> np.ndarray:
        """The mean image f(z) [N, 784] in [0, 1]."""
        return self.decoder.run(["x_mean"], {"z": np.ascontiguousarray(z, np.float32)})[0]

    def sample(self, n: int, seed: int, start: int = 0, digit: int | None = None) -> np.ndarray:
        """Images start .. start + n - 1 generated from `seed` [n, 784] in [0, 1]: the mean
        images f(z) of the prior's z, as the server's Sample and SampleStream make them."""
        return self.decode(self.prior.latents(seed, start, n, digit))

    def latent_log_density(self, x: np.ndarray) -> np.ndarray:
        """log p(mu(x)) [N] under the model's prior: how typical the place of x's code is among
        the training digits' codes, around which a learned prior is fitted (their MAP codes,
        narrowed by its temperature). An anomaly score that, unlike log p(x), does not favour
        images for having little ink (EVAL.md)."""
        return self.prior.log_prob(self.encode(x)[0])

    def decode_for_likelihood(self, z: np.ndarray) -> np.ndarray:
        """What log p(x|z) needs: the mean image (Gaussian) or the logits (Bernoulli)."""
        name = "x_mean" if self.likelihood == lk.GAUSSIAN else "logits"
        return self.decoder.run([name], {"z": np.ascontiguousarray(z, np.float32)})[0]

    def log_weights(self, x: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """Importance log-weights [N, K] for images x [N, D] and noise eps [N, K, k]."""
        mu, logvar = self.encode(x)
        z = lk.latents(mu, logvar, eps)
        n, k_samples, _ = eps.shape
        decoded = self.decode_for_likelihood(z.reshape(n * k_samples, -1))
        decoded = decoded.reshape(n, k_samples, -1)
        return lk.log_weights(x, mu, logvar, eps, decoded, self.likelihood, self.sigma, z,
                              self.prior.log_prob)

    def score(self, x: np.ndarray, k_samples: int, seed: int,
              decodes_per_run: int = 16384) -> lk.Scores:
        """ELBO, log p(x) and bits/dim for every image; the noise comes from `seed` alone
        (lk.score_noise), drawn per chunk of images whose size never changes the result."""
        return lk.score_images(self.log_weights, x, k_samples, seed, self.latent_dim,
                               self.likelihood, decodes_per_run)
