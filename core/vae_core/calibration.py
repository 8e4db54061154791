"""The anomaly score's calibration: where an image's log p(x) estimate falls among the
estimates of held-out digits (the run's validation digits) made with the same number of
importance samples K.

The estimate log mean_k w_k is biased low, by less as K grows (Burda et al., 2015), so an
image scored with K = 1 against estimates made with K = 100 would read too low a percentile:
a table of quantiles calibrated at K = 100 alone flagged twice the advertised share of the
held-out digits at K = 1. The manifest's calibration holds a table for each of a ladder of Ks
(`by_k`); a K between two of them takes their tables interpolated in log K, and a K beyond
them the nearest end's. A manifest with one table (`quantiles`, at `k`) serves it for any K.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from vae_core.likelihood import percentile_of
from vae_core.manifest import ManifestError


class Calibration:
    """The calibration entry of a manifest, checked: a malformed one (tables of other lengths
    than the levels, Ks not ascending, quantiles descending, levels outside [0, 1]) is a
    ManifestError."""

    def __init__(self, entry: Mapping[str, Any] | None) -> None:
        entry = entry or {}
        if not isinstance(entry, Mapping):
            raise ManifestError(f"calibration: a JSON {type(entry).__name__}, not an object")
        try:
            self.levels = np.asarray(entry.get("levels", []), dtype=np.float64)
            by_k = entry.get("by_k")
            if by_k:
                self.ks = np.asarray(by_k["k"], dtype=np.float64)
                self.tables = np.asarray(by_k["quantiles"], dtype=np.float64)
            elif entry.get("quantiles"):
                self.ks = np.asarray([entry.get("k", 1)], dtype=np.float64)
                self.tables = np.asarray([entry["quantiles"]], dtype=np.float64)
            else:
                self.ks = np.zeros(0)
                self.tables = np.zeros((0, len(self.levels)))
            percentile = entry.get("anomaly_percentile", 1.0)
            if isinstance(percentile, str | bool):  # float("50") would take it
                raise TypeError(percentile)
            self.anomaly_percentile = float(percentile)
        except KeyError as exc:
            raise ManifestError(f"calibration: by_k has no {exc} entry") from None
        except (TypeError, ValueError):  # a string or null where a number goes, ragged tables
            raise ManifestError("calibration: the levels, Ks and quantiles must be numbers, "
                                "each table as long as the levels") from None
        if len(self.ks) and (self.ks.ndim != 1 or self.levels.ndim != 1
                             or self.tables.shape != (len(self.ks), len(self.levels))
                             or np.any(np.diff(self.ks) <= 0) or not np.all(self.ks >= 1)):
            raise ManifestError("calibration: one table of quantiles per K, the Ks ascending "
                                "from 1, each as long as the levels")
        if len(self.ks) and not (np.all(np.isfinite(self.tables))
                                 and np.all(np.diff(self.tables, axis=1) >= 0)):
            raise ManifestError("calibration: each table's quantiles must be finite and "
                                "ascending")
        if len(self.ks) and not (len(self.levels) and np.all(np.isfinite(self.ks))):
            raise ManifestError("calibration: tables need levels, and finite Ks")
        if len(self.ks) and not (np.all(np.diff(self.levels) > 0) and self.levels[0] >= 0
                                 and self.levels[-1] <= 1):
            raise ManifestError("calibration: the levels must ascend within [0, 1]")
        if not 0.0 <= self.anomaly_percentile <= 100.0:
            raise ManifestError(f"calibration: anomaly_percentile {self.anomaly_percentile} "
                                f"is not within [0, 100]")
        self._cache: dict[int, np.ndarray] = {}

    @property
    def empty(self) -> bool:
        return len(self.ks) == 0

    def quantiles(self, k: int) -> np.ndarray:
        """The quantiles of the held-out digits' log p(x) estimates with K = k samples."""
        table = self._cache.get(k)
        if table is None:
            at = np.log(k)
            logs = np.log(self.ks)
            j = int(np.searchsorted(logs, at))
            if j == 0:
                table = self.tables[0]
            elif j == len(logs):
                table = self.tables[-1]
            else:
                w = (at - logs[j - 1]) / (logs[j] - logs[j - 1])
                table = (1 - w) * self.tables[j - 1] + w * self.tables[j]
            self._cache[k] = table
        return table

    def percentile(self, log_likelihood: np.ndarray, k: int) -> np.ndarray:
        """Percentile (0..100) of each estimate made with K = k among the held-out digits'
        (NaN without a calibration). An estimate that is NaN or +inf (an overflow: nothing
        the model can vouch for) is at 0, so that it is flagged: NaN compares false with any
        threshold, and +inf would read as the most typical of images."""
        scores = np.asarray(log_likelihood, np.float64)
        if self.empty:
            return np.full(scores.shape, np.nan)
        overflow = np.isnan(scores) | np.isposinf(scores)
        return percentile_of(np.where(overflow, -np.inf, scores), self.quantiles(k), self.levels)
