"""Sweep latent size, decoder sigma (and hidden widths) to choose VAEConfig's defaults.

For every configuration: train with `vae_export.train.train` (default TrainConfig, seed 0),
export with `vae_export.onnx_export.export_onnx` (no calibration), and score the VALIDATION
split of the training data (never a test set) with the exported ONNX models, exactly as the
anomaly calibration does: the same split, dequantised with the calibration seed, K = 100
importance samples. Prints a markdown table and writes OUT/sweep.json.

Log-densities of the same dequantised validation digits are comparable across sigma and
latent size, so the validation log p(x) is the selection criterion.

    .venv/bin/python scripts/sweep_defaults.py --out runs/sweep

Configurations already in OUT/sweep.json are skipped unless --force (train again) or --rescore
(score the saved models again, without training); runs are sequential. Training times depend on
what else the machine is running: compare configurations by their epoch counts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vae_core.onnx_model import OnnxVAE
from vae_export.config import TrainConfig, VAEConfig
from vae_export.data import run_split
from vae_export.onnx_export import CALIBRATION_SEED, export_onnx, validation_inputs
from vae_export.train import train

# Burda et al. (2015): a latent unit is active when Cov_x(E_q[z_u]) > 0.01.
ACTIVE_UNIT_THRESHOLD = 0.01


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _hidden(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("-", ",").split(",") if v)


def config_name(cfg: VAEConfig) -> str:
    return f"k{cfg.latent_dim}_s{cfg.sigma:g}_h{'-'.join(str(h) for h in cfg.hidden)}"


def score_model(model_dir: Path, x_val: np.ndarray, k_samples: int) -> dict[str, Any]:
    """Validation figures of an exported model: the selection criterion and its context."""
    model = OnnxVAE(model_dir)
    t0 = time.perf_counter()
    scores = model.score(x_val, k_samples, CALIBRATION_SEED)
    score_seconds = time.perf_counter() - t0
    mu, _ = model.encode(x_val)
    recon = model.decode(mu)
    return {
        "val_elbo": float(np.mean(scores.elbo)),
        "val_log_px": float(np.mean(scores.log_likelihood)),
        "val_bits_per_dim": float(np.mean(scores.bits_per_dim)),
        "val_recon_rmse": float(np.sqrt(np.mean((recon - x_val) ** 2))),
        "active_units": int(np.sum(np.var(mu, axis=0) > ACTIVE_UNIT_THRESHOLD)),
        "score_seconds": round(score_seconds, 2),
        "k": k_samples,
        "n_val": int(len(x_val)),
    }


def run_one(cfg: VAEConfig, train_cfg: TrainConfig, out: Path, x_val: np.ndarray,
            k_samples: int) -> dict[str, Any]:
    name = config_name(cfg)
    run_dir, model_dir = out / "runs" / name, out / "models" / name
    t0 = time.perf_counter()
    summary = train(cfg, train_cfg, run_dir, progress=False)
    train_wall = time.perf_counter() - t0
    export_onnx(run_dir, model_dir, calibrate=False)
    return {
        "name": name,
        "latent_dim": cfg.latent_dim,
        "sigma": cfg.sigma,
        "hidden": list(cfg.hidden),
        **score_model(model_dir, x_val, k_samples),
        "train_elbo_torch": summary["train_elbo"],
        "val_elbo_torch_early_stopping": summary["val_elbo"],
        "train_seconds": summary["train_seconds"],
        "train_wall_seconds": round(train_wall, 2),
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    best = max(rows, key=lambda r: r["val_log_px"])["name"] if rows else None
    head = ("| latent k | sigma | hidden | val ELBO | val log p(x), K=100 | bits/dim | "
            "recon RMSE | active units | train s (machine load!) | epochs (best) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        mark = " **(best)**" if r["name"] == best else ""
        lines.append(
            f"| {r['latent_dim']} | {r['sigma']:g} | {'-'.join(map(str, r['hidden']))} | "
            f"{r['val_elbo']:.1f} | {r['val_log_px']:.1f}{mark} | {r['val_bits_per_dim']:.4f} | "
            f"{r['val_recon_rmse']:.4f} | {r['active_units']}/{r['latent_dim']} | "
            f"{r['train_seconds']:.1f} | {r['epochs_run']} ({r['best_epoch']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for runs, models and sweep.json")
    p.add_argument("--latent-dims", type=_ints, default=[2, 8, 16, 32],
                   help="comma-separated latent sizes (default: 2,8,16,32)")
    p.add_argument("--sigmas", type=_floats, default=[0.03, 0.05, 0.1, 0.2],
                   help="comma-separated decoder sigmas (default: 0.03,0.05,0.1,0.2)")
    p.add_argument("--hidden", type=_hidden, nargs="+", default=[VAEConfig().hidden],
                   help="hidden widths, one or more, each comma- or dash-separated "
                   "(default: VAEConfig's)")
    p.add_argument("--extra", nargs="*", default=[], metavar="K:SIGMA:HIDDEN",
                   help="configurations outside the grid, e.g. 16:0.1:1024-512")
    p.add_argument("--k", type=int, default=100,
                   help="importance samples per validation digit (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="re-run configurations already done")
    p.add_argument("--rescore", action="store_true",
                   help="re-score the saved models of configurations already done (no training), "
                   "e.g. after a change to the scoring code")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "sweep.json"
    train_cfg = TrainConfig()  # seed 0 and every other optimisation default
    configs = [VAEConfig(latent_dim=k, sigma=s, hidden=h)
               for h, k, s in itertools.product(args.hidden, args.latent_dims, args.sigmas)]
    for spec in args.extra:
        k, s, h = spec.split(":")
        configs.append(VAEConfig(latent_dim=int(k), sigma=float(s), hidden=_hidden(h)))

    done: dict[str, dict[str, Any]] = {}
    if result_path.exists() and not args.force:
        done = {r["name"]: r for r in json.loads(result_path.read_text())["results"]}
    x_val = validation_inputs(run_split(asdict(train_cfg))[1])
    t_start = time.perf_counter()
    for cfg in configs:
        name = config_name(cfg)
        if name in done and args.rescore:
            row = {**done[name], **score_model(Path(done[name]["model_dir"]), x_val, args.k)}
            print(f"{name}: re-scored, val log p(x) {row['val_log_px']:.1f}", file=sys.stderr)
        elif name in done:
            print(f"{name}: already in {result_path}, skipped", file=sys.stderr)
            continue
        else:
            row = run_one(cfg, train_cfg, out, x_val, args.k)
            print(f"{name}: val log p(x) {row['val_log_px']:.1f}, ELBO {row['val_elbo']:.1f}, "
                  f"{row['train_seconds']} s, {row['epochs_run']} epochs "
                  f"[{time.perf_counter() - t_start:.0f} s elapsed]", file=sys.stderr, flush=True)
        done[name] = row
        blob = {"train_config": asdict(train_cfg), "k": args.k,
                "validation": "stratified validation split of the training data, dequantised "
                              f"with seed {CALIBRATION_SEED}",
                "results": list(done.values())}
        result_path.write_text(json.dumps(blob, indent=1) + "\n")

    names = [config_name(c) for c in configs]
    rows = [done[n] for n in names if n in done]
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
