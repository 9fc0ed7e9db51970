"""Perceptual hashes of images and their Hamming distances: the one home of the near-duplicate test that the data
converters (train/test leakage reports) and the scoreboard (test sets against a model's training files) share.

    from medllava.leakage import image_phash, hamming
    a, b = image_phash("train/x.png"), image_phash("test/y.png")     # 64-bit ints (None if the file does not decode)
    hamming(np.array([a], dtype=np.uint64), b)                       # bits that differ, per train hash
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_phash(path: str | Path) -> int | None:
    """64-bit perceptual hash (imagehash.phash over medllava's image loader); None if the image does not load."""
    import imagehash

    from medllava.processing import ImageLoadError, load_image

    try:
        bits = imagehash.phash(load_image(path)).hash.flatten()
    except (ImageLoadError, OSError):
        return None
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(values: np.ndarray, value: int) -> np.ndarray:
    """Number of differing bits between each 64-bit hash of `values` (uint64 array) and `value`."""
    xor = np.bitwise_xor(np.asarray(values, dtype=np.uint64), np.uint64(value))
    return np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
