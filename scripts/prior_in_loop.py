"""The mixture prior learned in the training loop, against the default's prior fitted after
training (EVAL.md, "Choosing the defaults").

The default recipe trains for `--warm` epochs against N(0, I), as `vae-export train` does.
Then a class-conditional Gaussian mixture (`--components` full-covariance components a class)
is fitted by EM to the encoder's means of the training digits, as `vae-export train` fits its
prior (temperature 1), and from there on the KL term is taken against it by the ELBO's one
sample z, log q(z|x) - log p(z | the digit's class), while the mixture's means, covariance
factors and weights learn with the network, until the recipe's last epoch.

The network is then exported twice (`vae-export onnx`, the scoring sigma calibrated for each
prior): with the mixture it learned, and with the prior refitted as `vae-export train` fits it
(10 components a class around the MAP codes, temperature 0.7). Each is judged as `vae-export
eval` judges the default: 10,000 samples, 1,000 of each class, the likelihood of the first
2,000 test digits and the AUROC against as many Fashion-MNIST images (K = 100: EVAL.md's
screen). The learned mixture narrowed by the default's temperature, and a mixture refitted around
the encoder's means at temperature 1 (as the default was fitted before MAP codes), are judged
too.

    python scripts/prior_in_loop.py --out runs/prior-in-loop --json docs/eval/prior-in-loop.json

About 5 minutes here; a run already trained in `--out` is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vae_core.likelihood import GAUSSIAN, LOG_2PI
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import PRIOR_FILE, GaussianMixture
from vae_export.config import CLASSIFIER_DIR, TrainConfig, VAEConfig
from vae_export.data import load_dataset, load_idx_dir, stratified_split
from vae_export.evaluate import Judge, evaluate, model_split, sample_quality
from vae_export.model import VAE, load_checkpoint, save_checkpoint
from vae_export.onnx_export import export_onnx
from vae_export.prior_fit import PriorConfig, fit_prior
from vae_export.train import (
    deform,
    epoch_lr,
    fit_model_prior,
    prepare_inputs,
    training_codes,
)


class ClassMixture(nn.Module):
    """p(z | c) = sum over the components j of class c of w_j|c N(z; m_j, L_j L_j^T), with
    every mean, factor and within-class weight a parameter; started from a fitted mixture."""

    def __init__(self, start: GaussianMixture) -> None:
        super().__init__()
        chols = torch.from_numpy(start.chols).float()
        self.means = nn.Parameter(torch.from_numpy(start.means).float())
        self.log_diag = nn.Parameter(torch.diagonal(chols, dim1=-2, dim2=-1).log())
        self.lower = nn.Parameter(torch.tril(chols, -1))
        self.class_of = start.classes
        self.classes = torch.from_numpy(start.classes)
        # Each class's share of the training digits: fixed, as the fitted prior's are.
        self.share = np.bincount(start.classes, weights=start.weights, minlength=10)
        self.logits = nn.Parameter(torch.from_numpy(
            np.log(start.weights / self.share[start.classes])).float())

    def factors(self) -> torch.Tensor:
        return torch.tril(self.lower, -1) + torch.diag_embed(self.log_diag.exp())

    def log_prob(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(z_i | labels_i) for z [B, k], labels [B]."""
        k = z.shape[1]
        y = torch.linalg.solve_triangular(self.factors(), (z[None] - self.means[:, None])
                                          .transpose(1, 2), upper=False)  # [C, k, B]
        log_n = (-0.5 * (y * y).sum(1) - self.log_diag.sum(-1)[:, None]
                 - 0.5 * k * LOG_2PI)  # [C, B]
        mine = self.classes[:, None] == labels[None]
        logits = self.logits[:, None].expand_as(log_n).masked_fill(~mine, -math.inf)
        return torch.logsumexp(logits.log_softmax(0) + log_n, 0)

    def mixture(self, temperature: float = 1.0) -> GaussianMixture:
        """The learned prior as the server takes it; its factors times `temperature`."""
        with torch.no_grad():
            weights = np.empty(len(self.logits))
            for c in range(10):
                mine = self.class_of == c
                weights[mine] = self.logits[mine].double().softmax(0).numpy() * self.share[c]
            return GaussianMixture(weights / weights.sum(), self.means.double().numpy(),
                                   temperature * self.factors().double().numpy(),
                                   self.class_of.astype(np.int64))


def elbo(model: VAE, prior: ClassMixture | None, x: torch.Tensor,
         labels: torch.Tensor) -> torch.Tensor:
    """Per-row ELBO: against N(0, I) in closed form (`VAE.elbo`), or against `prior` by the
    one sample z the reconstruction term takes."""
    if prior is None:
        return model.elbo(x)[0]
    mu, logvar = model.encoder(x)
    eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(-1)
    return model.log_px_given_z(x, model.decoder(z)) - (log_q - prior.log_prob(z, labels))


def train_in_loop(cfg: TrainConfig, warm: int, components: int
                  ) -> tuple[VAE, ClassMixture, dict[str, float]]:
    """The network and the mixture learned with it (see the module's doc)."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    digits = load_dataset(cfg.data)
    train_idx, val_idx = stratified_split(digits.labels, cfg.val_fraction, cfg.seed)
    train_px, val_px = digits.images[train_idx], digits.images[val_idx]
    labels = torch.from_numpy(digits.labels[train_idx]).long()
    val_labels = torch.from_numpy(digits.labels[val_idx]).long()
    pixels = torch.from_numpy(train_px.astype(np.float32)).unsqueeze(1)
    x_val = prepare_inputs(val_px, GAUSSIAN, torch.Generator().manual_seed(cfg.seed + 1))
    model = VAE(VAEConfig())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    prior: ClassMixture | None = None
    t0 = time.perf_counter()
    val = -math.inf
    for epoch in range(1, cfg.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(cfg, epoch)
        if epoch == warm + 1:
            model.eval()
            codes = PriorConfig(components=components, codes="mean", temperature=1.0)
            prior = ClassMixture(fit_prior(*training_codes(model, train_px, codes),
                                           labels.numpy(), codes))
            opt.add_param_group({"params": list(prior.parameters()),
                                "lr": epoch_lr(cfg, epoch)})
        model.train()
        x_train = prepare_inputs(deform(pixels, cfg, gen), GAUSSIAN, gen)
        for idx in torch.randperm(len(x_train), generator=gen).split(cfg.batch_size):
            loss = -elbo(model, prior, x_train[idx], labels[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # as train.evaluate_elbo
            torch.manual_seed(cfg.seed + 2)
            val = float(elbo(model, prior, x_val, val_labels).mean())
        if epoch % 20 == 0 or epoch == cfg.epochs:
            print(f"epoch {epoch}: validation ELBO {val:.1f}", file=sys.stderr, flush=True)
    if prior is None:
        raise ValueError(f"--warm {warm} leaves no epoch of the {cfg.epochs} to learn a prior")
    return model, prior, {"val_elbo": val, "train_seconds": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/prior-in-loop"))
    p.add_argument("--warm", type=int, default=50, help="epochs against N(0, I) first")
    p.add_argument("--components", type=int, default=10, help="of the mixture, a class")
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--classifier", type=Path, default=Path(CLASSIFIER_DIR))
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cfg = TrainConfig()
    recipe = {"warm": args.warm, "components": args.components, "train": asdict(cfg)}
    learned_run, refitted_run = args.out / "learned", args.out / "refitted"
    checkpoint = learned_run / "checkpoint.pt"
    if checkpoint.is_file():
        network, extra = load_checkpoint(checkpoint)
        if extra.get("recipe") != recipe:
            sys.exit(f"{args.out} holds a run of another recipe: remove it or pick another --out")
        trained = {key: extra[key] for key in ("val_elbo", "train_seconds")}
        learned = GaussianMixture.load(learned_run / PRIOR_FILE, network.cfg.latent_dim)
    else:
        network, mixture, trained = train_in_loop(cfg, args.warm, args.components)
        learned = mixture.mixture()
        digits = load_dataset(cfg.data)
        train_idx, _ = stratified_split(digits.labels, cfg.val_fraction, cfg.seed)
        refitted = fit_model_prior(network, digits.images[train_idx],
                                   digits.labels[train_idx], PriorConfig())
        extra = {**trained, "recipe": recipe, "train": asdict(cfg), "data_source": digits.source,
                 "n_train": len(train_idx), "n_val": len(digits.labels) - len(train_idx)}
        for run, prior, fitted in ((learned_run, learned, None),
                                   (refitted_run, refitted, PriorConfig().to_dict())):
            run.mkdir(parents=True, exist_ok=True)
            save_checkpoint(run / "checkpoint.pt", network, extra={**extra, "prior": fitted})
            prior.save(run / PRIOR_FILE)
    for run in (learned_run, refitted_run):
        if not (run / "model" / "manifest.json").is_file():
            export_onnx(run, run / "model")

    test = load_idx_dir(args.data)
    refitted_model = OnnxVAE(refitted_run / "model")
    split = model_split(refitted_model)
    judge = Judge.of(refitted_model, args.classifier, test, split)
    rows = []
    narrowed = replace(learned, chols=PriorConfig().temperature * learned.chols)
    means = PriorConfig(codes="mean", temperature=1.0)
    train = split[0]
    at_means = fit_prior(*training_codes(network, train.images, means), train.labels, means)
    judged: list[tuple[str, Path, GaussianMixture | None]] = [  # None: the exported prior
        ("learned in the loop", learned_run, None),
        ("learned, narrowed by the default's temperature", learned_run, narrowed),
        ("refitted after training, as the default", refitted_run, None),
        ("refitted around the encoder's means, temperature 1", refitted_run, at_means)]
    for name, run, prior in judged:
        model = OnnxVAE(run / "model")
        if prior is not None:
            model.prior = prior
        quality = sample_quality(model, args.classifier, test, args.samples, judged_by=judge)
        row = {"prior": name, "model_version": model.manifest["model_version"],
               **{key: quality[key] for key in (
                   "confident_fraction", "class_entropy", "fd_over_writers",
                   "nn_pixels_median", "nn_features_median", "copy_ratio_pixels",
                   "copy_ratio_features")},
               "digit_agreement_mean": quality["by_digit"]["mean"],
               "digit_agreement_min": quality["by_digit"]["min"]}
        if prior is None:  # the likelihood of the exported model, its sigma calibrated for it
            screen = evaluate(run / "model", args.data, k_samples=100, limit=2000)
            row.update(test_log_likelihood_first_2000=screen["test"]["mean_log_likelihood"],
                       fashion_auroc=screen["ood"]["auroc"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {**recipe, **trained, "samples": args.samples,
              "reconstructions": judge.reconstructions, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
