"""The anomaly scores of scripts/heldout_digits.py (EVAL.md, "Held-out digits") on known
cases: higher is more normal."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vae_export.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import heldout_digits as h  # noqa: E402

VALIDATION = np.array([690.0, 700.0, 710.0, 700.0])  # mean 700, sd about 7.07


def test_typicality_is_highest_at_the_validation_mean_and_falls_either_way() -> None:
    scores = h.typicality(np.array([700.0, 720.0, 680.0, 800.0, 300.0]), VALIDATION)
    assert scores[0] == 0.0
    assert scores[1] == scores[2] < 0  # as atypical above the mean as below it
    assert scores[3] < scores[1] and scores[4] < scores[3]
    np.testing.assert_allclose(scores[1], -20.0 / VALIDATION.std())


def test_either_takes_the_more_anomalous_of_the_two_scores() -> None:
    latent_reference = np.array([-10.0, 0.0, 10.0])
    log_px = np.array([700.0, 700.0, 600.0])
    latent = np.array([0.0, -50.0, 0.0])
    both = h.either(log_px, latent, (VALIDATION, latent_reference))
    assert both[0] == 0.0  # typical by both
    assert both[1] == h.standardised(latent, latent_reference)[1]  # anomalous code
    assert both[2] == h.standardised(log_px, VALIDATION)[2]  # anomalous likelihood
    # A likelihood higher than the validation digits' is normal to `either`, not to typicality.
    high = np.array([800.0])
    assert h.either(high, np.array([0.0]), (VALIDATION, latent_reference))[0] == 0.0
    assert h.typicality(high, VALIDATION)[0] < -10


def test_complexity_is_the_compressed_length_in_nats() -> None:
    blank = np.zeros((1, 28, 28), np.uint8)
    noisy = np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    c = h.complexity_nats(np.concatenate([blank, noisy]))
    assert 0 < c[0] < c[1]
    assert c[1] > 784 * 8 * np.log(2) * 0.9  # noise does not compress


def test_every_score_of_a_set_is_named_and_standardised_by_its_own_reference() -> None:
    reference = {"log_px": VALIDATION, "latent_density": np.array([-10.0, 0.0, 10.0]),
                 "code_density_3": np.array([90.0, 100.0, 110.0])}
    log_px, latent = np.array([700.0, 700.0]), np.array([0.0, 0.0])
    code = np.array([100.0, 0.0])  # typical, then far from the training digits' codes
    scores = h.scored(log_px, latent, np.array([5.0, 5.0]), {3: code}, reference)
    assert set(scores) == {"log_px", "log_px_plus_complexity", "latent_density", "either",
                           "typicality", "typical_and_either", "code_density_3",
                           "either_code_density_3"}
    np.testing.assert_array_equal(scores["log_px_plus_complexity"], [705.0, 705.0])
    assert scores["code_density_3"] is code
    np.testing.assert_array_equal(scores["either"], [0.0, 0.0])
    # The code density's z-score is against the validation digits' code densities.
    both = scores["either_code_density_3"]
    assert both[0] == 0.0
    np.testing.assert_allclose(both[1], -100.0 / reference["code_density_3"].std())


def test_the_code_density_components_are_chosen_by_the_mean_validation_auroc() -> None:
    # Two held-out digits; 2 components a class is best on the test set, 5 on validation.
    rows = [{"digit": d, "auroc_code_density_2": 0.9, "auroc_code_density_5": 0.8,
             "val_auroc_code_density_2": 0.7 + 0.1 * d, "val_auroc_code_density_5": 0.85,
             "fashion": {"n": 10, "auroc_code_density_2": 0.99, "auroc_code_density_5": 0.97}}
            for d in (0, 1)]
    summary = h.summarised(rows, [2, 5])
    assert summary["chosen_code_components"] == 5
    np.testing.assert_allclose(summary["mean_val_auroc_code_density_2"], 0.75)
    np.testing.assert_allclose(summary["mean_auroc_code_density_2"], 0.9)
    assert summary["fashion_mean_auroc"] == {"auroc_code_density_2": 0.99,
                                             "auroc_code_density_5": 0.97}


def test_a_cached_model_of_another_recipe_is_refused_not_scored(tmp_path: Path) -> None:
    """--out may hold models of the default recipe: asked for another (--elastic-alpha,
    --epochs), the script must not score those as if they were the recipe asked for."""
    folder = tmp_path / "without-9"
    (folder / "model").mkdir(parents=True)
    (folder / "run").mkdir()
    (folder / "model" / "manifest.json").write_text("{}")
    (folder / "run" / "summary.json").write_text(
        json.dumps({"train": dataclasses.asdict(TrainConfig())}))
    with pytest.raises(SystemExit, match="give another --out"):
        h.trained(folder, None, dataclasses.replace(
            TrainConfig(), elastic_alpha=TrainConfig().elastic_alpha + 1.0), None)
