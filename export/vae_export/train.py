"""`vae-export train`: Adam, seeded and deterministic on CPU, early stopping on the
validation ELBO, and the pictures of the run."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vae_core.likelihood import BERNOULLI, GAUSSIAN
from vae_export import plots
from vae_export.config import TrainConfig
from vae_export.data import Digits, load_dataset, stratified_split
from vae_export.model import VAE, VAEConfig, save_checkpoint


def prepare_inputs(pixels: np.ndarray, likelihood: str, gen: torch.Generator) -> torch.Tensor:
    """uint8 [N, 28, 28] -> the float training inputs in [0, 1].

    Gaussian: uniform dequantisation (y + u) / 256, fresh u each call, so the density is
    fit to continuous data. Bernoulli: dynamic binarisation, x ~ Bernoulli(y / 255).
    """
    y = torch.from_numpy(pixels.reshape(len(pixels), -1).astype(np.float32))
    if likelihood == GAUSSIAN:
        return (y + torch.rand(y.shape, generator=gen)) / 256.0
    return torch.bernoulli(y / 255.0, generator=gen)


@torch.no_grad()
def evaluate_elbo(model: VAE, x: torch.Tensor, seed: int) -> float:
    """Mean ELBO (nats per image) with fixed noise, so epochs compare like with like."""
    torch.manual_seed(seed)
    return float(model.elbo(x)[0].mean())


def train(
    model_cfg: VAEConfig,
    train_cfg: TrainConfig,
    out: Path,
    digits: Digits | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and write checkpoint.pt, history.json, curves.png, samples.png, recon.png to
    `out`. Returns the summary also stored in summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(train_cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(train_cfg.seed)
    gen = torch.Generator().manual_seed(train_cfg.seed)

    digits = load_dataset(train_cfg.data) if digits is None else digits
    train_idx, val_idx = stratified_split(digits.labels, train_cfg.val_fraction, train_cfg.seed)
    train_px, val_px = digits.images[train_idx], digits.images[val_idx]
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
        model.train()
        x_train = prepare_inputs(train_px, model_cfg.likelihood, gen)
        perm = torch.randperm(len(x_train), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(perm), train_cfg.batch_size):
            xb = x_train[perm[start : start + train_cfg.batch_size]]
            loss = -model.elbo(xb)[0].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().item() * len(xb)
            seen += len(xb)
        model.eval()
        val_elbo = evaluate_elbo(model, x_val, seed=train_cfg.seed + 2)
        history.append({"epoch": epoch, "train_loss": total / seen, "val_elbo": val_elbo})
        if val_elbo > best_elbo:
            best_state, best_elbo, best_epoch = copy.deepcopy(model.state_dict()), val_elbo, epoch
        bar.set_postfix(loss=f"{total / seen:.1f}", val_elbo=f"{val_elbo:.1f}", best=best_epoch)
        if epoch - best_epoch >= train_cfg.patience:
            break
    seconds = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.eval()

    x_train_eval = prepare_inputs(train_px, model_cfg.likelihood, torch.Generator().manual_seed(3))
    summary = {
        "train_elbo": evaluate_elbo(model, x_train_eval, seed=train_cfg.seed + 2),
        "val_elbo": best_elbo,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(seconds, 2),
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "data_source": digits.source,
        "model": model_cfg.to_dict(),
        "train": asdict(train_cfg),
    }
    save_checkpoint(out / "checkpoint.pt", model, extra=summary)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _pictures(model, out, history, x_val, train_cfg.seed)
    return summary


@torch.no_grad()
def _pictures(model: VAE, out: Path, history: list[dict[str, float]], x_val: torch.Tensor,
              seed: int) -> None:
    plots.save_curves(out / "curves.png", history)
    z = torch.randn(64, model.cfg.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples = torch.sigmoid(model.decoder(z)).numpy()
    title = "prior samples f(z), z ~ N(0, I)"
    plots.save_grid(out / "samples.png", samples, cols=8, title=title)
    x = x_val[:32]
    mu, _ = model.encoder(x)
    recon = torch.sigmoid(model.decoder(mu)).numpy()
    plots.save_recon(out / "recon.png", x.numpy(), recon)


__all__ = ["TrainConfig", "train", "prepare_inputs", "BERNOULLI"]
