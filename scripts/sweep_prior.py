"""The learned prior's size, chosen on validation data: for a trained and exported model, fit
the class mixture with M components per class for each M, and record side by side the
validation log p(x) (the choice) and what the samples look like to the judging classifier
(the confident share, the Fréchet distance over the writer populations', the copy ratio).

    python scripts/sweep_prior.py --model-dir models/default --json docs/eval/prior-sweep.json

It shows the trade-off of EVAL.md: more components bring the samples closer to the training
digits (a lower Fréchet distance) by copying them (a lower copy ratio), and the likelihood of
unseen digits falls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.onnx_model import OnnxVAE
from vae_export.config import CLASSIFIER_DIR
from vae_export.data import load_idx_dir, run_split
from vae_export.evaluate import sample_quality
from vae_export.onnx_export import CALIBRATION_SEED, validation_inputs
from vae_export.prior_fit import PriorConfig, fit_prior


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models/default"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--classifier", type=Path, default=Path(CLASSIFIER_DIR))
    p.add_argument("--components", default="1,3,10,20,40,80")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--k", type=int, default=100, help="importance samples, validation")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model = OnnxVAE(args.model_dir)
    train, val = run_split((model.manifest.get("training") or {}).get("config") or {})
    mu, logvar = model.encode(lk.to_unit(train.images.reshape(len(train), -1)))
    x_val = validation_inputs(val)
    test = load_idx_dir(args.data)
    rows = []
    for m in (int(v) for v in args.components.split(",")):
        t0 = time.perf_counter()
        model.prior = fit_prior(mu, logvar, train.labels, PriorConfig(components=m))
        val = model.score(x_val, args.k, CALIBRATION_SEED)
        quality = sample_quality(model, args.classifier, test, args.samples)
        row = {"components_per_class": m,
               "val_log_likelihood": float(np.mean(val.log_likelihood)),
               **{key: quality[key] for key in ("confident_fraction", "class_entropy",
                                                "fd_over_writers", "nn_pixels_median",
                                                "nn_features_median", "copy_ratio_pixels",
                                                "copy_ratio_features")},
               "digit_agreement_min": quality["by_digit"]["min"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model_version": model.manifest["model_version"], "k": args.k,
              "samples": args.samples, "sigma": model.sigma, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
