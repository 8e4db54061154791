"""The learned prior, chosen on validation data: for a trained and exported model, fit the
class mixture for each choice of codes (each training digit's MAP code, or the encoder's
mean), components per class and temperature, and record side by side the validation log p(x)
and what the samples look like to the judging classifier: the Fréchet distance to the 500
validation digits (which the choice may look at), and the figures on the test set (the
confident share, the Fréchet distance over the writer populations', the distances to the
nearest training digit and the copy ratio).

    python scripts/sweep_prior.py --run runs/default --model-dir models/default \
        --json docs/eval/prior-sweep.json

It shows the trade-offs of EVAL.md: more components bring the samples closer to the real
digits by copying the training digits (a lower copy ratio), and the likelihood of unseen
digits falls; a lower temperature makes the samples look more like digits, at some cost in
likelihood.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from vae_core.onnx_model import OnnxVAE
from vae_export.config import CLASSIFIER_DIR
from vae_export.data import Digits, load_idx_dir
from vae_export.evaluate import Judge, model_split, sample_quality
from vae_export.model import VAE, load_checkpoint
from vae_export.onnx_export import CALIBRATION_SEED, validation_inputs
from vae_export.prior_fit import PriorConfig, fit_prior
from vae_export.train import training_codes


def model_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of a study of one trained model's prior: its run, its exported model, the
    test digits and the judging classifier."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/default"),
                   help="the run the model was exported from (its network finds MAP codes)")
    p.add_argument("--model-dir", type=Path, default=Path("models/default"))
    p.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    p.add_argument("--classifier", type=Path, default=Path(CLASSIFIER_DIR))
    return p


def studied(args: argparse.Namespace) -> tuple[OnnxVAE, VAE, Digits, Digits, Digits, Judge]:
    """For `model_arguments`' options: the exported model, its run's network, its training
    and validation digits, the test digits, and what its samples are judged against."""
    model = OnnxVAE(args.model_dir)
    network, _ = load_checkpoint(args.run / "checkpoint.pt")
    train, val = model_split(model)
    test = load_idx_dir(args.data)
    return model, network, train, val, test, Judge.of(model, args.classifier, test, (train, val))


def main() -> int:
    p = model_arguments(__doc__)
    p.add_argument("--codes", default="mean,map")
    p.add_argument("--components", default="10")
    p.add_argument("--temperatures", default="0.6,0.7,0.8,0.9,1.0")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--k", type=int, default=100, help="importance samples, validation")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model, network, train, val, test, judged_by = studied(args)
    x_val = validation_inputs(val)
    rows = []
    for codes in args.codes.split(","):
        z, logvar = training_codes(network, train.images, PriorConfig(codes=codes))
        for m in (int(v) for v in args.components.split(",")):
            for t in (float(v) for v in args.temperatures.split(",")):
                t0 = time.perf_counter()
                cfg = PriorConfig(components=m, codes=codes, temperature=t)
                model.prior = fit_prior(z, logvar, train.labels, cfg)
                scores = model.score(x_val, args.k, CALIBRATION_SEED)
                quality = sample_quality(model, args.classifier, test, args.samples,
                                         judged_by=judged_by)
                row = {"codes": codes, "components_per_class": m, "temperature": t,
                       "val_log_likelihood": float(np.mean(scores.log_likelihood)),
                       "val_frechet_distance": quality["fd_validation"],
                       **{key: quality[key] for key in (
                           "confident_fraction", "class_entropy", "fd_over_writers",
                           "nn_pixels_median", "nn_features_median", "copy_ratio_pixels",
                           "copy_ratio_features")},
                       "digit_agreement_mean": quality["by_digit"]["mean"],
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
