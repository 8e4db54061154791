"""`vae-export eval`: score the exported ONNX models on a test set (ELBO, importance-sampled
log p(x), bits/dim) and measure how well that score tells the test digits from an
out-of-distribution set (AUROC)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from vae_core import likelihood as lk
from vae_core.onnx_model import OnnxVAE
from vae_export.data import Digits, load_idx_dir

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that a random out-of-distribution image scores lower (more anomalous) than
    a random in-distribution one: the Mann-Whitney U statistic, ties counted half."""
    all_scores = np.concatenate([in_scores, out_scores])
    order = all_scores.argsort(kind="mergesort")
    ranks = np.empty(len(all_scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(all_scores) + 1)
    # Average the ranks of tied scores.
    sorted_scores = all_scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first[counts > 1], counts[counts > 1], strict=True):
        ranks[order[f : f + c]] = ranks[order[f : f + c]].mean()
    n_in, n_out = len(in_scores), len(out_scores)
    u = ranks[:n_in].sum() - n_in * (n_in + 1) / 2
    return float(u / (n_in * n_out))


def roc_curve(in_scores: np.ndarray, out_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) when flagging images scoring below a threshold,
    out-of-distribution images being the positives."""
    thresholds = np.unique(np.concatenate([in_scores, out_scores]))
    fpr = np.searchsorted(np.sort(in_scores), thresholds, side="right") / len(in_scores)
    tpr = np.searchsorted(np.sort(out_scores), thresholds, side="right") / len(out_scores)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def _prepare(digits: Digits, limit: int | None, seed: int) -> np.ndarray:
    images = digits.images[:limit] if limit else digits.images
    return lk.dequantize(images.reshape(len(images), -1), seed)


def _summary(scores: lk.Scores, model: OnnxVAE) -> dict[str, Any]:
    cal = model.manifest.get("calibration") or {}
    out: dict[str, Any] = {
        "n": int(len(scores.elbo)),
        "mean_elbo": float(np.mean(scores.elbo)),
        "mean_log_likelihood": float(np.mean(scores.log_likelihood)),
        "bits_per_dim": float(np.mean(scores.bits_per_dim)),
    }
    if cal.get("quantiles"):
        pct = lk.percentile_of(scores.log_likelihood, np.array(cal["quantiles"]),
                               np.array(cal["levels"]))
        out["flagged_fraction"] = float(np.mean(pct < cal["anomaly_percentile"]))
    return out


def evaluate(model_dir: Path, data_dir: Path, k_samples: int = 1000, seed: int = 0,
             ood_dir: Path | None = Path(FASHION_MNIST_DIR), limit: int | None = None,
             roc_path: Path | None = None, threads: int = 0) -> dict[str, Any]:
    """Scores of the test set (and the out-of-distribution set, when given and present)."""
    model = OnnxVAE(model_dir, threads=threads)
    t0 = time.perf_counter()
    test = load_idx_dir(data_dir)
    in_scores = model.score(_prepare(test, limit, seed), k_samples, seed)
    result: dict[str, Any] = {
        "model_dir": str(model_dir),
        "model_version": model.manifest["model_version"],
        "likelihood": model.likelihood,
        "latent_dim": model.latent_dim,
        "sigma": model.sigma,
        "provider": model.encoder.get_providers()[0],
        "k": k_samples,
        "seed": seed,
        "data": str(data_dir),
        "test": _summary(in_scores, model),
    }
    if ood_dir is not None and Path(ood_dir).is_dir():
        ood = load_idx_dir(ood_dir)
        ood_scores = model.score(_prepare(ood, limit, seed + 1), k_samples, seed + 1)
        a = auroc(in_scores.log_likelihood, ood_scores.log_likelihood)
        result["ood"] = {"data": str(ood_dir), **_summary(ood_scores, model), "auroc": a}
        if roc_path is not None:
            from vae_export import plots

            fpr, tpr = roc_curve(in_scores.log_likelihood, ood_scores.log_likelihood)
            plots.save_roc(roc_path, fpr, tpr, a, f"MNIST vs {Path(ood_dir).name}, K={k_samples}")
    elif ood_dir is not None:
        result["ood"] = {"data": str(ood_dir), "skipped": "directory not found"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result
