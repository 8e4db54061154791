"""The mixture prior learned in the training loop (scripts/prior_in_loop.py), on known cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from prior_in_loop import ClassMixture, elbo  # noqa: E402

from vae_core.prior import GaussianMixture  # noqa: E402
from vae_export.config import VAEConfig  # noqa: E402
from vae_export.model import VAE  # noqa: E402


def _mixture(k: int = 3, per_class: int = 2, seed: int = 0) -> GaussianMixture:
    rng = np.random.default_rng(seed)
    c = 10 * per_class
    a = rng.normal(size=(c, k, k)) * 0.3
    chols = np.linalg.cholesky(a @ np.transpose(a, (0, 2, 1)) + np.eye(k))
    weights = rng.uniform(0.5, 2.0, size=c)
    return GaussianMixture(weights / weights.sum(), rng.normal(size=(c, k)) * 2, chols,
                           np.repeat(np.arange(10), per_class).astype(np.int64))


def test_its_density_is_the_mixture_of_the_digits_class() -> None:
    gm = _mixture()
    z = np.random.default_rng(1).normal(size=(50, 3)) * 2
    labels = np.arange(50) % 10
    got = ClassMixture(gm).log_prob(torch.from_numpy(z).float(), torch.from_numpy(labels))
    for c in range(10):
        mine = gm.classes == c
        own = GaussianMixture(gm.weights[mine] / gm.weights[mine].sum(), gm.means[mine],
                              gm.chols[mine], gm.classes[mine])
        np.testing.assert_allclose(got[labels == c].detach().numpy(),
                                   own.log_prob(z[labels == c]), rtol=0, atol=1e-4)


def test_it_gives_back_the_mixture_it_started_from() -> None:
    gm = _mixture()
    back = ClassMixture(gm).mixture()
    np.testing.assert_allclose(back.weights, gm.weights, rtol=1e-6)
    np.testing.assert_allclose(back.means, gm.means, rtol=1e-6)
    np.testing.assert_allclose(back.chols, gm.chols, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(back.classes, gm.classes)
    narrowed = ClassMixture(gm).mixture(temperature=0.5)
    np.testing.assert_allclose(narrowed.chols, 0.5 * gm.chols, rtol=1e-6, atol=1e-7)


def test_against_a_standard_normal_the_sampled_kl_is_the_closed_form_one() -> None:
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden=(16,)))
    k = 4
    with torch.no_grad():  # a posterior well away from the prior: a KL of a few nats
        model.encoder.head.bias[:k] += 1.5
        model.encoder.head.bias[k:] -= 1.0
    standard = GaussianMixture(np.full(10, 0.1), np.zeros((10, k)), np.tile(np.eye(k), (10, 1, 1)),
                               np.arange(10).astype(np.int64))
    prior = ClassMixture(standard)
    x = torch.rand(1, 784).repeat(20_000, 1)
    labels = torch.arange(20_000) % 10
    with torch.no_grad():
        torch.manual_seed(1)
        sampled = elbo(model, prior, x, labels)
        torch.manual_seed(1)  # the same z: the reconstruction terms cancel
        closed, rec, kl = model.elbo(x)
    # log q(z|x) - log N(z; 0, I) averages to the closed-form KL.
    assert float((rec - sampled).mean()) == pytest.approx(float(kl[0]), abs=0.02 * float(kl[0]))
    assert float(kl[0]) > 3
    assert elbo(model, None, x[:4], labels[:4]).shape == (4,)
