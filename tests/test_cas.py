"""vae_export.cas: the labelled digits the classification accuracy score trains on, as many
of each class as n allows, and a model without classes refused with one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from serving import server_thread
from vae_client import VaeClient
from vae_core.manifest import MANIFEST, model_version
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import PRIOR_FILE
from vae_export.__main__ import main
from vae_export.cas import generated_digits


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[VaeClient]:
    """A client of a real server of the model: the digits it sends are what a user gets."""
    with server_thread(model_dir) as srv, VaeClient(srv.target, retries=0) as client:
        yield client


def served_digits(client: VaeClient, n: int, seed: int, digit: int) -> np.ndarray:
    """The first n images of class `digit` and `seed`, as the server's UINT8 replies."""
    chunks = client.sample_stream(n, seed=seed, digit=digit, dtype="uint8", chunk_size=1024)
    return np.concatenate([x for _, x in chunks])


@pytest.mark.parametrize(("n", "counts"), [
    (15, [2] * 5 + [1] * 5),
    (95, [10] * 5 + [9] * 5),
    (3, [1] * 3 + [0] * 7),
    (40, [4] * 10),
])
def test_n_is_spread_over_the_classes_as_evenly_as_it_goes(model_dir: Path, served: VaeClient,
                                                           n: int, counts: list[int]) -> None:
    """n = 15 gave [2, 2, 2, 2, 2, 2, 2, 1, 0, 0]: ceil(n / 10) of each class, cut to n."""
    model = OnnxVAE(model_dir, threads=1)
    assert model.prior.digits == list(range(10))
    made = generated_digits(model, n, seed=3)
    assert len(made) == n and made.images.shape == (n, 28, 28)
    assert np.bincount(made.labels, minlength=10).tolist() == counts
    # Each class's digits are the first of its seeded sequence, as the server sends them.
    for d in range(10):
        if counts[d]:
            np.testing.assert_array_equal(made.images[made.labels == d],
                                          served_digits(served, counts[d], 3, d))


def test_fifty_thousand_digits_are_the_servers(model_dir: Path, served: VaeClient) -> None:
    """The default n (EVAL.md's figure): 5,000 of each class, the digits a user gets from
    SampleStream with seed 0 and that class, in UINT8."""
    made = generated_digits(OnnxVAE(model_dir, threads=1), 50_000, seed=0)
    np.testing.assert_array_equal(made.labels, np.repeat(np.arange(10, dtype=np.uint8), 5000))
    for d in range(10):
        np.testing.assert_array_equal(made.images[d * 5000 : (d + 1) * 5000],
                                      served_digits(served, 5000, 0, d))


def test_a_model_without_classes_is_one_error_line(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plain = Path(shutil.copytree(model_dir, tmp_path / "model"))
    (plain / PRIOR_FILE).unlink()
    manifest = json.loads((plain / MANIFEST).read_text())
    del manifest["files"][PRIOR_FILE]
    manifest["prior"] = {"kind": "standard", "description": "N(0, I)"}
    manifest["model_version"] = model_version(manifest)
    (plain / MANIFEST).write_text(json.dumps(manifest))
    # A folder without a test set: the model is refused before the data is read.
    assert main(["cas", "--model-dir", str(plain), "--data", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vae-export: error: ") and "no digit classes" in err
    assert err.count("\n") == 1
