"""Learn a generative model of brain MRI slices: a VQ-VAE, then a PixelCNN prior over its codes.

    python driver.py --demo                          # the bundled demo slices, a few minutes on CPU
    python driver.py --data keras_png_slices_data    # OASIS
    python driver.py --evaluate                      # metrics and figures from saved models

The pipeline, `run()`: load the three splits, train the VQ-VAE (van den Oord et al. 2017), encode
the training split to code maps once, train the PixelCNN prior (van den Oord et al. 2016) on them,
sample new code maps and decode them, evaluate everything on the test split (evaluation.py), write
the samples, the figures and metrics.json into --out. Finished models go to --checkpoint-dir; a
killed run resumes there.
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def silenced_stderr():
    """Sends file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines (oneDNN banners, a
    'failed call to cuInit' error on a machine without a GPU) ignore TF_CPP_MIN_LOG_LEVEL."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Quiet only where there is no NVIDIA driver: on a GPU machine TensorFlow's warnings and errors
# about CUDA may matter. On a CPU they are noise (a oneDNN note on int32 ops is logged as an error).
HAS_NVIDIA_DRIVER = Path("/proc/driver/nvidia").exists()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if HAS_NVIDIA_DRIVER else "3")
with contextlib.nullcontext() if HAS_NVIDIA_DRIVER else silenced_stderr():
    import tensorflow as tf

    tf.config.list_physical_devices("GPU")  # the CUDA probe, which logs its failure

import keras  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

import evaluation  # noqa: E402
import pixelcnn  # noqa: E402
import vqvae  # noqa: E402

SPLIT_FOLDERS = {
    "train": "keras_png_slices_train",
    "validate": "keras_png_slices_validate",
    "test": "keras_png_slices_test",
}
DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
OASIS_SOURCE = (
    "OASIS slices come as keras_png_slices_data.zip from the OASIS-1 brain MRI project "
    "(oasis-brains.org, via your course page); unzip it and pass the folder holding "
    "keras_png_slices_train, keras_png_slices_validate and keras_png_slices_test with --data"
)
EXPECTED_SIZE = 256  # OASIS slices are 256x256; other sizes are resized with a warning
PIXEL_MAX = 255.0
PREFETCHED_BATCHES = 2  # the next batch is ready when a step ends, one more in the making
# tf.image.ssim's Gaussian window is 11 pixels wide; the code grid is the image / 4.
MIN_IMAGE_SIZE = 16
FIGURE_EXAMPLES = 6  # images in codebook_results.png
SAMPLES_SHOWN = 8  # samples in samples.png
HEIGHT_ROWS = 8  # heights (rows) in samples_by_slice.png
IMAGES_PER_HEIGHT = 3  # real slices, and samples, in each of its rows
# OASIS and the demo name each slice's axial position: case_001_slice_17.nii.png
SLICE_NAME = re.compile(r"slice_(\d+)")


class PipelineError(Exception):
    """A problem with the input or the environment, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------------
# Flags


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def checked(kind, test, requirement):
    """An argparse type: parse with `kind`, then insist on `test`."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
        return value

    return parse


positive_int = checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
open_unit_interval = checked(float, lambda v: 0 < v < 1, "a number between 0 and 1, exclusive")
positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
non_negative_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
square_size = checked(int, lambda v: v >= MIN_IMAGE_SIZE, f"an integer >= {MIN_IMAGE_SIZE}")
power_of_two = checked(int, lambda v: v >= 2 and v & (v - 1) == 0, "a power of 2 >= 2")


def slice_list(text):
    """--slice: comma-separated heights or slice indices. A value with a '.' is a relative
    height in [0, 1] (a float); a plain integer is a slice index (an int), which `sample_heights`
    converts with the data set's slices per case."""
    height = checked(float, lambda v: 0 <= v <= 1, "a height in [0, 1] such as 0.5")
    index = checked(int, lambda v: v >= 0, "a slice index >= 0 or a height such as 0.5")
    return [height(value) if "." in value else index(value) for value in text.split(",")]

# Settings of --demo: small enough to finish on a 2-core CPU in minutes (see the README).
# A 64x64 image keeps the seed's 16x16 code grid (downsampling 4).
DEMO_DEFAULTS = dict(
    image_size=64, downsample=vqvae.DOWNSAMPLING, epochs=40, pcnn_epochs=40,
)
# The defaults below were chosen on the demo slices at 256x256 (README, "What we tried"): a
# 32x32 code grid (downsample 8), K=128 codes of D=16, an EMA codebook and 8 gated blocks dilated
# (cycle 4) to see the whole map draw whole brains, where the seed's settings (downsample 4,
# K=512, D=2, 2 blocks of 128 filters) draw blobs.
OASIS_DOWNSAMPLE = 8
# Both models' optimiser, chosen on the same slices (README, "Training speed"): with Adam at 1e-3
# on batches of 16 our VQ-VAE passes within 2-2.5 minutes the SSIM that the seed's 2e-4 on
# batches of 32 reaches in 4.
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
# Enough samples for a decisive two-sample test against OASIS's 544 test slices, and against the
# demo's 64 four tests averaged (evaluation.two_sample_test); drawn in a minute or two.
DEFAULT_SAMPLES = 256
# The slice-conditional prior fits the demo's test codes better and draws the anatomy of the
# height asked for (README, "Slice-conditional prior").
DEFAULT_CONDITION = "slice"
# --pcnn-positions: whether the prior learns where each code is (pixelcnn.PositionEmbedding).
# Without, a quarter to half of the 256x256 samples carried stray codes along the map's last row
# or column, drawn as fragments at the image border (README, "Results at 256x256").
POSITIONS = ("none", "learned")
DEFAULT_POSITIONS = "learned"


def build_parser():
    parser = OneLineParser(
        prog="driver.py",
        description="Train a VQ-VAE and a PixelCNN prior on brain MRI slices and sample brains.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=Path("keras_png_slices_data"),
                      help="folder holding keras_png_slices_{train,validate,test} "
                           "(default: %(default)s)")
    data.add_argument("--demo", action="store_true",
                      help=f"use the bundled demo slices in {DEMO_DATA.name}/ with settings that "
                           "finish in minutes on a CPU; flags given explicitly still win")
    data.add_argument("--image-size", type=square_size, default=EXPECTED_SIZE,
                      help="images are resized to this square size (default: %(default)s)")
    data.add_argument("--shift", type=unit_interval, default=0.5,
                      help="subtracted after dividing by 255; 0.5 gives [-0.5, 0.5] "
                           "(default: %(default)s)")

    vq = parser.add_argument_group("VQ-VAE")
    vq.add_argument("--K", type=positive_int, default=128,
                    help="K, the number of codebook vectors (default: %(default)s)")
    vq.add_argument("--D", type=positive_int, default=16,
                    help="D, the size of each codebook vector (default: %(default)s)")
    vq.add_argument("--beta", type=non_negative_float, default=1.5,
                    help="beta, the commitment loss weight of eq. 3 (default: %(default)s)")
    vq.add_argument("--downsample", type=power_of_two, default=OASIS_DOWNSAMPLE,
                    help="the code grid is the image divided by this in each direction (the "
                         "paper's and the seed's 4; 8 or 16 give the prior a smaller map) "
                         "(default: %(default)s)")
    vq.add_argument("--quantizer", choices=vqvae.QUANTIZERS, default="ema",
                    help="how the codebook learns: ema, moving averages of the encoder outputs "
                         "(the paper's appendix A.1) with restarts of unused codes; loss, the "
                         "codebook term of eq. 3 (default: %(default)s)")
    vq.add_argument("--ema-decay", type=open_unit_interval, default=vqvae.PAPER_EMA_DECAY,
                    help="gamma, the decay of the EMA codebook's moving averages "
                         "(default: %(default)s)")
    vq.add_argument("--restart-threshold", type=non_negative_float,
                    default=vqvae.RESTART_THRESHOLD,
                    help="an EMA code used by fewer encoder outputs per batch than this (moving "
                         "average) is restarted at an encoder output drawn in proportion to its "
                         "squared quantization error; 0 never restarts "
                         "(default: %(default)s)")
    vq.add_argument("--epochs", type=non_negative_int, default=30,
                    help="VQ-VAE training epochs (default: %(default)s)")
    vq.add_argument("--batch_size", type=positive_int, default=BATCH_SIZE,
                    help="batch size of both models (default: %(default)s)")
    vq.add_argument("--learning_rate", type=positive_float, default=LEARNING_RATE,
                    help="VQ-VAE Adam learning rate (default: %(default)s)")

    prior = parser.add_argument_group("PixelCNN prior")
    prior.add_argument("--pcnn-type", choices=pixelcnn.KINDS, default="gated",
                       help="plain masked convolutions or the gated PixelCNN "
                            "(default: %(default)s)")
    prior.add_argument("--pcnn-epochs", type=non_negative_int, default=30,
                       help="PixelCNN training epochs (default: %(default)s)")
    prior.add_argument("--pcnn-learning-rate", type=positive_float, default=LEARNING_RATE,
                       help="PixelCNN Adam learning rate (default: %(default)s)")
    prior.add_argument("--pcnn-filters", type=positive_int, default=64,
                       help="channels of every PixelCNN layer (default: %(default)s)")
    prior.add_argument("--pcnn-res-blocks", type=non_negative_int, default=8,
                       help="residual (plain) or gated (gated) blocks after the first masked "
                            "convolution (default: %(default)s)")
    prior.add_argument("--pcnn-dilation-cycle", type=positive_int, default=4,
                       help="block i's masked convolutions are dilated by 2 ** (i mod this), so "
                            "the prior's reach grows exponentially with depth: 4 with 8 blocks "
                            "sees a whole 32x32 map; 1 is the paper's undilated stack "
                            "(default: %(default)s)")
    prior.add_argument("--pcnn-layers", type=non_negative_int, default=2,
                       help="1x1 convolution layers between the blocks and the logits "
                            "(default: %(default)s)")
    prior.add_argument("--condition", choices=pixelcnn.CONDITIONS,
                       help="none: the prior models p(c); slice: p(c | h), conditioned on each "
                            "slice's relative height h in [0, 1] read from its file name "
                            "(slice_<n>; section 2.3 of the PixelCNN paper), gated prior only "
                            f"(default: {DEFAULT_CONDITION} for the gated prior, none for the "
                            "plain one)")
    prior.add_argument("--pcnn-positions", choices=POSITIONS,
                       help="learned: each code's embedding is added to a learned embedding of "
                            "its row and column, so that the prior knows where the map ends; "
                            f"gated prior only (default: {DEFAULT_POSITIONS} for the gated "
                            "prior, none for the plain one)")
    prior.add_argument("--slice", type=slice_list, default=None,
                       help="heights to sample with --condition slice: one or a comma-separated "
                            "list of relative heights (0.2,0.5,0.8; values with a '.') or slice "
                            "indices (3,4; plain integers); the samples are spread over them in "
                            "order (default: the test slices' heights, evenly over their "
                            "sorted list)")
    prior.add_argument("--num-samples", type=positive_int, default=DEFAULT_SAMPLES,
                       help="code maps to sample, decode and save as PNGs; the realism test "
                            f"needs at least {evaluation.MIN_IMAGES_PER_SET} "
                            "(default: %(default)s)")
    prior.add_argument("--temperature", type=positive_float, default=1.0,
                       help="sampling temperature: logits are divided by it "
                            "(default: %(default)s)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--strategy", choices=("auto", "mirrored", "multiworker"),
                          default="auto",
                          help="auto: all local GPUs if there are several, else the default "
                               "device; mirrored: tf.distribute.MirroredStrategy over local GPUs; "
                               "multiworker: MultiWorkerMirroredStrategy configured by TF_CONFIG "
                               "(default: %(default)s)")
    hardware.add_argument("--cpu-replicas", type=positive_int, default=1,
                          help="with --strategy mirrored: split the CPU into this many devices, "
                               "one replica each, to try the distributed path without GPUs "
                               "(default: %(default)s)")
    hardware.add_argument("--mixed-precision", choices=("off", "float16", "bfloat16"),
                          default="off",
                          help="compute in 16 bits with float32 weights (float16 with loss "
                               "scaling); for GPUs: it slows CPUs down (default: %(default)s)")

    output = parser.add_argument_group("output and run control")
    output.add_argument("--out", type=Path, default=Path("resources"),
                     help="folder for figures and metrics.json (default: %(default)s)")
    output.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                     help="folder for trained models and resumable state (default: %(default)s)")
    output.add_argument("--seed", type=non_negative_int, default=0,
                     help="seed of every random source (default: %(default)s)")
    output.add_argument("--evaluate", action="store_true",
                     help="skip training: load the models in --checkpoint-dir and recompute "
                          "metrics and figures")
    output.add_argument("--fresh", action="store_true",
                     help="ignore and replace checkpoints of an earlier run instead of resuming")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(data=DEMO_DATA, **DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.image_size % args.downsample:
        parser.error(f"argument --image-size: {args.image_size} is not a multiple of "
                     f"--downsample {args.downsample}")
    if args.num_samples < evaluation.MIN_IMAGES_PER_SET:
        parser.error(f"argument --num-samples: expected an integer >= "
                     f"{evaluation.MIN_IMAGES_PER_SET} (the realism test's "
                     f"{evaluation.C2ST_FOLDS}-fold cross-validation), got {args.num_samples}")
    if args.cpu_replicas > 1 and args.strategy != "mirrored":
        parser.error("argument --cpu-replicas: only --strategy mirrored splits the CPU")
    if args.condition is None:
        args.condition = DEFAULT_CONDITION if args.pcnn_type == "gated" else "none"
    if args.condition != "none" and args.pcnn_type != "gated":
        parser.error(f"argument --condition: {args.condition} needs --pcnn-type gated")
    if args.pcnn_positions is None:
        args.pcnn_positions = DEFAULT_POSITIONS if args.pcnn_type == "gated" else "none"
    if args.pcnn_positions != "none" and args.pcnn_type != "gated":
        parser.error(f"argument --pcnn-positions: {args.pcnn_positions} needs --pcnn-type gated")
    if args.slice is not None and args.condition != "slice":
        parser.error("argument --slice: only a prior with --condition slice takes heights")
    return args


# ---------------------------------------------------------------------------------------------
# Files: every output is written to a temporary name and renamed, so a killed run never leaves
# half a file and never removes the last run's output before the new one is complete.


def replace_atomically(path, write):
    """Call write(temporary_path), then rename the result to path."""
    path = Path(path)
    temporary = path.with_name(f".partial.{path.name}")  # keeps the suffix Keras checks
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def save_figure(fig, path):
    replace_atomically(path, lambda p: fig.savefig(p, dpi=120, bbox_inches="tight"))


def save_json(data, path):
    replace_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def save_model(model, path):
    replace_atomically(path, model.save)


def replace_folder_atomically(folder, write):
    """Call write(temporary_folder), then put the result in folder's place: a rerun never leaves a
    half-written folder, and the old one is removed only once the new one is complete."""
    folder = Path(folder)
    temporary, previous = (folder.with_name(f"{prefix}{folder.name}")
                           for prefix in (".partial.", ".previous."))
    for leftover in (temporary, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        write(temporary)
        if folder.exists():
            os.replace(folder, previous)  # a directory cannot be renamed onto a full one
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(previous, ignore_errors=True)


def sample_name(index, height=None):
    """sample_007.png, or with the relative height it was drawn at, sample_007_slice_0.50.png."""
    drawn_at = "" if height is None else f"_slice_{height:.2f}"
    return f"sample_{index:03d}{drawn_at}.png"


def save_sample_pngs(images, folder, heights=None):
    """Each image in [0, 1] as an 8-bit grayscale PNG, mapped back as the input slices were read
    (pixel / 255), named by `sample_name`."""
    heights = [None] * len(images) if heights is None else heights

    def write(temporary):
        for index, (image, height) in enumerate(zip(images, heights)):
            pixels = np.round(np.asarray(image)[..., 0] * PIXEL_MAX).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(temporary / sample_name(index, height))

    replace_folder_atomically(folder, write)


def prepare_folder(folder, flag):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PipelineError(
            f"cannot write to {flag} {folder} ({error.strerror}); pass a writable folder"
        ) from None


# ---------------------------------------------------------------------------------------------
# Data


def check_split_folder(folder):
    """Fail on a missing or empty split or an unreadable PNG; warn on images that get converted.

    Returns the number of images.
    """
    if not folder.is_dir():
        raise PipelineError(f"split folder {folder} is missing; expected the OASIS layout "
                            f"({', '.join(SPLIT_FOLDERS.values())}) under --data")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".png" and p.is_file())
    if not images:
        raise PipelineError(f"split folder {folder} holds no .png images; "
                            "put the split's slices there")
    converted = []
    for path in images:
        try:
            with Image.open(path) as image:
                image.load()
                if image.mode != "L" or image.size != (EXPECTED_SIZE, EXPECTED_SIZE):
                    converted.append(f"{path.name} ({image.mode}, {image.size[0]}x{image.size[1]})")
        except (OSError, UnidentifiedImageError, SyntaxError) as error:
            raise PipelineError(f"unreadable image {path} ({error}); "
                                "delete or replace it and rerun") from None
    if converted:
        print(f"driver.py: warning: {folder.name}: {len(converted)} image(s) are not "
              f"{EXPECTED_SIZE}x{EXPECTED_SIZE} grayscale and are converted and resized, "
              f"e.g. {converted[0]}", file=sys.stderr)
    return len(images)


def untuned(dataset):
    """The dataset, and every dataset made from it, without tf.data's autotuner. Its thread
    wakes at growing intervals, and an iterator's end waits for the next wake: a prior epoch of
    5 s took 10.2 s at random, a validation pass likewise. Our pipelines are a cache, a cast and
    a fixed prefetch, with nothing to tune."""
    options = tf.data.Options()
    options.autotune.enabled = False
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
        return np.concatenate(list(getattr(self, split).batch(256).as_numpy_iterator()))


def sharded_by_data(dataset):
    """The dataset with each worker of a cluster taking its share of every global batch: the
    in-memory cache has no files to shard by, which the default policy would try first."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def load_splits(data_dir, size, shift, batch_size, demo):
    if not data_dir.is_dir():
        hint = "" if demo else f"; {OASIS_SOURCE}, or run with --demo for the bundled slices"
        raise PipelineError(f"data folder {data_dir} not found{hint}")
    folders = {split: data_dir / folder for split, folder in SPLIT_FOLDERS.items()}
    test_count = [check_split_folder(folder) for folder in folders.values()][-1]
    if test_count < evaluation.MIN_IMAGES_PER_SET:
        raise PipelineError(
            f"{folders['test']} holds {test_count} images; the realism test needs at least "
            f"{evaluation.MIN_IMAGES_PER_SET} ({evaluation.C2ST_FOLDS}-fold cross-validation)")
    images, paths = zip(*(load_split(folder, size) for folder in folders.values()))
    return Splits(*images, shift, batch_size, dict(zip(SPLIT_FOLDERS, paths)))


def pixel_variance(images):
    """Variance of the pixels in [0, 1] of a uint8 dataset; shifting does not change it."""
    total, total_squares, count = 0.0, 0.0, 0
    for batch in images.batch(256).as_numpy_iterator():
        pixels = batch.astype(np.float64) / PIXEL_MAX
        total += pixels.sum()
        total_squares += (pixels**2).sum()
        count += pixels.size
    mean = total / count
    return total_squares / count - mean**2


# ---------------------------------------------------------------------------------------------
# Training


class ValidationQuality(keras.callbacks.Callback):
    """After every epoch, the mean SSIM of the validation images and their reconstructions and
    the codebook's use on them, recorded in the history as val_ssim, val_codebook_perplexity and
    val_codes_used."""

    def __init__(self, images, shift):
        super().__init__()
        self.images = images
        self.shift = shift

    def on_epoch_end(self, epoch, logs=None):
        originals, reconstructed = evaluation.reconstructions(self.model, self.images, self.shift)
        logs["val_ssim"] = evaluation.reconstruction_metrics(originals, reconstructed)["test_ssim"]
        counts = evaluation.code_counts(encode(self.model, self.images),
                                        self.model.num_embeddings)
        logs.update({f"val_{name}": value
                     for name, value in evaluation.codebook_metrics(counts).items()})


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops at the first NaN or infinite loss, before the epoch's checkpoint can save it."""

    def __init__(self, model_name):
        super().__init__()
        self.model_name = model_name

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise PipelineError(
                f"{self.model_name} loss became {loss} in batch {batch + 1}; the last finished "
                "epoch is kept in --checkpoint-dir: lower the learning rate and rerun"
            )


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore whose files are replaced atomically: Keras writes them in place, so a kill
    during the write left a corrupt backup that the rerun could not load."""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        # Weights first: a kill between the two renames repeats one epoch, never skips one.
        replace_atomically(self._weights_path, self.model.save_weights)
        save_json({"epoch": self._current_epoch, "batch": self._last_batch_seen},
                  Path(self._training_metadata_path))


class HistoryFile(keras.callbacks.Callback):
    """Keeps every epoch's logs in a JSON file, so a resumed run's history is complete."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_train_begin(self, logs=None):
        self.epochs = read_epochs(self.path)

    def on_epoch_end(self, epoch, logs=None):
        # A run killed after writing this but before its backup repeats the epoch: overwrite it.
        self.epochs = self.epochs[:epoch] + [{k: float(v) for k, v in logs.items()}]
        save_json(self.epochs, self.path)


class KeepBest(keras.callbacks.Callback):
    """Ends training with the weights of the epoch of lowest validation loss, kept in a file so
    that a resumed run remembers them: the prior overfits a small training set."""

    def __init__(self, path, history):
        super().__init__()
        self.path = path
        self.history = history

    def on_train_begin(self, logs=None):
        self.best = min((epoch["val_loss"] for epoch in read_epochs(self.history)),
                        default=math.inf)

    def on_epoch_end(self, epoch, logs=None):
        if logs.get("val_loss", math.inf) < self.best:  # no validation data: nothing to pick
            self.best = logs["val_loss"]
            replace_atomically(self.path, self.model.save_weights)

    def on_train_end(self, logs=None):
        if self.path.exists():
            self.model.load_weights(self.path)


def read_epochs(path):
    """The per-epoch logs a HistoryFile keeps: [{metric: value}, ...], [] before the first."""
    return json.loads(path.read_text()) if path.exists() else []


def by_metric(epochs):
    """[{metric: value} per epoch] -> {metric: [value per epoch]}, or None without epochs."""
    return {key: [epoch[key] for epoch in epochs] for key in epochs[0]} if epochs else None


def fit(model, data, validation, epochs, checkpoints, log_dir, callbacks=()):
    """model.fit that resumes from the last finished epoch, keeps its history in a file and in
    TensorBoard logs, stops on a non-finite loss before that loss can reach a checkpoint and
    ends with the weights of the best validation epoch."""
    return model.fit(
        data, validation_data=validation, epochs=epochs, shuffle=False,
        # KeepBest before HistoryFile: a kill between the two then loses no best epoch
        callbacks=[*callbacks, KeepBest(checkpoints.best, checkpoints.history),
                   HistoryFile(checkpoints.history), StopOnNonFiniteLoss(model.name),
                   keras.callbacks.TensorBoard(str(log_dir)),
                   AtomicBackupAndRestore(str(checkpoints.backup))],
    )


def describe_devices(strategy):
    gpus = len(tf.config.list_logical_devices("GPU"))
    devices = f"{gpus} GPU{'s' if gpus > 1 else ''}" if gpus else "the CPU (no GPU found)"
    replicas = strategy.num_replicas_in_sync
    return f"Running on {devices}" + (f", {replicas} replicas in sync" if replicas > 1 else "")


def distribution_strategy(name, cpu_replicas):
    """The tf.distribute strategy that --strategy names; --batch_size is the global batch."""
    if name == "multiworker":
        check_cluster_config()
        return MultiWorkerStrategy()
    if cpu_replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
        return tf.distribute.MirroredStrategy(
            [device.name for device in tf.config.list_logical_devices("CPU")])
    if name == "mirrored" or len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose reduce accepts what Keras 3 (3.15 here) passes it in
    fit: a nested batch (x, y), and scalar logs with axis=0, which fail on the stock strategy
    (tensorflow/tensorflow#72388). A scalar is averaged over the replicas alone."""

    def reduce(self, reduce_op, value, axis):
        def reduce_one(per_replica):
            scalar = self.experimental_local_results(per_replica)[0].shape.rank == 0
            return super(MultiWorkerStrategy, self).reduce(reduce_op, per_replica,
                                                           None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def check_cluster_config():
    """Refuse a missing or malformed TF_CONFIG in one line, before TensorFlow reads it."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise PipelineError("--strategy multiworker needs the TF_CONFIG environment variable "
                            "naming the workers and this one's index (README, \"GPUs and "
                            "clusters\")")
    try:
        config = json.loads(text)
        workers, index = config["cluster"]["worker"], config["task"]["index"]
        if not 0 <= index < len(workers):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"TF_CONFIG {text!r} is not a cluster of workers with this task's "
                            "index among them (README, \"GPUs and clusters\")") from None


def worker_folder(strategy, checkpoint_dir):
    """Where a worker other than the chief writes (None on the chief, which writes the results):
    its own checkpoints, which it resumes from when restarted, and logs, inside --checkpoint-dir
    so that every worker can run the same command, even sharing one machine."""
    resolver = strategy.cluster_resolver
    if resolver is None or strategy.extended.should_checkpoint:
        return None
    return checkpoint_dir / f".{resolver.task_type}_{resolver.task_id}"


def chief_lacks(path, strategy):
    """Whether the chief has no file at path, as every worker learns it: the workers then train
    the same models and enter the same collective ops."""
    lacks = float(strategy.extended.should_checkpoint and not path.exists())
    per_replica = strategy.run(lambda: tf.constant(lacks))
    return bool(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0)


def train_vqvae(splits, args, checkpoints, strategy):
    print(f"Training the VQ-VAE for {args.epochs} epochs")
    variance = pixel_variance(splits.train)
    with strategy.scope():
        model = vqvae.VQVAE(args.K, args.D, beta=args.beta, data_variance=variance,
                            pixel_range=(-args.shift, 1.0 - args.shift),
                            downsampling=args.downsample, quantizer=args.quantizer,
                            ema_decay=args.ema_decay, restart_threshold=args.restart_threshold)
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
        model(tf.zeros((1, args.image_size, args.image_size, 1)))  # build, so a backup restores
    fit(model, splits.shuffled_train(args.seed), splits.scaled("validate"), args.epochs,
        checkpoints, args.out / "logs" / "vqvae",
        callbacks=[ValidationQuality(splits.scaled("validate"), args.shift)])
    return model


def encode(model, images):
    """Code maps (N, h, w) of a batched image dataset, computed once."""
    return np.concatenate([model.encode_to_indices(batch).numpy() for batch in images])


def code_dataset(codes, heights, batch_size, seed=None):
    """(codes, codes) pairs, or ((codes, heights), codes) for a conditional prior (heights not
    None)."""
    inputs = codes if heights is None else (codes, heights)
    data = untuned(tf.data.Dataset.from_tensor_slices((inputs, codes)))
    if seed is not None:
        data = data.shuffle(len(codes), seed=seed, reshuffle_each_iteration=True)
    return sharded_by_data(data.batch(batch_size).prefetch(PREFETCHED_BATCHES))


def prior_positions(args, grid_shape):
    """build_pixelcnn's positions: the code grid when the prior learns positions, else None."""
    return tuple(grid_shape) if args.pcnn_positions == "learned" else None


def train_prior(codes, heights, args, checkpoints, strategy):
    """The prior, trained on the training split's code maps (and, when conditional, their
    heights), validated on the validation split's."""
    train_codes = codes["train"]
    print(f"Training the {args.pcnn_type} PixelCNN (condition: {args.condition}) for "
          f"{args.pcnn_epochs} epochs on {len(train_codes)} code maps of "
          f"{train_codes.shape[1]}x{train_codes.shape[2]}")
    with strategy.scope():
        prior = pixelcnn.build_pixelcnn(args.K, args.pcnn_filters, args.pcnn_res_blocks,
                                        args.pcnn_layers, kind=args.pcnn_type,
                                        dilation_cycle=args.pcnn_dilation_cycle,
                                        condition=args.condition,
                                        positions=prior_positions(args, train_codes.shape[1:]))
        prior.compile(optimizer=keras.optimizers.Adam(args.pcnn_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit(prior, code_dataset(train_codes, heights["train"], args.batch_size, args.seed),
        code_dataset(codes["validate"], heights["validate"], args.batch_size),
        args.pcnn_epochs, checkpoints, args.out / "logs" / "pixelcnn")
    return prior


# ---------------------------------------------------------------------------------------------
# Evaluation: the metrics themselves live in evaluation.py


def evaluate(models, splits, sampled, codes, heights, args):
    """metrics.json's content and the anatomy statistics of the three image sets: real test
    slices, their reconstructions and the samples. A conditional prior's NLL is conditional,
    and its samples are also compared with the real slices at their heights."""
    model, prior = models
    _, sampled_images, sampled_heights = sampled
    originals, reconstructed = evaluation.reconstructions(model, splits.scaled("test"), args.shift)
    started = time.perf_counter()
    real, reconstructions, samples = (
        evaluation.realism_summary(images) for images in (originals, reconstructed, sampled_images))
    samples_vs_real = evaluation.realism(real, samples, args.seed)
    samples_vs_reconstructions = evaluation.realism(reconstructions, samples, args.seed)
    reconstructions_vs_real = evaluation.realism(real, reconstructions, args.seed)
    print(f"Realism tests (3 image sets, 3 pairs): {time.perf_counter() - started:.1f} s")
    metrics = {
        "vqvae": {
            **evaluation.reconstruction_metrics(originals, reconstructed),
            **evaluation.codebook_metrics(evaluation.code_counts(codes["test"], args.K)),
            "brain_codebook_perplexity": evaluation.brain_codebook_perplexity(
                codes["test"], originals, args.K),
            "brain_code_share": float(
                evaluation.brain_code_positions(originals, codes["test"].shape[1:]).mean()),
            "c2st_reconstructions": reconstructions_vs_real["c2st_accuracy"],
            "c2st_reconstructions_stderr": reconstructions_vs_real["c2st_stderr"],
            "anatomy_reconstructions": reconstructions_vs_real["anatomy"],
        },
        "pixelcnn": {
            "test_nll_bits": evaluation.prior_nll_bits(prior, codes["test"], args.batch_size,
                                                       heights["test"]),
            "unigram_bits": evaluation.entropy_bits(
                evaluation.code_counts(codes["train"], args.K)),
            "uniform_bits": math.log2(args.K),
        },
        "samples": {
            "n_real": len(originals),
            "n_samples": len(sampled_images),
            **samples_vs_real,
            "c2st_vs_reconstructions": samples_vs_reconstructions["c2st_accuracy"],
            "c2st_vs_reconstructions_stderr": samples_vs_reconstructions["c2st_stderr"],
            "anatomy_vs_reconstructions": samples_vs_reconstructions["anatomy"],
            "touching_border": float(evaluation.touches_border(sampled_images).mean()),
            "real_touching_border": float(evaluation.touches_border(originals).mean()),
            "nn_ssim": float(evaluation.nearest_neighbour_ssim(
                sampled_images, splits.pixels("train")).mean()),
            "pairwise_ssim": evaluation.pairwise_ssim(sampled_images, args.seed),
        },
    }
    if sampled_heights is not None:
        metrics["samples"].update(samples_by_height(
            (originals, real, heights["test"]), (sampled_images, samples, sampled_heights),
            args.seed))
    statistics = {"real test slices": real["statistics"],
                  "reconstructions": reconstructions["statistics"],
                  "samples": samples["statistics"]}
    return metrics, statistics


def samples_by_height(real, sampled, seed):
    """The realism test per height band, and how well the samples' brain area follows the real
    slices' from bottom to top. `real` and `sampled` are (images, realism summary, heights)."""
    (real_images, real_summary, real_heights), (images, summary, heights) = real, sampled
    area = evaluation.brain_area_by_height(
        real_summary["statistics"]["brain_area"], real_heights,
        summary["statistics"]["brain_area"], heights)
    return {"by_band": evaluation.realism_by_band(real_images, real_heights, images, heights,
                                                  seed),
            "brain_area_height_correlation": area["correlation"],
            "brain_area_by_height": area["by_height"]}


def print_metrics(metrics, prefix=""):
    if not prefix:
        print("\nTest-split evaluation")
    for name, value in metrics.items():
        if isinstance(value, dict):
            print_metrics(value, f"{prefix}{name}.")
        else:
            print(f"  {prefix + name:<46} {value:10.4f}")


# ---------------------------------------------------------------------------------------------
# Figures: one function per PNG, each taking data and a path.


def plot_losses(history, path):
    fig = Figure(figsize=(12, 3.5))
    for ax, key, title in zip(fig.subplots(1, 3), ("loss", "reconstruction_loss", "vq_loss"),
                              ("total loss", "reconstruction loss (MSE / variance)", "VQ loss")):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        ax.plot(epochs, history[f"val_{key}"], label="validation")
        # log scale: the late epochs' progress is a small fraction of the first epoch's loss
        ax.set(title=title, xlabel="epoch", yscale="log")
        ax.legend()
    save_figure(fig, path)


def plot_validation_quality(history, num_embeddings, path):
    """Validation SSIM and, in histories that track it, codebook use per epoch."""
    tracks_codebook = "val_codes_used" in history  # not in checkpoints of earlier versions
    fig = Figure(figsize=(10 if tracks_codebook else 5, 3.5))
    ssim_axis, *codebook_axes = fig.subplots(1, 2 if tracks_codebook else 1, squeeze=False)[0]
    epochs = np.arange(1, len(history["val_ssim"]) + 1)
    ssim_axis.plot(epochs, history["val_ssim"], marker="o")
    ssim_axis.set(title="validation SSIM", xlabel="epoch", ylabel="mean SSIM")
    if tracks_codebook:
        plot_codebook_history(codebook_axes[0], epochs, history, num_embeddings)
    save_figure(fig, path)


def plot_codebook_history(codebook_axis, epochs, history, num_embeddings):
    codebook_axis.plot(epochs, history["val_codes_used"], marker="o", label="codes used")
    codebook_axis.plot(epochs, np.array(history["val_codebook_perplexity"]) / num_embeddings,
                       marker="o", label="perplexity / K")
    codebook_axis.set(title=f"codebook use on the validation split (K = {num_embeddings})",
                      xlabel="epoch", ylabel="share of K", ylim=(0, 1.05))
    codebook_axis.legend()


def plot_codebook_results(originals, codes, reconstructions, scores, path):
    fig = Figure(figsize=(7.5, 2.5 * len(originals)))
    axes = fig.subplots(len(originals), 3, squeeze=False)
    for row, (image, code, reconstruction, score) in enumerate(
            zip(originals, codes, reconstructions, scores)):
        axes[row, 0].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        axes[row, 1].imshow(code, cmap="viridis")
        axes[row, 2].imshow(reconstruction[..., 0], cmap="gray", vmin=0, vmax=1)
        axes[row, 2].set_title(f"reconstruction, SSIM {score:.3f}")
        axes[row, 0].set_title("original")
        axes[row, 1].set_title("code map")
    for ax in axes.ravel():
        ax.axis("off")
    save_figure(fig, path)


def plot_samples(codes, images, path):
    fig = Figure(figsize=(2.2 * len(codes), 4.6))
    axes = fig.subplots(2, len(codes), squeeze=False)
    for col, (code, image) in enumerate(zip(codes, images)):
        axes[0, col].imshow(code, cmap="viridis")
        axes[1, col].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title("sampled code maps", loc="left")
    axes[1, 0].set_title("decoded", loc="left")
    for ax in axes.ravel():
        ax.axis("off")
    save_figure(fig, path)


def plot_codebook_usage(counts, path):
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), counts / counts.sum(), width=1.0)
    ax.set(title=f"code usage on the test split ({(counts > 0).sum()} of {len(counts)} used)",
           xlabel="code k", ylabel="frequency")
    save_figure(fig, path)


def plot_realism(statistics, distances, path):
    """One panel per anatomy statistic: its distribution in each image set, titled with the
    samples' distance from the real slices in units of the real spread."""
    columns = math.ceil(len(evaluation.ANATOMY) / 2)
    fig = Figure(figsize=(4.2 * columns, 7.4), layout="constrained")
    for ax, name in zip(fig.subplots(2, columns).ravel(), evaluation.ANATOMY):
        if name == "intensity":
            for label, values in statistics.items():
                ax.plot(evaluation.intensity_bin_centres(), values[name], label=label)
            ax.set(xlabel="intensity inside the brain", ylabel="share of brain pixels")
        else:
            values = [values[name] for values in statistics.values()]
            edges = np.histogram_bin_edges(np.concatenate(values), bins=20)
            ax.hist(values, bins=edges, density=True, histtype="step", linewidth=1.5,
                    label=list(statistics))
            ax.set(xlabel=name.replace("_", " "), ylabel="density")
        ax.set_title(f"{name.replace('_', ' ')}\nsamples {distances[name]:.2f} sd from real")
    fig.axes[0].legend(loc="upper right", fontsize="small")
    save_figure(fig, path)


def plot_samples_by_slice(real, real_heights, samples, sample_heights, path):
    """Rows of heights, the top of the head at the top: real test slices at each height, then
    samples drawn at (nearest to) it."""
    levels = np.unique(real_heights)
    levels = levels[np.round(np.linspace(0, len(levels) - 1, min(HEIGHT_ROWS, len(levels))))
                    .astype(int)][::-1]
    sample_levels = evaluation.nearest_height(sample_heights, levels)
    fig = Figure(figsize=(1.6 * 2 * IMAGES_PER_HEIGHT, 1.7 * len(levels)))
    axes = fig.subplots(len(levels), 2 * IMAGES_PER_HEIGHT, squeeze=False)
    for row, level in enumerate(levels):
        images = [*real[real_heights == level][:IMAGES_PER_HEIGHT]]
        images += [None] * (IMAGES_PER_HEIGHT - len(images))
        images += [*samples[sample_levels == level][:IMAGES_PER_HEIGHT]]
        for ax, image in zip(axes[row], images):
            if image is not None:
                ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axis("off" if image is None else "on")
        axes[row, 0].set_ylabel(f"h = {level:.2f}")
    axes[0, 0].set_title("real test slices", loc="left")
    axes[0, IMAGES_PER_HEIGHT].set_title("samples at that height", loc="left")
    save_figure(fig, path)


def write_figures(model, splits, vq_history, sampled, codes, statistics, metrics, args):
    if vq_history:
        plot_losses(vq_history, args.out / "loss_plot.png")
        plot_validation_quality(vq_history, args.K, args.out / "ssim_plot.png")
    examples = next(iter(splits.scaled("validate").unbatch().batch(FIGURE_EXAMPLES)))
    reconstructions = evaluation.to_unit_range(model(examples), args.shift)
    originals = evaluation.to_unit_range(examples, args.shift)
    plot_codebook_results(originals.numpy(), model.encode_to_indices(examples).numpy(),
                          reconstructions.numpy(),
                          evaluation.ssim(originals, reconstructions).numpy(),
                          args.out / "codebook_results.png")
    sampled_codes, sampled_images, sampled_heights = sampled
    # spread over the samples: a conditional run draws them in order of height
    shown = np.linspace(0, len(sampled_codes) - 1, SAMPLES_SHOWN).round().astype(int)
    plot_samples(sampled_codes[shown], sampled_images[shown], args.out / "samples.png")
    if sampled_heights is not None:
        real = np.concatenate(list(splits.test.batch(256).as_numpy_iterator())) / PIXEL_MAX
        plot_samples_by_slice(real, splits.heights("test"), sampled_images, sampled_heights,
                              args.out / "samples_by_slice.png")
    plot_codebook_usage(evaluation.code_counts(codes["test"], args.K),
                        args.out / "codebook_usage.png")
    plot_realism(statistics, metrics["samples"]["anatomy"], args.out / "realism.png")


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Checkpoints:
    """Where one model's finished .keras file, per-epoch history and resumable state live."""

    keras_file: Path
    history: Path
    backup: Path
    best: Path

    @classmethod
    def in_folder(cls, folder, name):
        return cls(folder / f"{name}.keras", folder / f"{name}_history.json",
                   folder / f"{name}_backup", folder / f"{name}_best.weights.h5")

    def remove(self):
        self.keras_file.unlink(missing_ok=True)
        self.history.unlink(missing_ok=True)
        self.best.unlink(missing_ok=True)
        shutil.rmtree(self.backup, ignore_errors=True)


SETTINGS_FILE = "settings.json"
# Flags that change what a checkpoint holds: a resumed run must use the same ones.
MODEL_FLAGS = ("data", "image_size", "shift", "downsample", "K", "D", "beta", "quantizer",
               "ema_decay", "restart_threshold", "epochs", "batch_size", "learning_rate",
               "pcnn_type", "pcnn_epochs", "pcnn_learning_rate", "pcnn_filters", "pcnn_res_blocks",
               "pcnn_dilation_cycle", "pcnn_layers", "condition", "pcnn_positions", "seed")
# What models saved before a flag existed were trained with.
LEGACY_SETTINGS = {"condition": "none", "pcnn_positions": "none"}


def model_settings(args):
    return {flag: getattr(args, flag) for flag in MODEL_FLAGS} | {"data": str(args.data)}


def trained_settings(args):
    """--evaluate's settings: the flags the saved models were trained with (except --data, which
    names the data to evaluate on now), the rest as given."""
    settings_file = args.checkpoint_dir / SETTINGS_FILE
    if not settings_file.exists():
        return args
    saved = LEGACY_SETTINGS | json.loads(settings_file.read_text())
    trained = {flag: value for flag, value in saved.items()
               if flag in MODEL_FLAGS and flag != "data"}
    return argparse.Namespace(**(vars(args) | trained))


def prepare_checkpoints(args):
    """The two models' checkpoints; --fresh removes them, and a resumed run must match them."""
    folder = args.checkpoint_dir
    prepare_folder(folder, "--checkpoint-dir")
    checkpoints = Checkpoints.in_folder(folder, "vqvae"), Checkpoints.in_folder(folder, "pixelcnn")
    if args.evaluate:
        return checkpoints
    settings_file = folder / SETTINGS_FILE
    if args.fresh:
        for checkpoint in checkpoints:
            checkpoint.remove()
        settings_file.unlink(missing_ok=True)
    if settings_file.exists():
        saved = LEGACY_SETTINGS | json.loads(settings_file.read_text())
        changed = sorted(k for k in MODEL_FLAGS if saved.get(k) != model_settings(args)[k])
        if changed:
            raise PipelineError(f"{folder} holds a run made with other settings "
                                f"({', '.join(changed)}); pass --fresh to start over, or another "
                                "--checkpoint-dir")
    save_json(model_settings(args), settings_file)
    return checkpoints


def trained(what, checkpoints, train, needs_training):
    """The model of a finished earlier run, or one that train() trains (or resumes) now."""
    if needs_training:
        save_model(train(), checkpoints.keras_file)
    if not checkpoints.keras_file.exists():
        raise PipelineError(f"no saved {what} at {checkpoints.keras_file}; train first (run "
                            "without --evaluate), point --checkpoint-dir at a finished run, or "
                            "in a cluster rerun every worker with --fresh")
    model = loaded(what, checkpoints.keras_file)
    print(f"{what} weights: sha256 {weights_fingerprint(model)}")
    return model


def loaded(what, path):
    """The model saved at path; a damaged file, or one saved by a version of this code whose
    layers differ, is a PipelineError (Keras raises ValueError or TypeError)."""
    try:
        return keras.models.load_model(path, safe_mode=True)
    except (ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0].rstrip(":")
        raise PipelineError(f"cannot load the {what} at {path} ({reason}): the file is damaged "
                            "or was saved by another version of this code; retrain with "
                            "--fresh (without --evaluate), or point --checkpoint-dir at "
                            "another run") from error


def weights_fingerprint(model):
    """A hash of every weight's bytes: workers of a cluster train in sync, so theirs are equal."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def slice_heights(splits, condition):
    """{split: each image's relative height} for a conditional prior, {split: None} otherwise."""
    return {split: splits.heights(split) if condition == "slice" else None
            for split in SPLIT_FOLDERS}


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


def sample_images(models, heights, args):
    """Sampled code maps (N, h, w) and their decoded images in [0, 1] (N, H, W, 1), drawn at
    the relative heights given (None for an unconditional prior)."""
    model, prior = models
    grid = args.image_size // args.downsample
    started = time.perf_counter()
    codes = pixelcnn.sample_codes(prior, args.num_samples, (grid, grid), args.temperature,
                                  args.seed, heights)
    images = evaluation.to_unit_range(model.decode_indices(codes), args.shift).numpy()
    print(f"Sampled {args.num_samples} code maps of {grid}x{grid} and decoded them in "
          f"{time.perf_counter() - started:.1f} s")
    return codes.numpy(), images


def run(args):
    # first, before any TensorFlow operation: a multi-worker strategy requires it
    strategy = distribution_strategy(args.strategy, args.cpu_replicas)
    print(describe_devices(strategy))
    if args.evaluate:
        args = trained_settings(args)
    own_folder = worker_folder(strategy, args.checkpoint_dir)
    if own_folder:
        args = argparse.Namespace(**(vars(args) | {"out": own_folder,
                                                   "checkpoint_dir": own_folder}))
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision != "off":
        keras.mixed_precision.set_global_policy(f"mixed_{args.mixed_precision}")
    prepare_folder(args.out, "--out")
    vq_checkpoints, prior_checkpoints = prepare_checkpoints(args)
    train_vq, train_pcnn = (not args.evaluate and chief_lacks(checkpoints.keras_file, strategy)
                            for checkpoints in (vq_checkpoints, prior_checkpoints))
    if own_folder and not (train_vq or train_pcnn):
        return finish_worker(own_folder)
    splits = load_splits(args.data, args.image_size, args.shift, args.batch_size, args.demo)
    heights = slice_heights(splits, args.condition)
    drawn_at = (sample_heights(args.slice, args.num_samples, splits.top_slice, heights["test"])
                if args.condition == "slice" else None)
    model = trained("VQ-VAE", vq_checkpoints,
                    lambda: train_vqvae(splits, args, vq_checkpoints, strategy), train_vq)
    codes = {split: encode(model, splits.scaled(split)) for split in SPLIT_FOLDERS}
    prior = trained("PixelCNN", prior_checkpoints,
                    lambda: train_prior(codes, heights, args, prior_checkpoints, strategy),
                    train_pcnn)
    if own_folder:
        return finish_worker(own_folder)
    sampled_codes, sampled_images = sample_images((model, prior), drawn_at, args)
    save_sample_pngs(sampled_images, args.out / "samples", drawn_at)
    sampled = (sampled_codes, sampled_images, drawn_at)
    metrics, statistics = evaluate((model, prior), splits, sampled, codes, heights, args)
    save_json(metrics, args.out / "metrics.json")
    save_json(vars(args) | {"data": str(args.data), "out": str(args.out),
                            "checkpoint_dir": str(args.checkpoint_dir)},
              args.out / "run_settings.json")
    write_figures(model, splits, by_metric(read_epochs(vq_checkpoints.history)),
                  sampled, codes, statistics, metrics, args)
    print_metrics(metrics)
    print(f"\nSamples, figures, metrics.json and run_settings.json: {args.out}/")
    print(f"Models: {vq_checkpoints.keras_file}, {prior_checkpoints.keras_file}")


def finish_worker(own_folder):
    """A worker other than the chief stops once the models are trained: evaluation, sampling and
    figures are the chief's alone, and use no collective op that this worker would have to join."""
    shutil.rmtree(own_folder)
    print(f"Worker finished training; the chief writes the results ({own_folder} removed)")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except PipelineError as error:
        sys.exit(f"driver.py: error: {error}")
    except tf.errors.UnavailableError:  # raised by a collective op only
        sys.exit("driver.py: error: lost contact with another worker of the cluster; rerun the "
                 "same command on every worker that stopped: training resumes from the last "
                 "finished epoch")


if __name__ == "__main__":
    main()
