"""Run plumbing: the settings of a run, files written atomically, resumable training, saved
models, and the distribution strategies. Nothing here is the models' math.

- Settings: frozen configs (nanoGPT's GPTConfig pattern) filled from the flags; the settings a
  checkpoint was made with are their fields, and a resumed run must match them.
- Files: every output is written to a temporary name and renamed, so a killed run never leaves
  half a file and never removes the last run's output before the new one is complete; and the
  format every figure shares.
- Training: `fit` resumes from the last finished epoch, keeps the history, stops on a non-finite
  loss and ends with the best validation epoch's weights.
- Clusters: --strategy's tf.distribute strategies and what the workers of a cluster agree on.
"""

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from matplotlib import colormaps, ticker
from PIL import Image

import evaluation
import pixelcnn
import vqvae

REPOSITORY = Path(__file__).resolve().parent
PIXEL_MAX = 255.0
SETTINGS_FILE = "settings.json"
# What models saved before a setting existed were trained with.
LEGACY_SETTINGS = {"condition": "none", "pcnn_positions": "none", "pcnn_mirror": False,
                   "pcnn_dropout": 0.0, "pcnn_attention": False, "top_K": None,
                   "levels": 1, "reconstruction": "mse", "spectral_weight": 0.0,
                   "adversarial_weight": 0.0,
                   "discriminator_start": vqvae.VQGAN_DISCRIMINATOR_START,
                   "discriminator_learning_rate": vqvae.PIX2PIX_LEARNING_RATE}
# tf.image.ssim's Gaussian window is 11 pixels wide, and the code grid is smaller still.
MIN_IMAGE_SIZE = 16
# --verbose: what prints besides each stage's heading, the results and the errors: nothing,
# one line per epoch and per finished step (for log files), or progress bars.
QUIET, LINES, BARS = 0, 1, 2


class PipelineError(Exception):
    """A problem with the input or the environment, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------------
# Settings: each field of a config is a flag of driver.py, with its default and help line here.
# The defaults are ours, chosen at 256x256 (docs/experiments.md); the libraries' constructors
# default to the papers' values.


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
dropout_rate = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
square_size = checked(int, lambda v: v >= MIN_IMAGE_SIZE, f"an integer >= {MIN_IMAGE_SIZE}")
power_of_two = checked(int, lambda v: v >= 2 and v & (v - 1) == 0, "a power of 2 >= 2")


def slice_list(text):
    """--slice: comma-separated heights or slice indices. A value with a '.' is a relative
    height in [0, 1] (a float); a plain integer is a slice index (an int), which
    `data.sample_heights` converts with the data set's slices per case."""
    height = checked(float, lambda v: 0 <= v <= 1, "a height in [0, 1] such as 0.5")
    index = checked(int, lambda v: v >= 0, "a slice index >= 0 or a height such as 0.5")
    return [height(value) if "." in value else index(value) for value in text.split(",")]


def setting(default, help, type=None, choices=None, alias=None, action=None, group=None):
    """A field that is also a flag: --name-with-hyphens (and an older spelling, alias), parsed
    by `type` or one of `choices` (or an argparse `action`), explained by `help`, shown in -h
    under `group` (the configs' fields under their config's)."""
    flag = {"help": help, "type": type, "choices": choices, "alias": alias, "action": action,
            "group": group}
    return dataclasses.field(default=default, metadata=flag)


@dataclass(frozen=True)
class DataConfig:
    """What the models learn from: the slices, their size and scaling, the batch and the seed."""

    data: Path = setting(Path("keras_png_slices_data"), type=Path,
                         help="folder holding keras_png_slices_{train,validate,test}")
    image_size: int = setting(256, type=square_size,
                              help="images are resized to this square size, a multiple of "
                                   "--downsample")
    shift: float = setting(0.5, type=unit_interval,
                           help="subtracted after dividing by 255; 0.5 gives [-0.5, 0.5]")
    batch_size: int = setting(16, type=positive_int, alias="--batch_size",
                              help="batch size of both models")
    seed: int = setting(0, type=non_negative_int, help="seed of every random source")


@dataclass(frozen=True)
class VQVAEConfig:
    """The VQ-VAE and its training."""

    K: int = setting(128, type=positive_int,
                     help="K, the number of codebook vectors (the bottom level's with --levels 2)")
    top_K: int = setting(None, type=positive_int,
                         help="K of the top level's codebook with --levels 2: fewer codes leave "
                              "the top level the layout and the bottom level the texture "
                              "(default: --K, as in VQ-VAE-2)")
    D: int = setting(16, type=positive_int, help="D, the size of each codebook vector")
    beta: float = setting(1.5, type=non_negative_float,
                          help="beta, the commitment loss weight of eq. 3")
    downsample: int = setting(8, type=power_of_two,
                              help="the code grid is the image divided by this in each direction "
                                   "(the paper's and the seed's 4; 8 or 16 give the prior a "
                                   "smaller map)")
    quantizer: str = setting("ema", choices=vqvae.QUANTIZERS,
                             help="how the codebook learns: ema, moving averages of the encoder "
                                  "outputs (the paper's appendix A.1) with restarts of unused "
                                  "codes; loss, the codebook term of eq. 3")
    ema_decay: float = setting(vqvae.PAPER_EMA_DECAY, type=open_unit_interval,
                               help="gamma, the decay of the EMA codebook's moving averages")
    restart_threshold: float = setting(
        vqvae.RESTART_THRESHOLD, type=non_negative_float,
        help="an EMA code used by fewer encoder outputs per batch than this (moving average) is "
             "restarted at an encoder output drawn in proportion to its squared quantization "
             "error; 0 never restarts")
    levels: int = setting(
        2, type=int, choices=(1, 2),
        help="2: VQ-VAE-2's hierarchy (Razavi et al. 2019), top codes at the grid of "
             "--downsample and bottom codes at twice its resolution, each level with its own "
             "codebook and prior, the bottom prior conditioned on the top codes (needs "
             "--downsample >= 4 and the gated prior); 1: one code map at the grid of "
             "--downsample, as in the VQ-VAE paper")
    reconstruction: str = setting(
        vqvae.PAPER_RECONSTRUCTION, choices=vqvae.RECONSTRUCTIONS,
        help="the reconstruction term: mse, the squared error over the data variance (eq. 3); "
             f"l1_msssim, Zhao et al. 2017's {vqvae.ZHAO_ALPHA} (1 - MS-SSIM) + "
             f"{1 - vqvae.ZHAO_ALPHA:.2f} L1")
    spectral_weight: float = setting(
        0.0, type=non_negative_float,
        help="weight of a spectral loss, the L1 distance of the log Fourier amplitudes, which "
             "penalises the loss of fine detail that pixel losses tolerate; 0 turns it off")
    adversarial_weight: float = setting(
        0.0, type=non_negative_float,
        help="weight of a patch discriminator's hinge loss (VQGAN, Esser et al. 2021), scaled "
             "by VQGAN's adaptive weight; 0 builds no discriminator")
    discriminator_start: int = setting(
        vqvae.VQGAN_DISCRIMINATOR_START, type=non_negative_int,
        help="training step at which the discriminator and its loss switch on")
    discriminator_learning_rate: float = setting(
        vqvae.PIX2PIX_LEARNING_RATE, type=positive_float,
        help="the discriminator's Adam learning rate (pix2pix's for a patch discriminator "
             "trained from scratch)")
    epochs: int = setting(30, type=non_negative_int, help="VQ-VAE training epochs")
    learning_rate: float = setting(1e-3, type=positive_float, alias="--learning_rate",
                                   help="VQ-VAE Adam learning rate")

    def build(self, pixel_range, data_variance):
        """The VQ-VAE (VQ-VAE-2 with two levels), uncompiled."""
        top_level = {"top_num_embeddings": self.top_K} if self.levels == 2 else {}
        model = vqvae.VQVAE2 if self.levels == 2 else vqvae.VQVAE
        return model(self.K, self.D, beta=self.beta, data_variance=data_variance, **top_level,
                     pixel_range=pixel_range, downsample=self.downsample,
                     quantizer=self.quantizer, ema_decay=self.ema_decay,
                     restart_threshold=self.restart_threshold,
                     reconstruction=self.reconstruction, spectral_weight=self.spectral_weight,
                     adversarial_weight=self.adversarial_weight,
                     discriminator_start=self.discriminator_start,
                     discriminator_learning_rate=self.discriminator_learning_rate)

    @property
    def codebook_sizes(self):
        """K of each level's codebook, top first."""
        return (self.top_K or self.K, self.K) if self.levels == 2 else (self.K,)


@dataclass(frozen=True)
class PriorConfig:
    """The PixelCNN prior and its training. Conditioning on the slice's height and learned
    positions default to on for the gated prior and off for the plain one, which has neither."""

    pcnn_type: str = setting("gated", choices=pixelcnn.KINDS,
                             help="plain masked convolutions or the gated PixelCNN")
    pcnn_epochs: int = setting(30, type=non_negative_int, help="PixelCNN training epochs")
    pcnn_learning_rate: float = setting(1e-3, type=positive_float,
                                        help="PixelCNN Adam learning rate")
    pcnn_filters: int = setting(64, type=positive_int, help="channels of every PixelCNN layer")
    pcnn_res_blocks: int = setting(8, type=non_negative_int,
                                   help="residual (plain) or gated (gated) blocks after the "
                                        "first masked convolution")
    pcnn_dilation_cycle: int = setting(
        4, type=positive_int,
        help="block i's masked convolutions are dilated by 2 ** (i mod this), so the prior's "
             "reach grows exponentially with depth: 4 with 8 blocks sees a whole 32x32 map; 1 "
             "is the paper's undilated stack")
    pcnn_layers: int = setting(2, type=non_negative_int,
                               help="1x1 convolution layers between the blocks and the logits")
    pcnn_dropout: float = setting(
        0.1, type=dropout_rate,
        help="the rate at which each block drops its activations in training, against a prior "
             "that learns its training maps by heart (PixelCNN++ drops 0.5, rosinality's "
             "VQ-VAE-2 priors 0.1, the PixelCNN paper nothing: 0); sampling drops nothing")
    condition: str = setting(None, choices=pixelcnn.CONDITIONS,
                             help="none: the prior models p(c); slice: p(c | h), conditioned on "
                                  "each slice's relative height h in [0, 1] read from its file "
                                  "name (slice_<n>; section 2.3 of the PixelCNN paper), gated "
                                  "prior only (default: slice for the gated prior, none for the "
                                  "plain one)")
    pcnn_mirror: bool = setting(
        True, action=argparse.BooleanOptionalAction,
        help="the (top) prior also learns from the training slices mirrored left-right (their "
             "code maps as the VQ-VAE encodes the mirror images, at the same heights): brains "
             "are nearly symmetric, and it doubles a small training set. The bottom prior takes "
             "the layout from the top codes and is not mirrored: that would double the run's "
             "longest step")
    pcnn_attention: bool = setting(
        False, action=argparse.BooleanOptionalAction,
        help="the top prior (the only one with --levels 1) ends in PixelSNAIL's causal "
             "self-attention (Chen et al. 2018), so that each code reads every code drawn "
             "before it, not only those in the convolutions' reach; gated prior only. The bottom "
             "prior takes the layout from the top codes and has none: over its 4x larger map "
             "attention would cost 16x")
    pcnn_positions: str = setting(None, choices=("none", "learned"),
                                  help="learned: each code's embedding is added to a learned "
                                       "embedding of its row and column, so that the prior knows "
                                       "where the map ends; gated prior only (default: learned "
                                       "for the gated prior, none for the plain one)")

    def __post_init__(self):
        gated = self.pcnn_type == "gated"
        if self.condition is None:
            object.__setattr__(self, "condition", "slice" if gated else "none")
        if self.pcnn_positions is None:
            object.__setattr__(self, "pcnn_positions", "learned" if gated else "none")

    @property
    def conditional(self):
        return self.condition == "slice"

    def build(self, num_embeddings, grid_shape, top_grid=None, top_embeddings=None):
        """The prior over code maps of grid_shape (rows, columns) of num_embeddings codes,
        uncompiled; with top_grid, VQ-VAE-2's bottom prior, conditioned on top code maps of that
        grid of top_embeddings codes (num_embeddings by default)."""
        return pixelcnn.build_pixelcnn(
            num_embeddings, self.pcnn_filters, self.pcnn_res_blocks, self.pcnn_layers,
            kind=self.pcnn_type, dilation_cycle=self.pcnn_dilation_cycle,
            condition=self.condition,
            positions=tuple(grid_shape) if self.pcnn_positions == "learned" else None,
            top_embeddings=None if top_grid is None else top_embeddings or num_embeddings,
            top_grid=None if top_grid is None else tuple(top_grid), dropout=self.pcnn_dropout,
            attention=self.pcnn_attention and top_grid is None)


# Enough samples for a decisive two-sample test against OASIS's 544 test slices.
DEFAULT_SAMPLES = 256
# Independent draws of the samples: their spread is how far another draw moves a score.
DEFAULT_DRAWS = 3
DATA_FLAGS = "data and training (both models)"
# Settings' fields that hold the configs of the models, whose fields settings.json keeps.
MODEL_CONFIGS = ("data", "vqvae", "prior")


def add_flags(group, fields):
    """One flag in an argparse group per field (dataclasses.Field made by `setting`)."""
    for field in fields:
        flag = field.metadata
        names = [f"--{field.name.replace('_', '-')}"] + ([flag["alias"]] if flag["alias"] else [])
        unshown = field.default is None or flag["action"]  # a switch is off unless given
        shown = "" if unshown else " (default: %(default)s)"
        parsing = {key: flag[key] for key in ("type", "choices", "action") if flag[key]}
        group.add_argument(*names, dest=field.name, default=field.default,
                           help=flag["help"] + shown, **parsing)


def flag_groups():
    """(title, fields) of driver.py's flags, in the order -h shows them."""
    yield DATA_FLAGS, dataclasses.fields(DataConfig)
    yield "VQ-VAE", dataclasses.fields(VQVAEConfig)
    yield "PixelCNN prior", dataclasses.fields(PriorConfig)
    for title in ("sampling", "hardware", "output and run control"):
        yield title, [field for field in dataclasses.fields(Settings)
                      if field.metadata.get("group") == title]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser(demo_defaults):
    """driver.py's flags: one per setting, grouped by what they change, and --demo, which sets
    `demo_defaults` (data.DEMO_DEFAULTS)."""
    parser = OneLineParser(
        prog="driver.py",
        description="Train a VQ-VAE and a PixelCNN prior on brain MRI slices and sample brains.",
    )
    groups = {title: parser.add_argument_group(title) for title, _ in flag_groups()}
    for title, fields in flag_groups():
        add_flags(groups[title], fields)
    demo = ", ".join(f"--{name.replace('_', '-')} {portable(value)}"
                     for name, value in demo_defaults.items())
    groups[DATA_FLAGS].add_argument(
        "--demo", action="store_true",
        help=f"the bundled demo slices, with settings that finish in minutes on a CPU ({demo}); "
             "flags given explicitly still win")
    return parser


def from_flags(config_class, flags):
    """A config with the values of the flags (an argparse namespace or a dict) of its fields."""
    flags = flags if isinstance(flags, dict) else vars(flags)
    return config_class(**{field.name: flags[field.name]
                            for field in dataclasses.fields(config_class)})


def portable(value):
    """A setting as settings files keep it: a path as text, relative to the repository when it
    is inside it, so that a moved clone still resumes its runs."""
    if not isinstance(value, Path):
        return value
    resolved = value.resolve()
    return str(resolved.relative_to(REPOSITORY) if resolved.is_relative_to(REPOSITORY)
               else resolved)


def model_settings(*configs):
    """What a checkpoint was made with, as settings.json holds it: one flat dict of the configs'
    fields."""
    settings = {}
    for config in configs:
        settings |= dataclasses.asdict(config)
    return {name: portable(value) for name, value in settings.items()}


def saved_settings(folder):
    """The settings the checkpoints in folder were made with, or None before the first run."""
    path = folder / SETTINGS_FILE
    return LEGACY_SETTINGS | json.loads(path.read_text()) if path.exists() else None


@dataclass(frozen=True)
class Settings:
    """A run's settings: what the models are (the three configs) and how to sample, on what
    hardware and where to write."""

    data: DataConfig
    vqvae: VQVAEConfig
    prior: PriorConfig
    demo: bool = False  # a flag of its own in driver.py, whose help lists what it sets

    num_samples: int = setting(
        DEFAULT_SAMPLES, type=positive_int, group="sampling",
        help="code maps to sample, decode and save as PNGs; the realism test needs at least "
             f"{evaluation.MIN_IMAGES_PER_SET}")
    temperature: float = setting(1.0, type=positive_float, group="sampling",
                                 help="sampling temperature: logits are divided by it")
    sample_draws: int = setting(
        DEFAULT_DRAWS, type=positive_int, group="sampling",
        help="independent draws of --num-samples code maps: each two-sample accuracy of the "
             "samples is the mean over the draws, with their standard deviation; the first "
             "draw is saved and shown")
    slice: list = setting(
        None, type=slice_list, group="sampling",
        help="heights to sample with --condition slice: one or a comma-separated list of "
             "relative heights (0.2,0.5,0.8; values with a '.') or slice indices (3,4; plain "
             "integers); the samples are spread over them in order (default: the test slices' "
             "heights, evenly over their sorted list)")

    strategy: str = setting(
        "auto", choices=("auto", "mirrored", "multiworker"), group="hardware",
        help="auto: all local GPUs if there are several, else the default device; mirrored: "
             "tf.distribute.MirroredStrategy over local GPUs; multiworker: "
             "MultiWorkerMirroredStrategy configured by TF_CONFIG")
    cpu_replicas: int = setting(
        1, type=positive_int, group="hardware",
        help="with --strategy mirrored: split the CPU into this many devices, one replica "
             "each, to try the distributed path without GPUs")
    mixed_precision: str = setting(
        "off", choices=("off", "float16", "bfloat16"), group="hardware",
        help="compute in 16 bits with float32 weights (float16 with loss scaling); for GPUs: "
             "it slows CPUs down")

    out: Path = setting(Path("resources/oasis"), type=Path, group="output and run control",
                        help="folder for the samples, figures and metrics.json")
    checkpoint_dir: Path = setting(
        None, type=Path, group="output and run control",
        help="folder for trained models and resumable state, one per run (default: "
             "checkpoints/ in --out)")
    evaluate: bool = setting(
        False, action="store_true", group="output and run control",
        help="skip training: load the models in --checkpoint-dir and recompute metrics and "
             "figures")
    fresh: bool = setting(
        False, action="store_true", group="output and run control",
        help="ignore and replace checkpoints of an earlier run instead of resuming")
    verbose: int = setting(
        None, type=int, choices=(QUIET, LINES, BARS), group="output and run control",
        help="progress: 0 none (stage headings, results and errors only); 1 one line per "
             "epoch and per finished step, for log files; 2 progress bars redrawn in place "
             "(default: 2 when printing to a terminal, else 1)")

    @classmethod
    def from_flags(cls, flags):
        """The settings of parsed flags (an argparse namespace)."""
        options = {field.name: getattr(flags, field.name) for field in dataclasses.fields(cls)
                   if field.name not in MODEL_CONFIGS}
        options["checkpoint_dir"] = options["checkpoint_dir"] or options["out"] / "checkpoints"
        if options["verbose"] is None:
            options["verbose"] = BARS if sys.stdout.isatty() else LINES
        return cls(data=from_flags(DataConfig, flags), vqvae=from_flags(VQVAEConfig, flags),
                   prior=from_flags(PriorConfig, flags), **options)

    def flat(self):
        """Every setting in one dict of flag names, paths as text (run_settings.json)."""
        options = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                   if field.name not in MODEL_CONFIGS}
        return self.model_settings() | {name: portable(value) for name, value in options.items()}

    def model_settings(self):
        """What the checkpoints are made with (settings.json)."""
        return model_settings(self.data, self.vqvae, self.prior)

    def as_trained(self):
        """--evaluate's settings: the configs the saved models were trained with (except --data,
        which names the data to evaluate on now), the rest as given."""
        saved = saved_settings(self.checkpoint_dir)
        if saved is None:
            return self
        saved["data"] = self.data.data
        return dataclasses.replace(self, data=from_flags(DataConfig, saved),
                                   vqvae=from_flags(VQVAEConfig, saved),
                                   prior=from_flags(PriorConfig, saved))

    def refusals(self):
        """(flag, problem) for each impossible combination of settings."""
        data, vq, prior = self.data, self.vqvae, self.prior
        if data.image_size % vq.downsample:
            yield "--image-size", (f"{data.image_size} is not a multiple of --downsample "
                                   f"{vq.downsample}")
        if self.num_samples < evaluation.MIN_IMAGES_PER_SET:
            yield "--num-samples", (f"expected an integer >= {evaluation.MIN_IMAGES_PER_SET} "
                                    f"(the realism test's {evaluation.C2ST_FOLDS}-fold "
                                    f"cross-validation), got {self.num_samples}")
        if self.cpu_replicas > 1 and self.strategy != "mirrored":
            yield "--cpu-replicas", "only --strategy mirrored splits the CPU"
        if prior.condition != "none" and prior.pcnn_type != "gated":
            yield "--condition", f"{prior.condition} needs --pcnn-type gated"
        if prior.pcnn_positions != "none" and prior.pcnn_type != "gated":
            yield "--pcnn-positions", f"{prior.pcnn_positions} needs --pcnn-type gated"
        if self.slice is not None and not prior.conditional:
            yield "--slice", "only a prior with --condition slice takes heights"
        if vq.levels == 2 and vq.downsample < 4:
            yield "--levels", (f"2 needs --downsample >= 4 (the bottom grid's), got "
                               f"{vq.downsample}; use --levels 1")
        if vq.levels == 1 and vq.top_K is not None:
            yield "--top-K", "there is no top level with --levels 1; use --K"
        if vq.levels == 2 and prior.pcnn_type != "gated":
            yield "--levels", ("2 needs --pcnn-type gated (the bottom prior reads the top codes); "
                               "use --levels 1")


# ---------------------------------------------------------------------------------------------
# Files


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
    replace_atomically(path, lambda p: fig.savefig(p, dpi=FIGURE_DPI, bbox_inches="tight"))


# ---------------------------------------------------------------------------------------------
# Figures: the format they share. FIGURE_WIDTH at FIGURE_DPI is about a README column, so a
# figure is shown at its own size there, and its fonts as they were drawn.

FIGURE_WIDTH = 7.5  # inches
FIGURE_DPI = 120
CODE_COLOURS_SEED = 0  # the palette's order: the same code has the same colour in every figure
CODE_COLOURS_NOTE = "code maps: one colour per code index, in an arbitrary order"


def epoch_axis(ax):
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


class PlainLogFormatter(ticker.LogFormatter):
    """LogFormatter's choice of ticks to label (minor ones too on a short range, where they are
    the only ones), written 0.3 rather than 3e-01."""

    def __call__(self, value, position=None):
        return f"{value:g}" if super().__call__(value, position) else ""


def plain_log_axis(ax):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PlainLogFormatter())
    ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def code_colours(num_embeddings):
    """(K, 3) RGB: a code map's indices are categories, so neighbouring indices get unrelated
    colours from a fixed shuffle of one palette, the same in every figure."""
    palette = colormaps["turbo"](np.linspace(0, 1, num_embeddings))[:, :3]
    return palette[np.random.default_rng(CODE_COLOURS_SEED).permutation(num_embeddings)]


def histogram_edges(values):
    """Unit bins centred on the integers for a count (pieces), else equal bins; an undefined
    (nan) value counts in no bin."""
    pooled = np.concatenate(values)
    pooled = pooled[np.isfinite(pooled)]
    if np.all(pooled == np.round(pooled)):
        return np.arange(pooled.min() - 0.5, pooled.max() + 1.5)
    return np.histogram_bin_edges(pooled, bins=20)


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
# Resumable training


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


class TrainingTimeEstimate(keras.callbacks.Callback):
    """After the first epoch a run trains, prints how long the epochs left will take. The
    epoch's first step, which compiles the training step, counts as long as a typical one."""

    def on_train_begin(self, logs=None):
        self.estimated = False

    def on_epoch_begin(self, epoch, logs=None):
        self.started = self.first_step_ended = self.last_step_ended = time.perf_counter()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.last_step_ended = time.perf_counter()
        if self.steps == 0:
            self.first_step_ended = self.last_step_ended
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.estimated:
            return
        self.estimated = True
        epoch_seconds = time.perf_counter() - self.started
        if self.steps > 1:
            typical_step = (self.last_step_ended - self.first_step_ended) / (self.steps - 1)
            epoch_seconds -= self.first_step_ended - self.started - typical_step
        left = self.params["epochs"] - epoch - 1
        if left:
            finish = time.strftime("%H:%M", time.localtime(time.time() + left * epoch_seconds))
            print(f"{self.model.name}: about {duration(epoch_seconds)} per epoch; the {left} "
                  f"epoch{'s' if left > 1 else ''} left end around {finish} "
                  f"(in {duration(left * epoch_seconds)})")


def duration(seconds):
    """45 s, 12 min or 2.5 h."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def keras_verbose(verbose):
    """Keras' verbose (of fit and Progbar) for ours: its 1 is a progress bar, its 2 one line per
    epoch or finished bar."""
    return {QUIET: 0, LINES: 2, BARS: 1}[verbose]


def progress_bar(steps, verbose, unit="step"):
    """A keras Progbar over `steps`: redrawn as they pass (BARS), one line when done (LINES),
    or silent (QUIET)."""
    return keras.utils.Progbar(steps, verbose=keras_verbose(verbose), unit_name=unit)


class LinePerStep:
    """Progress for a log file when each step is long (a sampled row): one line per finished
    step, with the time left at the pace since the first, which includes compiling."""

    def __init__(self, steps, unit):
        self.steps, self.unit = steps, unit
        self.started = time.perf_counter()

    def update(self, done):
        now = time.perf_counter()
        if done == 1:
            self.first_done = now
        line = f"{done}/{self.steps} {self.unit}s - {duration(now - self.started)}"
        if 1 < done < self.steps:
            left = (now - self.first_done) / (done - 1) * (self.steps - done)
            line += f" - about {duration(left)} left"
        print(line)


def progress_of_long_steps(steps, verbose, unit):
    """A function to call once per finished step, for steps that each take long (a sampled
    row): a line per step for a log file (LINES), a progress bar (BARS), or None (QUIET)."""
    if verbose == QUIET:
        return None
    progress = LinePerStep(steps, unit) if verbose == LINES else progress_bar(steps, verbose,
                                                                               unit=unit)
    done = itertools.count(1)
    return lambda *_: progress.update(next(done))


def read_epochs(path):
    """The per-epoch logs a HistoryFile keeps: [{metric: value}, ...], [] before the first."""
    return json.loads(path.read_text()) if path.exists() else []


def by_metric(epochs):
    """[{metric: value} per epoch] -> {metric: [value per epoch]}, or None without epochs."""
    return {key: [epoch[key] for epoch in epochs] for key in epochs[0]} if epochs else None


def fit(model, data, validation, epochs, checkpoints, log_dir, callbacks=(), verbose=QUIET):
    """model.fit that resumes from the last finished epoch, keeps its history in a file and in
    TensorBoard logs, stops on a non-finite loss before that loss can reach a checkpoint and
    ends with the weights of the best validation epoch. Progress as --verbose says, with the
    time the training will take once the first epoch is done."""
    # Our ProgbarLogger, not the one fit appends last: the estimate then follows the epoch's line.
    progress = ([keras.callbacks.ProgbarLogger(), TrainingTimeEstimate()]
                if verbose != QUIET else [])
    vqvae.build_optimizer(model)  # the prior's; a VQ-VAE builds its own
    return model.fit(
        data, validation_data=validation, epochs=epochs, shuffle=False,
        verbose=keras_verbose(verbose),
        # KeepBest before HistoryFile: a kill between the two then loses no best epoch
        callbacks=[*callbacks, KeepBest(checkpoints.best, checkpoints.history),
                   HistoryFile(checkpoints.history), StopOnNonFiniteLoss(model.name),
                   keras.callbacks.TensorBoard(str(log_dir)),
                   AtomicBackupAndRestore(str(checkpoints.backup)), *progress],
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints


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


PRIOR_NAMES = ("pixelcnn", "pixelcnn_bottom")  # the prior of each code level, top first


def prepare_checkpoints(folder, settings, fresh, evaluate):
    """The VQ-VAE's checkpoints and a list of its priors' (one per code level) in folder;
    `fresh` removes them, and a run that resumes them must have been given the settings (a
    `model_settings` dict) they were made with."""
    prepare_folder(folder, "--checkpoint-dir")
    vq = Checkpoints.in_folder(folder, "vqvae")
    priors = [Checkpoints.in_folder(folder, name) for name in PRIOR_NAMES[:settings["levels"]]]
    if evaluate:
        return vq, priors
    if fresh:
        for name in ("vqvae", *PRIOR_NAMES):
            Checkpoints.in_folder(folder, name).remove()
        (folder / SETTINGS_FILE).unlink(missing_ok=True)
    saved = saved_settings(folder)
    if saved is not None:
        changed = sorted(name for name in settings if saved.get(name) != settings[name])
        if changed:
            raise PipelineError(f"{folder} holds a run made with other settings "
                                f"({', '.join(changed)}); pass --fresh to start over, or another "
                                "--checkpoint-dir")
    save_json(settings, folder / SETTINGS_FILE)
    return vq, priors


def load_finished(what, checkpoints):
    """The finished model saved in checkpoints, its weights' fingerprint printed. A missing or
    damaged file, or one saved by a version of this code whose layers differ, is a PipelineError
    (Keras raises ValueError or TypeError)."""
    path = checkpoints.keras_file
    if not path.exists():
        raise PipelineError(f"no saved {what} at {path}; train first (run without --evaluate), "
                            "point --checkpoint-dir at a finished run, or in a cluster rerun "
                            "every worker with --fresh")
    try:
        model = keras.models.load_model(path, safe_mode=True)
    except (ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0].rstrip(":")
        raise PipelineError(f"cannot load the {what} at {path} ({reason}): the file is damaged "
                            "or was saved by another version of this code; retrain with "
                            "--fresh (without --evaluate), or point --checkpoint-dir at "
                            "another run") from error
    print(f"{what} weights: sha256 {weights_fingerprint(model)}")
    return model


def weights_fingerprint(model):
    """A hash of every weight's bytes: workers of a cluster train in sync, so theirs are equal."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Distribution


def describe_devices(strategy):
    gpus = len(tf.config.list_logical_devices("GPU"))
    devices = f"{gpus} GPU{'s' if gpus > 1 else ''}" if gpus else "the CPU (no GPU found)"
    replicas = strategy.num_replicas_in_sync
    return f"Running on {devices}" + (f", {replicas} replicas in sync" if replicas > 1 else "")


def distribution_strategy(name, cpu_replicas):
    """The tf.distribute strategy that --strategy names; --batch-size is the global batch."""
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
    """MultiWorkerMirroredStrategy whose reduce accepts what Keras 3 passes it in fit: a nested
    batch (x, y), and scalar logs with axis=0, which fail on the stock strategy
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


def needs_training(checkpoints, strategy):
    """Whether to train a model: the chief has no finished one. Every worker learns the chief's
    answer, so that all of them train the same models and enter the same collective ops."""
    chief_lacks = float(strategy.extended.should_checkpoint
                        and not checkpoints.keras_file.exists())

    @tf.function  # strategies warn that running eagerly is slow
    def sum_over_replicas(value):
        per_replica = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return bool(sum_over_replicas(tf.constant(chief_lacks)) > 0)


def finish_worker(own_folder):
    """A worker other than the chief stops once the models are trained: evaluation, sampling and
    figures are the chief's alone, and use no collective op that this worker would have to join."""
    shutil.rmtree(own_folder)
    print(f"Worker finished training; the chief writes the results ({own_folder} removed)")
