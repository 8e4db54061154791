"""How often the anomaly flag marks unseen digits (EVAL.md, "Flagged, by K and by writers").

Scores the MNIST test digits with the exported model as `vae-export eval` does (dequantised
with `--seed`, the same seed for the importance samples) and prints, for each K, the share
flagged (below the calibration's anomaly percentile) and the share below the 5th percentile,
over all digits and over the test set's first and last 5,000 (two writer populations).
Then the percentiles of a few images with little or no ink, which the one-sided flag lets
through.

    .venv/bin/python scripts/flag_rates.py 1 10 100 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vae_core import likelihood as lk
from vae_core.calibration import Calibration
from vae_core.onnx_model import OnnxVAE
from vae_export.data import load_idx_dir


def shares(pct: np.ndarray, below: float) -> str:
    half = len(pct) // 2
    parts = [np.mean(pct < below), np.mean(pct[:half] < below), np.mean(pct[half:] < below)]
    return "{:.2f} % (first / last half {:.2f} / {:.2f} %)".format(*(100 * v for v in parts))


def little_ink() -> dict[str, np.ndarray]:
    blank = np.zeros((28, 28), np.uint8)
    pixel = blank.copy()
    pixel[14, 8] = 255
    bar = blank.copy()
    bar[4:24, 13:15] = 255
    faint = np.random.default_rng(1).integers(0, 21, (28, 28)).astype(np.uint8)
    return {"blank": blank, "one lit pixel": pixel, "a bar": bar,
            "faint noise (0 - 20)": faint, "all 255": np.full((28, 28), 255, np.uint8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("k", type=int, nargs="+", help="importance samples per image")
    parser.add_argument("--model-dir", type=Path, default=Path("models/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mnist"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--ink-k", type=int, default=100, help="K of the little-ink images")
    args = parser.parse_args()

    model = OnnxVAE(args.model_dir, threads=args.threads)
    calibration = Calibration(model.manifest.get("calibration"))
    if calibration.empty:
        raise SystemExit(f"{args.model_dir}: the manifest holds no calibration")
    test = load_idx_dir(args.data)
    x = lk.dequantize(test.images.reshape(len(test.images), -1), args.seed)
    print(f"model {model.manifest['model_version']}, {len(x)} test digits, seed {args.seed}")
    for k in args.k:
        pct = calibration.percentile(model.score(x, k, args.seed).log_likelihood, k)
        print(f"K = {k}: flagged {shares(pct, calibration.anomaly_percentile)}; below the 5th "
              f"percentile {shares(pct, 5.0)}", flush=True)
    k = args.ink_k
    for name, image in little_ink().items():
        score = model.score(lk.dequantize(image.reshape(1, -1), args.seed), k, args.seed)
        pct = calibration.percentile(score.log_likelihood, k)[0]
        print(f"{name}, K = {k}: percentile {pct:.1f}")


if __name__ == "__main__":
    main()
