"""Build the bundled demo slices: many synthetic brains made from the ICBM 2009 template in nilearn.

The template (the nonlinear symmetric average of 152 adult T1 MRIs, with its grey- and
white-matter probability maps) is cut into axial slices laid out like the OASIS
keras_png_slices data: keras_png_slices_{train,validate,test}/case_NNN_slice_S.nii.png,
256x256 8-bit grayscale, skull-stripped on black, nose up. Every case belongs to exactly one
split, so validation and test anatomies are never seen in training. Nothing is downloaded: the
volumes come from the installed nilearn wheel (no package on PyPI ships several real people's
whole-brain T1 scans). The output is deterministic for a given SEED.

Each case is a different brain, not a re-posed copy of the template:

- Anatomy. A smooth random non-linear deformation at two scales, with per-axis head-shape
  changes. After an affine (Talairach) normalisation the same sulcus still lies several
  millimetres to about a centimetre apart in different adults (Thompson et al. 1996), which
  is why the registration methods compared by Klein et al. (2009) all start from an affine
  step and go on non-linearly; the fields here move tissue by a few millimetres RMS, up to
  about a centimetre.
- Age and dementia. Each case has an age drawn across the OASIS range, 18 to 96 (Marcus et
  al. 2007), and over 60 half of them dementia, so about a quarter of all cases as in OASIS.
  Atrophy grows with age along a linear plus quadratic curve, as whole-brain volume declines
  in the OASIS sample (Fotenos et al. 2005), and dementia adds more, which puts a few cases
  at the far end. Atrophy shows as (i) ventricles pushed wider into the surrounding white
  matter, several-fold in volume at the oldest ages (about 20% more per decade in mid-life,
  then faster: Kaye et al. 1992), and (ii) sulci widened by removing the tissue next to the
  CSF, so that tissue is lost at the old end by about the share that normalised whole-brain
  volume falls across OASIS (about 0.87 to 0.7: Fotenos et al. 2005).
- Scan. Grey/white contrast, gamma, gain, bias field, noise and slice thickness (an axial
  average over the slab) differ per case, as between scanners and protocols; so do head tilt,
  size and position.

References:
  Thompson PM, Schwartz C, Lin RT, Khan AA, Toga AW. Three-dimensional statistical analysis of
  sulcal variability in the human brain. J Neurosci 1996;16(13):4261-4274.
  Klein A, et al. Evaluation of 14 nonlinear deformation algorithms applied to human brain MRI
  registration. NeuroImage 2009;46(3):786-802.
  Marcus DS, et al. Open Access Series of Imaging Studies (OASIS): cross-sectional MRI data in
  young, middle aged, nondemented, and demented older adults. J Cogn Neurosci 2007;19:1498-1507.
  Fotenos AF, Snyder AZ, Girton LE, Morris JC, Buckner RL. Normative estimates of
  cross-sectional and longitudinal brain volume decline in aging and AD. Neurology
  2005;64(6):1032-1039.
  Kaye JA, DeCarli C, Luxenberg JS, Rapoport SI. The significance of age-related enlargement
  of the cerebral ventricles in healthy men and women measured by quantitative computed X-ray
  tomography. J Am Geriatr Soc 1992;40(3):225-231.

The template's licence asks for its copyright notice in all copies: it is in NOTICE next to
this script, and goes wherever these images go.

This script's dependencies are not requirements of the project; install them with

    pip install nilearn nibabel scipy numpy Pillow matplotlib

and run it from the repository root:

    python demo_data/make_demo_data.py [--out FOLDER] [--compare OLD_FOLDER]

It prints how varied the cases are (next to another set, e.g. the one-template set of an
older commit, with --compare) and draws some cases at three heights into cases.png. The
measurements need only numpy, scipy and Pillow, so the tests import them without nilearn.
"""

import argparse
import re
import time
from pathlib import Path

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
SLICE_NAME = re.compile(r"case_(\d+)_slice_(\d+)\.nii\.png")

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
CROP_MARGIN = 8  # voxels kept around the brain; deformations never reach further out

# Tissue and CSF inside the brain mask. Sulcal CSF reaches the brain's surface; the ventricles
# are the CSF that stays deeper than this (mm; the template's 1 mm voxels are the unit
# throughout).
TISSUE_PROBABILITY = 0.5
VENTRICLE_MIN_DEPTH = 10.0

# Framing: the brain's front-to-back length fills this share of the image height, as in the
# middle OASIS slices (roughly 70-85%).
BRAIN_LENGTH_FRACTION = 0.78

# T1 intensities: these percentiles of the in-brain values (ventricular CSF and the brightest
# white matter) are mapped to DARK_LEVEL and 1, so grey matter lands mid-grey.
DARK_PERCENTILE = 1.0
BRIGHT_PERCENTILE = 99.5
DARK_LEVEL = 0.08  # CSF is dark but, as in a scan, not quite the black of the background

# Anatomy: a smooth random displacement at each (knot spacing, RMS displacement per axis) in mm.
# The coarse field moves lobes, the fine one bends gyri; both stay far from folding.
DEFORMATION_SCALES = ((24.0, 2.5), (10.0, 0.8))
MAX_SHAPE_CHANGE = 0.05  # head shape: each axis of the brain stretched by up to this share
FIELD_STEP = 4  # pixels between the points where the smooth fields are evaluated
# Pixels this far outside the warped brain are still sampled: the ventricles' push and the slab
# move the outline by less.
NEAR_MARGIN = 4

# Age and atrophy. Atrophy is 0 at the youngest age and 1 at the oldest without dementia.
AGE_RANGE = (18.0, 96.0)  # the OASIS cross-sectional range
DEMENTIA_MIN_AGE = 60.0
DEMENTIA_SHARE = 0.5  # of the cases over DEMENTIA_MIN_AGE: about a quarter of all, as in OASIS
DEMENTIA_ATROPHY = 0.35  # what dementia adds; the far end is then 1 + this
# Ventricle walls move out by this many mm at atrophy 1; the push fades to nothing this far
# (mm) into the tissue, well short of the cortex.
VENTRICLE_GROWTH = 6.0
VENTRICLE_PUSH_REACH = 15.0
# The septum between the lateral ventricles is a voxel thick; the push loses its left-right
# part within this many mm of the midline so that the septum stays.
SEPTUM_HALF_WIDTH = 1.5
# Tissue within this many mm of the CSF is lost at atrophy 1, widening the sulci.
SULCAL_WIDENING = 1.0

# Scan: per-case contrast, shading, noise and slice thickness.
MAX_ROTATION_DEGREES = 5.0  # head tilt in the scanner
MAX_SCALE_CHANGE = 0.08  # head size differs by about this much between adults
MAX_SHIFT_PIXELS = 6  # head position in the field of view
GREY_WHITE_CONTRAST = 0.08  # white matter brightened (grey darkened) by up to this, or reversed
GAMMA_RANGE = (0.8, 1.25)  # contrast differences between scanners and sequences
GAIN_RANGE = (0.88, 1.0)  # brightness; at most 1, as the bias field already clips some WM
BIAS_AMPLITUDE_RANGE = (0.04, 0.15)  # coil inhomogeneity: a smooth multiplicative field
BIAS_GRID = 4  # knots per axis of the bias field's spline; few knots keep it smooth
NOISE_SIGMA_RANGE = (1.0, 3.0)  # scanner noise in gray levels; more would bloat the PNGs
THICKNESS_RANGE = (1.0, 3.0)  # slice thickness in mm, from isotropic to thick clinical slices
SLAB_STEP = 1.0  # mm between the heights sampled across the slab and averaged

# cases.png: cases in order of atrophy, at the three slices.
FIGURE_CASES = 6
FIGURE_SLICES = (2, 4, 6)

# Measurements of the variation, on the 8-bit slices.
# Ventricles: pixels darker than this share of the brain's bright (90th percentile) level ...
VENTRICLE_DARKNESS = 0.3
BRIGHT_REFERENCE_PERCENTILE = 90
# ... within this many standard deviations of the brain's centre along its principal axes,
# which takes in the lateral ventricles and leaves out the Sylvian fissures and the cortex.
VENTRICLE_REGION = 1.0
MID_SLICES = (3, 4)  # the ventricle bodies lie in these two height bands


def template_path(kind):
    import nilearn  # only the generator needs it, not the measurements
    return Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE.format(kind)


def load_volume(kind):
    """One template volume as float32, voxel (i, j, k) pointing right, anterior, superior."""
    import nibabel
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


def brain_crop(mask):
    """The index ranges of the brain's bounding box with CROP_MARGIN around it."""
    low = np.argwhere(mask).min(axis=0) - CROP_MARGIN
    high = np.argwhere(mask).max(axis=0) + CROP_MARGIN + 1
    return tuple(slice(max(a, 0), b) for a, b in zip(low, high))


def slice_range(mask):
    """First and last axial index where the brain covers MIN_AREA_FRACTION of its widest slice."""
    area = mask.sum(axis=(0, 1))
    wide = np.flatnonzero(area >= MIN_AREA_FRACTION * area.max())
    return wide[0], wide[-1]


def brain_framing(mask, image_size):
    """Centre of the brain (voxel i, j) and the voxels per pixel giving BRAIN_LENGTH_FRACTION."""
    i, j, _ = np.nonzero(mask)
    centre = np.array([(i.min() + i.max()) / 2, (j.min() + j.max()) / 2])
    length = j.max() - j.min() + 1
    return centre, length / (BRAIN_LENGTH_FRACTION * image_size)


def ventricles(mask, tissue):
    """The largest CSF space inside the brain that stays VENTRICLE_MIN_DEPTH from its surface."""
    labels, count = ndimage.label(mask & ~tissue)
    index = np.arange(1, count + 1)
    depth = ndimage.minimum(ndimage.distance_transform_edt(mask), labels, index)
    sizes = ndimage.sum(np.ones_like(labels), labels, index)
    deep = index[np.asarray(depth) > VENTRICLE_MIN_DEPTH]
    return labels == deep[np.argmax(np.asarray(sizes)[deep - 1])]


def ventricle_push(ventricle, midline):
    """Backward displacement per mm of growth (3, ...) and the distance to the ventricles.

    Tissue at distance d from the ventricles is sampled from (1 - d / reach)^2 mm nearer to
    them, so the walls move out and the white matter around them is squeezed and lost, while
    tissue beyond the reach, and the brain's outline, stay. The map d -> d - g (1 - d/reach)^2
    has a positive slope for every growth g, so it never folds.
    """
    distance, nearest = ndimage.distance_transform_edt(~ventricle, return_indices=True)
    grid = np.indices(ventricle.shape, dtype=np.float32)
    outward = (grid - nearest) / np.maximum(distance, 1)  # unit vector away from the ventricles
    fade = np.clip(1 - distance / VENTRICLE_PUSH_REACH, 0, 1) ** 2
    outward[0] *= np.clip(np.abs(grid[0] - midline) / SEPTUM_HALF_WIDTH, 0, 1)
    return (outward * fade).astype(np.float32), distance.astype(np.float32)


def ventricle_source(points, growth, template):
    """Where the case's points (3, n) are in the template once the ventricles are widened.

    A point the walls moved past is read at the nearest wall, not beyond it: a push longer
    than the distance would cross a thin horn and bring back the tissue on its far side.
    """
    push = np.stack([ndimage.map_coordinates(p, points, order=1) for p in template["push"]])
    distance = ndimage.map_coordinates(template["ventricle_distance"], points, order=1)
    length = np.linalg.norm(push, axis=0)
    shift = np.minimum(growth * length, distance) / np.maximum(length, np.finfo(np.float32).eps)
    return points - shift * push


def load_template(image_size):
    """Everything a slice is sampled from, cropped to the brain, and its framing and heights."""
    t1, gm, wm = (load_volume(kind) for kind in ("t1", "gm", "wm"))
    mask = brain_mask(gm, wm)
    # The symmetric template's midline is its middle column.
    midline = (mask.shape[0] - 1) / 2
    crop = brain_crop(mask)
    t1, gm, wm, mask = t1[crop], gm[crop], wm[crop], mask[crop]
    midline -= crop[0].start
    tissue = mask & ((gm + wm) / PROBABILITY_SCALE > TISSUE_PROBABILITY)
    low, high = slice_range(mask)
    return {
        # Cubic interpolation needs spline coefficients; computing them once saves it per slice.
        "t1": ndimage.spline_filter(normalised_t1(t1, mask), order=3),
        "grey_white": np.where(mask, (wm - gm) / PROBABILITY_SCALE, 0).astype(np.float32),
        "mask": mask.astype(np.float32),
        # Distance of tissue from the nearest CSF (or outside), 1 for the outermost voxels.
        "depth": ndimage.distance_transform_edt(tissue).astype(np.float32),
        **dict(zip(("push", "ventricle_distance"),
                   ventricle_push(ventricles(mask, tissue), midline))),
        "framing": brain_framing(mask, image_size),
        "heights": (low, high),
        "centre": (np.array(mask.shape) - 1) / 2,
    }


def random_field(rng, shape, spacing, rms):
    """Spline coefficients of a smooth displacement (3 axes) with knots `spacing` mm apart.

    The coefficients interpolate random values at the knots, so the displacement there has
    the given RMS per axis, and about that in between.
    """
    knots = tuple(int(np.ceil(size / spacing)) + 1 for size in shape)
    values = rng.normal(0, rms, size=(3, *knots))
    return [ndimage.spline_filter(axis, order=3) for axis in values]


def case_ages(rng, count):
    """Ages spread over AGE_RANGE (one in each of `count` equal bands, in random order)."""
    bands = np.linspace(*AGE_RANGE, count + 1)
    return rng.permutation(rng.uniform(bands[:-1], bands[1:]))


def atrophy(age, demented):
    """0 at the youngest age, 1 at the oldest, along a linear plus quadratic decline."""
    x = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    return (x + x * x) / 2 + DEMENTIA_ATROPHY * demented


def random_case(rng, age, template):
    """The random anatomy, pose, scan and slice heights of one case."""
    shape = template["mask"].shape
    demented = bool(age >= DEMENTIA_MIN_AGE and rng.uniform() < DEMENTIA_SHARE)
    severity = atrophy(age, demented)
    low, high = template["heights"]
    # One slice in each of SLICES_PER_CASE equal bands, so every case spans the brain's height.
    bands = np.linspace(low, high, SLICES_PER_CASE + 1)
    return {
        "age": age,
        "demented": demented,
        "atrophy": severity,
        "fields": [(spacing, random_field(rng, shape, spacing, rms))
                   for spacing, rms in DEFORMATION_SCALES],
        "shape": 1 + rng.uniform(-MAX_SHAPE_CHANGE, MAX_SHAPE_CHANGE, size=3),
        "ventricle_growth": VENTRICLE_GROWTH * severity,
        "sulcal_widening": SULCAL_WIDENING * severity,
        "rotation": np.deg2rad(rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)),
        "scale": 1 + rng.uniform(-MAX_SCALE_CHANGE, MAX_SCALE_CHANGE),
        "shift": rng.uniform(-MAX_SHIFT_PIXELS, MAX_SHIFT_PIXELS, size=2),
        "grey_white": rng.uniform(-GREY_WHITE_CONTRAST, GREY_WHITE_CONTRAST),
        "gamma": np.exp(rng.uniform(*np.log(GAMMA_RANGE))),
        "gain": rng.uniform(*GAIN_RANGE),
        "bias_knots": (rng.uniform(-1, 1, size=(BIAS_GRID,) * 3)
                       * rng.uniform(*BIAS_AMPLITUDE_RANGE)),
        "noise": rng.uniform(*NOISE_SIGMA_RANGE),
        "thickness": rng.uniform(*THICKNESS_RANGE),
        "heights": rng.uniform(bands[:-1], bands[1:]),
    }


def slice_coordinates(case, height, framing, image_size):
    """Case-space voxel coordinates (3, size, size) sampled by the pixels.

    Anterior is up and the patient's left on the left (the template is symmetric, so the
    left-right convention hardly shows).
    """
    centre, voxels_per_pixel = framing
    pixel = np.arange(image_size) - (image_size - 1) / 2
    rows, columns = np.meshgrid(pixel - case["shift"][0], pixel - case["shift"][1], indexing="ij")
    cos, sin = np.cos(case["rotation"]), np.sin(case["rotation"])
    step = voxels_per_pixel / case["scale"]
    right = step * (cos * columns - sin * rows)
    anterior = -step * (sin * columns + cos * rows)  # image rows run downwards, i.e. backwards
    return np.stack([centre[0] + right, centre[1] + anterior, np.full_like(right, height)])


def upsampled(coarse, size):
    """A smooth field evaluated every FIELD_STEP pixels (C, n, n), at each pixel (C, size, size)."""
    fine = np.mgrid[:size, :size] / FIELD_STEP
    return np.stack([ndimage.map_coordinates(c, fine, order=1, mode="nearest") for c in coarse])


def anatomy_displacement(case, points, template):
    """Backward displacement (3, n, n) of the random anatomy at the case's points (3, n, n)."""
    centre = template["centre"][:, None, None]
    displacement = (points - centre) / case["shape"][:, None, None] + centre - points
    for spacing, coefficients in case["fields"]:
        knots = points / spacing
        displacement += np.stack([ndimage.map_coordinates(c, knots, order=3, prefilter=False)
                                  for c in coefficients])
    return displacement


def bias_field(case, points, shape):
    """The case's smooth multiplicative field (1, n, n) at the case's points (3, n, n)."""
    knot_per_voxel = (BIAS_GRID - 1) / (np.array(shape) - 1)
    knots = points * knot_per_voxel[:, None, None]
    return 1 + ndimage.map_coordinates(case["bias_knots"], knots, order=3, mode="nearest")[None]


def render_slice(rng, case, height, template, image_size):
    """One 8-bit slice of the case at the given axial height."""
    shape = template["mask"].shape
    points = slice_coordinates(case, height, template["framing"], image_size)
    # The anatomy and the bias field are smooth: evaluated every FIELD_STEP pixels.
    coarse = points[:, ::FIELD_STEP, ::FIELD_STEP]
    warped = points + upsampled(anatomy_displacement(case, coarse, template), image_size)
    bias = upsampled(bias_field(case, coarse, shape), image_size)[0]
    # Only pixels near the brain are sampled further.
    near = ndimage.binary_dilation(
        ndimage.map_coordinates(template["mask"], warped, order=1) > 0, iterations=NEAR_MARGIN)
    warped = warped[:, near]
    source = ventricle_source(warped, case["ventricle_growth"], template)
    shaded, inside = 0, 0
    # Through-plane blur: the slab of the case's thickness, sampled about every SLAB_STEP mm.
    heights = int(np.ceil(case["thickness"] / SLAB_STEP))
    for offset in (np.arange(heights) + 0.5) / heights - 0.5:
        at = source + np.array([0, 0, offset * case["thickness"]])[:, None]
        t1 = ndimage.map_coordinates(template["t1"], at, order=3, prefilter=False)
        grey_white = ndimage.map_coordinates(template["grey_white"], at, order=1)
        depth = ndimage.map_coordinates(template["depth"], at, order=1)
        inside = inside + ndimage.map_coordinates(template["mask"], at, order=1)
        intensity = np.clip(t1 + case["grey_white"] * grey_white, 0, 1)
        # Atrophy: tissue within the widening of the CSF (depth 1 is the outermost voxel) is lost.
        lost = np.clip(case["sulcal_widening"] - np.maximum(depth - 1, 0), 0, 1)
        intensity = intensity - (intensity - DARK_LEVEL) * lost
        shaded = shaded + np.clip(intensity, 0, 1) ** case["gamma"] / heights
    pixels = np.zeros((image_size, image_size))
    pixels[near] = shaded * case["gain"] * bias[near] * GRAY_MAX
    noisy = pixels + rng.normal(0, case["noise"], pixels.shape)
    # A pixel is brain when most of its slab is.
    brain = np.zeros_like(near)
    brain[near] = inside / heights > 0.5
    return np.where(brain, np.clip(np.rint(noisy), 0, GRAY_MAX), 0).astype(np.uint8)


def clear_split(folder):
    """Remove the slices of a previous run so that a smaller rerun does not leave stale ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("case_*_slice_*.nii.png"):
        old.unlink()


def write_splits(out, template, split_cases=SPLIT_CASES, image_size=IMAGE_SIZE):
    """Render every case into its split's folder; returns {case number: case}."""
    rng = np.random.default_rng(SEED)
    cases = {}
    for split, count in split_cases.items():
        folder = out / split
        clear_split(folder)
        # Each split spans the ages, so validation and test see young and old brains too.
        for age in case_ages(rng, count):
            number = len(cases) + 1
            case = cases[number] = random_case(rng, age, template)
            for index, height in enumerate(case["heights"]):
                pixels = render_slice(rng, case, height, template, image_size)
                name = f"case_{number:03d}_slice_{index}.nii.png"
                Image.fromarray(pixels).save(folder / name, optimize=True)
        print(f"{split}: {count * SLICES_PER_CASE} images")
    return cases


# How varied the cases are.

def read_cases(root):
    """{case number: (SLICES_PER_CASE, H, W) float32 image stack} from the split folders."""
    slices = {}
    for path in sorted(Path(root).glob("keras_png_slices_*/case_*_slice_*.nii.png")):
        case, index = map(int, SLICE_NAME.fullmatch(path.name).groups())
        slices.setdefault(case, {})[index] = np.asarray(Image.open(path), dtype=np.float32)
    return {case: np.stack([by_index[i] for i in sorted(by_index)])
            for case, by_index in slices.items()}


def split_case_numbers(root):
    """{split folder name: set of case numbers in it}."""
    return {folder.name: {int(SLICE_NAME.fullmatch(p.name).group(1))
                          for p in folder.glob("case_*_slice_*.nii.png")}
            for folder in sorted(Path(root).glob("keras_png_slices_*"))}


def brain_region(image):
    return ndimage.binary_fill_holes(image > 0)


def principal_axes(region):
    """Centre (row, column), standard deviations and axes (columns) of a region's pixels."""
    points = np.argwhere(region).astype(np.float64)
    centre = points.mean(axis=0)
    variances, axes = np.linalg.eigh(np.cov((points - centre).T))
    return centre, np.sqrt(variances), axes


def ventricle_area(image):
    """Dark pixels in the middle of the brain, in pixels."""
    region = brain_region(image)
    centre, spread, axes = principal_axes(region)
    offsets = np.moveaxis(np.indices(image.shape), 0, -1) - centre
    radius = np.sum((offsets @ axes / spread) ** 2, axis=-1)  # in units of the spreads
    bright = np.percentile(image[region], BRIGHT_REFERENCE_PERCENTILE)
    dark = ndimage.median_filter(image, size=3) < VENTRICLE_DARKNESS * bright
    return int(np.sum(region & dark & (radius < VENTRICLE_REGION ** 2)))


def mid_ventricle_share(stack):
    """The largest ventricle area, as a share of the brain's, among the MID_SLICES."""
    return max(ventricle_area(stack[i]) / brain_region(stack[i]).sum() for i in MID_SLICES)


def undo_pose(image, area):
    """The image moved so that the brain's centre is the image centre, its long axis (the one
    nearer to vertical) is vertical and its area is `area`: head position, tilt and size undone."""
    region = brain_region(image)
    centre, _, axes = principal_axes(region)
    vertical = axes[:, np.argmax(np.abs(axes[0]))]
    vertical = vertical * np.sign(vertical[0])
    rotation = np.array([[vertical[0], -vertical[1]], [vertical[1], vertical[0]]])
    zoom = np.sqrt(region.sum() / area)
    middle = (np.array(image.shape) - 1) / 2
    # output pixel x is read from input centre + zoom * rotation @ (x - middle)
    matrix = zoom * rotation
    return ndimage.affine_transform(image, matrix, offset=centre - matrix @ middle, order=1)


def aligned_similarity(images):
    """Median over pairs of brain-mask IoU and of intensity correlation inside both brains,
    after undoing each image's pose; `images` are the cases' slices at one height."""
    area = np.median([brain_region(image).sum() for image in images])
    aligned = np.stack([undo_pose(image, area) for image in images])
    regions = aligned > 0
    # Per pair sums over the pixels in both brains, as products of (cases, pixels) matrices.
    inside = regions.reshape(len(images), -1).astype(np.float64)
    values = aligned.reshape(len(images), -1) * inside
    count = inside @ inside.T
    iou = count / (inside.sum(axis=1)[:, None] + inside.sum(axis=1)[None, :] - count)
    mean = values @ inside.T / count  # [a, b]: mean of a over both brains
    square = values ** 2 @ inside.T / count
    covariance = values @ values.T / count - mean * mean.T
    correlation = covariance / np.sqrt((square - mean ** 2) * (square - mean ** 2).T)
    pairs = np.triu_indices(len(images), 1)
    return float(np.median(iou[pairs])), float(np.median(correlation[pairs]))


def variation(root):
    """Per height: brain and ventricle areas across cases and the aligned same-height
    similarity; and the mid-height ventricle share per case."""
    stacks = list(read_cases(root).values())
    rows = []
    for index in range(SLICES_PER_CASE):
        images = [stack[index] for stack in stacks]
        brain = np.array([brain_region(image).sum() for image in images])
        ventricle = np.array([ventricle_area(image) for image in images])
        iou, correlation = aligned_similarity(images)
        rows.append({"brain": brain, "ventricle": ventricle, "iou": iou,
                     "correlation": correlation})
    shares = np.array([mid_ventricle_share(stack) for stack in stacks])
    return rows, shares


def spread(values):
    """mean sd max/min of positive values; max/min is inf when the smallest is 0."""
    ratio = values.max() / values.min() if values.min() > 0 else np.inf
    return f"{values.mean():7.0f} {values.std():6.0f} {ratio:6.2f}"


def variation_table(sets):
    """The variation of each named set of cases {name: root folder}, one block per set."""
    lines = []
    for name, root in sets.items():
        rows, shares = variation(root)
        lines.append(f"{name} ({root}): {len(shares)} cases")
        lines.append("slice   brain area (px)        ventricle area (px)    aligned same-height")
        lines.append("        mean     sd max/min     mean     sd max/min     "
                     "mask IoU  correlation")
        for index, row in enumerate(rows):
            lines.append(f"{index:5d} {spread(row['brain'])}  {spread(row['ventricle'])}"
                         f"      {row['iou']:.3f}        {row['correlation']:.3f}")
        lines.append(f"mid-height ventricle share (largest of slices {MID_SLICES}): "
                     f"{shares.min():.3f} to {shares.max():.3f}, "
                     f"max/min {shares.max() / shares.min():.2f}")
        lines.append("")
    return "\n".join(lines)


def cases_figure(root, cases, path):
    """FIGURE_CASES cases from the least to the most atrophied at FIGURE_SLICES, one per column."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    stacks = read_cases(root)
    order = sorted(cases, key=lambda number: cases[number]["atrophy"])
    chosen = [order[i] for i in np.linspace(0, len(order) - 1, FIGURE_CASES).round().astype(int)]
    figure, grid = plt.subplots(len(FIGURE_SLICES), FIGURE_CASES,
                                figsize=(2 * FIGURE_CASES, 2 * len(FIGURE_SLICES) + 0.4))
    for column, number in enumerate(chosen):
        case = cases[number]
        title = f"case {number}, age {case['age']:.0f}" + (", dementia" if case["demented"] else "")
        grid[0, column].set_title(title, fontsize=8)
        for row, index in enumerate(FIGURE_SLICES):
            grid[row, column].imshow(stacks[number][index], cmap="gray", vmin=0, vmax=GRAY_MAX)
            grid[row, column].set_xticks([])
            grid[row, column].set_yticks([])
        for row, index in enumerate(FIGURE_SLICES):
            grid[row, 0].set_ylabel(f"slice {index}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=here,
                        help="folder to write the three split folders into (default: %(default)s)")
    parser.add_argument("--compare", type=Path, default=None,
                        help="a folder of split folders to print the variation of next to the "
                             "new set's, e.g. an older commit's demo_data (default: none)")
    parser.add_argument("--figure", type=Path, default=here / "cases.png",
                        help="where to draw some cases at three heights (default: %(default)s)")
    args = parser.parse_args()
    start = time.perf_counter()
    template = load_template(IMAGE_SIZE)
    cases = write_splits(args.out, template)
    print(f"generated in {time.perf_counter() - start:.0f} s")
    cases_figure(args.out, cases, args.figure)
    sets = {"new": args.out} if args.compare is None else {"old": args.compare, "new": args.out}
    print(variation_table(sets))


if __name__ == "__main__":
    main()
