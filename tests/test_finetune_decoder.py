"""scripts/finetune_decoder.py (EVAL.md, "Copies"): the decoder alone learns the digits at
their MAP codes; the network it starts from is left as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import finetune_decoder as fd  # noqa: E402

from vae_core.likelihood import to_unit  # noqa: E402
from vae_export.model import VAE, VAEConfig  # noqa: E402
from vae_export.prior_fit import PriorConfig  # noqa: E402
from vae_export.train import training_codes  # noqa: E402


def test_the_decoder_alone_learns_the_digits_at_their_map_codes() -> None:
    torch.manual_seed(0)
    network = VAE(VAEConfig(latent_dim=4, hidden=(32,))).eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    pixels = np.random.default_rng(0).integers(0, 256, (64, 784), dtype=np.uint8)
    z, _ = training_codes(network, pixels, PriorConfig())
    x = torch.from_numpy(to_unit(pixels))
    codes = torch.from_numpy(z)
    tuned = fd.finetuned(network, x, codes, epochs=20, lr=1e-2, batch=16)

    with torch.no_grad():
        err_before = ((torch.sigmoid(network.decoder(codes)) - x) ** 2).sum(-1).mean()
        err_after = ((torch.sigmoid(tuned.decoder(codes)) - x) ** 2).sum(-1).mean()
    assert err_after < 0.9 * err_before
    # The model's own settings, sigma included: MAP codes under the tuned decoder are then
    # found as `vae-export train` finds them.
    assert tuned.cfg == network.cfg
    assert not tuned.training
    # The encoder is shared as it was; the network tuned from is untouched.
    for name, value in tuned.encoder.state_dict().items():
        assert torch.equal(value, before[f"encoder.{name}"])
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())
    # Seeded: the same call gives the same decoder.
    again = fd.finetuned(network, x, codes, epochs=20, lr=1e-2, batch=16)
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    # No epochs: the decoder is the network's.
    same = fd.finetuned(network, x, codes, epochs=0, lr=1e-2)
    assert all(torch.equal(v, before[k]) for k, v in same.state_dict().items())
