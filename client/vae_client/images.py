"""Digit images in and out of files, with numpy and the standard library (and the client's
own pixel rule, vae_client._codec.pixels).

- PNG: `write_png` writes 8-bit grayscale; `read_png` reads any non-interlaced PNG
  (grayscale, gray+alpha, RGB, RGBA, palette; 1 to 16 bits) and returns 8-bit grayscale.
- `replacing` (vae_core.files): a file written beside its path and renamed when whole, as
  every output is.
- `grid`: many 28x28 digits as one picture, white digits on black as in MNIST.
- IDX: the MNIST file format, read by `vae_core.idx`.
- `load_images`: a .png, .npy or IDX file -> images for the server ([N, 28, 28]).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from vae_client._codec import pixels
from vae_core import idx
from vae_core.files import replacing

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
SIDE = 28
PIXELS = SIDE * SIDE

# Samples per pixel of each PNG colour type, and the bit depths the standard allows for it.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# ITU-R BT.601 luma, the weights most image libraries use for RGB -> gray.
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageFileError(ValueError):
    """A file that is not a readable image file of a supported kind."""


# -- PNG ------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] -> the bytes of an 8-bit grayscale PNG (filter type 0 on every row)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 2 or 0 in img.shape:
        raise ValueError(f"encode_png needs a non-empty uint8 [H, W] array, not "
                         f"{img.dtype} {list(img.shape)}")
    h, w = img.shape
    rows = np.empty((h, w + 1), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None
    rows[:, 1:] = img
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write uint8 [H, W] as an 8-bit grayscale PNG, whole or not at all (`replacing`)."""
    data = encode_png(image)
    with replacing(path) as f:
        f.write(data)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: bytes, height: int, stride: int, bpp: int, name: str) -> np.ndarray:
    """Undo the per-scanline filters: raw (filter byte + stride bytes per row) -> [H, stride].

    bpp: bytes per complete pixel, at least 1 (the distance the Sub, Average and Paeth
    filters look back)."""
    if len(raw) != height * (stride + 1):
        raise ImageFileError(f"{name}: image data holds {len(raw)} bytes; the header's size "
                             f"needs {height * (stride + 1)}")
    lines = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind, line = int(lines[y, 0]), lines[y, 1:]
        if kind == 0:  # None
            cur = line.copy()
        elif kind == 1:  # Sub: a running sum (mod 256) over the bytes bpp apart
            pad = (-stride) % bpp
            cur = np.concatenate([line, np.zeros(pad, np.uint8)]).reshape(-1, bpp)
            cur = np.cumsum(cur, axis=0, dtype=np.uint8).reshape(-1)[:stride]
        elif kind == 2:  # Up
            cur = line + prev
        elif kind in (3, 4):  # Average, Paeth: each byte depends on the one bpp before it
            buf = bytearray(line.tobytes())
            up = prev.tobytes()
            for i in range(stride):
                left = buf[i - bpp] if i >= bpp else 0
                up_left = up[i - bpp] if i >= bpp else 0
                pred = (left + up[i]) >> 1 if kind == 3 else _paeth(left, up[i], up_left)
                buf[i] = (buf[i] + pred) & 0xFF
            cur = np.frombuffer(bytes(buf), dtype=np.uint8)
        else:
            raise ImageFileError(f"{name}: row {y} has filter type {kind}; PNG defines 0 to 4")
        out[y] = cur
        prev = out[y]
    return out


def _samples(rows: np.ndarray, width: int, channels: int, depth: int) -> np.ndarray:
    """Unfiltered rows [H, stride] -> samples [H, W, channels] (uint8, or uint16 if 16-bit)."""
    h = rows.shape[0]
    if depth == 16:
        return rows.view(">u2").reshape(h, width, channels).astype(np.uint16)
    if depth == 8:
        return rows.reshape(h, width, channels)
    # 1-, 2- and 4-bit samples (one channel) are packed from the high bits down.
    shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
    vals = (rows[:, :, None] >> shifts) & np.uint8((1 << depth) - 1)
    return vals.reshape(h, -1)[:, :width].reshape(h, width, 1)


def decode_png(data: bytes, name: str = "<png>") -> np.ndarray:
    """The bytes of a PNG -> uint8 grayscale [H, W].

    Colour becomes gray by BT.601 luma; alpha, an alpha channel's or a tRNS chunk's (palette
    alphas, or the one transparent gray or colour), is composited over black (the MNIST
    background); 16-bit samples are rounded to 8 bits and 1/2/4-bit grays are scaled to
    0..255.
    Interlaced (Adam7) PNGs are not supported. Chunk CRCs are checked."""
    if not data.startswith(PNG_SIGNATURE):
        raise ImageFileError(f"{name}: not a PNG file (bad signature)")
    pos, header, palette, idat = len(PNG_SIGNATURE), None, None, []
    transparency: bytes | None = None
    while True:
        if pos + 8 > len(data):
            raise ImageFileError(f"{name}: truncated (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        crc_bytes = data[pos + 8 + length : pos + 12 + length]
        if len(body) != length or len(crc_bytes) != 4:
            raise ImageFileError(f"{name}: truncated {kind!r} chunk")
        if struct.unpack(">I", crc_bytes)[0] != zlib.crc32(kind + body) & 0xFFFFFFFF:
            raise ImageFileError(f"{name}: CRC mismatch in the {kind.decode('latin-1')} chunk")
        pos += 12 + length
        if kind == b"IHDR":
            if length != 13:
                raise ImageFileError(f"{name}: IHDR of {length} bytes (expected 13)")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            if length % 3:
                raise ImageFileError(f"{name}: a PLTE chunk of {length} bytes (not a multiple "
                                     "of 3)")
            palette = np.frombuffer(body, dtype=np.uint8).reshape(-1, 3)
        elif kind == b"tRNS":
            transparency = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ImageFileError(f"{name}: no IHDR chunk")
    width, height, depth, color, compression, filter_method, interlace = header
    if color not in _CHANNELS or depth not in _DEPTHS[color]:
        raise ImageFileError(f"{name}: colour type {color} with bit depth {depth} is not valid")
    if compression != 0 or filter_method != 0:
        raise ImageFileError(f"{name}: unknown compression or filter method")
    if interlace:
        raise ImageFileError(f"{name}: interlaced PNGs are not supported; save it without "
                             "interlacing")
    if width == 0 or height == 0:
        raise ImageFileError(f"{name}: empty image ({width}x{height})")
    if not idat:
        raise ImageFileError(f"{name}: no IDAT chunk")
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise ImageFileError(f"{name}: corrupt image data ({exc})") from None
    channels = _CHANNELS[color]
    bits = depth * channels
    rows = _unfilter(raw, height, (width * bits + 7) // 8, max(1, bits // 8), name)
    px = _samples(rows, width, channels, depth)
    if color == 3:
        if palette is None:
            raise ImageFileError(f"{name}: palette image without a PLTE chunk")
        if int(px.max()) >= len(palette):
            raise ImageFileError(f"{name}: palette index out of range")
        index = px[:, :, 0]
        px, depth = palette[index], 8
        if transparency is not None:  # an alpha for each of the first palette entries
            alpha = np.full(len(palette), 255, np.uint8)
            given = np.frombuffer(transparency, np.uint8)[: len(palette)]
            alpha[: len(given)] = given
            px = np.concatenate([px, alpha[index][:, :, None]], axis=2)
    elif color in (0, 2) and transparency is not None:  # one gray or colour is transparent
        if len(transparency) != 2 * channels:
            raise ImageFileError(f"{name}: a tRNS chunk of {len(transparency)} bytes for "
                                 f"colour type {color} (expected {2 * channels})")
        key = np.frombuffer(transparency, ">u2").astype(np.int64)
        opaque = ~np.all(px.astype(np.int64) == key, axis=2)
        px = np.concatenate([px, (opaque * ((1 << depth) - 1)).astype(px.dtype)[:, :, None]],
                            axis=2)
    maxval = (1 << depth) - 1
    px = px.astype(np.float64)
    gray = px[:, :, :3] @ _LUMA if px.shape[2] >= 3 else px[:, :, 0]
    if px.shape[2] in (2, 4):
        gray = gray * px[:, :, -1] / maxval
    return np.clip(np.rint(gray * (255.0 / maxval)), 0, 255).astype(np.uint8)


def read_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a PNG file as uint8 grayscale [H, W] (see decode_png)."""
    return decode_png(Path(path).read_bytes(), str(path))


# -- grids ----------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 as is; float in [0, 1] -> round(255 * x), as the server converts."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    return np.rint(np.clip(arr.astype(np.float32), 0.0, 1.0) * np.float32(255.0)).astype(np.uint8)


def grid_shape(n: int, cols: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a grid of n tiles: `cols` columns, or a square-ish ceil(sqrt(n))."""
    if n < 1:
        raise ValueError("a grid needs at least one image")
    cols = max(1, math.ceil(math.sqrt(n)) if cols is None else min(cols, n))
    return math.ceil(n / cols), cols


def grid(images: np.ndarray, cols: int | None = None, gutter: int = 2,
         gutter_value: int = 128) -> np.ndarray:
    """Images [N, h, w] (float in [0, 1] or uint8) -> one uint8 grayscale picture.

    Tiles run left to right, then top to bottom, `cols` per row (default ceil(sqrt(N))).
    Pixel values are kept as the model sees them, so digits are white on black, as in MNIST.
    A `gutter` pixels wide band of gray `gutter_value` surrounds every tile (the outer border
    too, as torchvision's make_grid does); unused cells of the last row are gutter-gray.
    The picture is rows * (h + gutter) + gutter high and cols * (w + gutter) + gutter wide.
    """
    tiles = to_uint8(images)
    if tiles.ndim == 2 and tiles.shape[1] == PIXELS:
        tiles = tiles.reshape(-1, SIDE, SIDE)
    if tiles.ndim != 3:
        raise ValueError(f"grid needs images [N, h, w] or [N, 784], not {list(tiles.shape)}")
    n, h, w = tiles.shape
    rows, cols = grid_shape(n, cols)
    out = np.full((rows * (h + gutter) + gutter, cols * (w + gutter) + gutter), gutter_value,
                  dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gutter + r * (h + gutter), gutter + c * (w + gutter)
        out[y : y + h, x : x + w] = tiles[i]
    return out


# -- IDX ------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, gzipped or not (vae_core.idx), as an ImageFileError when it fails."""
    try:
        return idx.read_idx(path)
    except idx.IdxError as exc:
        raise ImageFileError(str(exc)) from None


# -- any image file -------------------------------------------------------------------------


def as_images(arr: np.ndarray, name: str) -> np.ndarray:
    """Check and shape an array of digits: [N, 784], [N, 28, 28], or one image [784] /
    [28, 28] -> [N, 28, 28] (or [N, 784]), their pixels by `_codec.pixels`.

    Pixel ranges are left to the server, which names the field and the limit."""
    if (arr.ndim == 1 and len(arr) == PIXELS) or arr.shape == (SIDE, SIDE):
        arr = arr[None]
    if not ((arr.ndim == 2 and arr.shape[1] == PIXELS)
            or (arr.ndim == 3 and arr.shape[1:] == (SIDE, SIDE))):
        raise ImageFileError(f"{name}: images of shape {list(arr.shape)}; expected [N, 784] "
                             "or [N, 28, 28]")
    if len(arr) == 0:
        raise ImageFileError(f"{name}: holds no images")
    try:
        return pixels(arr)  # the library's rule, so that a file and an array score alike
    except ValueError as exc:
        raise ImageFileError(f"{name}: {exc}") from None


def sniff(path: str | os.PathLike[str]) -> str:
    """'png', 'npy', 'idx' or 'idx.gz', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head.startswith(idx.GZIP_MAGIC):
        return "idx.gz"
    if head[:2] == b"\x00\x00":
        return "idx"
    raise ImageFileError(f"{path}: not a PNG, NPY or IDX file")


def load_images(path: str | os.PathLike[str]) -> np.ndarray:
    """A file of digits -> images [N, 28, 28] (or [N, 784] from an NPY file), uint8 or float32.

    The kind is told by content: PNG (one 28x28 digit, converted to 8-bit gray), NPY
    ([N, 784] or [N, 28, 28], uint8 or float in [0, 1]; memory-mapped, so a large file is
    read as it is used), IDX (idx3-ubyte, gzipped or not)."""
    name = str(path)
    kind = sniff(path)
    if kind == "png":
        img = read_png(path)
        if img.shape != (SIDE, SIDE):
            raise ImageFileError(f"{name}: a {img.shape[1]}x{img.shape[0]} PNG; expected one "
                                 f"{SIDE}x{SIDE} digit")
        return img[None]
    if kind == "npy":
        try:
            arr = np.load(name, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise ImageFileError(f"{name}: {exc}") from None
        return as_images(arr, name)
    return as_images(read_idx(path), name)
