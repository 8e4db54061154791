"""vae_export.prior_fit and the MAP codes of vae_export.train: the mixture fitted to the
training digits' codes, its temperature, and the codes it is fitted around."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_export.model import VAE, VAEConfig
from vae_export.prior_fit import PriorConfig, fit_gmm, fit_prior
from vae_export.train import map_codes


def test_em_finds_well_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    x = np.concatenate([c + rng.standard_normal((400, 2)) * [0.5, 1.0] for c in centres])
    weights, means, covs = fit_gmm(x, 3, np.random.default_rng(1), reg=0.0)
    order = np.argsort(means[:, 0] + 0.1 * means[:, 1])
    np.testing.assert_allclose(means[order], centres[[0, 1, 2]], atol=0.15)
    np.testing.assert_allclose(weights, 1 / 3, atol=0.01)
    for cov in covs:
        np.testing.assert_allclose(np.diag(cov), [0.25, 1.0], rtol=0.2)


def test_the_temperature_narrows_every_component_and_moves_none():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((200, 3))
    logvar = np.full((200, 3), -2.0)
    labels = np.repeat(np.arange(2), 100)
    full = fit_prior(mu, logvar, labels, PriorConfig(components=2, temperature=1.0))
    cold = fit_prior(mu, logvar, labels, PriorConfig(components=2, temperature=0.5))
    np.testing.assert_array_equal(cold.means, full.means)
    np.testing.assert_array_equal(cold.weights, full.weights)
    np.testing.assert_array_equal(cold.classes, full.classes)
    np.testing.assert_allclose(cold.chols, 0.5 * full.chols)


@pytest.mark.parametrize(("setting", "message"), [
    ({"temperature": 0.0}, "temperature must be in"), ({"temperature": 1.1}, "temperature must"),
    ({"codes": "median"}, "codes must be map or mean"), ({"map_steps": -1}, "map_steps must be"),
    ({"map_lr": 0.0}, "map_lr > 0")])
def test_a_prior_setting_out_of_range_is_refused(setting, message):
    with pytest.raises(ValueError, match=message):
        PriorConfig(**setting)


def test_map_codes_raise_the_posterior_density_from_the_encoder_means():
    torch.manual_seed(0)
    model = VAE(VAEConfig(latent_dim=4, hidden=(32,)))
    x = torch.rand(64, 784)
    with torch.no_grad():
        mu, _ = model.encoder(x)

    def log_joint(z: torch.Tensor) -> torch.Tensor:  # log p(x|z) + log N(z; 0, I), to a constant
        with torch.no_grad():
            return model.log_px_given_z(x, model.decoder(z)) - 0.5 * (z * z).sum(-1)

    z = map_codes(model, x, mu, steps=100, lr=0.05)
    assert torch.all(log_joint(z) > log_joint(mu))
    assert torch.equal(z, map_codes(model, x, mu, steps=100, lr=0.05))  # deterministic
    assert torch.equal(map_codes(model, x, mu, steps=0, lr=0.05), mu)
    assert all(p.grad is None for p in model.parameters())  # the network is left as it was
