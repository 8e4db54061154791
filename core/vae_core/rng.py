"""Random streams addressed by keys of non-negative integers: (seed, index) and the like.

numpy seeds a generator from a list of integers by joining their 32-bit words, so the keys
[s + 2**32 h, b] and [s, h, b] name one stream, and a short list is padded with zeros, so
[s, h, 0] is [s, h]: Sample(seed=2**32 + 5) gave the images 1024 - 2047 of Sample(seed=5).
`key_words` keeps numpy's list for keys whose values all fit in 32 bits, the keys of every
output before this module, and gives any other key its own words: each value's length and
32-bit words, and a mark that no key of the first form ends with.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_WORD = 2**32
_MARK = 0x5EED_C0DE  # ends every key of the second form (no small key has 5 words or more)


def key_words(*key: int) -> list[int]:
    """The entropy words of `key` for numpy's SeedSequence (see the module's doc)."""
    if all(0 <= v < _WORD for v in key):
        return [int(v) for v in key]
    words: list[int] = []
    for v in key:
        if v < 0:
            raise ValueError(f"a stream key holds non-negative integers, not {v}")
        parts = []
        while True:
            parts.append(int(v) % _WORD)
            v = int(v) // _WORD
            if not v:
                break
        words += [len(parts), *parts]
    return [*words, _MARK]


def keyed_rng(*key: int) -> np.random.Generator:
    """The generator of the stream named by `key`."""
    return np.random.default_rng(key_words(*key))


ROWS_PER_BLOCK = 1024


def block_spans(start: int, n: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(b, lo, hi) for each block b of `size` rows that rows start .. start + n - 1 touch:
    the rows lo .. hi - 1 of block b are theirs, in order."""
    for b in range(start // size, (start + n - 1) // size + 1) if n else ():
        yield b, max(start, b * size) - b * size, min(start + n, (b + 1) * size) - b * size


def indexed_normals(seed: int, start: int, n: int, width: int) -> np.ndarray:
    """Rows start .. start + n - 1 of an endless float32 array [., width] of N(0, 1) draws
    named by `seed`: row i depends on (seed, i) alone, so a set of rows split over several
    calls gets the draws it would get in one. Rows come in blocks of ROWS_PER_BLOCK: block b
    is the stream (seed, b, 2), except block 0 of a seed below 2^32, numpy's default_rng(seed):
    the stream of the whole call before rows had indices, so those first rows keep their
    draws. (numpy reads a larger seed 2^32 h + s as the key (s, h), another stream's.)"""
    out = np.empty((n, width), dtype=np.float32)
    pos = 0
    for b, lo, hi in block_spans(start, n, ROWS_PER_BLOCK):
        rng = (np.random.default_rng(seed) if b == 0 and seed < _WORD
               else keyed_rng(seed, b, 2))
        # Only the block's rows up to the last one asked for are drawn: a block's stream
        # gives its rows in order, so the draws of a row do not depend on how many follow.
        out[pos : pos + hi - lo] = rng.standard_normal((hi, width), dtype=np.float32)[lo:]
        pos += hi - lo
    return out
