"""vae_client.images: the numpy-only PNG writer and reader, grids, load_images; vae_core.idx."""

from __future__ import annotations

import gzip
import struct
import zlib

import numpy as np
import pytest

from vae_client.images import (
    ImageFileError,
    as_images,
    decode_png,
    encode_png,
    grid,
    load_images,
    read_idx,
    read_png,
    write_png,
)
from vae_core.idx import IdxError, parse_idx

RNG = np.random.default_rng(0)


# -- helpers that build PNGs by hand --------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """The PNG filter `kind` applied to one scanline, as an encoder does it (spec section 9)."""
    out = bytearray(len(row))
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = (0, a, b, (a + b) // 2, paeth(a, b, c))[kind]
        out[i] = (x - pred) % 256
    return bytes([kind]) + bytes(out)


def make_png(rows: list[bytes], width: int, depth: int, color: int, filters: list[int],
             bpp: int, extra: bytes = b"", interlace: int = 0) -> bytes:
    """A PNG of the given raw scanlines, each filtered with its entry of `filters`."""
    prev = bytes(len(rows[0]))
    data = b""
    for row, kind in zip(rows, filters, strict=True):
        data += filter_row(kind, row, prev, bpp)
        prev = row
    ihdr = struct.pack(">IIBBBBB", width, len(rows), depth, color, 0, 0, interlace)
    idat = zlib.compress(data)
    # Two IDAT chunks: a reader must join them.
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra
            + chunk(b"IDAT", idat[:5]) + chunk(b"IDAT", idat[5:]) + chunk(b"IEND", b""))


GRAY = RNG.integers(0, 256, size=(9, 13), dtype=np.uint8)


def rows_of(samples: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in samples]


# -- PNG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (28, 28), (3, 50), (50, 3), (64, 257)])
def test_png_round_trip(tmp_path, shape):
    img = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    write_png(path, img)
    back = read_png(path)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, img)


def test_png_writer_chunks_and_crcs():
    data = encode_png(np.zeros((2, 3), np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", data[16:29]) == (3, 2, 8, 0, 0, 0, 0)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_each_filter_type_gray8(kind):
    png = make_png(rows_of(GRAY), 13, 8, 0, [kind] * len(GRAY), bpp=1)
    np.testing.assert_array_equal(decode_png(png), GRAY)


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_each_filter_type_multibyte_pixels(kind):
    """RGB (3 bytes a pixel) and 16-bit gray + alpha (4 bytes): the filters look back one
    pixel, not one byte. Gray RGB and opaque alpha give the gray values back."""
    rgb = np.repeat(GRAY[:, :, None], 3, axis=2)
    png = make_png(rows_of(rgb.reshape(len(GRAY), -1)), 13, 8, 2, [kind] * len(GRAY), bpp=3)
    np.testing.assert_array_equal(decode_png(png), GRAY)
    ga16 = np.stack([GRAY.astype(">u2") * 257, np.full(GRAY.shape, 65535, ">u2")], axis=2)
    png = make_png([r.tobytes() for r in ga16.reshape(len(GRAY), -1)], 13, 16, 4,
                   [kind] * len(GRAY), bpp=4)
    np.testing.assert_array_equal(decode_png(png), GRAY)


def test_filters_mixed_row_by_row():
    filters = [i % 5 for i in range(len(GRAY))][::-1]
    rgba = np.concatenate([np.repeat(GRAY[:, :, None], 3, axis=2),
                           np.full(GRAY.shape + (1,), 255, np.uint8)], axis=2)
    png = make_png(rows_of(rgba.reshape(len(GRAY), -1)), 13, 8, 6, filters, bpp=4)
    np.testing.assert_array_equal(decode_png(png), GRAY)


def test_colour_and_alpha_conversion():
    # RGB -> BT.601 luma; alpha composited over black.
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    png = make_png(rows_of(rgb.reshape(1, -1)), 4, 8, 2, [0], bpp=3)
    expected = np.rint(rgb.astype(float) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    np.testing.assert_array_equal(decode_png(png), expected)
    ga = np.array([[[200, 255], [200, 0], [200, 128]]], np.uint8)
    png = make_png(rows_of(ga.reshape(1, -1)), 3, 8, 4, [0], bpp=2)
    np.testing.assert_array_equal(decode_png(png), [[200, 0, round(200 * 128 / 255)]])


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_low_bit_depth_gray_and_palette(depth):
    levels = (1 << depth) - 1
    values = RNG.integers(0, levels + 1, size=(5, 11))
    packed = []
    for row in values:
        bits = "".join(format(int(v), f"0{depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        packed.append(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    png = make_png(packed, 11, depth, 0, [1] * 5, bpp=1)
    np.testing.assert_array_equal(decode_png(png), np.rint(values * 255 / levels))
    palette = RNG.integers(0, 256, size=(levels + 1, 3), dtype=np.uint8)
    plte = chunk(b"PLTE", palette.tobytes())
    png = make_png(packed, 11, depth, 3, [4] * 5, bpp=1, extra=plte)
    expected = np.rint(palette[values].astype(float) @ [0.299, 0.587, 0.114])
    np.testing.assert_array_equal(decode_png(png), expected)


def test_transparency_of_a_trns_chunk_is_composited_over_black():
    """A white digit on a transparent background, as a palette or a gray PNG with a tRNS
    chunk (what Pillow writes for a quantised RGBA digit). Before, tRNS was ignored and the
    palette image read all white."""
    digit = np.zeros((6, 5), np.uint8)
    digit[1:5, 2] = 1  # palette index 1: the stroke
    palette = chunk(b"PLTE", bytes([255, 255, 255, 255, 255, 255]))  # both entries white
    alphas = chunk(b"tRNS", bytes([0]))  # entry 0 transparent; entry 1 opaque (omitted)
    png = make_png(rows_of(digit), 5, 8, 3, [0] * 6, 1, extra=palette + alphas)
    np.testing.assert_array_equal(decode_png(png), digit * 255)
    # Gray: the value 200 is transparent, every other opaque.
    gray = np.where(digit == 1, 255, 200).astype(np.uint8)
    png = make_png(rows_of(gray), 5, 8, 0, [0] * 6, 1,
                   extra=chunk(b"tRNS", struct.pack(">H", 200)))
    np.testing.assert_array_equal(decode_png(png), digit * 255)
    with pytest.raises(ImageFileError, match="tRNS chunk of 6 bytes for colour type 0"):
        decode_png(make_png(rows_of(gray), 5, 8, 0, [0] * 6, 1,
                            extra=chunk(b"tRNS", bytes(6))))


def test_a_palette_of_a_length_not_a_multiple_of_three_is_refused():
    """Before: a plain ValueError from numpy's reshape, a traceback in the CLI."""
    png = make_png(rows_of(np.zeros((2, 2), np.uint8)), 2, 8, 3, [0, 0], 1,
                   extra=chunk(b"PLTE", b"\x00\x00\x00\xff"))
    with pytest.raises(ImageFileError, match="PLTE chunk of 4 bytes"):
        decode_png(png)


def test_png_from_pillow_if_installed(tmp_path):
    """Cross-check against an independent encoder (Pillow chooses its own filters)."""
    image = pytest.importorskip("PIL.Image")
    img = RNG.integers(0, 256, size=(30, 41), dtype=np.uint8)
    for mode in ("L", "LA", "RGB", "RGBA"):
        path = tmp_path / f"{mode}.png"
        image.fromarray(img).convert(mode).save(path)
        np.testing.assert_array_equal(read_png(path), img, err_msg=mode)
    # And Pillow reads what we write.
    write_png(tmp_path / "ours.png", img)
    np.testing.assert_array_equal(np.asarray(image.open(tmp_path / "ours.png")), img)


def test_png_errors():
    good = encode_png(GRAY)
    with pytest.raises(ImageFileError, match="signature"):
        decode_png(b"GIF89a" + good[6:])
    bad_crc = bytearray(good)
    bad_crc[20] ^= 1  # inside IHDR
    with pytest.raises(ImageFileError, match="CRC"):
        decode_png(bytes(bad_crc))
    with pytest.raises(ImageFileError, match="truncated"):
        decode_png(good[:-20])
    interlaced = make_png(rows_of(GRAY), 13, 8, 0, [0] * len(GRAY), bpp=1, interlace=1)
    with pytest.raises(ImageFileError, match="interlaced"):
        decode_png(interlaced)
    bad_filter = make_png(rows_of(GRAY), 13, 8, 0, [0] * len(GRAY), bpp=1)
    body = zlib.compress(b"\x07" + bytes(13) + bytes(14 * 8))
    ihdr = struct.pack(">IIBBBBB", 13, 9, 8, 0, 0, 0, 0)
    bad_filter = (bad_filter[:8] + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body)
                  + chunk(b"IEND", b""))
    with pytest.raises(ImageFileError, match="filter type 7"):
        decode_png(bad_filter)
    short = (good[:8] + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(10)))
             + chunk(b"IEND", b""))
    with pytest.raises(ImageFileError, match="image data"):
        decode_png(short)


# -- grid -----------------------------------------------------------------------------------


def test_grid_layout():
    tiles = np.stack([np.full((28, 28), 10 * (i + 1), np.uint8) for i in range(5)])
    g = grid(tiles, cols=3, gutter=2, gutter_value=128)
    assert g.shape == (2 * 30 + 2, 3 * 30 + 2) and g.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 2 + 30 * r, 2 + 30 * c
        assert (g[y : y + 28, x : x + 28] == 10 * (i + 1)).all()
    assert (g[:2] == 128).all() and (g[:, :2] == 128).all() and (g[-2:] == 128).all()
    assert (g[32:60, 62:90] == 128).all()  # the sixth cell is empty
    assert (g[30:32] == 128).all() and (g[:, 30:32] == 128).all()


def test_grid_defaults_and_float_input():
    x = RNG.random((10, 28, 28), dtype=np.float32)
    g = grid(x)  # ceil(sqrt(10)) = 4 columns, 3 rows
    assert g.shape == (3 * 30 + 2, 4 * 30 + 2)
    np.testing.assert_array_equal(g[2:30, 2:30], np.rint(x[0] * 255).astype(np.uint8))
    g = grid(x.reshape(10, 784), cols=20, gutter=0)  # cols capped at N; [N, 784] accepted
    assert g.shape == (28, 280)
    np.testing.assert_array_equal(g[:, 28:56], np.rint(x[1] * 255).astype(np.uint8))


# -- IDX and load_images --------------------------------------------------------------------


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.tobytes()


def test_idx_plain_and_gzipped(tmp_path):
    imgs = RNG.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    (tmp_path / "x-idx3-ubyte").write_bytes(idx_bytes(imgs))
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        np.testing.assert_array_equal(read_idx(tmp_path / name), imgs)
        loaded = load_images(tmp_path / name)
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded, imgs)
    labels = np.arange(10, dtype=np.uint8)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)


def test_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(IdxError, match="magic"):
        parse_idx(b"\x01" + good[1:])
    with pytest.raises(IdxError, match="unsigned byte"):
        parse_idx(good[:2] + b"\x0d" + good[3:])
    with pytest.raises(IdxError, match="truncated"):
        parse_idx(good[:-1])
    with pytest.raises(IdxError, match="trailing"):
        parse_idx(good + b"\x00")
    with pytest.raises(IdxError, match="too short"):
        parse_idx(b"\x00\x00")
    (tmp_path / "cut").write_bytes(good[:-1])
    with pytest.raises(ImageFileError, match="truncated"):
        load_images(tmp_path / "cut")
    (tmp_path / "labels").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ImageFileError, match=r"shape \[5\]"):
        load_images(tmp_path / "labels")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(ImageFileError, match="gzip"):
        load_images(tmp_path / "bad.gz")


def test_load_images_npy_and_png(tmp_path):
    x = RNG.random((4, 784), dtype=np.float32)
    np.save(tmp_path / "f.npy", x)
    np.testing.assert_array_equal(load_images(tmp_path / "f.npy"), x)
    np.save(tmp_path / "d.npy", x.astype(np.float64))
    assert load_images(tmp_path / "d.npy").dtype == np.float32
    u = RNG.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "u.npy", u.astype(np.int64))  # integers 0..255 become uint8
    loaded = load_images(tmp_path / "u.npy")
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, u)
    np.save(tmp_path / "one.npy", u[0])  # one image [28, 28]
    assert load_images(tmp_path / "one.npy").shape == (1, 28, 28)
    write_png(tmp_path / "d.png", u[1])
    np.testing.assert_array_equal(load_images(tmp_path / "d.png"), u[1:2])


def test_load_images_errors(tmp_path):
    np.save(tmp_path / "shape.npy", np.zeros((2, 27, 28), np.float32))
    with pytest.raises(ImageFileError, match=r"\[2, 27, 28\]"):
        load_images(tmp_path / "shape.npy")
    np.save(tmp_path / "ints.npy", np.full((1, 784), 300))
    with pytest.raises(ImageFileError, match="0 .. 255"):
        load_images(tmp_path / "ints.npy")
    write_png(tmp_path / "big.png", np.zeros((28, 30), np.uint8))
    with pytest.raises(ImageFileError, match="30x28 PNG"):
        load_images(tmp_path / "big.png")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImageFileError, match="not a PNG, NPY or IDX"):
        load_images(tmp_path / "x.txt")


def test_a_one_dimensional_array_is_named_by_its_own_shape() -> None:
    # Before: "images of shape [1, 10000]", the shape after taking it for one image, for an
    # IDX file of 10,000 labels.
    with pytest.raises(ImageFileError, match=r"images of shape \[10000\]; expected"):
        as_images(np.zeros(10000, np.uint8), "labels")
    assert as_images(np.zeros(784, np.uint8), "one").shape == (1, 784)
