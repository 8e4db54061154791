"""How far the served log p(x) estimate is from converging (EVAL.md, "How far the estimate
is from log p(x)").

LogLikelihood returns log (1/K) sum_k w_k, the importance-weighted bound with K samples from
the encoder's q(z|x): a lower bound on log p(x) in expectation, which rises towards it as K
grows. For the first --n test digits (dequantised with --seed, as `vae-export eval` scores
them), this prints for each K the mean estimate and the mean ELBO, the effective sample size of
the normalised weights (sum w)^2 / sum w^2 (median and lowest), and the
spread of an image's estimate over --seeds seeds of the importance noise at --spread-k.

    .venv/bin/python scripts/estimator_convergence.py --ks 10 100 1000 10000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.onnx_model import OnnxVAE
from vae_export.data import load_idx_dir


def log_weights(model: OnnxVAE, x: np.ndarray, k: int, seed: int,
                rows_per_run: int = 16384) -> np.ndarray:
    """[N, K] importance log-weights, with the noise the server and the evaluator draw."""
    per_run = max(1, rows_per_run // k)
    parts = []
    for start in range(0, len(x), per_run):
        chunk = x[start:start + per_run]
        eps = lk.score_noise(seed, start, len(chunk), k, model.latent_dim)
        parts.append(model.log_weights(chunk, eps))
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--n", type=int, default=200, help="test digits (the first N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3, help="seeds for the spread")
    parser.add_argument("--spread-k", type=int, default=1000, help="K of the spread")
    parser.add_argument("--model-dir", type=Path, default=Path("models/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    model = OnnxVAE(args.model_dir, threads=args.threads)
    test = load_idx_dir(args.data)
    pixels = test.images[:args.n].reshape(args.n, -1)
    x = lk.dequantize(pixels, args.seed)
    print(f"model {model.manifest['model_version']}, the first {args.n} test digits, "
          f"seed {args.seed}")
    print("| K | mean log p(x) estimate | mean ELBO | ESS median | ESS lowest |")
    print("|---:|---:|---:|---:|---:|")
    for k in args.ks:
        w = log_weights(model, x, k, args.seed)
        estimate = lk.log_mean_exp(w, axis=1)
        ess = np.exp(2 * lk.logsumexp(w, axis=1) - lk.logsumexp(2 * w, axis=1))
        print(f"| {k} | {estimate.mean():.2f} | {w.mean():.2f} | {np.median(ess):.1f} | "
              f"{ess.min():.1f} |", flush=True)
    k = args.spread_k
    runs = np.stack([lk.log_mean_exp(log_weights(model, x, k, seed), axis=1)
                     for seed in range(args.seed, args.seed + args.seeds)])
    spread = runs.std(axis=0, ddof=1)
    print(f"K = {k}, {args.seeds} seeds: an image's estimate varies by a median of "
          f"{np.median(spread):.2f} nats (standard deviation; largest {spread.max():.2f}); the "
          f"mean over the {args.n} digits by {runs.mean(axis=1).std(ddof=1):.2f}")


if __name__ == "__main__":
    main()
