"""Fitting the learned prior (vae_core.prior.GaussianMixture) to where the training digits'
codes lie: for each digit class, a Gaussian mixture fitted by EM to latents drawn around each
of that class's training digits' codes with the spread of its posterior q(z|x) (so that samples
are new digits rather than decodings of training codes), its components then narrowed by a
temperature.

The codes are the encoder's means, or (the default) each digit's MAP code, argmax_z
log p(x|z) + log N(z; 0, I), found by gradient steps from the encoder's mean
(vae_export.train): the encoder, trained to amortise, stops short of it, and the decoder draws
sharper digits from the MAP codes (EVAL.md, "Choosing the defaults").

The class weights are the classes' shares of the training digits; labelled generation draws
from one class's components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vae_core import likelihood as lk
from vae_core.prior import MAX_COMPONENTS, MAX_FACTOR_ENTRIES, GaussianMixture

PRIOR_KINDS = ("mixture", "standard")
COVARIANCES = ("full", "diag")
CODES = ("map", "mean")


# Far colder than anyone samples, and far above where a component's standard deviations fall
# under the least a prior file may hold (vae_core.prior.MIN_SCALE), which failed the fit only
# after training.
MIN_TEMPERATURE = 0.01


@dataclass
class PriorConfig:
    """How the prior is made: "standard" is N(0, I); "mixture" is fitted after training."""

    kind: str = "mixture"
    components: int = 10  # per digit class
    covariance: str = "full"  # "full" or "diag"
    samples_per_digit: int = 10  # latents drawn from each training digit's q(z|x)
    reg: float = 1e-3  # added to each covariance's diagonal, relative to the codes' variance
    iterations: int = 100
    seed: int = 0
    codes: str = "map"  # each digit's code: its MAP code ("map") or the encoder's mean ("mean")
    map_steps: int = 100  # Adam steps from the encoder's mean to the MAP code
    map_lr: float = 0.05
    # Each component's standard deviations are multiplied by this (its covariance by the
    # square), as sampling "at a temperature" does: the fitted components spread past where
    # the decoder draws digits.
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"prior kind must be standard or mixture, not {self.kind!r}")
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance must be full or diag, not {self.covariance!r}")
        if self.codes not in CODES:
            raise ValueError(f"prior codes must be map or mean, not {self.codes!r}")
        # Per class: ten classes of at most this many are a prior.npz a server loads
        # (vae_core.prior.MAX_COMPONENTS in all).
        if not 1 <= self.components <= MAX_COMPONENTS // 10:
            raise ValueError(f"prior components must be in 1 .. {MAX_COMPONENTS // 10} (per "
                             f"digit class), got {self.components}")
        if self.samples_per_digit < 1:
            raise ValueError(f"samples_per_digit must be >= 1, got {self.samples_per_digit}")
        if not MIN_TEMPERATURE <= self.temperature <= 1:
            raise ValueError(f"prior temperature must be in {MIN_TEMPERATURE:g} .. 1, not "
                             f"{self.temperature}")
        if self.map_steps < 0 or not self.map_lr > 0:
            raise ValueError("map_steps must be >= 0 and map_lr > 0")

    def check_latent_dim(self, latent_dim: int) -> None:
        """ValueError where the mixture of this config in R^latent_dim, ten classes of it,
        would be a prior.npz larger than a server loads (vae_core.prior.MAX_FACTOR_ENTRIES):
        found before training, not by `onnx` after it."""
        entries = 10 * self.components * latent_dim * latent_dim
        if self.kind == "mixture" and entries > MAX_FACTOR_ENTRIES:
            raise ValueError(f"a mixture prior of {self.components} components per digit class "
                             f"in R^{latent_dim} has {entries} covariance entries, past the "
                             f"{MAX_FACTOR_ENTRIES} a served prior may have: fewer "
                             "--prior-components, a smaller --latent-dim, or --prior standard")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def posterior_samples(mu: np.ndarray, logvar: np.ndarray, labels: np.ndarray, per_digit: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`per_digit` latents z ~ q(z|x) of each digit, and their labels."""
    eps = rng.standard_normal((len(mu), per_digit, mu.shape[1]))
    z = mu[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * eps
    return z.reshape(-1, mu.shape[1]), np.repeat(labels, per_digit)


def fit_prior(mu: np.ndarray, logvar: np.ndarray, labels: np.ndarray,
              cfg: PriorConfig) -> GaussianMixture:
    """The prior fitted around the training digits' codes `mu` [N, k] with their posteriors'
    spread exp(logvar) [N, k], and their labels [N]."""
    k = mu.shape[1]
    if cfg.kind == "standard":
        return GaussianMixture.standard(k)
    rng = np.random.default_rng(cfg.seed)
    z, lab = posterior_samples(np.asarray(mu, np.float64), np.asarray(logvar, np.float64),
                               np.asarray(labels), cfg.samples_per_digit, rng)
    weights, means, chols, classes = [], [], [], []
    for c in np.unique(lab):
        w, m, cov = fit_gmm(z[lab == c], cfg.components, rng, cfg.covariance, cfg.reg,
                            cfg.iterations)
        weights.append(np.mean(lab == c) * w)
        means.append(m)
        chols.append(cfg.temperature * np.linalg.cholesky(cov))
        classes.append(np.full(len(w), int(c)))
    weights_all = np.concatenate(weights)
    return GaussianMixture(weights_all / weights_all.sum(), np.concatenate(means),
                           np.concatenate(chols), np.concatenate(classes).astype(np.int64))


def fit_gmm(x: np.ndarray, m: int, rng: np.random.Generator, covariance: str = "full",
            reg: float = 1e-3, iterations: int = 100, tol: float = 1e-4
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EM for an m-component Gaussian mixture on x [n, k]: (weights [m], means [m, k],
    covariances [m, k, k]). k-means++ seeding and a few Lloyd steps start it; `reg` times the
    data's mean variance is added to every covariance's diagonal, so that no component
    collapses onto a few points."""
    x = np.asarray(x, np.float64)
    n, k = x.shape
    m = min(m, n)
    floor = reg * float(x.var(axis=0).mean()) * np.eye(k)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, m):
        centres.append(x[rng.choice(n, p=d2 / d2.sum())])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(axis=1))
    means = np.array(centres)
    for _ in range(10):
        assign = _sq_dist(x, means).argmin(axis=1)
        means = np.array([x[assign == j].mean(axis=0) if np.any(assign == j) else means[j]
                          for j in range(m)])
    resp = np.eye(m)[assign]
    previous = -np.inf
    weights = np.full(m, 1.0 / m)
    covs = np.empty((m, k, k))
    for _ in range(iterations):
        # M step: the parameters from the responsibilities.
        counts = resp.sum(axis=0) + 1e-10
        weights = counts / n
        means = (resp.T @ x) / counts[:, None]
        for j in range(m):
            d = x - means[j]
            if covariance == "full":
                covs[j] = (resp[:, j, None] * d).T @ d / counts[j] + floor
            else:
                covs[j] = np.diag((resp[:, j, None] * d * d).sum(axis=0) / counts[j]) + floor
        # E step: the responsibilities from the parameters.
        chols = np.linalg.cholesky(covs)
        inverse = np.linalg.inv(chols)
        log_p = np.empty((n, m))
        for j in range(m):
            y = (x - means[j]) @ inverse[j].T
            log_p[:, j] = (np.log(weights[j]) - np.log(np.diagonal(chols[j])).sum()
                           - 0.5 * k * np.log(2 * np.pi) - 0.5 * np.einsum("nk,nk->n", y, y))
        total = lk.logsumexp(log_p, axis=1)
        resp = np.exp(log_p - total[:, None])
        if total.mean() - previous < tol:
            break
        previous = total.mean()
    return weights, means, covs


def _sq_dist(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return ((x * x).sum(axis=1)[:, None] + (centres * centres).sum(axis=1)[None, :]
            - 2 * x @ centres.T)


