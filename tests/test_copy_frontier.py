"""scripts/copy_frontier.py's sharpening of mean images (EVAL.md, "Copies") on known cases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import copy_frontier as cf  # noqa: E402


def test_sharpening_multiplies_the_logits_and_keeps_the_middle() -> None:
    images = np.array([[0.0, 0.1, 0.5, 0.9, 1.0]], np.float32)
    assert cf.sharpened(images, 1) is images
    twice = cf.sharpened(images, 2)
    # sigmoid(2 logit(0.1)) = 0.01 / (0.01 + 0.81)
    np.testing.assert_allclose(twice[0, 1], 0.01 / 0.82, rtol=1e-5)
    np.testing.assert_allclose(twice[0, 1] + twice[0, 3], 1.0, rtol=1e-6)  # symmetric
    assert twice[0, 2] == 0.5
    assert 0 <= twice[0, 0] < 1e-6 and 1 - 1e-6 < twice[0, 4] <= 1  # ends stay in [0, 1]
    assert twice.dtype == np.float32
