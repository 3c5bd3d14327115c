"""Learn a generative model of brain MRI slices: a VQ-VAE, then a PixelCNN prior over its codes.

    python driver.py --demo                          # the bundled demo slices, a few minutes on CPU
    python driver.py --data keras_png_slices_data    # OASIS
    python driver.py --evaluate                      # metrics and figures from saved models

The pipeline: load the three splits, train the VQ-VAE (van den Oord et al. 2017), encode the
training split to code maps once, train the PixelCNN prior (van den Oord et al. 2016) on them,
sample new code maps and decode them, evaluate everything on the test split, write the figures
and metrics.json into --out. Finished models go to --checkpoint-dir; a killed run resumes there.
"""

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# TensorFlow's C++ start-up chatter hides the progress bars; it must be silenced before import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

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
# PSNR of identical images would be infinite: the MSE is floored here (caps PSNR at 100 dB).
MSE_FLOOR = 1e-10
# tf.image.ssim's Gaussian window is 11 pixels wide; the code grid is the image / 4.
MIN_IMAGE_SIZE = 16
FIGURE_EXAMPLES = 6  # images in codebook_results.png
SAMPLES_SHOWN = 8  # samples in samples.png
C2ST_EPOCHS = 30
C2ST_LEARNING_RATE = 1e-3


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
positive_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a number > 0")
non_negative_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
unit_interval = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
image_size = checked(
    int, lambda v: v >= MIN_IMAGE_SIZE and v % vqvae.DOWNSAMPLING == 0,
    f"a multiple of {vqvae.DOWNSAMPLING} >= {MIN_IMAGE_SIZE}",
)

# Settings of --demo: small enough to finish on a 2-core CPU in minutes (see the README).
DEMO_DEFAULTS = dict(
    image_size=64, epochs=40, batch_size=16, learning_rate=1e-3, K=128, D=16,
    pcnn_epochs=40, pcnn_learning_rate=1e-3, pcnn_filters=64, pcnn_res_blocks=8,
    num_samples=64,
)


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
    data.add_argument("--image-size", type=image_size, default=EXPECTED_SIZE,
                      help="images are resized to this square size (default: %(default)s)")
    data.add_argument("--shift", type=unit_interval, default=0.5,
                      help="subtracted after dividing by 255; 0.5 gives [-0.5, 0.5] "
                           "(default: %(default)s)")

    vq = parser.add_argument_group("VQ-VAE")
    vq.add_argument("--K", type=positive_int, default=512,
                    help="K, the number of codebook vectors (default: %(default)s)")
    vq.add_argument("--D", type=positive_int, default=2,
                    help="D, the size of each codebook vector (default: %(default)s)")
    vq.add_argument("--beta", type=non_negative_float, default=1.5,
                    help="beta, the commitment loss weight of eq. 3 (default: %(default)s)")
    vq.add_argument("--epochs", type=non_negative_int, default=30,
                    help="VQ-VAE training epochs (default: %(default)s)")
    vq.add_argument("--batch_size", type=positive_int, default=32,
                    help="batch size of both models (default: %(default)s)")
    vq.add_argument("--learning_rate", type=positive_float, default=2e-4,
                    help="VQ-VAE Adam learning rate (default: %(default)s)")

    prior = parser.add_argument_group("PixelCNN prior")
    prior.add_argument("--pcnn-type", choices=pixelcnn.KINDS, default="gated",
                       help="plain masked convolutions or the gated PixelCNN "
                            "(default: %(default)s)")
    prior.add_argument("--pcnn-epochs", type=non_negative_int, default=30,
                       help="PixelCNN training epochs (default: %(default)s)")
    prior.add_argument("--pcnn-learning-rate", type=positive_float, default=3e-4,
                       help="PixelCNN Adam learning rate (default: %(default)s)")
    prior.add_argument("--pcnn-filters", type=positive_int, default=128,
                       help="channels of every PixelCNN layer (default: %(default)s)")
    prior.add_argument("--pcnn-res-blocks", type=non_negative_int, default=2,
                       help="residual (plain) or gated (gated) blocks after the first masked "
                            "convolution (default: %(default)s)")
    prior.add_argument("--pcnn-layers", type=non_negative_int, default=2,
                       help="1x1 convolution layers between the blocks and the logits "
                            "(default: %(default)s)")
    prior.add_argument("--num-samples", type=positive_int, default=32,
                       help="code maps to sample and decode (default: %(default)s)")
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
    hardware.add_argument("--mixed-precision", choices=("off", "float16", "bfloat16"),
                          default="off",
                          help="compute in 16 bits with float32 weights (float16 with loss "
                               "scaling); for GPUs: it slows CPUs down (default: %(default)s)")

    run = parser.add_argument_group("output and run control")
    run.add_argument("--out", type=Path, default=Path("resources"),
                     help="folder for figures and metrics.json (default: %(default)s)")
    run.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"),
                     help="folder for trained models and resumable state (default: %(default)s)")
    run.add_argument("--seed", type=non_negative_int, default=0,
                     help="seed of every random source (default: %(default)s)")
    run.add_argument("--evaluate", action="store_true",
                     help="skip training: load the models in --checkpoint-dir and recompute "
                          "metrics and figures")
    run.add_argument("--fresh", action="store_true",
                     help="ignore and replace checkpoints of an earlier run instead of resuming")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(data=DEMO_DATA, **DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("argument --num-samples: expected an integer >= 2 (diversity compares pairs)")
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


def load_split(folder, size):
    """Decode a split once into a cached dataset of uint8 images (N, size, size, 1)."""
    check_split_folder(folder)
    images = keras.utils.image_dataset_from_directory(
        folder, labels=None, color_mode="grayscale", image_size=(size, size),
        batch_size=None, shuffle=False, verbose=False,
    )
    # uint8 in the cache takes a quarter of float32's memory.
    return images.map(lambda x: tf.cast(tf.round(x), tf.uint8)).cache()


@dataclass
class Splits:
    train: tf.data.Dataset
    validate: tf.data.Dataset
    test: tf.data.Dataset
    shift: float
    batch_size: int

    def scaled(self, split):
        """Batches of images in [-shift, 1 - shift]."""
        return (getattr(self, split).batch(self.batch_size)
                .map(lambda x: tf.cast(x, tf.float32) / PIXEL_MAX - self.shift)
                .prefetch(tf.data.AUTOTUNE))

    def shuffled_train(self, seed):
        count = int(self.train.cardinality())
        return (self.train.shuffle(count, seed=seed, reshuffle_each_iteration=True)
                .batch(self.batch_size)
                .map(lambda x: tf.cast(x, tf.float32) / PIXEL_MAX - self.shift)
                .prefetch(tf.data.AUTOTUNE))


def load_splits(data_dir, size, shift, batch_size, demo):
    if not data_dir.is_dir():
        hint = "" if demo else f"; {OASIS_SOURCE}, or run with --demo for the bundled slices"
        raise PipelineError(f"data folder {data_dir} not found{hint}")
    train, validate, test = (load_split(data_dir / SPLIT_FOLDERS[s], size) for s in SPLIT_FOLDERS)
    return Splits(train, validate, test, shift, batch_size)


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


class SSIMCallback(keras.callbacks.Callback):
    """After every epoch, the mean SSIM of the validation images and their reconstructions,
    recorded in the history as val_ssim."""

    def __init__(self, images, shift):
        super().__init__()
        self.images = images
        self.shift = shift

    def on_epoch_end(self, epoch, logs=None):
        logs["val_ssim"] = mean_reconstruction_ssim(self.model, self.images, self.shift)


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
        self.epochs = json.loads(self.path.read_text()) if self.path.exists() else []

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
        epochs = json.loads(self.history.read_text()) if self.history.exists() else []
        self.best = min((epoch["val_loss"] for epoch in epochs), default=math.inf)

    def on_epoch_end(self, epoch, logs=None):
        if logs.get("val_loss", math.inf) < self.best:  # no validation data: nothing to pick
            self.best = logs["val_loss"]
            replace_atomically(self.path, self.model.save_weights)

    def on_train_end(self, logs=None):
        if self.path.exists():
            self.model.load_weights(self.path)


def read_history(path):
    """{metric: [value per epoch]} from a HistoryFile, or None if there is none."""
    if not path.exists():
        return None
    epochs = json.loads(path.read_text())
    return {key: [epoch[key] for epoch in epochs] for key in epochs[0]} if epochs else None


def fit(model, data, validation, epochs, checkpoints, callbacks=()):
    """model.fit that resumes from the last finished epoch, keeps its history in a file, stops
    on a non-finite loss before that loss can reach a checkpoint and ends with the weights of
    the best validation epoch."""
    return model.fit(
        data, validation_data=validation, epochs=epochs, shuffle=False,
        # KeepBest before HistoryFile: a kill between the two then loses no best epoch
        callbacks=[*callbacks, KeepBest(checkpoints.best, checkpoints.history),
                   HistoryFile(checkpoints.history), StopOnNonFiniteLoss(model.name),
                   AtomicBackupAndRestore(str(checkpoints.backup))],
    )


def distribution_strategy(name):
    """The tf.distribute strategy that --strategy names; --batch_size is the global batch."""
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored" or len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def train_vqvae(splits, args, checkpoints):
    variance = pixel_variance(splits.train)
    with distribution_strategy(args.strategy).scope():
        model = vqvae.VQVAE(args.K, args.D, beta=args.beta, data_variance=variance,
                            pixel_range=(-args.shift, 1.0 - args.shift))
        model.compile(optimizer=keras.optimizers.Adam(args.learning_rate))
        model(tf.zeros((1, args.image_size, args.image_size, 1)))  # build, so a backup restores
    fit(model, splits.shuffled_train(args.seed), splits.scaled("validate"), args.epochs,
        checkpoints, callbacks=[SSIMCallback(splits.scaled("validate"), args.shift)])
    return model


def encode(model, images):
    """Code maps (N, h, w) of a batched image dataset, computed once."""
    return np.concatenate([model.encode_to_indices(batch).numpy() for batch in images])


def code_dataset(codes, batch_size, seed=None):
    data = tf.data.Dataset.from_tensor_slices((codes, codes))
    if seed is not None:
        data = data.shuffle(len(codes), seed=seed, reshuffle_each_iteration=True)
    return data.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def train_prior(train_codes, validate_codes, args, checkpoints):
    with distribution_strategy(args.strategy).scope():
        prior = pixelcnn.build_pixelcnn(args.K, args.pcnn_filters, args.pcnn_res_blocks,
                                        args.pcnn_layers, kind=args.pcnn_type)
        prior.compile(optimizer=keras.optimizers.Adam(args.pcnn_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    fit(prior, code_dataset(train_codes, args.batch_size, args.seed),
        code_dataset(validate_codes, args.batch_size), args.pcnn_epochs, checkpoints)
    return prior


# ---------------------------------------------------------------------------------------------
# Evaluation


def to_unit_range(images, shift):
    return tf.clip_by_value(tf.cast(images, tf.float32) + shift, 0.0, 1.0)


def ssim(a, b):
    """Per-image SSIM of images in [0, 1]."""
    return tf.image.ssim(a, b, max_val=1.0)


def psnr(a, b):
    """Per-image PSNR (dB) of images in [0, 1]; identical images give the cap, not infinity."""
    mse = tf.reduce_mean(tf.square(a - b), axis=[1, 2, 3])
    return -10.0 * tf.math.log(tf.maximum(mse, MSE_FLOOR)) / tf.math.log(10.0)


def mean_reconstruction_ssim(model, images, shift):
    scores = [ssim(to_unit_range(batch, shift), to_unit_range(model(batch), shift))
              for batch in images]
    return float(tf.reduce_mean(tf.concat(scores, axis=0)))


def reconstruction_metrics(model, images, shift):
    ssims, psnrs, mses = [], [], []
    for batch in images:
        original = to_unit_range(batch, shift)
        reconstruction = to_unit_range(model(batch), shift)
        ssims.append(ssim(original, reconstruction))
        psnrs.append(psnr(original, reconstruction))
        mses.append(tf.reduce_mean(tf.square(original - reconstruction), axis=[1, 2, 3]))
    mean = lambda values: float(tf.reduce_mean(tf.concat(values, axis=0)))  # noqa: E731
    return {"test_ssim": mean(ssims), "test_psnr": mean(psnrs), "test_mse": mean(mses)}


def code_counts(codes, num_embeddings):
    return np.bincount(np.asarray(codes).ravel(), minlength=num_embeddings)


def entropy_bits(counts):
    """Entropy in bits of the distribution with these counts."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def codebook_metrics(counts):
    return {
        "codebook_perplexity": float(2 ** entropy_bits(counts)),
        "codes_used": float((counts > 0).mean()),
    }


def prior_nll_bits(prior, codes, batch_size):
    """Mean negative log-likelihood per code, in bits, of code maps under the prior."""
    total, count = 0.0, 0
    for batch in tf.data.Dataset.from_tensor_slices(codes).batch(batch_size):
        logits = prior(batch, training=False)
        nll = keras.losses.sparse_categorical_crossentropy(batch, logits, from_logits=True)
        total += float(tf.reduce_sum(nll))
        count += int(tf.size(nll))
    return total / count / math.log(2)


def nearest_neighbour_ssim(samples, images):
    """For each sample (in [0, 1]), the highest SSIM to any of the images (a dataset in [0, 1])."""
    best = tf.fill([tf.shape(samples)[0]], -1.0)
    for batch in images:
        # (S, B): every sample against every image of the batch
        scores = tf.stack([ssim(tf.repeat(sample[None], tf.shape(batch)[0], 0), batch)
                           for sample in samples])
        best = tf.maximum(best, tf.reduce_max(scores, axis=1))
    return best.numpy()


def pairwise_ssim(samples):
    """Mean SSIM over all pairs of distinct samples."""
    scores = [ssim(samples[i:i + 1], samples[j:j + 1])
              for i in range(len(samples)) for j in range(i + 1, len(samples))]
    return float(tf.reduce_mean(tf.concat(scores, axis=0)))


def two_sample_classifier():
    """A small CNN that outputs the logit of 'this image is a sample'."""
    return keras.Sequential([
        keras.Input(shape=(None, None, 1)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1),
    ])


def c2st_accuracy(real, fake, seed):
    """Classifier two-sample test: accuracy of a CNN telling real from fake on held-out halves.

    Both sets are cut to the same size, shuffled, and split in half; the CNN trains on one half of
    each and is scored on the other. 0.5 means it cannot tell them apart.
    """
    count = min(len(real), len(fake))
    rng = np.random.default_rng(seed)
    real = np.asarray(real)[rng.permutation(len(real))[:count]]
    fake = np.asarray(fake)[rng.permutation(len(fake))[:count]]
    half = count // 2
    if half < 1:
        raise PipelineError("the two-sample test needs at least 2 samples and 2 test images")
    images = lambda part: np.concatenate([real[part], fake[part]])  # noqa: E731
    labels = lambda n_real, n_fake: np.r_[np.zeros(n_real), np.ones(n_fake)]  # noqa: E731
    train, held_out = slice(0, half), slice(half, count)
    keras.utils.set_random_seed(seed)
    classifier = two_sample_classifier()
    classifier.compile(optimizer=keras.optimizers.Adam(C2ST_LEARNING_RATE),
                       loss=keras.losses.BinaryCrossentropy(from_logits=True))
    classifier.fit(images(train), labels(half, half), epochs=C2ST_EPOCHS,
                   batch_size=min(32, 2 * half), shuffle=True, verbose=0)
    predictions = classifier.predict(images(held_out), verbose=0)[:, 0] > 0
    return float((predictions == labels(count - half, count - half)).mean())


def evaluate(models, splits, samples, train_codes, test_codes, args):
    """metrics.json: reconstruction on the test split, code usage, prior fit, sample quality."""
    model, prior = models
    test_counts = code_counts(test_codes, args.K)
    unit = lambda data: data.map(lambda x: tf.cast(x, tf.float32) / PIXEL_MAX)  # noqa: E731
    test_images = np.concatenate(list(unit(splits.test).batch(args.batch_size)))
    return {
        "vqvae": {**reconstruction_metrics(model, splits.scaled("test"), args.shift),
                  **codebook_metrics(test_counts)},
        "pixelcnn": {
            "test_nll_bits": prior_nll_bits(prior, test_codes, args.batch_size),
            "unigram_bits": entropy_bits(code_counts(train_codes, args.K)),
            "uniform_bits": math.log2(args.K),
        },
        "samples": {
            "nn_ssim": float(nearest_neighbour_ssim(
                samples, unit(splits.train).batch(args.batch_size)).mean()),
            "pairwise_ssim": pairwise_ssim(samples),
            "c2st_accuracy": c2st_accuracy(test_images, samples.numpy(), args.seed),
        },
    }


# ---------------------------------------------------------------------------------------------
# Figures: one function per PNG, each taking data and a path.


def plot_losses(history, path):
    fig = Figure(figsize=(12, 3.5))
    for ax, key, title in zip(fig.subplots(1, 3), ("loss", "reconstruction_loss", "vq_loss"),
                              ("total loss", "reconstruction loss (MSE / variance)", "VQ loss")):
        epochs = np.arange(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set(title=title, xlabel="epoch")
        ax.legend()
    save_figure(fig, path)


def plot_ssim(history, path):
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    ax.plot(np.arange(1, len(history["val_ssim"]) + 1), history["val_ssim"], marker="o")
    ax.set(title="validation SSIM", xlabel="epoch", ylabel="mean SSIM")
    save_figure(fig, path)


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


def write_figures(models, splits, vq_history, sampled, test_codes, args):
    model, _ = models
    if vq_history:
        plot_losses(vq_history, args.out / "loss_plot.png")
        plot_ssim(vq_history, args.out / "ssim_plot.png")
    examples = next(iter(splits.scaled("validate").unbatch().batch(FIGURE_EXAMPLES)))
    reconstructions = to_unit_range(model(examples), args.shift)
    originals = to_unit_range(examples, args.shift)
    plot_codebook_results(originals.numpy(), model.encode_to_indices(examples).numpy(),
                          reconstructions.numpy(), ssim(originals, reconstructions).numpy(),
                          args.out / "codebook_results.png")
    codes, images = sampled
    plot_samples(codes[:SAMPLES_SHOWN], images[:SAMPLES_SHOWN], args.out / "samples.png")
    plot_codebook_usage(code_counts(test_codes, args.K), args.out / "codebook_usage.png")


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Checkpoints:
    """Where one model's finished .keras file, per-epoch history and resumable state live."""

    model: Path
    history: Path
    backup: Path
    best: Path

    @classmethod
    def in_folder(cls, folder, name):
        return cls(folder / f"{name}.keras", folder / f"{name}_history.json",
                   folder / f"{name}_backup", folder / f"{name}_best.weights.h5")

    def remove(self):
        self.model.unlink(missing_ok=True)
        self.history.unlink(missing_ok=True)
        self.best.unlink(missing_ok=True)
        shutil.rmtree(self.backup, ignore_errors=True)


SETTINGS_FILE = "settings.json"
# Flags that change what a checkpoint holds: a resumed run must use the same ones.
MODEL_FLAGS = ("data", "image_size", "shift", "K", "D", "beta", "epochs", "batch_size",
               "learning_rate", "pcnn_type", "pcnn_epochs", "pcnn_learning_rate",
               "pcnn_filters", "pcnn_res_blocks", "pcnn_layers", "seed")


def model_settings(args):
    return {flag: getattr(args, flag) for flag in MODEL_FLAGS} | {"data": str(args.data)}


def prepare_checkpoints(args):
    """The two models' checkpoints; --fresh removes them, and a resumed run must match them."""
    folder = args.checkpoint_dir
    prepare_folder(folder, "--checkpoint-dir")
    checkpoints = Checkpoints.in_folder(folder, "vqvae"), Checkpoints.in_folder(folder, "pixelcnn")
    settings_file = folder / SETTINGS_FILE
    if args.evaluate:
        # evaluate the models as they were trained, on whatever data --data names now
        if settings_file.exists():
            saved = json.loads(settings_file.read_text())
            vars(args).update({k: v for k, v in saved.items() if k in MODEL_FLAGS and k != "data"})
        return checkpoints
    if args.fresh:
        for checkpoint in checkpoints:
            checkpoint.remove()
        settings_file.unlink(missing_ok=True)
    if settings_file.exists():
        saved = json.loads(settings_file.read_text())
        changed = sorted(k for k in MODEL_FLAGS if saved.get(k) != model_settings(args)[k])
        if changed:
            raise PipelineError(f"{folder} holds a run made with other settings "
                                f"({', '.join(changed)}); pass --fresh to start over, or another "
                                "--checkpoint-dir")
    save_json(model_settings(args), settings_file)
    return checkpoints


def load_saved(path, what):
    if not path.exists():
        raise PipelineError(f"no saved {what} at {path}; train first (run without --evaluate) "
                            "or point --checkpoint-dir at a finished run")
    return keras.models.load_model(path, safe_mode=True)


def trained_vqvae(splits, args, checkpoints):
    """The VQ-VAE of a finished earlier run, or a newly trained (or resumed) one."""
    if not checkpoints.model.exists() and not args.evaluate:
        print(f"Training the VQ-VAE for {args.epochs} epochs")
        save_model(train_vqvae(splits, args, checkpoints), checkpoints.model)
    return load_saved(checkpoints.model, "VQ-VAE")


def trained_prior(train_codes, validate_codes, args, checkpoints):
    """The PixelCNN of a finished earlier run, or a newly trained (or resumed) one."""
    if not checkpoints.model.exists() and not args.evaluate:
        print(f"Training the {args.pcnn_type} PixelCNN for {args.pcnn_epochs} epochs on "
              f"{len(train_codes)} code maps of {train_codes.shape[1]}x{train_codes.shape[2]}")
        save_model(train_prior(train_codes, validate_codes, args, checkpoints), checkpoints.model)
    return load_saved(checkpoints.model, "PixelCNN")


def sample_images(models, args):
    """Sampled code maps (N, h, w) and their decoded images in [0, 1]."""
    model, prior = models
    grid = args.image_size // vqvae.DOWNSAMPLING
    print(f"Sampling {args.num_samples} code maps of {grid}x{grid}")
    codes = pixelcnn.sample_codes(prior, args.num_samples, (grid, grid), args.temperature,
                                  args.seed)
    return codes.numpy(), to_unit_range(model.decode_indices(codes), args.shift)


def print_metrics(metrics):
    print("\nTest-split evaluation")
    for group, values in metrics.items():
        for name, value in values.items():
            print(f"  {group + '.' + name:<30} {value:10.4f}")


def run(args):
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision != "off":
        keras.mixed_precision.set_global_policy(f"mixed_{args.mixed_precision}")
    prepare_folder(args.out, "--out")
    vq_checkpoints, prior_checkpoints = prepare_checkpoints(args)
    splits = load_splits(args.data, args.image_size, args.shift, args.batch_size, args.demo)
    model = trained_vqvae(splits, args, vq_checkpoints)
    train_codes = encode(model, splits.scaled("train"))
    prior = trained_prior(train_codes, encode(model, splits.scaled("validate")), args,
                          prior_checkpoints)
    sampled_codes, sampled_images = sample_images((model, prior), args)
    test_codes = encode(model, splits.scaled("test"))
    metrics = evaluate((model, prior), splits, sampled_images, train_codes, test_codes, args)
    save_json(metrics, args.out / "metrics.json")
    save_json(vars(args) | {"data": str(args.data), "out": str(args.out),
                            "checkpoint_dir": str(args.checkpoint_dir)},
              args.out / "run_settings.json")
    write_figures((model, prior), splits, read_history(vq_checkpoints.history),
                  (sampled_codes, sampled_images.numpy()), test_codes, args)
    print_metrics(metrics)
    print(f"\nFigures, metrics.json and run_settings.json: {args.out}/")
    print(f"Models: {vq_checkpoints.model}, {prior_checkpoints.model}")


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except PipelineError as error:
        sys.exit(f"driver.py: error: {error}")


if __name__ == "__main__":
    main()
