"""Training speed, peak memory and quality per time of our VQ-VAE and PixelCNN against the seed's.

    python benchmarks/training.py                    # about 25 minutes on a 2-core CPU
    python benchmarks/training.py --markdown         # as markdown, into docs/performance.md
    python benchmarks/training.py --parts quality    # only the quality races (about 18 minutes)
    python benchmarks/training.py --quick            # about 5 minutes: checks that everything runs

The seed is the keras.io "vq_vae" example (its VQ-VAE, VQVAETrainer and PixelCNN), rebuilt below
at its defaults (K=512, D=2, beta=1.5, batch 32, 256x256) and at the demo settings. Every
measurement runs in its own subprocess, so the peak memory of one is not inherited by the next:

- throughput: images/s (VQ-VAE) and code maps/s (PixelCNN) of `fit` on random in-memory batches,
  timed after one warm-up step that traces the graph; ours is built from runs.py's configs as
  driver.py builds it, so a setting with two code levels (the 256x256 default) trains VQ-VAE-2,
  whose bottom prior, given random top code maps, is measured too (ours alone: the seed has one
  level);
- peak memory: growth of the process's peak RSS from just before the model is built;
- quality per time: validation SSIM and PSNR of a VQ-VAE trained for the same wall-clock budget
  on --data (240 s at 256x256, 120 s at the demo's 64x64), its SSIM recorded along the way
  (the clock paused meanwhile), so the table shows the check by which each reaches the seed's
  final SSIM; at 256x256 the seed's VQ-VAE also races with our optimiser settings, which tells
  the architectures' share of the lead from the optimiser's;
- a projection of a full default run (the VQ-VAE and each level's prior, driver.py's default
  epochs, the top prior's on twice the maps with --pcnn-mirror) on OASIS_SLICES slices from the
  measured throughput;
- whether issue #17's targets are met, judged within this one run.
"""

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402

import data  # noqa: E402
import evaluation  # noqa: E402
import runs  # noqa: E402

SEED = 0
MODELS = ("seed", "ours")
# Ours with the codebook term of eq. 3 instead of the EMA codebook: the quantizers' speeds compared.
LOSS_QUANTIZER = "ours, loss quantizer"
# The seed's VQ-VAE with our optimiser settings in the 256x256 race: what the architectures
# themselves do in the same time.
SEED_OUR_OPTIMISER = "seed, our optimiser"
OPTIMISER_SETTINGS = ("batch_size", "learning_rate", "pcnn_learning_rate")


@dataclasses.dataclass(frozen=True)
class Setting:
    """The configs of runs.py that a driver.py run trains with, as driver.Settings holds them."""

    data: runs.DataConfig
    vqvae: runs.VQVAEConfig
    prior: runs.PriorConfig

    def replace(self, **changes):
        """This setting with changed fields, each in the config that has it, as flags change it."""
        configs = (self.data, self.vqvae, self.prior)
        names = {field.name for config in configs for field in dataclasses.fields(config)}
        if set(changes) - names:
            raise ValueError(f"no config has the fields {sorted(set(changes) - names)}")
        return Setting(*(dataclasses.replace(config, **{
            field.name: changes[field.name] for field in dataclasses.fields(config)
            if field.name in changes}) for config in configs))


DEFAULTS = Setting(runs.DataConfig(), runs.VQVAEConfig(), runs.PriorConfig())
# The settings of driver.py's runs compared; the seed takes SEED_DEFAULTS at 256x256 and the
# demo's K, D, batch size and learning rates at the demo size, so that both models do the same
# task. --demo's defaults also name its output folder, which is no model's setting.
SETTINGS = {"defaults": DEFAULTS, "demo": DEFAULTS.replace(**{
    name: value for name, value in data.DEMO_DEFAULTS.items() if name != "out"})}
SEED_DEFAULTS = dict(image_size=256, downsample=4, levels=1, K=512, D=2, beta=1.5, batch_size=32,
                     learning_rate=2e-4, pcnn_learning_rate=3e-4, pcnn_mirror=False,
                     pcnn_dropout=0.0)
# The keras.io PixelCNN: 128 filters, 2 residual blocks, 2 masked 1x1 layers, at any K.
SEED_PIXELCNN_FILTERS = 128
SEED_PIXELCNN_BLOCKS = 2
SEED_PIXELCNN_LAYERS = 2
# The throughput kinds that both models run; ours alone runs BOTTOM_PRIOR, VQ-VAE-2's bottom prior.
COMPARED_KINDS = ("vqvae", "pixelcnn")
BOTTOM_PRIOR = "bottom pixelcnn"
# Distinct random batches cycled through by the throughput runs.
DATA_BATCHES = 4
# Enough epochs or steps that only a StopAfter callback ends training.
UNLIMITED = 1_000_000
QUICK_SECONDS = 1.0
QUICK_BUDGET_SECONDS = 10.0
# Validation SSIM checks per quality run: the time-to-quality's resolution is budget / this.
QUALITY_CHECKS = 12
# The OASIS training split's slice count, for the projection of a full default run.
OASIS_SLICES = 9664
# With --pcnn-mirror the top prior trains on each training slice's code maps and its mirror
# image's.
MIRRORED_MAPS_PER_SLICE = 2
SECONDS_PER_HOUR = 3600
# Issue #17's targets (and #14's for the prior), each judged within one run.
TARGET_TIME_TO_SEED_SSIM = 0.5  # of the 256x256 budget
TARGET_SSIM_LEAD_256 = 0.03
TARGET_SSIM_LEAD_DEMO = 0.005  # "ahead, not tied": more than SSIM's run-to-run noise
TARGET_IMAGES_PER_SECOND_RATIO = 0.8
TARGET_MEMORY_RATIO = 1.0
TARGET_PRIOR_MAPS_PER_SECOND = 20.0
TARGET_FULL_RUN_HOURS = 8.0
PARTS = ("throughput", "quality")
MIB = 1024  # ru_maxrss is in KiB on Linux
MATMUL_SIZE = 4096


def matmul_gflops():
    """float32 MATMUL_SIZE^2 matmul speed of this machine now: machines here vary 3-4x from day
    to day, so times are printed beside it."""
    a = tf.random.normal((MATMUL_SIZE, MATMUL_SIZE))
    tf.matmul(a, a).numpy()
    start = time.perf_counter()
    for _ in range(3):
        tf.matmul(a, a).numpy()
    return 3 * 2 * MATMUL_SIZE**3 / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------------------
# --markdown: a benchmark's printed table into its section of docs/performance.md

REPOSITORY = Path(__file__).resolve().parent.parent
PERFORMANCE_DOC = REPOSITORY / "docs" / "performance.md"
MARKDOWN_FLAG = "--markdown"


def add_markdown_option(parser):
    parser.add_argument(MARKDOWN_FLAG, nargs="?", const=PERFORMANCE_DOC, type=Path,
                        metavar="FILE",
                        help="also write what this prints, with the command, date, machine and "
                             "matmul speed, into FILE's section for this command, between "
                             "'<!-- benchmarks/x.py args -->' and '<!-- end benchmarks/x.py "
                             "args -->' (FILE: docs/performance.md if not given; default: off)")


def benchmark_command(argv=None):
    """The command as the docs name its section: the script's path from the repository root and
    its arguments, without --markdown and its FILE."""
    script, *arguments = sys.argv if argv is None else argv
    script = Path(script).resolve()
    name = script.relative_to(REPOSITORY).as_posix() if script.is_relative_to(REPOSITORY) else \
        script.name
    kept, skip_value = [], False
    for argument in arguments:
        if skip_value and not argument.startswith("-"):
            skip_value = False
            continue
        skip_value = argument == MARKDOWN_FLAG
        if not (skip_value or argument.startswith(MARKDOWN_FLAG + "=")):
            kept.append(argument)
    return " ".join([name, *kept])


def section_markers(name):
    return f"<!-- {name} -->", f"<!-- end {name} -->"


def section_bounds(text, path, name):
    """(start, end) of the text between name's markers in text; refuses unless each appears
    once, in order."""
    begin, end = section_markers(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"benchmarks: error: {path} needs the lines '{begin}' and '{end}', once "
                         "each and in this order, around the place for this command's table")
    return text.index(begin) + len(begin), text.index(end)


def write_markdown_section(path, name, text):
    """Replaces what lies between name's markers in the markdown file at path with text, written
    to a temporary file and renamed over path, so that a killed run leaves the old file whole."""
    path = Path(path)
    old = path.read_text()
    start, end = section_bounds(old, path, name)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(f"{old[:start]}\n{text.strip()}\n{old[end:]}")
    os.replace(temporary, path)


def as_markdown(printed):
    """Printed output as markdown: its markdown table rows as they are, every other run of lines
    in a code block, so that fixed-width tables keep their columns."""
    blocks, lines, table = [], [], None
    for line in printed.strip().splitlines():
        is_row = line.startswith("|")
        if lines and is_row != table:
            blocks.append("\n".join(lines) if table else "```\n" + "\n".join(lines) + "\n```")
            lines = []
        lines.append(line)
        table = is_row
    if lines:
        blocks.append("\n".join(lines) if table else "```\n" + "\n".join(lines) + "\n```")
    return "\n\n".join(blocks)


class MarkdownReport:
    """Echoes what a benchmark prints. With a path, it checks on entry that the file has this
    command's section, so that a long benchmark does not fail at its end, and on a normal exit
    writes into it what was printed, after a line with the command, the date, the machine and
    the matmul speed that `matmul_gflops` records."""

    def __init__(self, path):
        self.path = path
        self.name = benchmark_command()
        self.gflops = None
        self.printed = io.StringIO()

    def matmul_gflops(self):
        """matmul_gflops(), remembering the first for the provenance line."""
        gflops = matmul_gflops()
        self.gflops = gflops if self.gflops is None else self.gflops
        return gflops

    def __enter__(self):
        if self.path is not None:
            section_bounds(Path(self.path).read_text(), self.path, self.name)
        self.redirect = contextlib.redirect_stdout(Tee(sys.stdout, self.printed))
        self.redirect.__enter__()
        return self

    def __exit__(self, *exception):
        self.redirect.__exit__(*exception)
        if self.path is not None and exception[0] is None:
            write_markdown_section(self.path, self.name,
                                   f"{self.provenance()}\n\n{as_markdown(self.printed.getvalue())}")

    def provenance(self):
        gflops = "not measured" if self.gflops is None else f"{self.gflops:.0f} GFLOP/s"
        return (f"`python {self.name}`, {datetime.date.today().isoformat()}, "
                f"{platform.platform()}, {os.cpu_count()} CPUs, matmul {gflops} at the start:")


class Tee(io.TextIOBase):
    """A text stream that writes to several."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


# ---------------------------------------------------------------------------------------------
# The seed: keras.io's VQ-VAE and PixelCNN, as the reference the table divides by


class SeedVectorQuantizer(layers.Layer):
    """keras.io's quantizer: a (D, K) codebook, nearest code by argmin, lookup by one-hot matmul."""

    def __init__(self, num_embeddings, embedding_dim, beta, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta

    def build(self, input_shape):
        # tf.random_uniform_initializer's default range, which the seed uses
        self.embeddings = self.add_weight(
            name="embeddings_vqvae", shape=(self.embedding_dim, self.num_embeddings),
            initializer=keras.initializers.RandomUniform(-0.05, 0.05),
        )

    def call(self, x):
        flat = ops.reshape(x, (-1, self.embedding_dim))  # (B, h, w, D) -> (B*h*w, D)
        distances = (ops.sum(flat**2, axis=1, keepdims=True)
                     + ops.sum(self.embeddings**2, axis=0)
                     - 2 * ops.matmul(flat, self.embeddings))
        encodings = ops.one_hot(ops.argmin(distances, axis=1), self.num_embeddings)
        quantized = ops.matmul(encodings, ops.transpose(self.embeddings))
        quantized = ops.reshape(quantized, ops.shape(x))  # (B*h*w, D) -> (B, h, w, D)
        commitment_loss = ops.mean((ops.stop_gradient(quantized) - x) ** 2)
        codebook_loss = ops.mean((quantized - ops.stop_gradient(x)) ** 2)
        self.add_loss(self.beta * commitment_loss + codebook_loss)
        return x + ops.stop_gradient(quantized - x)


def seed_vqvae(num_embeddings, embedding_dim, beta, image_size):
    """keras.io's get_vqvae: two strided convolutions down, two transposed convolutions up."""
    images = keras.Input(shape=(image_size, image_size, 1))
    x = layers.Conv2D(32, 3, strides=2, activation="relu", padding="same")(images)
    x = layers.Conv2D(64, 3, strides=2, activation="relu", padding="same")(x)
    x = layers.Conv2D(embedding_dim, 1, padding="same")(x)
    x = SeedVectorQuantizer(num_embeddings, embedding_dim, beta, name="vector_quantizer")(x)
    x = layers.Conv2DTranspose(64, 3, strides=2, activation="relu", padding="same")(x)
    x = layers.Conv2DTranspose(32, 3, strides=2, activation="relu", padding="same")(x)
    reconstructions = layers.Conv2DTranspose(1, 3, padding="same")(x)
    return keras.Model(images, reconstructions, name="seed_vqvae")


class SeedVQVAETrainer(keras.Model):
    """keras.io's VQVAETrainer: MSE / train variance plus the quantizer's losses."""

    def __init__(self, train_variance, num_embeddings, embedding_dim, beta, image_size):
        super().__init__()
        self.train_variance = train_variance
        self.vqvae = seed_vqvae(num_embeddings, embedding_dim, beta, image_size)
        self.total_loss_tracker = keras.metrics.Mean(name="total_loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.vq_loss_tracker = keras.metrics.Mean(name="vq_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.vq_loss_tracker]

    def train_step(self, x):
        with tf.GradientTape() as tape:
            reconstructions = self.vqvae(x)
            reconstruction_loss = ops.mean((x - reconstructions) ** 2) / self.train_variance
            total_loss = reconstruction_loss + sum(self.vqvae.losses)
        gradients = tape.gradient(total_loss, self.vqvae.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.vqvae.trainable_variables))
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.vq_loss_tracker.update_state(sum(self.vqvae.losses))
        return {m.name: m.result() for m in self.metrics}


class SeedPixelConv(layers.Layer):
    """keras.io's PixelConvLayer: a Conv2D whose kernel is masked on every call."""

    def __init__(self, mask_type, **conv_kwargs):
        super().__init__()
        self.mask_type = mask_type
        self.conv = layers.Conv2D(**conv_kwargs)

    def build(self, input_shape):
        self.conv.build(input_shape)
        height, width = self.conv.kernel.shape[:2]
        self.mask = np.zeros(self.conv.kernel.shape, dtype="float32")
        self.mask[: height // 2] = 1.0
        self.mask[height // 2, : width // 2 + (self.mask_type == "B")] = 1.0

    def call(self, x):
        # The seed writes the masked kernel back into the weights each call; kept for its cost.
        self.conv.kernel.assign(self.conv.kernel * self.mask)
        return self.conv(x)


def seed_residual_block(x, filters):
    """keras.io's ResidualBlock: 1x1 conv (keeping all filters), masked 3x3 conv to filters/2,
    1x1 conv back to filters, added to x."""
    h = layers.Conv2D(filters, 1, activation="relu")(x)
    h = SeedPixelConv("B", filters=filters // 2, kernel_size=3, activation="relu",
                      padding="same")(h)
    h = layers.Conv2D(filters, 1, activation="relu")(h)
    return layers.add([x, h])


def seed_pixelcnn(num_embeddings, grid_size):
    """keras.io's PixelCNN over one-hot code maps (B, grid, grid) -> logits (B, grid, grid, K)."""
    codes = keras.Input(shape=(grid_size, grid_size), dtype="int32")
    x = SeedPixelConv("A", filters=SEED_PIXELCNN_FILTERS, kernel_size=7, activation="relu",
                      padding="same")(ops.one_hot(codes, num_embeddings))
    for _ in range(SEED_PIXELCNN_BLOCKS):
        x = seed_residual_block(x, SEED_PIXELCNN_FILTERS)
    for _ in range(SEED_PIXELCNN_LAYERS):
        x = SeedPixelConv("B", filters=SEED_PIXELCNN_FILTERS, kernel_size=1, activation="relu")(x)
    logits = layers.Conv2D(num_embeddings, 1)(x)
    return keras.Model(codes, logits, name="seed_pixelcnn")


# ---------------------------------------------------------------------------------------------
# One measurement, run in a subprocess


def model_settings(setting, model_name):
    """The Setting named setting, with the seed's defaults for the seed."""
    if model_name == "seed" and setting == "defaults":
        return SETTINGS[setting].replace(**SEED_DEFAULTS)
    if model_name == SEED_OUR_OPTIMISER:
        return SETTINGS[setting].replace(**{key: value for key, value in SEED_DEFAULTS.items()
                                            if key not in OPTIMISER_SETTINGS})
    return SETTINGS[setting]


def compiled_vqvae(model_name, settings, variance):
    given, vq = settings.data, settings.vqvae
    if model_name in ("seed", SEED_OUR_OPTIMISER):
        model = SeedVQVAETrainer(variance, vq.K, vq.D, vq.beta, given.image_size)
    else:
        if model_name == LOSS_QUANTIZER:
            vq = dataclasses.replace(vq, quantizer="loss")
        model = vq.build((-given.shift, 1.0 - given.shift), variance)
    model.compile(optimizer=keras.optimizers.Adam(vq.learning_rate))
    return model


def reconstructor(model):
    """The image -> reconstruction model inside a compiled VQ-VAE of either kind."""
    return model.vqvae if isinstance(model, SeedVQVAETrainer) else model


def code_grids(settings):
    """Sides of the setting's code maps, top level first, as its VQ-VAE's `code_grids` gives
    them: VQ-VAE-2's bottom grid is twice as fine as the top's."""
    top = settings.data.image_size // settings.vqvae.downsample
    return (top,) if settings.vqvae.levels == 1 else (top, 2 * top)


def compiled_prior(model_name, settings, grid, top_grid=None):
    """The seed's prior, or ours unconditional (the code maps are random, without heights), over
    grid x grid code maps; with top_grid, ours as VQ-VAE-2's bottom prior, given top code maps
    of top_grid x top_grid."""
    if model_name == "seed":
        prior = seed_pixelcnn(settings.vqvae.K, grid)
    else:
        prior = dataclasses.replace(settings.prior, condition="none").build(
            settings.vqvae.K, (grid, grid), None if top_grid is None else (top_grid, top_grid))
    prior.compile(optimizer=keras.optimizers.Adam(settings.prior.pcnn_learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return prior


def cycled(batches):
    """An endless dataset of pre-batched arrays (batches, B, ...), or tuples of them: no input
    pipeline cost."""
    return data.untuned(tf.data.Dataset.from_tensor_slices(batches)).repeat().prefetch(
        data.PREFETCHED_BATCHES)


def vqvae_job(model_name, settings, rng):
    size = settings.data.image_size
    shape = (DATA_BATCHES, settings.data.batch_size, size, size, 1)
    images = rng.uniform(-0.5, 0.5, shape).astype("float32")
    return compiled_vqvae(model_name, settings, float(images.var())), cycled(images)


def random_code_maps(settings, grid, rng):
    return rng.integers(0, settings.vqvae.K, (DATA_BATCHES, settings.data.batch_size, grid, grid),
                        dtype="int32")


def pixelcnn_job(model_name, settings, rng):
    grid = code_grids(settings)[0]
    codes = random_code_maps(settings, grid, rng)
    return compiled_prior(model_name, settings, grid), cycled((codes, codes))


def bottom_prior_job(model_name, settings, rng):
    """VQ-VAE-2's bottom prior on random bottom code maps, given random top ones: the inputs in
    data.code_dataset's order."""
    top_grid, grid = code_grids(settings)
    codes, top = (random_code_maps(settings, side, rng) for side in (grid, top_grid))
    return compiled_prior(model_name, settings, grid, top_grid), cycled(((codes, top), codes))


THROUGHPUT_JOBS = {"vqvae": vqvae_job, "pixelcnn": pixelcnn_job, BOTTOM_PRIOR: bottom_prior_job}


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / MIB


class StopAfter(keras.callbacks.Callback):
    """Stops training at the first batch end after `seconds`; counts the steps until then."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.steps = 0

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        self.elapsed = time.perf_counter() - self.start
        if self.elapsed >= self.seconds:
            self.model.stop_training = True


def throughput(kind, model_name, setting, seconds):
    """Training examples per second after a warm-up step, and the peak RSS growth in MiB."""
    settings = model_settings(setting, model_name)
    before = peak_rss_mib()
    model, batches = THROUGHPUT_JOBS[kind](model_name, settings, np.random.default_rng(SEED))
    model.fit(batches, steps_per_epoch=1, shuffle=False, verbose=0)  # traces the training step
    stop = StopAfter(seconds)
    model.fit(batches, steps_per_epoch=UNLIMITED, shuffle=False, callbacks=[stop], verbose=0)
    return {"per_second": stop.steps * settings.data.batch_size / stop.elapsed,
            "memory_mib": peak_rss_mib() - before}


class SSIMOverTime(StopAfter):
    """A StopAfter that records the validation SSIM every `interval` seconds of training and at
    the end, its clock paused while it evaluates. A check falls at the first step's end after its
    time; the curve keeps both: a model's "120-s SSIM" is that of its check at 120 s, as the
    seed's 240-s SSIM is that of its last check, a step after 240 s."""

    def __init__(self, seconds, interval, validation, shift):
        super().__init__(seconds)
        self.interval = interval
        self.validation = validation
        self.shift = shift
        self.curve = []  # (check's time, seconds of training, validation SSIM)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.next_check = self.interval

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.elapsed >= self.next_check or self.model.stop_training:
            paused = time.perf_counter()
            check = min(self.next_check, self.seconds)
            self.curve.append((check, self.elapsed, self.metrics()["test_ssim"]))
            self.start += time.perf_counter() - paused
            self.next_check += self.interval

    def metrics(self):
        return evaluation.reconstruction_metrics(*evaluation.reconstructions(
            reconstructor(self.model), self.validation, self.shift))


def quality(model_name, setting, data_dir, budget_seconds):
    """Validation SSIM and PSNR of a VQ-VAE trained on data_dir for budget_seconds (tracing
    included), and its validation SSIM along the way."""
    settings = model_settings(setting, model_name)
    given = settings.data
    splits = data.load_splits(data_dir, given.image_size, given.shift, given.batch_size, demo=True)
    model = compiled_vqvae(model_name, settings, data.pixel_variance(splits.train))
    clock = SSIMOverTime(budget_seconds, budget_seconds / QUALITY_CHECKS,
                         splits.scaled("validate"), given.shift)
    model.fit(splits.shuffled_train(given.seed), epochs=UNLIMITED, shuffle=False,
              callbacks=[clock], verbose=0)
    metrics = clock.metrics()
    return {"ssim": metrics["test_ssim"], "psnr": metrics["test_psnr"], "steps": clock.steps,
            "curve": clock.curve}


def measure(job):
    keras.utils.set_random_seed(SEED)
    if job["kind"] == "quality":
        return quality(job["model"], job["setting"], Path(job["data"]), job["budget_seconds"])
    return throughput(job["kind"], job["model"], job["setting"], job["seconds"])


# ---------------------------------------------------------------------------------------------
# The table


def run_in_subprocess(job):
    print(f"measuring {job['kind']} {job['setting']} {job['model']}", file=sys.stderr, flush=True)
    # TensorFlow's start-up logs go to stderr: shown only if the measurement fails
    child = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"{child.stderr}\ntraining.py: error: the measurement {job} failed (above)")
    print(child.stdout.splitlines()[-1], file=sys.stderr, flush=True)  # kept if the table fails
    return json.loads(child.stdout.splitlines()[-1])


def all_jobs(args):
    if "throughput" in args.parts:
        for kind in COMPARED_KINDS:
            for setting in SETTINGS:
                for model_name in MODELS:
                    yield dict(kind=kind, setting=setting, model=model_name,
                               seconds=args.timed_seconds)
        for setting in SETTINGS:
            yield dict(kind="vqvae", setting=setting, model=LOSS_QUANTIZER,
                       seconds=args.timed_seconds)
            if BOTTOM_PRIOR in prior_kinds(model_settings(setting, "ours")):
                yield dict(kind=BOTTOM_PRIOR, setting=setting, model="ours",
                           seconds=args.timed_seconds)
    if "quality" in args.parts:
        for setting in SETTINGS:
            for model_name in MODELS:
                yield dict(kind="quality", setting=setting, model=model_name, data=str(args.data),
                           budget_seconds=budget(args, setting))
        yield dict(kind="quality", setting="defaults", model=SEED_OUR_OPTIMISER,
                   data=str(args.data), budget_seconds=budget(args, "defaults"))


def budget(args, setting):
    return args.demo_budget_seconds if setting == "demo" else args.budget_seconds


def rows(results):
    """(measurement, setting, seed, ours, which direction is better, format) per table row."""
    metrics = [
        ("VQ-VAE training, images/s", "vqvae", "per_second", "higher", ".1f"),
        ("VQ-VAE training, peak RSS growth MiB", "vqvae", "memory_mib", "lower", ".0f"),
        ("PixelCNN training, maps/s", "pixelcnn", "per_second", "higher", ".2f"),
        ("PixelCNN training, peak RSS growth MiB", "pixelcnn", "memory_mib", "lower", ".0f"),
        ("validation SSIM after the budget", "quality", "ssim", "higher", ".3f"),
        # SSIM punishes faint noise on the black background that PSNR barely sees
        ("validation PSNR dB after the budget", "quality", "psnr", "higher", ".2f"),
        ("VQ-VAE steps in the budget", "quality", "steps", "higher", "d"),
    ]
    for name, kind, key, better, spec in metrics:
        for setting in SETTINGS:
            if (kind, setting, "seed") in results:
                seed, ours = (results[kind, setting, m][key] for m in MODELS)
                yield name, setting_label(setting), seed, ours, better, spec


def seconds_to_reach(curve, ssim):
    """The time of the first check at which a validation SSIM curve reaches ssim, or None."""
    return next((check for check, _, value in curve if value >= ssim), None)


def reached_words(check):
    """How a time-to-quality line reads the check from `seconds_to_reach`."""
    return "not within the budget" if check is None else f"at its {check:.0f}-s check"


def time_to_quality_lines(results, args):
    """Seconds each model needs to reach the seed's SSIM after the budget."""
    for setting in SETTINGS:
        if ("quality", setting, "seed") not in results:
            continue
        target = results["quality", setting, "seed"]["ssim"]
        for model_name in MODELS:
            reached = seconds_to_reach(results["quality", setting, model_name]["curve"], target)
            yield (f"time to the seed's {budget(args, setting):g}-s validation SSIM "
                   f"({target:.3f}), {setting_label(setting)}: {model_name} "
                   f"{reached_words(reached)}")


def same_optimiser_lines(results, args):
    """The seed's VQ-VAE with our optimiser against ours: the architectures alone."""
    if ("quality", "defaults", SEED_OUR_OPTIMISER) not in results:
        return
    seed = results["quality", "defaults", SEED_OUR_OPTIMISER]
    ours = results["quality", "defaults", "ours"]
    settings = model_settings("defaults", SEED_OUR_OPTIMISER)
    reached = seconds_to_reach(seed["curve"], ours["ssim"])
    yield (f"the seed's VQ-VAE with our optimiser (batch {settings.data.batch_size}, Adam "
           f"{settings.vqvae.learning_rate:g}), 256x256 defaults: validation SSIM "
           f"{seed['ssim']:.3f} after {args.budget_seconds:g} s against ours {ours['ssim']:.3f}; "
           f"ours' final SSIM {reached_words(reached)}")


def prior_kinds(settings):
    """The throughput kind of each of the setting's priors, top level first."""
    return ("pixelcnn", BOTTOM_PRIOR)[:settings.vqvae.levels]


def full_run_hours(results, model_name):
    """Hours of training of a full default run on OASIS_SLICES slices at the measured speeds:
    the VQ-VAE's epochs, then each prior's, the top one's on twice the maps with --pcnn-mirror."""
    settings = model_settings("defaults", model_name)
    maps_per_slice = [MIRRORED_MAPS_PER_SLICE if settings.prior.pcnn_mirror else 1, 1]
    seconds = OASIS_SLICES * (
        settings.vqvae.epochs / results["vqvae", "defaults", model_name]["per_second"]
        + sum(settings.prior.pcnn_epochs * maps
              / results[kind, "defaults", model_name]["per_second"]
              for kind, maps in zip(prior_kinds(settings), maps_per_slice)))
    return seconds / SECONDS_PER_HOUR


def projection_lines(results):
    for model_name in MODELS:
        settings = model_settings("defaults", model_name)
        priors = ("prior",) if settings.vqvae.levels == 1 else ("top prior", "bottom prior")
        parts = [f"{settings.vqvae.epochs} VQ-VAE epochs",
                 *(f"{settings.prior.pcnn_epochs} {prior} epochs" for prior in priors)]
        mirrored = ", the top prior's on mirrored maps too" if settings.prior.pcnn_mirror else ""
        yield (f"projected full default run on {OASIS_SLICES:,} slices, {model_name}: "
               f"{full_run_hours(results, model_name):.1f} h ({' + '.join(parts)}{mirrored} at "
               "the measured 256x256 speeds)")


def bottom_prior_lines(results):
    """Our bottom prior's speed and memory, outside the table: the seed has no bottom level."""
    for setting in SETTINGS:
        if (BOTTOM_PRIOR, setting, "ours") in results:
            top_grid, grid = code_grids(model_settings(setting, "ours"))
            result = results[BOTTOM_PRIOR, setting, "ours"]
            yield (f"bottom PixelCNN training ({grid}x{grid} given {top_grid}x{top_grid} top "
                   f"codes), {setting_label(setting)}, ours: {result['per_second']:.2f} maps/s, "
                   f"peak RSS growth {result['memory_mib']:.0f} MiB")


def targets(results, args):
    """(target, met) of issue #17 (and #14's prior speed) for what this run measured."""
    if ("vqvae", "defaults", "seed") in results:
        # a peak RSS growth of 0 (the run stayed below the import's peak) compares as nan
        speed, memory = (
            results["vqvae", "defaults", "ours"][key]
            / (results["vqvae", "defaults", "seed"][key] or float("nan"))
            for key in ("per_second", "memory_mib"))
        prior = results["pixelcnn", "defaults", "ours"]["per_second"]
        yield (f"VQ-VAE images/s >= {TARGET_IMAGES_PER_SECOND_RATIO:g}x the seed's at 256x256 "
               f"({speed:.2f}x)", speed >= TARGET_IMAGES_PER_SECOND_RATIO)
        yield (f"VQ-VAE peak memory <= {TARGET_MEMORY_RATIO:g}x the seed's at 256x256 "
               f"({memory:.2f}x)", memory <= TARGET_MEMORY_RATIO)
        yield (f"prior >= {TARGET_PRIOR_MAPS_PER_SECOND:g} maps/s at the default grid "
               f"({prior:.2f})", prior >= TARGET_PRIOR_MAPS_PER_SECOND)
        hours = full_run_hours(results, "ours")
        yield (f"full default run on {OASIS_SLICES:,} slices <= {TARGET_FULL_RUN_HOURS:g} h "
               f"({hours:.1f} h)", hours <= TARGET_FULL_RUN_HOURS)
    if ("quality", "defaults", "seed") in results:
        seed, ours = (results["quality", "defaults", m] for m in MODELS)
        limit = TARGET_TIME_TO_SEED_SSIM * args.budget_seconds
        reached = seconds_to_reach(ours["curve"], seed["ssim"])
        when = "not reached" if reached is None else f"{reached:.0f} s"
        yield (f"ours reaches the seed's {args.budget_seconds:g}-s SSIM at 256x256 in <= "
               f"{limit:g} s ({when})", reached is not None and reached <= limit)
        lead = ours["ssim"] - seed["ssim"]
        yield (f"ours >= {TARGET_SSIM_LEAD_256:g} SSIM ahead after {args.budget_seconds:g} s at "
               f"256x256 ({lead:+.3f})", lead >= TARGET_SSIM_LEAD_256)
    if ("quality", "demo", "seed") in results:
        seed, ours = (results["quality", "demo", m] for m in MODELS)
        lead = ours["ssim"] - seed["ssim"]
        yield (f"ours ahead of the seed at the demo settings after {args.demo_budget_seconds:g} "
               f"s by > {TARGET_SSIM_LEAD_DEMO:g} SSIM ({lead:+.3f})",
               lead > TARGET_SSIM_LEAD_DEMO)


def quantizer_lines(results):
    """Our VQ-VAE's speed with the EMA codebook (the default) against the loss codebook."""
    if ("vqvae", "defaults", "ours") not in results:
        return
    for setting in SETTINGS:
        ema, loss = (results["vqvae", setting, m]["per_second"] for m in ("ours", LOSS_QUANTIZER))
        yield (f"VQ-VAE training images/s, {setting_label(setting)}: EMA quantizer {ema:.1f}, "
               f"loss quantizer {loss:.1f}, EMA/loss {ema / loss:.2f}")


def setting_label(setting):
    size = model_settings(setting, "ours").data.image_size
    return f"{size}x{size} {setting}"


def table_lines(table_rows, markdown):
    header = ("measurement", "setting", "seed", "ours", "ours/seed", "better")
    cells = [header] + [(name, setting, format(seed, spec), format(ours, spec),
                         # a peak RSS growth can be 0: the run stayed below the import's
                         f"{ours / seed:.2f}" if seed else "n/a", better)
                        for name, setting, seed, ours, better, spec in table_rows]
    numeric = (False, False, True, True, True, False)
    if markdown:
        rule = tuple("---:" if right else "---" for right in numeric)
        return [f"| {' | '.join(row)} |" for row in [cells[0], rule, *cells[1:]]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) if right else cell.ljust(w)
                      for cell, w, right in zip(row, widths, numeric)).rstrip() for row in cells]


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(gflops_before):
    return (f"machine: {os.cpu_count()} CPU cores ({cpu_name()}), {platform.system()} "
            f"{platform.release()}, GPUs: {len(tf.config.list_physical_devices('GPU'))}, "
            f"tensorflow {tf.__version__}, keras {keras.__version__}, "
            f"matmul {gflops_before:.0f} GFLOP/s before the measurements and "
            f"{matmul_gflops():.0f} after")


def settings_lines():
    """What each setting means for each model, so the table says how it was made."""
    lines = []
    for setting in SETTINGS:
        seed, ours = (model_settings(setting, m) for m in MODELS)
        prior = ours.prior
        levels = "one code level" if ours.vqvae.levels == 1 else \
            f"{ours.vqvae.levels} code levels, each with its own codebook and prior"
        lines.append(
            f"{setting_label(setting)}: seed K={seed.vqvae.K} D={seed.vqvae.D} batch "
            f"{seed.data.batch_size}, keras.io PixelCNN ({SEED_PIXELCNN_FILTERS} filters, "
            f"{SEED_PIXELCNN_BLOCKS} residual blocks); ours {levels}, K={ours.vqvae.K} "
            f"D={ours.vqvae.D} batch {ours.data.batch_size}, {prior.pcnn_type} PixelCNN "
            f"({prior.pcnn_filters} filters, {prior.pcnn_res_blocks} blocks, "
            f"{prior.pcnn_layers} output layers)"
        )
    return lines


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timed-seconds", type=runs.positive_float, default=20.0,
                        help="each throughput measurement trains at least this long, and at "
                             "least one step, after its warm-up step (default: %(default)s)")
    parser.add_argument("--budget-seconds", type=runs.positive_float, default=240.0,
                        help="wall-clock training budget of each quality run at 256x256 "
                             "(default: %(default)s)")
    parser.add_argument("--demo-budget-seconds", type=runs.positive_float, default=120.0,
                        help="wall-clock training budget of each quality run at the demo "
                             "settings (default: %(default)s)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS,
                        help="which measurements to run (default: all)")
    parser.add_argument("--data", type=Path, default=data.DEMO_DATA,
                        help="folder of keras_png_slices_{train,validate,test} for the quality "
                             "runs (default: the bundled demo_data)")
    parser.add_argument("--quick", action="store_true",
                        help=f"--timed-seconds {QUICK_SECONDS:g}, both budgets "
                             f"{QUICK_BUDGET_SECONDS:g} s: checks that it runs")
    add_markdown_option(parser)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # one job, in a subprocess
    args = parser.parse_args()
    if args.quick:
        args.timed_seconds = QUICK_SECONDS
        args.budget_seconds = args.demo_budget_seconds = QUICK_BUDGET_SECONDS
    return args


def main():
    args = parse_args()
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    train_folder = args.data / data.SPLIT_FOLDERS["train"]
    if not train_folder.is_dir():
        sys.exit(f"training.py: error: no {train_folder} for the quality runs; create the demo "
                 "data (demo_data/make_demo_data.py) or pass --data")
    with MarkdownReport(args.markdown) as report:
        report_table(args, report.matmul_gflops())


def report_table(args, gflops_before):
    """Runs every measurement in its subprocess and prints the table and what it shows."""
    results = {(job["kind"], job["setting"], job["model"]): run_in_subprocess(job)
               for job in all_jobs(args)}
    print(machine_line(gflops_before))
    print("\n".join(table_lines(list(rows(results)), args.markdown)))
    print("\n".join([*bottom_prior_lines(results), *quantizer_lines(results),
                     *time_to_quality_lines(results, args),
                     *same_optimiser_lines(results, args)]))
    if ("vqvae", "defaults", "seed") in results:
        print("\n".join(projection_lines(results)))
    print("\n".join(f"target {'met' if met else 'NOT met'}: {target}"
                     for target, met in targets(results, args)))
    print("\n".join(settings_lines()))
    print(f"throughput: at least {args.timed_seconds:g} s of training after 1 warm-up step, on "
          "random batches in memory; quality: on the validation split of "
          f"{args.data.name}, after training on its training split for "
          f"{args.budget_seconds:g} s at 256x256 and {args.demo_budget_seconds:g} s at the demo "
          "settings (tracing included), the SSIM checked every 1/"
          f"{QUALITY_CHECKS} of the budget")


if __name__ == "__main__":
    main()
