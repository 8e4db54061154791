"""Where the decoder draws a digit best (EVAL.md, "The prior: MAP codes and a temperature"):
for the test digits, the encoder's means mu(x) against the MAP codes argmax_z log p(x|z) +
log N(z; 0, I) found as `vae-export train` finds them for the prior (100 Adam steps from
mu(x)), their norms, and the decoder's images of both, judged as `vae-export eval` judges
samples (the Fréchet distance over the writer populations', the distances to the nearest
training digit).

    python scripts/map_codes.py --run runs/default --model-dir models/default \\
        --json docs/eval/map-codes.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sweep_prior import model_arguments, studied

from vae_export.evaluate import judged
from vae_export.prior_fit import PriorConfig
from vae_export.train import training_codes

JUDGED = ("fd_over_writers", "confident_fraction", "nn_pixels_median", "nn_features_median")


def main() -> int:
    p = model_arguments(__doc__)
    p.add_argument("--limit", type=int, default=0, help="the first N test digits (0: all)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    model, network, _, _, test, judge = studied(args)
    pixels = test.images[:args.limit] if args.limit else test.images
    result: dict[str, object] = {"model_version": model.manifest["model_version"],
                                 "test_digits": len(pixels)}
    for codes in ("mean", "map"):
        t0 = time.perf_counter()
        z, _ = training_codes(network, pixels, PriorConfig(codes=codes))
        with torch.no_grad():
            images = torch.sigmoid(network.decoder(torch.from_numpy(z))).numpy()
        verdict = judged(judge, images)
        norms = np.linalg.norm(z, axis=1)
        row = {"codes": codes, "norm_mean": float(norms.mean()),
               "norm_median": float(np.median(norms)),
               **{key: verdict[key] for key in JUDGED},
               "seconds": round(time.perf_counter() - t0, 1)}
        result[codes] = row
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
