"""The likelihood math, in numpy, written once: `vae-export eval` and the server both use it.

Notation: x images [N, D] in [0, 1]; the encoder gives mu, logvar [N, k]; eps [N, K, k] is
standard normal noise drawn outside the ONNX graphs; z = mu + exp(logvar / 2) * eps; the
decoder's output for z is `decoded` [N, K, D] (the mean image f(z) for the Gaussian decoder,
the logits for the Bernoulli decoder).

The importance weights are w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) and
log p(x) ~= logsumexp_k(w_k) - log K; with K = 1 that is the ELBO. Everything is accumulated
in float64 so that log-weights of -1e4 and below stay finite and exact enough.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np

# The likelihoods' names, defined with the manifest that records them.
from vae_core.manifest import BERNOULLI as BERNOULLI
from vae_core.manifest import GAUSSIAN as GAUSSIAN
from vae_core.manifest import LIKELIHOODS as LIKELIHOODS
from vae_core.rng import keyed_rng

LOG_2PI = float(np.log(2.0 * np.pi))
# 8-bit pixels dequantised onto [0, 1]: x = (y + u) / 256, u ~ U[0, 1).
PIXEL_LEVELS = 256


def logsumexp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log(sum(exp(a))) along `axis`; -inf rows stay -inf, never NaN."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def log_mean_exp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(mean(exp(a))) along `axis`: the importance-sampled log-likelihood from log-weights."""
    return logsumexp(a, axis=axis) - np.log(np.asarray(a).shape[axis])


def latents(mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z = mu + sigma * eps, broadcast over the sample axis: [N, k] x [N, K, k] -> [N, K, k]."""
    std = np.exp(0.5 * logvar.astype(np.float32))
    return (mu[:, None, :] + std[:, None, :] * eps).astype(np.float32)


def log_normal_std(z: np.ndarray) -> np.ndarray:
    """log N(z; 0, I) summed over the last axis."""
    z = z.astype(np.float64)
    return -0.5 * (np.sum(z * z, axis=-1) + z.shape[-1] * LOG_2PI)


def log_q(eps: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """log q(z|x) for z = mu + exp(logvar/2) * eps: depends on eps and logvar alone. [N, K]."""
    eps = eps.astype(np.float64)
    k = eps.shape[-1]
    return -0.5 * (np.sum(eps * eps, axis=-1) + k * LOG_2PI + np.sum(logvar, axis=-1)[:, None])


def log_px_given_z(
    x: np.ndarray, decoded: np.ndarray, likelihood: str, sigma: float | None
) -> np.ndarray:
    """log p(x|z) for each of K decodings: x [N, D], decoded [N, K, D] -> [N, K]."""
    # The [N, K, D] elementwise work stays in float32 (it is most of the time); sums over
    # pixels are returned in float64, and everything after that is float64.
    x32 = np.asarray(x, dtype=np.float32)[:, None, :]
    out = np.asarray(decoded, dtype=np.float32)
    d = x.shape[-1]
    if likelihood == GAUSSIAN:
        if sigma is None or sigma <= 0:
            raise ValueError("the Gaussian decoder needs sigma > 0")
        diff = out - x32
        sq = np.einsum("nkd,nkd->nk", diff, diff).astype(np.float64)
        # sq is [N, K], so this is an array; numpy's stubs widen the arithmetic to a scalar.
        return cast(np.ndarray, -0.5 * sq / (sigma * sigma) - d * (np.log(sigma) + 0.5 * LOG_2PI))
    if likelihood == BERNOULLI:
        # x * l - log(1 + e^l), written stably: log(1 + e^l) = max(l, 0) + log1p(e^-|l|).
        terms = x32 * out - (np.maximum(out, 0.0) + np.log1p(np.exp(-np.abs(out))))
        # A sum over the last axis of [N, K, D] is an [N, K] array; the stubs say scalar or array.
        return cast(np.ndarray, np.sum(terms, axis=-1, dtype=np.float64))
    raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}")


def log_weights(
    x: np.ndarray,
    mu: np.ndarray,
    logvar: np.ndarray,
    eps: np.ndarray,
    decoded: np.ndarray,
    likelihood: str,
    sigma: float | None,
    z: np.ndarray | None = None,
    log_prior: Callable[[np.ndarray], np.ndarray] = log_normal_std,
) -> np.ndarray:
    """Importance log-weights [N, K] given the decoder's output for z = latents(mu, logvar, eps)
    (pass `z` [N, K, k] where the caller has it already). `log_prior`: log p(z) summed over the
    last axis, the model's prior (vae_core.prior; N(0, I) by default)."""
    if z is None:
        z = latents(mu, logvar, eps)
    return log_px_given_z(x, decoded, likelihood, sigma) + log_prior(z) - log_q(eps, logvar)


@dataclass(frozen=True)
class Scores:
    """Per-image scores, all in nats except bits_per_dim."""

    elbo: np.ndarray  # mean log-weight: the ELBO estimated with K samples
    log_likelihood: np.ndarray  # logsumexp - log K: the importance-sampled log p(x)
    bits_per_dim: np.ndarray


def scores_from_log_weights(w: np.ndarray, likelihood: str, d: int) -> Scores:
    """ELBO, log p(x) and bits/dim per image from log-weights [N, K]; d pixels per image."""
    w = np.asarray(w, dtype=np.float64)
    ll = log_mean_exp(w, axis=-1)
    return Scores(np.mean(w, axis=-1), ll, bits_per_dim(ll, likelihood, d=d))


def bits_per_dim(log_px: np.ndarray, likelihood: str, d: int) -> np.ndarray:
    """Bits per pixel of the discrete 8-bit image.

    Gaussian: log p(x) is a density on [0, 1]^D of the dequantised image, so the discrete
    log-probability is bounded below by log p(x) - D log 256 (Jensen over the dequantisation
    noise). Bernoulli: log p(x) is already a log-probability of a binary image.
    """
    log_px = np.asarray(log_px, dtype=np.float64)
    if likelihood == GAUSSIAN:
        return -(log_px - d * np.log(PIXEL_LEVELS)) / (d * np.log(2.0))
    return -log_px / (d * np.log(2.0))


def dequantize(pixels: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    """uint8 images [n, D] -> float32 (y + u) / 256, where image i's u ~ U[0, 1)^D comes from
    the generator seeded by (seed, start + i, 1) alone: a set split into parts dequantises
    exactly as the whole. (score_noise uses (seed, index): the two never share a stream.)"""
    pixels = np.asarray(pixels)
    u = _pixel_noise(pixels.shape, seed, start)
    return (pixels.astype(np.float32) + u) / np.float32(PIXEL_LEVELS)


def binarize(pixels: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    """uint8 images [n, D] -> float32 binary images x ~ Bernoulli(y / 255) (dynamic
    binarisation, what a Bernoulli decoder scores), from the same uniforms as `dequantize`."""
    pixels = np.asarray(pixels)
    u = _pixel_noise(pixels.shape, seed, start)
    return (u < pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def _pixel_noise(shape: tuple[int, ...], seed: int, start: int) -> np.ndarray:
    """u ~ U[0, 1) float32 of `shape` [n, ...]: image i's from the generator of
    (seed, start + i, 1) alone."""
    u = np.empty(shape, dtype=np.float32)
    for j in range(shape[0]):
        u[j] = keyed_rng(seed, start + j, 1).random(shape[1:], dtype=np.float32)
    return u


def scored_inputs(pixels: np.ndarray, likelihood: str, seed: int, start: int = 0) -> np.ndarray:
    """uint8 images as a model of `likelihood` scores them: dequantised for the Gaussian
    decoder, whose density is of continuous pixels; binarised for the Bernoulli decoder,
    whose probability is of binary images."""
    if likelihood == BERNOULLI:
        return binarize(pixels, seed, start)
    return dequantize(pixels, seed, start)


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (y / 255): the serving and display scale."""
    return (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def score_noise(seed: int, start: int, n: int, k_samples: int, latent_dim: int) -> np.ndarray:
    """Importance-sampling noise eps [n, K, k] for images start .. start + n - 1 of a request.

    Image i's noise comes from the generator seeded by (seed, i) alone, so neither the
    server's batching nor the evaluator's chunking can change any image's score.
    """
    out = np.empty((n, k_samples, latent_dim), dtype=np.float32)
    for j in range(n):
        rng = keyed_rng(seed, start + j)
        out[j] = rng.standard_normal((k_samples, latent_dim), dtype=np.float32)
    return out


def score_images(
    log_weights_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    x: np.ndarray,
    k_samples: int,
    seed: int,
    latent_dim: int,
    likelihood: str,
    decodes_per_run: int = 16384,
) -> Scores:
    """Score images x [N, D] with K importance samples each, in chunks of about
    `decodes_per_run` decoder rows; `log_weights_fn(x_chunk, eps) -> [n, K]`."""
    per_chunk = max(1, decodes_per_run // k_samples)
    parts = []
    for start in range(0, len(x), per_chunk):
        xc = x[start : start + per_chunk]
        eps = score_noise(seed, start, len(xc), k_samples, latent_dim)
        parts.append(log_weights_fn(xc, eps))
    w = np.concatenate(parts) if parts else np.zeros((0, k_samples))
    return scores_from_log_weights(w, likelihood, d=x.shape[-1])


def percentile_of(scores: np.ndarray, quantiles: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Percentile (0..100) of each score within a calibration set, by interpolating the
    calibration quantiles (`levels` in [0, 1], ascending `quantiles`)."""
    return 100.0 * np.interp(np.asarray(scores, np.float64), quantiles, levels, left=0.0, right=1.0)
