"""Build the bundled demo slices from the ICBM 2009 brain template that ships inside nilearn.

The template (the nonlinear symmetric average of 152 adult T1 MRIs, with its grey- and
white-matter probability maps) is cut into axial slices laid out like the OASIS
keras_png_slices data: keras_png_slices_{train,validate,test}/case_NNN_slice_S.nii.png,
256x256 8-bit grayscale, skull-stripped on black, nose up. Each "case" is one randomly varied
copy of the template (rotation, scale, shift, gamma, gain, bias field, noise); every case
belongs to exactly one split. Nothing is downloaded: the volumes come from the installed
nilearn wheel. The output is deterministic for a given SEED.

The template's licence asks for its copyright notice in all copies: it is in NOTICE next to
this script, and goes wherever these images go.

This script's dependencies are not requirements of the project; install them with

    pip install nilearn nibabel scipy numpy Pillow

and run it from the repository root:

    python demo_data/make_demo_data.py [--out FOLDER]
"""

import argparse
from pathlib import Path

import nibabel
import nilearn
import numpy as np
from PIL import Image
from scipy import ndimage

SEED = 2009  # fixed so that a rerun reproduces the same images byte for byte
TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # {} is t1, gm or wm

# Split folder -> number of cases; 8 slices a case gives 384 / 64 / 64 images.
SPLIT_CASES = {
    "keras_png_slices_train": 48,
    "keras_png_slices_validate": 8,
    "keras_png_slices_test": 8,
}
SLICES_PER_CASE = 8
IMAGE_SIZE = 256  # OASIS keras_png slices are 256x256
GRAY_MAX = 255
PROBABILITY_SCALE = 255  # the converted probability maps store 0-1 as 0-255

# Brain mask. gm+wm probability above this is brain; 0.3-0.5 give the same outline to about a
# voxel, and lower values start to take in the CSF between the gyri.
BRAIN_PROBABILITY = 0.4
# A closing this wide (in voxels) seals the narrow CSF channels into the ventricles so that
# filling holes keeps them inside the brain, where they show dark as in T1.
CLOSING_RADIUS = 3
# The slices used run from where the brain's axial area first reaches this share of its largest
# area (cerebellum and temporal lobes) to where it last does (top of the cortex); below it
# only the brainstem is left.
MIN_AREA_FRACTION = 0.2

# Framing: the brain's front-to-back length fills this share of the image height, as in the
# middle OASIS slices (roughly 70-85%).
BRAIN_LENGTH_FRACTION = 0.78

# T1 intensities: these percentiles of the in-brain values (ventricular CSF and the brightest
# white matter) are mapped to DARK_LEVEL and 1, so grey matter lands mid-grey.
DARK_PERCENTILE = 1.0
BRIGHT_PERCENTILE = 99.5
DARK_LEVEL = 0.08  # CSF is dark but, as in a scan, not quite the black of the background

# Per-case variation, mild enough to stay a plausible scan of the same kind.
MAX_ROTATION_DEGREES = 5.0  # head tilt in the scanner
MAX_SCALE_CHANGE = 0.08  # head size differs by about this much between adults
MAX_SHIFT_PIXELS = 6  # head position in the field of view
GAMMA_RANGE = (0.8, 1.25)  # contrast differences between scanners and sequences
GAIN_RANGE = (0.88, 1.0)  # brightness; at most 1, as the bias field already clips some WM
BIAS_AMPLITUDE = 0.12  # coil inhomogeneity: a smooth +-12% multiplicative field
BIAS_GRID = 4  # knots per axis of the bias field's spline; few knots keep it smooth
NOISE_SIGMA = 2.0  # slight scanner noise, in gray levels; more would bloat the PNGs


def template_path(kind):
    return Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE.format(kind)


def load_volume(kind):
    """One template volume as float32, voxel (i, j, k) pointing right, anterior, superior."""
    image = nibabel.as_closest_canonical(nibabel.load(template_path(kind)))
    return np.asarray(image.dataobj, dtype=np.float32)


def largest_component(mask):
    labels, _ = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + np.argmax(sizes)


def brain_mask(gm, wm):
    """Brain tissue plus the CSF it encloses (ventricles), without anything outside it."""
    probability = (gm + wm) / PROBABILITY_SCALE
    tissue = largest_component(probability > BRAIN_PROBABILITY)
    ball = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), CLOSING_RADIUS)
    closed = ndimage.binary_fill_holes(ndimage.binary_closing(tissue, ball))
    # Some CSF spaces open to the outside in 3D but are enclosed in every axial slice.
    for k in range(closed.shape[2]):
        closed[:, :, k] = ndimage.binary_fill_holes(closed[:, :, k])
    return closed


def normalised_t1(t1, mask):
    """T1 rescaled so CSF is DARK_LEVEL and the brightest white matter 1, zero outside the brain."""
    dark, bright = np.percentile(t1[mask], [DARK_PERCENTILE, BRIGHT_PERCENTILE])
    scaled = DARK_LEVEL + (1 - DARK_LEVEL) * (t1 - dark) / (bright - dark)
    return np.where(mask, np.clip(scaled, 0, 1), 0).astype(np.float32)


def slice_range(mask):
    """First and last axial index where the brain covers MIN_AREA_FRACTION of its widest slice."""
    area = mask.sum(axis=(0, 1))
    wide = np.flatnonzero(area >= MIN_AREA_FRACTION * area.max())
    return wide[0], wide[-1]


def brain_framing(mask):
    """Centre of the brain (voxel i, j) and the voxels per pixel giving BRAIN_LENGTH_FRACTION."""
    i, j, _ = np.nonzero(mask)
    centre = np.array([(i.min() + i.max()) / 2, (j.min() + j.max()) / 2])
    length = j.max() - j.min() + 1
    return centre, length / (BRAIN_LENGTH_FRACTION * IMAGE_SIZE)


def random_case(rng, low, high):
    """The random pose, contrast and slice heights of one case."""
    # One slice in each of SLICES_PER_CASE equal bands, so every case spans the brain's height.
    bands = np.linspace(low, high, SLICES_PER_CASE + 1)
    return {
        "rotation": np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)),
        "scale": 1 + rng.uniform(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE),
        "shift": rng.uniform(-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS, size=2),
        "gamma": np.exp(rng.uniform(*np.log(GAMMA_RANGE))),
        "gain": rng.uniform(*GAIN_RANGE),
        "bias_knots": rng.uniform(-BIAS_AMPLITUDE, BIAS_AMPLITUDE, size=(BIAS_GRID,) * 3),
        "heights": rng.uniform(bands[:-1], bands[1:]),
    }


def slice_coordinates(case, height, centre, voxels_per_pixel):
    """Voxel coordinates (3, size, size) sampled by the pixels.

    Anterior is up and the patient's left on the left (the template is symmetric, so the
    left-right convention hardly shows).
    """
    pixel = np.arange(IMAGE_SIZE) - (IMAGE_SIZE - 1) / 2
    rows, columns = np.meshgrid(pixel - case["shift"][0], pixel - case["shift"][1], indexing="ij")
    cos, sin = np.cos(case["rotation"]), np.sin(case["rotation"])
    step = voxels_per_pixel / case["scale"]
    right = step * (cos * columns - sin * rows)
    anterior = -step * (sin * columns + cos * rows)  # image rows run downwards, i.e. backwards
    return np.stack([centre[0] + right, centre[1] + anterior, np.full_like(right, height)])


def bias_field(case, coordinates, shape):
    """The case's smooth multiplicative field at the sampled voxels."""
    knot_per_voxel = (BIAS_GRID - 1) / (np.array(shape) - 1)
    knots = coordinates * knot_per_voxel[:, None, None]
    return 1 + ndimage.map_coordinates(case["bias_knots"], knots, order=3, mode="nearest")


def render_slice(rng, case, height, volumes, framing):
    """One 8-bit slice of the case at the given axial height."""
    t1_coefficients, mask = volumes
    coordinates = slice_coordinates(case, height, *framing)
    t1 = ndimage.map_coordinates(t1_coefficients, coordinates, order=3, prefilter=False)
    # A pixel is brain when most of it is: the interpolated mask is over one half.
    inside = ndimage.map_coordinates(mask, coordinates, order=1) > 0.5
    contrast = np.clip(t1, 0, 1) ** case["gamma"] * case["gain"]
    shaded = contrast * bias_field(case, coordinates, mask.shape) * GRAY_MAX
    noisy = shaded + rng.normal(0, NOISE_SIGMA, shaded.shape)
    return np.where(inside, np.clip(np.rint(noisy), 0, GRAY_MAX), 0).astype(np.uint8)


def clear_split(folder):
    """Remove the slices of a previous run so that a smaller rerun does not leave stale ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("case_*_slice_*.nii.png"):
        old.unlink()


def write_splits(out, volumes, framing, low, high):
    rng = np.random.default_rng(SEED)
    case_number = 0
    for split, cases in SPLIT_CASES.items():
        folder = out / split
        clear_split(folder)
        for _ in range(cases):
            case_number += 1
            case = random_case(rng, low, high)
            for index, height in enumerate(case["heights"]):
                pixels = render_slice(rng, case, height, volumes, framing)
                name = f"case_{case_number:03d}_slice_{index}.nii.png"
                Image.fromarray(pixels).save(folder / name, optimize=True)
        print(f"{split}: {cases * SLICES_PER_CASE} images")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write the three split folders into (default: %(default)s)")
    out = parser.parse_args().out
    t1, gm, wm = (load_volume(kind) for kind in ("t1", "gm", "wm"))
    mask = brain_mask(gm, wm)
    # Cubic interpolation needs spline coefficients; computing them once saves it per slice.
    t1_coefficients = ndimage.spline_filter(normalised_t1(t1, mask), order=3)
    volumes = (t1_coefficients, mask.astype(np.float32))
    write_splits(out, volumes, brain_framing(mask), *slice_range(mask))


if __name__ == "__main__":
    main()
