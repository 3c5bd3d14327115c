"""Learn a generative model of brain MRI slices: a VQ-VAE, then a PixelCNN prior over its codes.

    python driver.py --demo                          # the bundled demo slices, a few minutes on CPU
    python driver.py --data keras_png_slices_data    # OASIS
    python driver.py --evaluate                      # metrics and figures from saved models

The pipeline, `run()`: load the three splits, train the VQ-VAE (van den Oord et al. 2017), encode
the training split to code maps once, train the PixelCNN prior (van den Oord et al. 2016) on them,
sample new code maps and decode them, evaluate everything on the test split (evaluation.py), write
the samples, the figures and metrics.json into --out. Finished models go to --checkpoint-dir; a
killed run resumes there. Data loading is in data.py, files, checkpoints, settings and clusters in
runs.py.
"""

import contextlib
import dataclasses
import math
import os
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


def import_tensorflow_quietly():
    """Import TensorFlow and probe for GPUs without its start-up noise where there is no NVIDIA
    driver; on a GPU machine its warnings about CUDA may matter, so they stay."""
    has_nvidia_driver = Path("/proc/driver/nvidia").exists()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2" if has_nvidia_driver else "3")
    with contextlib.nullcontext() if has_nvidia_driver else silenced_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # the CUDA probe, which logs its failure


import_tensorflow_quietly()  # before the modules below import TensorFlow

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import data  # noqa: E402
import evaluation  # noqa: E402
import pixelcnn  # noqa: E402
import runs  # noqa: E402
from runs import PipelineError, Settings, save_figure  # noqa: E402

FIGURE_EXAMPLES = 6  # images in codebook_results.png
SAMPLES_SHOWN = 8  # samples in samples.png
HEIGHT_ROWS = 8  # heights (rows) in samples_by_slice.png
IMAGES_PER_HEIGHT = 3  # real slices, and samples, in each of its rows
VQVAE_NAME = "VQ-VAE"
PRIOR_NAMES = ("PixelCNN", "bottom PixelCNN")  # each code level's, top first
LEVEL_NAMES = ("top", "bottom")  # of the code levels, top first
REAL_TOPS_SEED = b"bottom codes given real top codes"  # a position of derived_seed's


# ---------------------------------------------------------------------------------------------
# Flags: they fill the configs of runs.py, which hold the defaults.


def parse_args(argv=None):
    """The run's Settings from the command line; impossible combinations are refused."""
    parser = runs.build_parser(data.DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**data.DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    settings = Settings.from_flags(args)
    for flag, problem in settings.refusals():
        parser.error(f"argument {flag}: {problem}")
    return settings


# ---------------------------------------------------------------------------------------------
# Training


class ValidationQuality(keras.callbacks.Callback):
    """After every epoch, the mean SSIM of the validation images and their reconstructions and
    each codebook's use on them, recorded in the history as val_ssim, val_codebook_perplexity
    and val_codes_used (and, with two levels, val_bottom_codebook_perplexity and
    val_bottom_codes_used)."""

    def __init__(self, images, shift):
        super().__init__()
        self.images = images
        self.shift = shift

    def on_epoch_end(self, epoch, logs=None):
        originals, reconstructed = evaluation.reconstructions(self.model, self.images, self.shift)
        logs["val_ssim"] = evaluation.reconstruction_metrics(originals, reconstructed)["test_ssim"]
        for level, codes, num_embeddings in zip(evaluation.LEVEL_PREFIXES,
                                                data.encode(self.model, self.images),
                                                self.model.codebook_sizes):
            counts = evaluation.code_counts(codes, num_embeddings)
            logs.update({f"val_{level}{name}": value
                         for name, value in evaluation.codebook_metrics(counts).items()})


def derived_seed(seed, *position):
    """A seed of its own for each position (a model's name, a draw and code level) from
    --seed, independent of the others'."""
    return int(np.random.SeedSequence((seed, *position)).generate_state(1)[0] >> 1)


def seed_model(seed, name):
    """Seeds every random source from (--seed, the model's name) before a model is built: its
    initial weights, dropout and shuffling then do not depend on what ran before it, so a run
    resumed after its VQ-VAE trains the priors an uninterrupted run trains."""
    keras.utils.set_random_seed(derived_seed(seed, *name.encode()))


def train_vqvae(splits, settings, checkpoints, strategy):
    given, vq = settings.data, settings.vqvae
    print(f"Training the {'two-level ' if vq.levels == 2 else ''}VQ-VAE for {vq.epochs} epochs")
    variance = data.pixel_variance(splits.train, settings.verbose)
    seed_model(given.seed, VQVAE_NAME)
    with strategy.scope():
        model = vq.build((-given.shift, 1.0 - given.shift), variance)
        model.compile(optimizer=keras.optimizers.Adam(vq.learning_rate))
        model(tf.zeros((1, given.image_size, given.image_size, 1)))  # build, so a backup restores
    runs.fit(model, splits.shuffled_train(given.seed), splits.scaled("validate"), vq.epochs,
             checkpoints, settings.out / "logs" / "vqvae",
             callbacks=[ValidationQuality(splits.scaled("validate"), given.shift)],
             verbose=settings.verbose)
    return model


def train_prior(codes, heights, top, settings, checkpoints, strategy):
    """A prior, trained on the training split's code maps (and, when conditional, their
    heights; for VQ-VAE-2's bottom level, the `top` level's code maps), validated on the
    validation split's."""
    given, config = settings.data, settings.prior
    mirror = config.pcnn_mirror and top is None  # see --pcnn-mirror: the top prior only
    training = ("train", data.MIRRORED_TRAIN) if mirror else ("train",)
    train_codes, train_heights, train_top = (data.joined(arrays, training)
                                             for arrays in (codes, heights, top))
    given_top = "" if top is None else ", given the top codes"
    mirrored = " (the training slices and their mirror images)" if mirror else ""
    print(f"Training the {config.pcnn_type} PixelCNN (condition: {config.condition}{given_top}) "
          f"for {config.pcnn_epochs} epochs on {len(train_codes)} code maps of "
          f"{train_codes.shape[1]}x{train_codes.shape[2]}{mirrored}")
    level = 0 if top is None else 1
    seed_model(given.seed, PRIOR_NAMES[level])
    codebook_sizes = settings.vqvae.codebook_sizes
    with strategy.scope():
        prior = config.build(codebook_sizes[level], train_codes.shape[1:],
                             None if top is None else train_top.shape[1:], codebook_sizes[0])
        prior.compile(optimizer=keras.optimizers.Adam(config.pcnn_learning_rate),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    runs.fit(prior, data.code_dataset(train_codes, train_heights, given.batch_size, given.seed,
                                      train_top),
             data.code_dataset(codes["validate"], heights["validate"], given.batch_size,
                               top=data.joined(top, ("validate",))),
             config.pcnn_epochs, checkpoints, settings.out / "logs" / checkpoints.keras_file.stem,
             verbose=settings.verbose)
    return prior


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Sampled:
    """One draw of the priors: the (top) code maps (N, h, w), the decoded images in [0, 1]
    (N, H, W, 1), and the relative height each was drawn at (None from an unconditional
    prior)."""

    codes: np.ndarray
    images: np.ndarray
    heights: np.ndarray


def sample(model, priors, heights, settings):
    """--sample-draws independent draws of --num-samples code maps from the priors (at the
    heights given), each level given the one above it, decoded. Each level's sampler is
    compiled once for all the draws."""
    draws, count = range(settings.sample_draws), settings.num_samples
    codes = [[] for _ in draws]  # each draw's code maps, a level at a time, top first
    for level, (prior, grid) in enumerate(zip(priors, model.code_grids(settings.data.image_size))):
        started = time.perf_counter()
        if settings.verbose != runs.QUIET:
            print(f"Sampling {len(draws)} draws of {count} code maps of {grid}x{grid}, a row of "
                  "each at a time")
        sampler = pixelcnn.code_sampler(
            prior, (grid, grid), runs.progress_of_long_steps(grid * len(draws), settings.verbose,
                                                             "row"))
        for draw in draws:
            codes[draw].append(sampler(count, settings.temperature,
                                       derived_seed(settings.data.seed, draw, level), heights,
                                       codes[draw][-1] if level else None))
        print(f"Sampled {len(draws)} x {count} code maps of {grid}x{grid} in "
              f"{time.perf_counter() - started:.1f} s")
    return [Sampled(levels[0].numpy(), evaluation.to_unit_range(
        model.decode_indices(*levels), settings.data.shift).numpy(), heights) for levels in codes]


def bottom_given_real_tops(model, bottom_prior, top_codes, heights, settings):
    """VQ-VAE-2's bottom prior on its own: --sample-draws draws of bottom codes given the top
    codes (and heights) of real slices, decoded with those top codes, images in [0, 1]. Against
    the same slices' reconstructions they score what the bottom prior adds to the samples'
    distance from them; the rest of that distance is the top prior's."""
    grid, count = model.code_grids(settings.data.image_size)[-1], len(top_codes)
    if settings.verbose != runs.QUIET:
        print(f"Sampling {settings.sample_draws} draws of {count} bottom code maps of "
              f"{grid}x{grid} given the top codes of training slices, a row of each at a time")
    sampler = pixelcnn.code_sampler(bottom_prior, (grid, grid), runs.progress_of_long_steps(
        grid * settings.sample_draws, settings.verbose, "row"))
    started = time.perf_counter()
    draws = []
    for draw in range(settings.sample_draws):
        bottom = sampler(count, settings.temperature,
                         derived_seed(settings.data.seed, draw, *REAL_TOPS_SEED), heights,
                         top_codes)
        draws.append(evaluation.to_unit_range(model.decode_indices(top_codes, bottom),
                                              settings.data.shift).numpy())
    print(f"Sampled {len(draws)} x {count} bottom code maps of {grid}x{grid} given the top codes "
          f"of training slices in {time.perf_counter() - started:.1f} s")
    return draws


@dataclass
class BottomAlone:
    """What `bottom_prior_realism` drew, for its figure: training slices, their reconstructions
    and the first draw given their top codes, in [0, 1] (N, H, W, 1), and their heights (None
    without a slice condition)."""

    originals: np.ndarray
    reconstructions: np.ndarray
    drawn: np.ndarray
    heights: np.ndarray


def bottom_prior_realism(model, bottom_prior, codes, heights, train_pixels, settings):
    """The two-sample metrics of `bottom_given_real_tops` for --num-samples training slices
    (drawn with --seed) against their reconstructions, and a BottomAlone of them; ({}, None)
    when there are too few slices."""
    shift, seed = settings.data.shift, settings.data.seed
    count = min(settings.num_samples, len(train_pixels))
    reason = evaluation.too_few_images(count, count)
    if reason is not None:
        print(f"  samples.c2st_bottom_given_top: nan ({reason})")
        return {}, None
    chosen = np.sort(np.random.default_rng(seed).choice(len(train_pixels), count, replace=False))
    heights = None if heights is None else heights[chosen]
    originals, reconstructed = evaluation.reconstructions(
        model, data.scaled_batches(train_pixels[chosen], shift, settings.data.batch_size), shift)
    drawn = bottom_given_real_tops(model, bottom_prior, tf.constant(codes[chosen]), heights,
                                   settings)
    result = evaluation.realism_over_draws(
        evaluation.realism_summary(reconstructed),
        [evaluation.realism_summary(images) for images in drawn], seed)
    return (evaluation.two_sample_metrics(result, "c2st_bottom_given_top",
                                          "anatomy_bottom_given_top"),
            BottomAlone(originals, reconstructed, drawn[0], heights))


# ---------------------------------------------------------------------------------------------
# Evaluation: the metrics themselves live in evaluation.py


def evaluate(model, priors, splits, draws, codes, heights, settings):
    """metrics.json's content, the anatomy statistics of the three image sets (real test
    slices, their reconstructions and the first draw of samples) and the samples nearest to a
    training slice, beside it (`evaluation.most_memorised`). Each two-sample accuracy of
    the samples is the mean over the draws; it is printed beside its floors (`print_metrics`).
    A conditional prior's NLL is conditional, and its samples are also compared with the real
    slices at their heights. With two code levels, also the bottom prior alone
    (`bottom_prior_realism`) and what it drew (a BottomAlone; None with one level)."""
    shift, seed, codebook_sizes = settings.data.shift, settings.data.seed, model.codebook_sizes
    sampled = draws[0]
    originals, reconstructed = evaluation.reconstructions(model, splits.scaled("test"), shift)
    train_pixels = splits.pixels("train")
    subset = evaluation.training_subset(len(train_pixels), len(sampled.images), seed)
    print(f"Training slices compared with the samples: {len(subset)} of {len(train_pixels)}, "
          f"drawn at random with --seed {seed}")
    train_originals, train_reconstructed = evaluation.reconstructions(
        model, data.scaled_batches(train_pixels[subset], shift, settings.data.batch_size), shift)
    nearest = evaluation.nearest_training_images(sampled.images, train_pixels)
    started = time.perf_counter()
    real, reconstructions, train_real, train_reconstructions, *drawn = (
        evaluation.realism_summary(images) for images in (
            originals, reconstructed, train_originals, train_reconstructed,
            *(draw.images for draw in draws)))
    samples_vs_real, samples_vs_reconstructions, samples_vs_train = (
        evaluation.realism_over_draws(reference, drawn, seed)
        for reference in (real, reconstructions, train_reconstructions))
    reconstructions_vs_real = evaluation.realism(real, reconstructions, seed)
    floors = evaluation.realism_floors(train_real, real, train_reconstructions, seed)
    print(f"Realism tests ({len(draws)} draws of samples against 3 image sets, and "
          f"{1 + len(floors)} other pairs; each two-sample test under "
          f"{evaluation.C2ST_REPEATS} seeds): {time.perf_counter() - started:.1f} s")
    metrics = {
        "vqvae": {
            **evaluation.reconstruction_metrics(originals, reconstructed),
            **evaluation.codebook_metrics_by_level([level["test"] for level in codes],
                                                   originals, codebook_sizes),
            **evaluation.two_sample_metrics(reconstructions_vs_real, "c2st_reconstructions",
                                            "anatomy_reconstructions"),
        },
        "pixelcnn": {
            **evaluation.prior_metrics_by_level(priors, codes, heights["test"],
                                                settings.data.batch_size, codebook_sizes),
        },
        "samples": {
            "n_real": len(originals),
            "n_samples": len(sampled.images),
            "draws": len(draws),
            "n_train_compared": len(train_originals),
            **samples_vs_real,
            **evaluation.two_sample_metrics(samples_vs_reconstructions,
                                            "c2st_vs_reconstructions",
                                            "anatomy_vs_reconstructions"),
            **evaluation.two_sample_metrics(samples_vs_train, "c2st_vs_train_reconstructions",
                                            "anatomy_vs_train_reconstructions"),
            **{key: value for name, result in floors.items() for key, value
               in evaluation.two_sample_metrics(result, name, f"anatomy_{name}").items()},
            "touching_border": float(evaluation.touches_border(sampled.images).mean()),
            "real_touching_border": float(evaluation.touches_border(originals).mean()),
            **evaluation.memorisation(sampled.images, originals, train_pixels, nearest),
            "pairwise_ssim": evaluation.pairwise_ssim(sampled.images, seed),
        },
    }
    bottom_alone = None
    if len(priors) == 2:
        scores, bottom_alone = bottom_prior_realism(
            model, priors[1], codes[0]["train"], heights["train"], train_pixels, settings)
        metrics["samples"].update(scores)
    if sampled.heights is not None:
        metrics["samples"].update(evaluation.samples_by_height(
            (originals, real, heights["test"]), (sampled.images, drawn[0], sampled.heights),
            seed))
    statistics = {"real test slices": real["statistics"],
                  "reconstructions": reconstructions["statistics"],
                  "samples": drawn[0]["statistics"]}
    memorised = evaluation.most_memorised(sampled.images, train_pixels, MEMORISATION_SHOWN,
                                          nearest)
    return metrics, statistics, memorised, bottom_alone


# ---------------------------------------------------------------------------------------------
# Figures: one function per PNG, each taking data and a path; each returns its Figure, which the
# tests inspect. The format they share (width, axes, code colours) is in runs.py.

VQ_LOSSES = {"loss": ("VQ-VAE: total loss", "loss"),
             "reconstruction_loss": ("VQ-VAE: reconstruction", None),  # RECONSTRUCTION_TERMS
             "vq_loss": ("VQ-VAE: VQ loss", "codebook + β · commitment")}
RECONSTRUCTION_TERMS = {"mse": "MSE / data variance", "l1_msssim": "α (1 − MS-SSIM) + (1 − α) L1"}
# the priors' panels, by the number of code levels
PRIOR_TITLES = {1: ("PixelCNN prior",), 2: ("top PixelCNN prior", "bottom PixelCNN prior")}


def plot_curves(ax, history, key, title, ylabel):
    """Training and validation curves of one loss, with the epoch whose weights were kept."""
    epochs = np.arange(1, len(history[key]) + 1)
    validation = np.asarray(history[f"val_{key}"])
    ax.plot(epochs, history[key], label="training")
    ax.plot(epochs, validation, label="validation")
    if key == "loss":  # what runs.KeepBest monitors
        best = int(np.argmin(validation))
        ax.plot(epochs[best], validation[best], "ko", label="kept (best validation loss)")
    ax.set(title=title, ylabel=ylabel)
    runs.epoch_axis(ax)


def plot_losses(vq_history, prior_histories, path, unigram_bits=(), reconstruction="mse"):
    """Training and validation losses per epoch: the VQ-VAE's three, on log scales since the late
    epochs' progress is a small fraction of the first's, and each code level's prior's
    cross-entropy (top first), where a rising validation curve shows it overfitting. A history
    is None for checkpoints without one. `unigram_bits`, each level's code entropy on the
    training split, is what a prior that ignores context reaches; `reconstruction` is
    --reconstruction, the VQ-VAE's reconstruction term."""
    titles = PRIOR_TITLES[len(prior_histories)] if prior_histories else ()
    priors = [(title, history, bits) for title, history, bits
              in zip(titles, prior_histories, [*unigram_bits, *[None] * len(titles)])
              if history]
    vq_panels = list(VQ_LOSSES) if vq_history else []
    panels = len(vq_panels) + len(priors)
    rows = math.ceil(panels / 2)
    fig = Figure(figsize=(runs.FIGURE_WIDTH, 2.6 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.remove()
    for ax, key in zip(axes, vq_panels):
        title, ylabel = VQ_LOSSES[key]
        plot_curves(ax, vq_history, key, title, ylabel or RECONSTRUCTION_TERMS[reconstruction])
        runs.plain_log_axis(ax)
    for ax, (title, history, bits) in zip(axes[len(vq_panels):], priors):
        in_bits = {key: np.asarray(values) / math.log(2) for key, values in history.items()}
        plot_curves(ax, in_bits, "loss", f"{title}: cross-entropy", "bits per code")
        if bits is not None:
            ax.axhline(bits, color="grey", linestyle="--", label="code entropy (no context)")
    handles = {label: handle for ax in axes[:panels]
               for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="outside upper center",
               ncols=min(len(handles), 2))
    save_figure(fig, path)
    return fig


def plot_validation_quality(history, codebook_sizes, path):
    """Validation SSIM and, in histories that track it, codebook use per epoch (of each level's
    codebook of codebook_sizes codes, top first)."""
    tracks_codebook = "val_codes_used" in history  # not in checkpoints of earlier versions
    fig = Figure(figsize=(runs.FIGURE_WIDTH if tracks_codebook else runs.FIGURE_WIDTH / 2, 3),
                 layout="constrained")
    ssim_axis, *codebook_axes = fig.subplots(1, 2 if tracks_codebook else 1, squeeze=False)[0]
    epochs = np.arange(1, len(history["val_ssim"]) + 1)
    ssim_axis.plot(epochs, history["val_ssim"], marker="o")
    ssim_axis.set(title="validation SSIM", ylabel="mean SSIM")
    runs.epoch_axis(ssim_axis)
    if tracks_codebook:
        codebook_axis = codebook_axes[0]
        for level, style, num_embeddings in zip(evaluation.LEVEL_PREFIXES, ("-", "--"),
                                                codebook_sizes):
            if f"val_{level}codes_used" not in history:  # one level
                continue
            name = level.replace("_", " ")
            codebook_axis.plot(epochs, history[f"val_{level}codes_used"], style, marker="o",
                               color="C0", label=f"{name}codes used")
            codebook_axis.plot(epochs, np.array(history[f"val_{level}codebook_perplexity"])
                               / num_embeddings, style, marker="o", color="C1",
                               label=f"{name}perplexity / K")
        sizes = (f"K = {codebook_sizes[0]}" if len(set(codebook_sizes)) == 1 else
                 ", ".join(f"K = {size} {name}" for size, name in zip(codebook_sizes, LEVEL_NAMES)))
        codebook_axis.set(title=f"validation codebook use ({sizes})",
                          ylabel="share of K", ylim=(0, 1.05))
        runs.epoch_axis(codebook_axis)
        codebook_axis.legend()
    save_figure(fig, path)
    return fig


def plot_codebook_results(originals, codes, reconstructions, scores, num_embeddings, path):
    """Validation images, their code maps and their reconstructions, each with its SSIM."""
    width = runs.FIGURE_WIDTH * 0.8
    fig = Figure(figsize=(width, width / 3 * len(originals) + 0.5), layout="constrained")
    axes = fig.subplots(len(originals), 3, squeeze=False)
    colours = runs.code_colours(num_embeddings)
    for row, (image, code, reconstruction, score) in enumerate(
            zip(originals, codes, reconstructions, scores)):
        axes[row, 0].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        axes[row, 1].imshow(colours[code])
        axes[row, 2].imshow(reconstruction[..., 0], cmap="gray", vmin=0, vmax=1)
        axes[row, 2].text(0.02, 0.02, f"SSIM {score:.3f}", color="white", va="bottom",
                          transform=axes[row, 2].transAxes)
    for ax, title in zip(axes[0], ("original", "code map", "reconstruction")):
        ax.set_title(title)
    for ax in axes.ravel():
        ax.axis("off")
    fig.supxlabel(runs.CODE_COLOURS_NOTE, fontsize="medium")
    save_figure(fig, path)
    return fig


def plot_samples(codes, images, heights, num_embeddings, path):
    """Sampled code maps above their decoded images, each titled with the relative height it was
    drawn at when the prior is conditional (`heights` is None otherwise)."""
    fig = Figure(figsize=(runs.FIGURE_WIDTH, runs.FIGURE_WIDTH / len(codes) * 2 + 0.6),
                 layout="constrained")
    axes = fig.subplots(2, len(codes), squeeze=False)
    colours = runs.code_colours(num_embeddings)
    for col, (code, image) in enumerate(zip(codes, images)):
        axes[0, col].imshow(colours[code])
        axes[1, col].imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
        if heights is not None:
            axes[0, col].set_title(f"h = {heights[col]:.2f}")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("code map")
    axes[1, 0].set_ylabel("decoded")
    fig.supxlabel(runs.CODE_COLOURS_NOTE + (
        "; h: relative height drawn at, 0 bottom, 1 top" if heights is not None else ""),
        fontsize="medium")
    save_figure(fig, path)
    return fig


def plot_codebook_usage(counts, path):
    """How often each code is used, on a log scale: the background's code would otherwise
    flatten all the others."""
    fig = Figure(figsize=(runs.FIGURE_WIDTH, 3), layout="constrained")
    ax = fig.subplots()
    ax.bar(np.arange(len(counts)), counts / counts.sum(), width=1.0)
    ax.axhline(1 / len(counts), color="grey", linestyle="--")
    ax.text(1.01, 1 / len(counts), "uniform\n(1 / K)", va="center", color="grey",
            transform=ax.get_yaxis_transform())
    ax.set(title=f"code use on the test split ({(counts > 0).sum()} of {len(counts)} codes used)",
           xlabel="code index k", ylabel="share of code positions", yscale="log",
           xlim=(-0.5, len(counts) - 0.5))
    save_figure(fig, path)
    return fig


def plot_realism(statistics, distances, path):
    """One panel per anatomy statistic: its distribution in each image set, titled with the
    samples' distance from the real test slices in units of the real slices' spread."""
    rows = math.ceil(len(evaluation.ANATOMY) / 2)
    fig = Figure(figsize=(runs.FIGURE_WIDTH, 2.5 * rows + 0.9), layout="constrained")
    grid = fig.subplots(rows, 2).ravel()
    axes, spare = dict(zip(evaluation.ANATOMY, grid)), grid[len(evaluation.ANATOMY):]
    for name, ax in axes.items():
        label = name.replace("_", " ")
        if name == "intensity":
            for set_name, values in statistics.items():
                ax.plot(evaluation.intensity_bin_centres(), values[name], label=set_name)
            ax.set(xlabel="intensity inside the brain", ylabel="share of brain pixels")
        else:
            values = [values[name] for values in statistics.values()]
            ax.hist(values, bins=runs.histogram_edges(values), density=True, histtype="step",
                    linewidth=1.5, label=list(statistics))
            ax.set(xlabel=label, ylabel="density")
        ax.set_title(f"{label}: samples {distances[name]:.2f} sd from real")
    fig.suptitle("Anatomy statistics. Panel titles: the samples' distance from the real test "
                 "slices\n(Wasserstein distance, in standard deviations of the real slices)",
                 fontsize="medium")
    # the intensity panel's lines, in the sets' order (a histogram adds its patches reversed),
    # in the empty panel if there is one, else below the panels
    handles = axes["intensity"].get_legend_handles_labels()
    if len(spare):
        spare[0].axis("off")
        spare[0].legend(*handles, loc="center", title="image sets")
    else:
        fig.legend(*handles, loc="outside lower center", ncols=len(statistics))
    save_figure(fig, path)
    return fig


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
    return fig


MEMORISATION_SHOWN = 6  # samples in memorisation.png


def plot_memorisation(samples, nearest, scores, test_threshold, path):
    """Samples beside their nearest training slices, each pair titled with its SSIM; a pair
    above `test_threshold`, the SSIM that few real test slices reach, counts as memorised."""
    pairs = len(samples)
    columns = math.ceil(pairs / 2)  # two rows of (sample, nearest) pairs
    fig = Figure(figsize=(runs.FIGURE_WIDTH, runs.FIGURE_WIDTH / (2 * columns) * 2 + 0.9),
                 layout="constrained")
    axes = fig.subplots(2, 2 * columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for pair, (sample, neighbour, score) in enumerate(zip(samples, nearest, scores)):
        sample_ax, neighbour_ax = axes[pair // columns, 2 * (pair % columns):][:2]
        sample_ax.imshow(sample[..., 0], cmap="gray", vmin=0, vmax=1)
        neighbour_ax.imshow(neighbour[..., 0], cmap="gray", vmin=0, vmax=1)
        sample_ax.text(0.02, 0.02, f"SSIM {score:.3f}", va="bottom", fontsize="small",
                       color="red" if score > test_threshold else "white",
                       transform=sample_ax.transAxes)
        sample_ax.set_title("sample", fontsize="small")
        neighbour_ax.set_title("nearest training", fontsize="small")
    fig.suptitle(f"The samples nearest to a training slice; SSIM in red above "
                 f"{test_threshold:.3f},\nwhich only "
                 f"{100 - evaluation.MEMORISATION_PERCENTILE}% of real test slices reach with "
                 "theirs (samples.test_nn_ssim_p99)", fontsize="medium")
    save_figure(fig, path)
    return fig


BOTTOM_ALONE_SHOWN = 8  # training slices in bottom_prior.png


def plot_bottom_prior(alone, path):
    """Training slices spread over the heights, their reconstructions, and the images decoded
    from their top codes with bottom codes the bottom prior drew given them: where the last row
    has the slices' structure, the samples' missing structure is the top prior's."""
    order = np.arange(len(alone.drawn)) if alone.heights is None else np.argsort(alone.heights)
    shown = order[np.linspace(0, len(order) - 1, BOTTOM_ALONE_SHOWN).round().astype(int)]
    fig = Figure(figsize=(runs.FIGURE_WIDTH, (runs.FIGURE_WIDTH / len(shown) + 0.3) * 3),
                 layout="constrained")
    rows = (alone.originals, alone.reconstructions, alone.drawn)
    titles = ("training slices", "their reconstructions",
              "their top codes with bottom codes the bottom prior drew given them")
    # a subfigure a row, so that each row's title spans it without widening its first column
    for row, (subfig, images, title) in enumerate(zip(fig.subfigures(len(rows), 1), rows,
                                                        titles)):
        subfig.suptitle(title, x=0.01, ha="left", fontsize="medium")
        for ax, index in zip(subfig.subplots(1, len(shown)), shown):
            ax.imshow(images[index, ..., 0], cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
            if row == 0 and alone.heights is not None:
                ax.text(0.03, 0.97, f"h = {alone.heights[index]:.2f}", color="white", va="top",
                        fontsize="x-small", transform=ax.transAxes)
    save_figure(fig, path)
    return fig


def write_figures(model, splits, histories, sampled, codes, statistics, memorised, metrics,
                  settings, bottom_alone=None):
    """The figures of a run; `histories` holds the VQ-VAE's and each level's prior's per-epoch
    logs ({metric: [value per epoch]}, None for checkpoints without a history file),
    `memorised` what `evaluate` found of the samples nearest to a training slice, and
    `bottom_alone` what it drew of the bottom prior alone (two code levels)."""
    out, shift = settings.out, settings.data.shift
    top_embeddings = model.codebook_sizes[0]  # the code maps shown are the top level's
    vq_history, *prior_histories = histories
    if vq_history or any(prior_histories):
        unigram_bits = [metrics["pixelcnn"][f"{level}unigram_bits"]
                        for level in evaluation.LEVEL_PREFIXES[:len(prior_histories)]]
        plot_losses(vq_history, prior_histories, out / "loss_plot.png", unigram_bits,
                    settings.vqvae.reconstruction)
    if vq_history:
        plot_validation_quality(vq_history, model.codebook_sizes, out / "ssim_plot.png")
    examples = next(iter(splits.scaled("validate").unbatch().batch(FIGURE_EXAMPLES)))
    reconstructions = evaluation.to_unit_range(model(examples), shift)
    originals = evaluation.to_unit_range(examples, shift)
    plot_codebook_results(originals.numpy(), data.encode(model, [examples])[0],
                          reconstructions.numpy(),
                          evaluation.ssim(originals, reconstructions).numpy(), top_embeddings,
                          out / "codebook_results.png")
    # spread over the samples: a conditional run draws them in order of height
    shown = np.linspace(0, len(sampled.codes) - 1, SAMPLES_SHOWN).round().astype(int)
    plot_samples(sampled.codes[shown], sampled.images[shown],
                 None if sampled.heights is None else sampled.heights[shown], top_embeddings,
                 out / "samples.png")
    if sampled.heights is not None:
        plot_samples_by_slice(splits.unit_range("test"), splits.heights("test"), sampled.images,
                              sampled.heights, out / "samples_by_slice.png")
    plot_codebook_usage(evaluation.code_counts(codes[0]["test"], top_embeddings),
                        out / "codebook_usage.png")
    plot_realism(statistics, metrics["samples"]["anatomy"], out / "realism.png")
    plot_memorisation(*memorised, metrics["samples"]["test_nn_ssim_p99"],
                      out / "memorisation.png")
    if bottom_alone is not None:
        plot_bottom_prior(bottom_alone, out / "bottom_prior.png")


# ---------------------------------------------------------------------------------------------
# The pipeline


def run(settings):
    # first, before any TensorFlow operation: a multi-worker strategy requires it
    strategy = runs.distribution_strategy(settings.strategy, settings.cpu_replicas)
    print(runs.describe_devices(strategy))
    if settings.evaluate:
        settings = settings.as_trained()
    own_folder = runs.worker_folder(strategy, settings.checkpoint_dir)
    if own_folder:
        settings = dataclasses.replace(settings, out=own_folder, checkpoint_dir=own_folder)
    given, prior_config = settings.data, settings.prior
    keras.utils.set_random_seed(given.seed)
    if settings.mixed_precision != "off":
        keras.mixed_precision.set_global_policy(f"mixed_{settings.mixed_precision}")
    runs.prepare_folder(settings.out, "--out")
    vq_checkpoints, prior_checkpoints = runs.prepare_checkpoints(
        settings.checkpoint_dir, settings.model_settings(), settings.fresh,
        settings.evaluate)
    train_vq, *train_priors = (not settings.evaluate and runs.needs_training(checkpoints, strategy)
                               for checkpoints in (vq_checkpoints, *prior_checkpoints))
    if own_folder and not (train_vq or any(train_priors)):
        return runs.finish_worker(own_folder)

    splits = data.load_splits(given.data, given.image_size, given.shift, given.batch_size,
                              settings.demo, settings.verbose)
    heights = data.slice_heights(splits, prior_config.conditional)
    drawn_at = (data.sample_heights(settings.slice, settings.num_samples, splits.top_slice,
                                    heights["test"]) if prior_config.conditional else None)
    if train_vq:
        runs.save_model(train_vqvae(splits, settings, vq_checkpoints, strategy),
                        vq_checkpoints.keras_file)
    model = runs.load_finished(VQVAE_NAME, vq_checkpoints)
    codes = data.code_maps(model, splits, settings.verbose,  # per level, top first
                           mirrored=prior_config.pcnn_mirror and train_priors[0])
    priors = []
    for level, checkpoints in enumerate(prior_checkpoints):
        top = codes[level - 1] if level else None
        if train_priors[level]:
            runs.save_model(train_prior(codes[level], heights, top, settings, checkpoints,
                                        strategy), checkpoints.keras_file)
        priors.append(runs.load_finished(PRIOR_NAMES[level], checkpoints))
    if own_folder:
        return runs.finish_worker(own_folder)

    draws = sample(model, priors, drawn_at, settings)
    runs.save_sample_pngs(draws[0].images, settings.out / "samples", drawn_at)
    metrics, statistics, memorised, bottom_alone = evaluate(model, priors, splits, draws, codes,
                                                            heights, settings)
    runs.save_json(metrics, settings.out / "metrics.json")
    runs.save_json(settings.flat(), settings.out / "run_settings.json")
    write_figures(model, splits, [runs.by_metric(runs.read_epochs(checkpoints.history))
                                  for checkpoints in (vq_checkpoints, *prior_checkpoints)],
                  draws[0], codes, statistics, memorised, metrics, settings, bottom_alone)
    evaluation.print_metrics(metrics)
    print(f"\nSamples, figures, metrics.json and run_settings.json: {settings.out}/")
    models = (vq_checkpoints, *prior_checkpoints)
    print(f"Models: {', '.join(str(checkpoints.keras_file) for checkpoints in models)}")


def main(argv=None):
    settings = parse_args(argv)
    try:
        run(settings)
    except PipelineError as error:
        sys.exit(f"driver.py: error: {error}")
    except tf.errors.UnavailableError:  # raised by a collective op only
        sys.exit("driver.py: error: lost contact with another worker of the cluster; rerun the "
                 "same command on every worker that stopped: training resumes from the last "
                 "finished epoch")


if __name__ == "__main__":
    main()
