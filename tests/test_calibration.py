"""vae_core.calibration on known tables: a K between two calibrated ones reads their tables
interpolated in log K, a K beyond them the nearest end's, a manifest of one table that table
for any K, and no calibration NaN."""

from __future__ import annotations

import numpy as np
import pytest

from vae_core.calibration import Calibration
from vae_core.manifest import ManifestError

LEVELS = [0.0, 0.5, 1.0]
ENTRY = {"levels": LEVELS, "k": 10, "quantiles": [-20.0, -10.0, 0.0],
         "by_k": {"k": [1, 10, 100], "quantiles": [[-40.0, -30.0, -20.0], [-20.0, -10.0, 0.0],
                                                   [-10.0, 0.0, 10.0]]},
         "anomaly_percentile": 1.0}


def test_the_table_of_each_calibrated_k_and_between_them_in_log_k() -> None:
    c = Calibration(ENTRY)
    np.testing.assert_array_equal(c.quantiles(1), [-40, -30, -20])
    np.testing.assert_array_equal(c.quantiles(100), [-10, 0, 10])
    np.testing.assert_allclose(c.quantiles(round(10**1.5)), [-15, -5, 5], atol=0.1)
    np.testing.assert_allclose(c.quantiles(np.sqrt(10)), [-30, -20, -10])
    np.testing.assert_array_equal(c.quantiles(5000), [-10, 0, 10])  # beyond: the last
    # An estimate of -10 is the median among K = 10's estimates, below all of K = 100's.
    np.testing.assert_allclose(c.percentile(np.array([-10.0, -30.0, 50.0]), 10), [50, 0, 100])
    np.testing.assert_allclose(c.percentile(np.array([-10.0]), 100), [0])
    np.testing.assert_allclose(c.percentile(np.array([-10.0]), 1), [100])


def test_one_table_serves_every_k_and_none_gives_nan() -> None:
    one = Calibration({k: v for k, v in ENTRY.items() if k != "by_k"})
    for k in (1, 10, 1000):
        np.testing.assert_array_equal(one.quantiles(k), [-20, -10, 0])
    none = Calibration(None)
    assert none.empty and np.isnan(none.percentile(np.zeros(3), 10)).all()


def test_a_malformed_ladder_is_refused() -> None:
    with pytest.raises(ValueError, match="one table of quantiles per K"):
        Calibration({**ENTRY, "by_k": {"k": [10, 1], "quantiles": [[0, 1, 2], [0, 1, 2]]}})
    with pytest.raises(ValueError, match="one table of quantiles per K"):
        Calibration({**ENTRY, "by_k": {"k": [1, 10], "quantiles": [[0, 1, 2]]}})


@pytest.mark.parametrize(("entry", "says"), [
    ({**ENTRY, "by_k": {"k": [1, 10], "quantiles": [[0, 1, 2], [0, 1]]}}, "as long as the levels"),
    ({**ENTRY, "by_k": {"k": [1, 10], "quantiles": [[0, 1, 2], [2, 1, 0]]}}, "ascending"),
    ({**ENTRY, "by_k": {"k": [1, 10], "quantiles": [[0, 1, None], [0, 1, 2]]}}, "finite"),
    ({**ENTRY, "by_k": {"k": [0, 10], "quantiles": [[0, 1, 2], [0, 1, 2]]}}, "ascending from 1"),
    ({**ENTRY, "by_k": {"quantiles": [[0, 1, 2]]}}, "by_k has no 'k' entry"),
    ({**ENTRY, "levels": [0.0, 1.0, 0.5]}, "levels must ascend within [0, 1]"),
    ({**ENTRY, "levels": [0.0, 0.5, 2.0]}, "levels must ascend within [0, 1]"),
    ({**ENTRY, "levels": "abc"}, "numbers"),
    ({**ENTRY, "anomaly_percentile": -1}, "anomaly_percentile"),
    ([1, 2], "not an object"),
], ids=["ragged", "descending", "null", "k-zero", "no-k", "levels-order", "levels-range",
        "levels-text", "percentile", "a-list"])
def test_a_malformed_table_is_a_manifest_error(entry, says) -> None:
    """Refused when the model loads, with one line, not when scoring fails later (np.interp
    reads descending quantiles without a word)."""
    with pytest.raises(ManifestError) as err:
        Calibration(entry)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_score_that_is_not_a_number_is_at_the_bottom_and_flagged() -> None:
    # A log-likelihood that overflowed to NaN (or +inf) is no evidence that the image is
    # typical: it reads as percentile 0, below the anomaly percentile, not as NaN (which compares false
    # and so was never flagged). Without a calibration nothing is flagged, NaN or not.
    c = Calibration(ENTRY)
    pct = c.percentile(np.array([np.nan, -10.0, -np.inf, np.inf]), 10)
    np.testing.assert_array_equal(pct, [0.0, 50.0, 0.0, 0.0])  # +inf is an overflow too
    assert list(pct < c.anomaly_percentile) == [True, False, True, True]
    none = Calibration(None)
    assert not (none.percentile(np.array([np.nan]), 10) < none.anomaly_percentile).any()
