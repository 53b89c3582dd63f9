"""The embedded default data set: scikit-learn's handwritten digits as an ImageFolder tree.

It ships inside a declared dependency, so `make demo` runs with no network: 1797 8x8 grayscale
digits, written as PNG files in train/val/test split folders (stratified 60/20/20, seeded).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write_digits(folder: str, seed: int = 0, per_class: int | None = None) -> dict[str, int]:
    """Write folder/{train,val,test}/{0..9}/NNNN.png once; returns images per split.
    per_class: keep only the first that many images of each class in each split (a quick run)."""
    digits = load_digits()
    rows = np.arange(len(digits.target))
    rest, test = train_test_split(rows, test_size=0.2, stratify=digits.target, random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=digits.target[rest], random_state=seed)
    counts = {}
    for split, chosen in (("train", train), ("val", val), ("test", test)):
        if per_class is not None:
            chosen = np.concatenate([chosen[digits.target[chosen] == c][:per_class] for c in range(10)])
        for i in chosen:
            path = os.path.join(folder, split, str(digits.target[i]), f"{i:04d}.png")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 ink levels
                Image.fromarray(pixels, "L").save(path)
        counts[split] = len(chosen)
    return counts
