"""The slices: the three split folders in the OASIS layout, read once into cached datasets, and
the datasets the two models train on (scaled image batches; code maps, with each slice's height).

    keras_png_slices_{train,validate,test}/case_001_slice_17.nii.png   (256x256 grayscale)

Images are read with keras.utils.image_dataset_from_directory, kept as uint8 and scaled in each
batch to pixel / 255 - shift.
"""

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

import evaluation
import vqvae
from runs import QUIET, PipelineError, progress_bar

SPLIT_FOLDERS = {
    "train": "keras_png_slices_train",
    "validate": "keras_png_slices_validate",
    "test": "keras_png_slices_test",
}
# --pcnn-mirror's extra training set: the training slices mirrored left-right
MIRRORED_TRAIN = "train_mirrored"
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
# --demo: the bundled slices with settings that finish on a 2-core CPU in minutes, and a folder
# of its own; a 64x64 image at the paper's downsampling keeps the seed's 16x16 code grid, one
# level of codes as in the paper. The prior's validation loss is lowest near epoch 24 of the demo
# and rises after it, so more prior epochs only cost time (the best epoch's weights are kept).
DEMO_DEFAULTS = dict(data=DEMO_DATA, image_size=64, downsample=vqvae.PAPER_DOWNSAMPLE, levels=1,
                     epochs=40, pcnn_epochs=25, out=Path("resources/demo"))
OASIS_SOURCE = (
    "OASIS slices come as keras_png_slices_data.zip from the OASIS-1 brain MRI project "
    "(oasis-brains.org, via your course page); unzip it and pass the folder holding "
    "keras_png_slices_train, keras_png_slices_validate and keras_png_slices_test with --data"
)
EXPECTED_SIZE = 256  # OASIS slices are 256x256; other sizes are resized with a warning
PIXEL_MAX = 255.0
PREFETCHED_BATCHES = 2  # the next batch is ready when a step ends, one more in the making
NUMPY_BATCH = 256  # images converted to one numpy array at a time
# OASIS and the demo name each slice's axial position: case_001_slice_17.nii.png
SLICE_NAME = re.compile(r"slice_(\d+)")


def split_images(folder):
    """The PNG files of a split folder, sorted; a missing or empty folder is refused."""
    if not folder.is_dir():
        raise PipelineError(f"split folder {folder} is missing; expected the OASIS layout "
                            f"({', '.join(SPLIT_FOLDERS.values())}) under --data")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    if not images:
        raise PipelineError(f"split folder {folder} holds no .png images; "
                            "put the split's slices there")
    return images


def check_split_folder(folder, images, progress):
    """Fail on an unreadable PNG among a split folder's `images`, including one too large to
    decode (Pillow's decompression-bomb limit); warn on images that get converted. `progress`
    (a Progbar) advances by one per image.

    Returns the number of images.
    """
    converted = []
    for path in images:
        try:
            # Up to twice its limit Pillow only warns, then decodes: refuse those too.
            with (warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning),
                  Image.open(path) as image):
                image.load()
                if image.mode != "L" or image.size != (EXPECTED_SIZE, EXPECTED_SIZE):
                    converted.append(f"{path.name} ({image.mode}, {image.size[0]}x{image.size[1]})")
        except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as error:
            raise PipelineError(f"unreadable image {path} ({error}); "
                                "delete or replace it and rerun") from None
        progress.add(1)
    if converted:
        print(f"driver.py: warning: {folder.name}: {len(converted)} image(s) are not "
              f"{EXPECTED_SIZE}x{EXPECTED_SIZE} grayscale and are converted and resized, "
              f"e.g. {converted[0]}", file=sys.stderr)
    return len(images)


def untuned(dataset):
    """The dataset, and every dataset made from it, without tf.data's autotuner. Its thread
    wakes at growing intervals, and an iterator's end waits for the next wake, which made epochs
    take up to twice as long at random. Our pipelines are a cache, a cast and a fixed prefetch,
    with nothing to tune."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def sharded_by_data(dataset):
    """The dataset with each worker of a cluster taking its share of every global batch: the
    in-memory cache has no files to shard by, which the default policy would try first."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def load_split(folder, size):
    """Decode a split once into a cached dataset of uint8 images (N, size, size, 1), and the
    images' file paths in the same order."""
    images = keras.utils.image_dataset_from_directory(
        folder, labels=None, color_mode="grayscale", image_size=(size, size),
        batch_size=None, shuffle=False, verbose=False,
    )
    # uint8 in the cache takes a quarter of float32's memory.
    cached = untuned(images.map(lambda x: tf.cast(tf.round(x), tf.uint8)).cache())
    return cached, images.file_paths


def slice_index(path):
    """The n of a file named like case_001_slice_<n>.nii.png."""
    match = SLICE_NAME.search(Path(path).name)
    if match is None:
        raise PipelineError(f"{path} has no slice_<n> in its name, which --condition slice "
                            "reads the slice's height from (as in case_001_slice_7.nii.png); "
                            "rename it or pass --condition none")
    return int(match.group(1))


@dataclass
class Splits:
    train: tf.data.Dataset
    validate: tf.data.Dataset
    test: tf.data.Dataset
    shift: float
    batch_size: int
    file_paths: dict  # {split: [path of each image, in the datasets' order]}

    @property
    def top_slice(self):
        """The highest slice index of the training split: slices per case - 1."""
        top = max(slice_index(path) for path in self.file_paths["train"])
        if top == 0:
            raise PipelineError("every training slice is named slice_0; --condition slice needs "
                                "several heights per case")
        return top

    def heights(self, split):
        """Each image's relative height in [0, 1]: its slice index / (slices per case - 1), so
        that OASIS's 32 heights and the demo's 8 mean the same."""
        indices = np.array([slice_index(path) for path in self.file_paths[split]], "float32")
        return indices / self.top_slice

    def scaled(self, split):
        """Batches of images in [-shift, 1 - shift]."""
        return self._batched_and_scaled(getattr(self, split))

    def shuffled_train(self, seed):
        count = int(self.train.cardinality())
        return self._batched_and_scaled(
            self.train.shuffle(count, seed=seed, reshuffle_each_iteration=True))

    def _batched_and_scaled(self, images):
        return sharded_by_data(images.batch(self.batch_size)
                               .map(lambda x: tf.cast(x, tf.float32) / PIXEL_MAX - self.shift)
                               .prefetch(PREFETCHED_BATCHES))

    def pixels(self, split):
        """The split's uint8 images as one array (N, size, size, 1)."""
        return np.concatenate(list(getattr(self, split).batch(NUMPY_BATCH).as_numpy_iterator()))

    def unit_range(self, split):
        """The split's images in [0, 1] as one float array (N, size, size, 1)."""
        return self.pixels(split) / PIXEL_MAX


def scaled_batches(pixels, shift, batch_size):
    """uint8 images (N, H, W, 1) as `Splits.scaled` gives a split's: float32 batches in
    [-shift, 1 - shift]."""
    scaled = pixels.astype("float32") / PIXEL_MAX - shift
    return [scaled[start:start + batch_size] for start in range(0, len(scaled), batch_size)]


def load_splits(data_dir, size, shift, batch_size, demo, verbose=QUIET):
    """The three splits, every image checked first (with progress as --verbose says)."""
    if not data_dir.is_dir():
        hint = "" if demo else f"; {OASIS_SOURCE}, or run with --demo for the bundled slices"
        raise PipelineError(f"data folder {data_dir} not found{hint}")
    folders = {split: data_dir / folder for split, folder in SPLIT_FOLDERS.items()}
    listed = {split: split_images(folder) for split, folder in folders.items()}
    total = sum(len(images) for images in listed.values())
    if verbose != QUIET:
        print(f"Checking the {total} images in {data_dir}")
    progress = progress_bar(total, verbose, unit="image")
    test_count = [check_split_folder(folders[split], images, progress)
                  for split, images in listed.items()][-1]
    if test_count < evaluation.MIN_IMAGES_PER_SET:
        raise PipelineError(
            f"{folders['test']} holds {test_count} images; the realism test needs at least "
            f"{evaluation.MIN_IMAGES_PER_SET} ({evaluation.C2ST_FOLDS}-fold cross-validation)")
    images, paths = zip(*(load_split(folder, size) for folder in folders.values()))
    return Splits(*images, shift, batch_size, dict(zip(SPLIT_FOLDERS, paths)))


def pixel_variance(images, verbose=QUIET):
    """Variance of the pixels in [0, 1] of a uint8 dataset (the training split); shifting does
    not change it. The first pass over a split decodes its PNGs into the cache, hence the
    progress bar."""
    if verbose != QUIET:
        print("Decoding the training images for their pixel variance")
    total, total_squares, count = 0.0, 0.0, 0
    batches = images.batch(NUMPY_BATCH)
    progress = progress_bar(int(batches.cardinality()), verbose, unit="batch")
    for batch in batches.as_numpy_iterator():
        progress.add(1)
        pixels = batch.astype(np.float64) / PIXEL_MAX
        total += pixels.sum()
        total_squares += (pixels**2).sum()
        count += pixels.size
    mean = total / count
    return total_squares / count - mean**2


def slice_heights(splits, conditional):
    """{split: each image's relative height} for a prior conditioned on it, else {split: None};
    the mirrored training slices are at the training slices' heights."""
    heights = {split: splits.heights(split) if conditional else None for split in SPLIT_FOLDERS}
    return heights | {MIRRORED_TRAIN: heights["train"]}


def encode(model, images, progress=None):
    """Code maps of a batched image dataset, computed once: one (N, h, w) array per code level,
    top first; `progress` (a Progbar) advances by one per batch."""
    batches = []
    for batch in images:
        maps = model.encode_to_indices(batch)
        batches.append([level.numpy() for level in (maps if model.levels > 1 else [maps])])
        if progress is not None:
            progress.add(1)
    return [np.concatenate(level) for level in zip(*batches)]


def code_maps(model, splits, verbose, mirrored=False):
    """[{split: its code maps (N, h, w)} per code level, top first], with one progress bar over
    every split's batches; `mirrored` adds MIRRORED_TRAIN, the code maps of the training images
    mirrored left-right (as the encoder codes them: its codes are not mirror-symmetric)."""
    batches = {split: splits.scaled(split) for split in SPLIT_FOLDERS}
    if mirrored:
        batches[MIRRORED_TRAIN] = batches["train"].map(tf.image.flip_left_right)
    if verbose != QUIET:
        also = " and the training images mirrored" if mirrored else ""
        print(f"Encoding the {', '.join(SPLIT_FOLDERS)} images{also} to code maps")
    progress = progress_bar(sum(int(b.cardinality()) for b in batches.values()), verbose,
                            unit="batch")
    encoded = {split: encode(model, images, progress) for split, images in batches.items()}
    return [{split: levels[level] for split, levels in encoded.items()}
            for level in range(model.levels)]


def joined(per_split, splits):
    """The arrays of `splits` in per_split ({split: array or None}, or None), one after another;
    None where there are none (a prior's absent condition)."""
    if per_split is None or per_split[splits[0]] is None:
        return None
    return np.concatenate([per_split[split] for split in splits])


def code_dataset(codes, heights, batch_size, seed=None, top=None):
    """(codes, codes) pairs, or ((codes, heights, top), codes) with those of the prior's
    conditions that are not None: heights for a conditional prior, the top level's code maps
    for VQ-VAE-2's bottom prior; shuffled each epoch when a seed is given."""
    conditions = tuple(given for given in (heights, top) if given is not None)
    inputs = (codes, *conditions) if conditions else codes
    data = untuned(tf.data.Dataset.from_tensor_slices((inputs, codes)))
    if seed is not None:
        data = data.shuffle(len(codes), seed=seed, reshuffle_each_iteration=True)
    return sharded_by_data(data.batch(batch_size).prefetch(PREFETCHED_BATCHES))


def sample_heights(requested, num_samples, top_slice, test_heights):
    """The relative height of each of num_samples samples: spread in order over the --slice
    values (heights, or slice indices / top_slice), or without them the test slices' heights,
    evenly over their sorted list, so that the realism test compares samples and test slices of
    the same heights."""
    if requested is None:
        picks = (np.arange(num_samples) + 0.5) * len(test_heights) / num_samples
        return np.sort(test_heights)[picks.astype(int)].astype("float32")
    too_high = [value for value in requested if isinstance(value, int) and value > top_slice]
    if too_high:
        raise PipelineError(f"--slice {too_high[0]} is above the data's highest slice index, "
                            f"{top_slice}")
    heights = np.array([value / top_slice if isinstance(value, int) else value
                        for value in requested], "float32")
    return heights[np.arange(num_samples) * len(heights) // num_samples]
