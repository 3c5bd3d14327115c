"""Shared fixtures: tiny PNG folders in the OASIS layout, written into a temporary directory."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

# The scaled pixel range at the default --shift of 0.5.
PIXEL_RANGE = (-0.5, 0.5)
SPLIT_SIZES = {"train": 16, "validate": 4, "test": 4}
TINY_SIZE = 32


def brain_like_image(rng, size):
    """A bright ellipse with a dark 'ventricle' on black: enough structure to train on."""
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    radius_y, radius_x = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
    brain = (rows / radius_y) ** 2 + (cols / radius_x) ** 2 < 1
    ventricle = (rows / 0.12) ** 2 + (cols / 0.06) ** 2 < 1
    return (brain * rng.uniform(150, 250) * ~ventricle).astype(np.uint8)


def write_split_folders(root, sizes=SPLIT_SIZES, image_size=TINY_SIZE, seed=0):
    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for case in range(count):
            image = Image.fromarray(brain_like_image(rng, image_size))
            image.save(folder / f"case_{case:03d}_slice_0.nii.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return write_split_folders(tmp_path / "data")
