"""The decoder jobs of Sample, SampleStream and LogLikelihood (batcher.Job): each makes its
own rows and turns the model's outputs into its result in the thread that runs its batch, so
the work around a run costs no hop between threads of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vae_core import likelihood as lk
from vae_core.prior import GaussianMixture
from vae_server import replies
from vae_server.runtime import ModelRuntime


@dataclass
class StreamChunk:
    """Images first .. first + rows - 1 of a seeded stream, as the chunk's reply bytes."""

    prior: GaussianMixture
    seed: int
    first: int
    rows: int
    digit: int | None
    dtype: int

    def make_rows(self) -> np.ndarray:
        return self.prior.latents(self.seed, self.first, self.rows, self.digit)

    def finish(self, outputs: list[np.ndarray]) -> bytes:
        return replies.sample_chunk(self.first, outputs[0], self.dtype)


@dataclass
class SampleReply(StreamChunk):
    """Images 0 .. rows - 1 of a Sample call, as its reply bytes, with their latents when
    the caller asks for them."""

    with_latents: bool = False
    _z: np.ndarray = field(init=False, repr=False)  # made by make_rows, read by finish

    def make_rows(self) -> np.ndarray:
        self._z = super().make_rows()
        return self._z

    def finish(self, outputs: list[np.ndarray]) -> bytes:
        return replies.sample(outputs[0], self.dtype, self._z if self.with_latents else None)


@dataclass
class ImportanceWeights:
    """Importance samples lo .. hi - 1 (of k) of images first .. of a LogLikelihood call, as
    their log-weights [n, hi - lo]. An image's noise is drawn whole, whatever part runs
    (lk.score_noise), so a call's scores do not depend on how it was split."""

    model: ModelRuntime
    x: np.ndarray  # [n, D], in [0, 1]
    mu: np.ndarray  # [n, latent_dim]
    logvar: np.ndarray
    seed: int
    first: int
    k: int
    lo: int = 0
    hi: int | None = None  # k when None
    # Made by make_rows, read by finish.
    _eps: np.ndarray = field(init=False, repr=False)
    _z: np.ndarray = field(init=False, repr=False)

    @property
    def samples(self) -> int:
        return (self.k if self.hi is None else self.hi) - self.lo

    @property
    def rows(self) -> int:
        return len(self.x) * self.samples

    def make_rows(self) -> np.ndarray:
        eps = lk.score_noise(self.seed, self.first, len(self.x), self.k, self.model.latent_dim)
        if self.samples < self.k:
            eps = eps[:, self.lo : self.lo + self.samples]
        self._eps = eps
        self._z = lk.latents(self.mu, self.logvar, eps)
        return self._z.reshape(self.rows, self.model.latent_dim)

    def finish(self, outputs: list[np.ndarray]) -> np.ndarray:
        m = self.model
        decoded = outputs[m.likelihood_output].reshape(len(self.x), self.samples, m.pixels)
        return lk.log_weights(self.x, self.mu, self.logvar, self._eps, decoded, m.likelihood,
                              m.sigma, self._z, m.prior.log_prob)


@dataclass
class ImageScores(ImportanceWeights):
    """All k samples of whole images, and their scores (ELBO, log p(x), bits/dim)."""

    def finish(self, outputs: list[np.ndarray]) -> lk.Scores:  # type: ignore[override]
        return lk.scores_from_log_weights(super().finish(outputs), self.model.likelihood,
                                          d=self.model.pixels)
