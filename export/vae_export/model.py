"""The seed article's VAE: diagonal-Gaussian encoder, N(0, I) prior, Gaussian decoder
N(f(z), sigma^2 I) (or a Bernoulli decoder), as a plain importable PyTorch module.

The checkpoint stores `VAEConfig` beside the weights, so `load_checkpoint` rebuilds the model
from the file alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vae_core.files import replacing
from vae_core.likelihood import GAUSSIAN
from vae_export.config import VAEConfig
from vae_export.data import DataError


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x [N, D] in [0, 1] -> (mu [N, k], logvar [N, k])."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.body = _mlp([cfg.image_pixels, *cfg.hidden])
        self.head = nn.Linear(cfg.hidden[-1], 2 * cfg.latent_dim)
        self.latent_dim = cfg.latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).split(self.latent_dim, dim=-1)
        return mu, logvar


class Decoder(nn.Module):
    """z [N, k] -> logits [N, D]; the mean image is sigmoid(logits), in [0, 1] for both
    likelihoods (for the Gaussian decoder f(z) = sigmoid(logits))."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.body = _mlp([cfg.latent_dim, *reversed(cfg.hidden)])
        self.head = nn.Linear(cfg.hidden[0], cfg.image_pixels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(z))


class ConvDecoder(nn.Module):
    """z [N, k] -> fc -> 64 x 7 x 7 -> transposed convs to 32 x 14 x 14 and 16 x 28 x 28 ->
    a 3 x 3 conv to the logits [N, 784]: strokes are drawn by local filters, shared across
    the image, rather than by one weight per pixel."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if cfg.image_pixels != 784:
            raise ValueError("the conv decoder draws 28 x 28 images")
        width = cfg.hidden[-1]
        self.fc = nn.Sequential(nn.Linear(cfg.latent_dim, width), nn.ReLU(),
                                nn.Linear(width, 64 * 7 * 7), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, 64, 7, 7)
        h = F.relu(self.up2(F.relu(self.up1(h))))
        return self.out(h).flatten(1)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder: nn.Module = ConvDecoder(cfg) if cfg.decoder == "conv" else Decoder(cfg)

    def log_px_given_z(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per row, summed over pixels (torch twin of the numpy code, for training)."""
        if self.cfg.likelihood == GAUSSIAN:
            s = self.cfg.sigma
            sq = torch.sum((x - torch.sigmoid(logits)) ** 2, dim=-1)
            return -0.5 * sq / (s * s) - x.shape[-1] * (math.log(s) + 0.5 * math.log(2 * math.pi))
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)

    def elbo(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row ELBO with one reparameterised sample and the closed-form KL to N(0, I),
        the prior it is trained against (the learned prior is fitted after training).
        Returns (elbo, reconstruction log-likelihood, KL)."""
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = self.log_px_given_z(x, self.decoder(z))
        kl = 0.5 * torch.sum(mu * mu + logvar.exp() - 1.0 - logvar, dim=-1)
        return rec - kl, rec, kl


CHECKPOINT = "checkpoint.pt"  # a run's network, in its folder (train writes, onnx reads)


def save_checkpoint(path: Path, model: VAE, extra: dict[str, Any] | None = None) -> None:
    """Written whole or not at all (vae_core.files.replacing)."""
    with replacing(path) as f:
        torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                    "extra": extra or {}}, f)


def load_checkpoint(path: Path) -> tuple[VAE, dict[str, Any]]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - garbage makes pickle raise almost anything
        if "Weights only load failed" in str(exc):
            # Not torch's words, which advise loading the file unrestricted (code execution
            # from whoever wrote it).
            raise DataError(f"{path}: not a checkpoint written by `vae-export train` (it "
                            "holds objects other than tensors and plain values, which are "
                            "not loaded)") from None
        detail = " ".join(str(exc).split())[:200]
        raise DataError(f"{path}: not a checkpoint ({type(exc).__name__}: {detail})") from None
    try:
        model = VAE(VAEConfig(**blob["config"]))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{path}: not a checkpoint written by `vae-export train` "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    model.eval()
    return model, blob.get("extra", {})


__all__ = ["CHECKPOINT", "VAE", "VAEConfig", "Encoder", "Decoder", "ConvDecoder", "save_checkpoint",
           "load_checkpoint"]
