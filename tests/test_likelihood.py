"""vae_core.likelihood (and the AUROC of vae_export.evaluate): the importance-sampled
log p(x) against a model whose log p(x) is known exactly, numerical stability far from zero,
and the per-image seeding of the scoring noise."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vae_core import likelihood as lk
from vae_export.evaluate import auroc, roc_curve

# ---------------------------------------------------------------------------------------
# A linear-Gaussian VAE: z ~ N(0, I_k), x | z ~ N(W z + b, sigma^2 I_D). Then
# p(x) = N(b, W W^T + sigma^2 I) and the posterior p(z|x) = N(m, S) with
# S = (I + W^T W / sigma^2)^-1 and m = S W^T (x - b) / sigma^2, all exact in numpy.

D, K_LATENT, SIGMA = 6, 3, 0.5


class LinearGaussian:
    def __init__(self, w: np.ndarray, b: np.ndarray, sigma: float) -> None:
        self.w, self.b, self.sigma = w, b, sigma
        d, k = w.shape
        self.cov_x = w @ w.T + sigma**2 * np.eye(d)
        self.post_cov = np.linalg.inv(np.eye(k) + w.T @ w / sigma**2)

    def log_px(self, x: np.ndarray) -> np.ndarray:
        r = x - self.b
        _, logdet = np.linalg.slogdet(self.cov_x)
        maha = np.einsum("nd,de,ne->n", r, np.linalg.inv(self.cov_x), r)
        return -0.5 * (x.shape[-1] * lk.LOG_2PI + logdet + maha)

    def post_mean(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.b) @ self.w / self.sigma**2) @ self.post_cov

    def kl_q_post(self, mu: np.ndarray, var: np.ndarray, x: np.ndarray) -> np.ndarray:
        """KL(N(mu, diag var) || p(z|x)) per row."""
        prec = np.linalg.inv(self.post_cov)
        diff = self.post_mean(x) - mu
        _, logdet_post = np.linalg.slogdet(self.post_cov)
        k = mu.shape[-1]
        return 0.5 * (
            np.einsum("kk,nk->n", prec, var) + np.einsum("nk,kl,nl->n", diff, prec, diff)
            - k + logdet_post - np.sum(np.log(var), axis=-1)
        )

    def sample_x(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, self.w.shape[1]))
        return z @ self.w.T + self.b + self.sigma * rng.standard_normal((n, self.w.shape[0]))

    def log_weights(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray,
                    eps: np.ndarray) -> np.ndarray:
        """The library's log-weights, with the decoder f(z) = W z + b computed in numpy."""
        mu, logvar = mu.astype(np.float32), logvar.astype(np.float32)
        z = lk.latents(mu, logvar, eps)
        decoded = z.astype(np.float64) @ self.w.T + self.b
        w = lk.log_weights(x, mu, logvar, eps, decoded, lk.GAUSSIAN, self.sigma)
        # The latents passed in (the server's jobs have them already) change nothing.
        np.testing.assert_array_equal(
            lk.log_weights(x, mu, logvar, eps, decoded, lk.GAUSSIAN, self.sigma, z), w)
        return w


def _general_model(seed: int = 0) -> LinearGaussian:
    rng = np.random.default_rng(seed)
    return LinearGaussian(rng.normal(size=(D, K_LATENT)), 0.3 * rng.normal(size=D), SIGMA)


def test_exact_posterior_gives_constant_weights_equal_to_log_px() -> None:
    """With orthogonal columns in W the posterior is diagonal, so the encoder can be exact;
    then every importance weight equals p(x), whatever the noise."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(D, K_LATENT)))
    model = LinearGaussian(q * np.array([2.0, 1.0, 0.5]), rng.normal(size=D), SIGMA)
    assert np.allclose(model.post_cov, np.diag(np.diag(model.post_cov)))
    x = model.sample_x(5, rng)
    mu = model.post_mean(x)
    logvar = np.log(np.diag(model.post_cov))[None].repeat(5, axis=0)
    eps = rng.standard_normal((5, 50, K_LATENT), dtype=np.float32)
    w = model.log_weights(x, mu, logvar, eps)
    exact = model.log_px(x)
    np.testing.assert_allclose(w, np.broadcast_to(exact[:, None], w.shape), rtol=0, atol=2e-4)
    np.testing.assert_allclose(lk.log_mean_exp(w), exact, rtol=0, atol=2e-4)


def test_elbo_is_log_px_minus_kl() -> None:
    """K = 1: the mean log-weight is the ELBO, log p(x) - KL(q || p(z|x)), in closed form."""
    model = _general_model()
    rng = np.random.default_rng(2)
    x = model.sample_x(3, rng)
    var = 2.0 * np.diag(model.post_cov)[None].repeat(3, axis=0)
    mu = model.post_mean(x) + 0.5 * np.sqrt(var)
    eps = rng.standard_normal((3, 20000, K_LATENT), dtype=np.float32)
    w = model.log_weights(x, mu, np.log(var), eps)
    elbo = model.log_px(x) - model.kl_q_post(mu, var, x)
    se = w.std(axis=1) / math.sqrt(w.shape[1])
    assert np.all(np.abs(w.mean(axis=1) - elbo) < 4 * se)
    scores = lk.scores_from_log_weights(w, lk.GAUSSIAN, d=D)
    np.testing.assert_allclose(scores.elbo, w.mean(axis=1))


def test_importance_sampling_converges_to_exact_log_px() -> None:
    """The gap to the exact log p(x) shrinks as K goes 1, 10, ..., 10^4; the estimate is
    biased low (Jensen) and never lies above log p(x) by more than its noise."""
    model = _general_model()
    rng = np.random.default_rng(3)
    n_x, reps = 4, 25
    x = model.sample_x(n_x, rng)
    # An approximate encoder: diagonal, wider than the posterior in every direction
    # (k diag(S) >= S, so the weights have finite variance), its mean off by 0.3 sd.
    var = K_LATENT * np.diag(model.post_cov)[None].repeat(n_x, axis=0)
    mu = model.post_mean(x) + 0.3 * np.sqrt(var)
    exact = model.log_px(x)
    xs, mus, logvars = (np.repeat(a, reps, axis=0) for a in (x, mu, np.log(var)))
    exacts = np.repeat(exact, reps)

    mean_abs_gap = []
    for k_samples in (1, 10, 100, 1000, 10000):
        eps = rng.standard_normal((n_x * reps, k_samples, K_LATENT), dtype=np.float32)
        w = model.log_weights(xs, mus, logvars, eps)
        gap = lk.log_mean_exp(w, axis=-1) - exacts
        mean_abs_gap.append(float(np.mean(np.abs(gap))))
        # Averaged over the repetitions, the estimate is not above log p(x) beyond noise.
        per_x = gap.reshape(n_x, reps)
        assert np.all(per_x.mean(axis=1) <= 3 * per_x.std(axis=1) / math.sqrt(reps) + 1e-9)
        if k_samples >= 10:
            # Nor is any single estimate, measured by its own delta-method standard error.
            wn = np.exp(w - w.max(axis=1, keepdims=True))
            se = np.sqrt(wn.var(axis=1) / k_samples) / wn.mean(axis=1)
            assert np.all(gap <= 5 * se + 1e-9)
    assert all(a > b for a, b in zip(mean_abs_gap, mean_abs_gap[1:], strict=False)), mean_abs_gap
    assert mean_abs_gap[0] > 1.0  # K = 1 is the ELBO: far below
    assert mean_abs_gap[-1] < 0.05
    assert mean_abs_gap[-1] < mean_abs_gap[2] / 3


# ---------------------------------------------------------------------------------------
# Stability: log-weights far from zero


def _reference_lme(values: list[float]) -> float:
    """log(mean(exp(v))) by hand: shift by the largest finite value, sum exponentials."""
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    m = max(finite)
    return m + math.log(sum(math.exp(v - m) for v in finite) / len(values))


EXTREME_ROWS = [
    [-1e4, -1e4 + 1.0, -1e4 - 2.0, -1e4 + 0.25],
    [-1e5, -1e5 - 0.5, -1e5 + 3.0, -1e5 - 40.0],
    [-1e4, -math.inf, -1e4 + 0.5, -math.inf],
    [-1e5 - 700.0, -1e5, -math.inf, -1e5 - 1.0],
]


@pytest.mark.parametrize("row", EXTREME_ROWS, ids=["1e4", "1e5", "1e4-inf", "1e5-inf"])
def test_extreme_log_weights_are_finite_and_exact(row: list[float]) -> None:
    w = np.array([row])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / divide / invalid warnings either
        lme = lk.log_mean_exp(w)
        lse = lk.logsumexp(w)
        scores = lk.scores_from_log_weights(w, lk.GAUSSIAN, d=784)
        bern = lk.scores_from_log_weights(w, lk.BERNOULLI, d=784)
    ref = _reference_lme(row)
    assert np.isfinite(lme[0]) and np.isfinite(lse[0])
    assert lme[0] == pytest.approx(ref, abs=1e-9, rel=0)
    assert lse[0] == pytest.approx(ref + math.log(len(row)), abs=1e-9, rel=0)
    assert scores.log_likelihood[0] == pytest.approx(ref, abs=1e-9, rel=0)
    expected_bpd = -(ref - 784 * math.log(256)) / (784 * math.log(2))
    assert scores.bits_per_dim[0] == pytest.approx(expected_bpd, rel=1e-12)
    assert bern.bits_per_dim[0] == pytest.approx(-ref / (784 * math.log(2)), rel=1e-12)
    assert scores.elbo[0] == (np.mean(row) if all(map(math.isfinite, row)) else -math.inf)
    # What the stable form protects against:
    with np.errstate(all="ignore"):
        assert np.log(np.mean(np.exp(w))) == -np.inf


def test_all_minus_inf_row_stays_minus_inf_without_nan() -> None:
    w = np.array([[-np.inf, -np.inf], [-1e4, -np.inf]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = lk.log_mean_exp(w)
    assert out[0] == -np.inf
    assert out[1] == pytest.approx(-1e4 - math.log(2), abs=1e-9)


def test_float32_log_weights_are_accumulated_in_float64() -> None:
    w = np.array([[-10000.0, -10001.0, -10002.5]], dtype=np.float32)
    assert lk.log_mean_exp(w).dtype == np.float64
    assert lk.log_mean_exp(w)[0] == pytest.approx(_reference_lme([-1e4, -10001.0, -10002.5]),
                                                  abs=1e-9)


def test_logsumexp_along_other_axes() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(3, 4, 5)) * 50 - 1e4
    for axis in (0, 1, 2, -1):
        ref = np.log(np.sum(np.exp(a + 1e4), axis=axis)) - 1e4
        np.testing.assert_allclose(lk.logsumexp(a, axis=axis), ref, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-50.0, 50.0), min_size=1, max_size=30),
    st.sampled_from([0.0, -1e3, -1e4, -1e5, -1e6]),
)
def test_log_mean_exp_is_shift_equivariant(values: list[float], shift: float) -> None:
    a = np.array(values)
    assert lk.log_mean_exp(a + shift) == pytest.approx(
        float(np.log(np.mean(np.exp(a)))) + shift, abs=1e-9)


# ---------------------------------------------------------------------------------------
# log p(x|z), noise, pixel scaling


def test_log_px_given_z_gaussian_against_direct_formula() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((2, 10))
    dec = rng.random((2, 3, 10))
    sigma = 0.1
    got = lk.log_px_given_z(x, dec, lk.GAUSSIAN, sigma)
    ref = np.sum(-0.5 * ((x[:, None] - dec) / sigma) ** 2 - math.log(sigma)
                 - 0.5 * math.log(2 * math.pi), axis=-1)
    assert got.shape == (2, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        lk.log_px_given_z(x, dec, lk.GAUSSIAN, None)
    with pytest.raises(ValueError, match="unknown likelihood"):
        lk.log_px_given_z(x, dec, "poisson", sigma)


def test_log_px_given_z_bernoulli_stable_for_large_logits() -> None:
    x = np.array([[1.0, 0.0, 1.0, 0.0, 0.5]])
    logits = np.array([[[200.0, 200.0, -200.0, -200.0, 0.0], [3.0, -3.0, 0.1, 0.2, 80.0]]])
    got = lk.log_px_given_z(x, logits, lk.BERNOULLI, None)

    def ref(xv: float, lv: float) -> float:
        softplus = max(lv, 0.0) + math.log1p(math.exp(-abs(lv)))
        return xv * lv - softplus

    expected = [sum(ref(xv, lv) for xv, lv in zip(x[0], row, strict=True)) for row in logits[0]]
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_score_noise_is_per_image() -> None:
    whole = lk.score_noise(seed=7, start=0, n=10, k_samples=4, latent_dim=3)
    part = lk.score_noise(seed=7, start=3, n=4, k_samples=4, latent_dim=3)
    assert whole.shape == (10, 4, 3) and whole.dtype == np.float32
    np.testing.assert_array_equal(whole[3:7], part)
    assert not np.array_equal(lk.score_noise(8, 0, 10, 4, 3), whole)


def test_score_images_chunking_does_not_change_scores() -> None:
    model = _general_model()
    x = model.sample_x(9, np.random.default_rng(6))
    mu, var = model.post_mean(x), np.diag(model.post_cov) * 2.0

    def fn(xc: np.ndarray, eps: np.ndarray) -> np.ndarray:
        # Rows of x are recognised by position in `x`, to give each its own encoder output.
        rows = [int(np.flatnonzero((x == r).all(axis=1))[0]) for r in xc]
        return model.log_weights(xc, mu[rows], np.log(var)[None].repeat(len(rows), 0), eps)

    ref = lk.score_images(fn, x, k_samples=8, seed=11, latent_dim=K_LATENT,
                          likelihood=lk.GAUSSIAN)
    for per_run in (1, 8, 24, 40):
        got = lk.score_images(fn, x, 8, 11, K_LATENT, lk.GAUSSIAN, decodes_per_run=per_run)
        np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=0, atol=1e-9)
        np.testing.assert_allclose(got.elbo, ref.elbo, rtol=0, atol=1e-9)
    other = lk.score_images(fn, x, 8, 12, K_LATENT, lk.GAUSSIAN)
    assert not np.allclose(other.log_likelihood, ref.log_likelihood)


def test_bits_per_dim_reference_points() -> None:
    d = 784
    # Gaussian: a density of 1 on [0, 1]^D is 8 bits per 8-bit pixel.
    assert lk.bits_per_dim(np.array([0.0]), lk.GAUSSIAN, d)[0] == pytest.approx(8.0)
    # Bernoulli: probability 2^-D is one bit per pixel.
    assert lk.bits_per_dim(np.array([-d * math.log(2)]), lk.BERNOULLI, d)[0] == pytest.approx(1)


def test_dequantize_and_to_unit() -> None:
    pixels = np.arange(256, dtype=np.uint8).repeat(40).reshape(40, 256)
    x = lk.dequantize(pixels, 0)
    # Per image: a set dequantised in parts equals the whole.
    np.testing.assert_array_equal(np.concatenate([lk.dequantize(pixels[:13], 0),
                                                  lk.dequantize(pixels[13:], 0, start=13)]), x)
    assert x.dtype == np.float32
    assert np.all(x >= 0.0) and np.all(x < 1.0)
    np.testing.assert_array_equal(np.floor(x.astype(np.float64) * 256).astype(int), pixels)
    u = lk.to_unit(np.array([0, 255], np.uint8))
    assert u.dtype == np.float32 and u.tolist() == [0.0, 1.0]


def test_percentile_of() -> None:
    q = np.array([-10.0, 0.0, 10.0])
    levels = np.array([0.0, 0.5, 1.0])
    got = lk.percentile_of(np.array([-20.0, -10.0, -5.0, 0.0, 10.0, 30.0]), q, levels)
    np.testing.assert_allclose(got, [0.0, 0.0, 25.0, 50.0, 100.0, 100.0])


# ---------------------------------------------------------------------------------------
# AUROC and ROC curve (vae_export.evaluate)


def _brute_force_auroc(ins: np.ndarray, outs: np.ndarray) -> float:
    """P(out scores lower than in), ties counting half, over every pair."""
    total = 0.0
    for a in ins:
        for b in outs:
            total += 1.0 if b < a else 0.5 if b == a else 0.0
    return total / (len(ins) * len(outs))


@pytest.mark.parametrize("seed", range(6))
def test_auroc_against_pairwise_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_in, n_out = rng.integers(1, 40, size=2)
    # Few distinct values, so that there are many ties, within and across the two sets.
    ins = rng.integers(0, 6, size=n_in).astype(np.float64)
    outs = rng.integers(-2, 4, size=n_out).astype(np.float64)
    assert auroc(ins, outs) == pytest.approx(_brute_force_auroc(ins, outs), abs=1e-12)


def test_auroc_reference_points() -> None:
    assert auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([5.0, 6.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0, 1.0])) == 0.5
    rng = np.random.default_rng(0)
    ins, outs = rng.normal(size=300), rng.normal(size=200) - 1.0
    assert auroc(ins, outs) == pytest.approx(_brute_force_auroc(ins, outs), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ins = rng.integers(0, 8, size=30).astype(np.float64)
    outs = rng.integers(-3, 5, size=20).astype(np.float64)
    fpr, tpr = roc_curve(ins, outs)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # The area under the curve (trapezoids: a tie is a diagonal step) is the AUROC.
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(ins, outs), abs=1e-12)
