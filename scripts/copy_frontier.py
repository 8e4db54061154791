"""How far from the training digits a trained model's samples can go before they stop looking
like the test digits: the front between the Fréchet distance and the distance to the nearest
training digit (EVAL.md, "Copies").

For each number of prior components a class and temperature t (the prior refitted around the
training digits' MAP codes, as `vae-export train` fits it), and each sharpening c of the
decoder (its logits times c: sigmoid(c logit f(z)), which thins the blur of a mean image), it
draws the samples as the server draws them from that prior, sharpens them by c, and judges
them as `vae-export eval` does: the Fréchet distance over the writer populations', the
median distances to the nearest training digit in pixels and features, and the copy ratios.
The target those distances miss is the test digits' (`reference` in the JSON).

    python scripts/copy_frontier.py --run runs/default --model-dir models/default \\
        --json docs/eval/copy-frontier.json

Sharpening is not part of any served model: a model with c != 1 would be another decoder,
whose likelihood the server would have to score.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sweep_prior import model_arguments, studied

from vae_export.evaluate import judged
from vae_export.prior_fit import PriorConfig, fit_prior
from vae_export.train import training_codes

# (components a class, temperature, sharpening): the default, then settings along the front.
SETTINGS = ("10:0.7:1,10:0.7:1.5,10:0.85:1.5,10:0.85:2,10:0.9:1.5,10:0.9:1.75,10:0.9:2,"
            "10:1.0:1.5,10:1.0:2,3:0.8:2,3:1.0:1.5,1:0.8:1.5")

# What a row records of `judged`'s verdict on the samples.
JUDGED = ("fd_over_writers", "fd_validation", "confident_fraction", "nn_pixels_median",
          "nn_features_median", "copy_ratio_pixels", "copy_ratio_features")


def sharpened(images: np.ndarray, c: float) -> np.ndarray:
    """sigmoid(c logit(images)) for mean images in [0, 1]: the decoder with its logits times c
    (the logits taken back from the mean image, clipped away from 0 and 1)."""
    if c == 1:
        return images
    y = np.clip(images.astype(np.float64), 1e-6, 1 - 1e-6)
    return (1 / (1 + np.exp(-c * np.log(y / (1 - y))))).astype(np.float32)


def main() -> int:
    p = model_arguments(__doc__)
    p.add_argument("--settings", default=SETTINGS,
                   help="comma-separated components:temperature:sharpening")
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split(",")]
    model, network, train, _, _, judge = studied(args)
    z, logvar = training_codes(network, train.images, PriorConfig())
    rows = []
    for m, t, c in settings:
        t0 = time.perf_counter()
        model.prior = fit_prior(z, logvar, train.labels,
                                PriorConfig(components=int(m), temperature=t))
        verdict = judged(judge, sharpened(model.sample(args.samples, 0), c))
        row = {"components_per_class": int(m), "temperature": t, "sharpening": c,
               **{key: verdict[key] for key in JUDGED},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = judge.reference
    result = {"model_version": model.manifest["model_version"], "samples": args.samples,
              "reference": {key: ref[key] for key in (
                  "test_nn_pixels_median", "test_nn_features_median",
                  "population_nn_pixels_median", "population_nn_features_median")},
              "reconstructions": judge.reconstructions, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
