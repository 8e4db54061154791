"""`vae-export train`: Adam, seeded and deterministic on CPU, with optional deformations of the
training digits, KL warm-up and a cosine learning rate; the checkpoint of the best validation
ELBO; then the learned prior fitted to the training digits' posteriors; and the pictures of
the run."""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from vae_core.files import check_writable, replacing
from vae_core.likelihood import BERNOULLI, GAUSSIAN, to_unit
from vae_core.manifest import sha256_file
from vae_core.prior import PRIOR_FILE, GaussianMixture
from vae_export import plots
from vae_export.augment import augment, perturb
from vae_export.config import TrainConfig, TrainingDiverged
from vae_export.data import Digits, fingerprint, load_dataset, stratified_split
from vae_export.model import CHECKPOINT, VAE, VAEConfig, save_checkpoint
from vae_export.prior_fit import PriorConfig, fit_prior


def prepare_inputs(pixels: np.ndarray | torch.Tensor, likelihood: str,
                   gen: torch.Generator) -> torch.Tensor:
    """Pixels on the 0..255 scale [N, 28, 28] (uint8, or float after a deformation) -> the
    float training inputs [N, 784] in [0, 1].

    Gaussian: uniform dequantisation (y + u) / 256, fresh u each call, so the density is
    fit to continuous data. Bernoulli: dynamic binarisation, x ~ Bernoulli(y / 255).
    """
    y = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(
        pixels.astype(np.float32))
    y = y.reshape(len(y), -1).float()
    if likelihood == GAUSSIAN:
        return (y + torch.rand(y.shape, generator=gen)) / 256.0
    return torch.bernoulli((y / 255.0).clamp(0.0, 1.0), generator=gen)


def deform(pixels: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The epoch's deformed (and with cfg.perturb, perturbed) copy of the training digits
    [N, 1, 28, 28] (0..255)."""
    if cfg.augment_p > 0:
        pixels = augment(pixels, gen, rot_deg=cfg.rot_deg, shift_px=cfg.shift_px,
                         scale=cfg.scale, shear_deg=cfg.shear_deg,
                         elastic_alpha=cfg.elastic_alpha, elastic_sigma=cfg.elastic_sigma,
                         p=cfg.augment_p)
    return perturb(pixels, gen, cfg.perturb) if cfg.perturb > 0 else pixels


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch 1 .. cfg.epochs: cfg.lr, decayed to 0 along a half cosine
    when cfg.cosine."""
    if not cfg.cosine:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / cfg.epochs))


@torch.no_grad()
def evaluate_elbo(model: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean ELBO (nats per image) with fixed noise, so epochs compare like with like. The
    noise comes from a fork of torch's global generator: training's own draws go on from
    where they were, rather than start again from `seed` after every epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(model.elbo(x)[0].mean())


def train(
    model_cfg: VAEConfig,
    train_cfg: TrainConfig,
    out: Path,
    digits: Digits | None = None,
    progress: bool = True,
    prior_cfg: PriorConfig | None = None,
) -> dict[str, Any]:
    """Train, fit the prior (`prior_cfg`, default PriorConfig()), and write checkpoint.pt,
    prior.npz (a learned prior only), history.json, summary.json, curves.png, samples.png
    and recon.png to `out`. Returns the summary also stored in summary.json."""
    prior_cfg = prior_cfg or PriorConfig()
    prior_cfg.check_latent_dim(model_cfg.latent_dim)
    torch.set_num_threads(train_cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(train_cfg.seed)
    gen = torch.Generator().manual_seed(train_cfg.seed)

    digits = load_dataset(train_cfg.data) if digits is None else digits
    train_idx, val_idx = stratified_split(digits.labels, train_cfg.val_fraction, train_cfg.seed)
    # Made once the data is good (a refused data set leaves no empty run folder), and tried
    # before the training (a folder that cannot be written fails now, not at its end).
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / CHECKPOINT)
    train_px, val_px = digits.images[train_idx], digits.images[val_idx]
    pixels = torch.from_numpy(train_px.astype(np.float32)).unsqueeze(1)
    # Validation inputs are drawn once: early stopping then compares a fixed target.
    val_gen = torch.Generator().manual_seed(train_cfg.seed + 1)
    x_val = prepare_inputs(val_px, model_cfg.likelihood, val_gen)

    model = VAE(model_cfg)
    opt = torch.optim.Adam(model.parameters(), lr=train_cfg.lr)
    history: list[dict[str, float]] = []
    best_state, best_elbo, best_epoch = copy.deepcopy(model.state_dict()), -np.inf, 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, train_cfg.epochs + 1), disable=not progress, unit="epoch")
    for epoch in bar:
        if train_cfg.cosine:
            for group in opt.param_groups:
                group["lr"] = epoch_lr(train_cfg, epoch)
        beta = min(1.0, epoch / train_cfg.warmup_epochs) if train_cfg.warmup_epochs else 1.0
        model.train()
        x_train = prepare_inputs(deform(pixels, train_cfg, gen), model_cfg.likelihood, gen)
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(perm), train_cfg.batch_size):
            xb = x_train[perm[start : start + train_cfg.batch_size]]
            _, rec, kl = model.elbo(xb)
            loss = -(rec - beta * kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item() * len(xb)
            seen += len(xb)
        model.eval()
        val_elbo = evaluate_elbo(model, x_val, seed=train_cfg.seed + 2)
        train_loss = total / seen
        # NaN never beats the best ELBO so far: the run would keep and write the weights it
        # started from as its best.
        if not (math.isfinite(train_loss) and math.isfinite(val_elbo)):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch} (loss {train_loss}, validation ELBO "
                f"{val_elbo}): lower --lr ({train_cfg.lr}), or raise --sigma "
                f"({model_cfg.sigma}) if it is very small; no checkpoint was written, and "
                f"what {out} held is left as it was")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_elbo": val_elbo})
        # Only epochs at the full KL weight compete for the best checkpoint.
        if beta >= 1.0 and val_elbo > best_elbo:
            best_state, best_elbo, best_epoch = copy.deepcopy(model.state_dict()), val_elbo, epoch
        bar.set_postfix(loss=f"{train_loss:.1f}", val_elbo=f"{val_elbo:.1f}", best=best_epoch)
        if beta >= 1.0 and train_cfg.patience and epoch - best_epoch >= train_cfg.patience:
            break
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.eval()

    t1 = time.perf_counter()
    # numpy's BLAS would run on every core: its sums, and so the prior's file and the model
    # version, would depend on the machine's core count rather than --threads.
    with threadpool_limits(train_cfg.threads):
        prior = fit_model_prior(model, train_px, digits.labels[train_idx], prior_cfg)
    prior_seconds = time.perf_counter() - t1
    # The network and its prior are one model: the old network goes before the new prior
    # comes, so that a run stopped between the two leaves no pair of two runs.
    (out / CHECKPOINT).unlink(missing_ok=True)
    (out / PRIOR_FILE).unlink(missing_ok=True)
    if not prior.is_standard:
        prior.save(out / PRIOR_FILE)

    x_train_eval = prepare_inputs(train_px, model_cfg.likelihood, torch.Generator().manual_seed(3))
    summary = {
        "train_elbo": evaluate_elbo(model, x_train_eval, seed=train_cfg.seed + 2),
        "val_elbo": best_elbo,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(seconds, 2),
        "prior_seconds": round(prior_seconds, 2),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "data_source": digits.source,
        "data_sha256": fingerprint(digits),
        # The prior is part of the model: `onnx` exports this one only.
        "prior_sha256": None if prior.is_standard else sha256_file(out / PRIOR_FILE),
        "model": model_cfg.to_dict(),
        "train": asdict(train_cfg),
        "prior": prior_cfg.to_dict(),
    }
    save_checkpoint(out / CHECKPOINT, model, extra=summary)
    for name, data, indent in (("history.json", history, 1), ("summary.json", summary, 2)):
        with replacing(out / name, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=indent))
    _pictures(model, prior, out, history, x_val)
    return summary


def fit_model_prior(model: VAE, pixels: np.ndarray, labels: np.ndarray,
                    cfg: PriorConfig) -> GaussianMixture:
    """The prior fitted to the codes of the training digits (`training_codes`)."""
    if cfg.kind == "standard":
        return GaussianMixture.standard(model.cfg.latent_dim)
    codes, logvar = training_codes(model, pixels, cfg)
    return fit_prior(codes, logvar, labels, cfg)


def training_codes(model: VAE, pixels: np.ndarray, cfg: PriorConfig
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The codes the prior is fitted around (`cfg.codes`: MAP codes or the encoder's means)
    and the posteriors' log-variances, of digits read as the served encoder reads 8-bit
    pixels (y / 255)."""
    x = torch.from_numpy(to_unit(pixels.reshape(len(pixels), -1)))
    with torch.no_grad():
        mu, logvar = model.encoder(x)
    codes = map_codes(model, x, mu, cfg.map_steps, cfg.map_lr) if cfg.codes == "map" else mu
    return codes.numpy(), logvar.numpy()


def map_codes(model: VAE, x: torch.Tensor, start: torch.Tensor, steps: int,
              lr: float) -> torch.Tensor:
    """argmax_z log p(x|z) + log N(z; 0, I) for each row of x, by `steps` Adam steps from
    `start` (the encoder's means) with the network fixed; deterministic on the CPU."""
    z = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        loss = (0.5 * (z * z).sum(-1) - model.log_px_given_z(x, model.decoder(z))).mean()
        (z.grad,) = torch.autograd.grad(loss, [z])  # z's alone: the weights' are not needed
        opt.step()
    return z.detach()


@torch.no_grad()
def _pictures(model: VAE, prior: GaussianMixture, out: Path, history: list[dict[str, float]],
              x_val: torch.Tensor) -> None:
    plots.save_curves(out / "curves.png", history)
    z = torch.from_numpy(prior.latents(seed=0, start=0, n=64))
    samples = torch.sigmoid(model.decoder(z)).numpy()
    title = "samples f(z), z ~ N(0, I)" if prior.is_standard else "samples f(z), z ~ the learned prior"
    plots.save_grid(out / "samples.png", samples, cols=8, title=title)
    x = x_val[:32]
    mu, _ = model.encoder(x)
    recon = torch.sigmoid(model.decoder(mu)).numpy()
    plots.save_recon(out / "recon.png", x.numpy(), recon)


__all__ = ["TrainConfig", "train", "prepare_inputs", "BERNOULLI"]
