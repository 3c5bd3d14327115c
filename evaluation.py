"""How good the models are: reconstructions, code usage, the prior's fit, and sample realism.

Pure functions of arrays and models: no flags, no files, no global random state (a function that
draws takes a seed). Images are in [0, 1] unless a function says otherwise.

Sample realism has two parts (see the README's evaluation section for what the values mean):
- a classifier two-sample test: a regularised logistic regression on fixed image features,
  cross-validated so that every image is scored once; 0.5 means it cannot tell the sets apart;
- anatomy statistics (brain area, pieces, left-right symmetry, solidity, the dark midline
  between the hemispheres, intensity and sharpness inside the brain), each compared between the
  sets as a 1-D Wasserstein distance in units of the reference set's spread.
Each score is read beside its floors, the scores of two sets of one kind (`halves_realism`).
"""

import math

import keras
import numpy as np
import tensorflow as tf
from scipy import fft, ndimage, spatial, stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import pixelcnn

# PSNR of identical images would be infinite: the MSE is floored here (caps PSNR at 100 dB).
MSE_FLOOR = 1e-10

# A pixel belongs to the brain above this intensity (in [0, 1]): the background is black, and
# 0.1 is below the darkest tissue but above the decoder's faint halo around the brain.
BRAIN_THRESHOLD = 0.1
# A separate piece of brain counts when it covers at least this share of the image.
MIN_PIECE_SHARE = 0.002
INTENSITY_BINS = 32
# The spread a statistic is measured in when the reference set does not vary at all (one piece
# in every image, say): its natural resolution.
SPREAD_FLOOR = {"brain_area": 0.01, "pieces": 0.5, "symmetry": 0.01, "solidity": 0.01,
                "midline_contrast": 0.01, "intensity": 1 / 255, "sharpness": 0.01}
# What anatomy_of measures per image, the statistics the classifier sees among its features: the
# intensity histogram is one per set, and sharpness reaches the classifier through the gradient
# histogram and the spectrum.
OUTLINE_STATISTICS = ("brain_area", "pieces", "symmetry", "solidity", "midline_contrast")
# Sharpness is read this many pixels inside the brain's outline: the discrete Laplacian reaches
# one pixel, and the outline's soft edge one more, so the step to the black background is left out.
SHARPNESS_MARGIN = 2
# Skull-stripped slices are centred on black: brain within this share of the side of an edge (8
# pixels at 256x256, the code map's outer row of codes at downsample 8) is brain where a real
# slice has none (tests/test_realism.py checks the demo's).
BORDER_SHARE = 1 / 32
# The midline band read by midline_contrast: this share of the image width on either side.
MIDLINE_HALF_WIDTH = 1 / 64
ANATOMY = tuple(SPREAD_FLOOR)

# The two-sample test: folds of the cross-validation, the inverse L2 strength of the logistic
# regression (chosen by the controls in tests/test_realism.py, not by our samples' scores), and
# the feature resolution.
C2ST_FOLDS = 5
C2ST_INVERSE_REGULARISATION = 0.01
FEATURE_GRID = 16
GRADIENT_BINS = 16
SPECTRUM_BANDS = 12
MIN_IMAGES_PER_SET = 2 * C2ST_FOLDS
# The two-sample test runs under this many seeds (each draws other folds and, for sets of
# different sizes, other parts of the larger set); the accuracy is their mean, c2st_sd their
# standard deviation: how far the score moves by the test's own randomness alone.
C2ST_REPEATS = 3
# Samples are compared with a random subset of the training slices this many times their number,
# so that each half of it, in the floor of two halves, is as large as the samples.
TRAIN_SUBSET_PER_SAMPLE = 2
# Relative heights in [0, 1] split into equal bands, each tested for realism on its own.
HEIGHT_BANDS = ("low", "middle", "high")
# Nearest-neighbour SSIM looks for the nearest training images by pixel distance at this size,
# then scores the closest few by SSIM at full size.
NEIGHBOUR_SEARCH_SIZE = 32
NEIGHBOUR_CANDIDATES = 4
NEIGHBOUR_CHUNK = 512  # training images converted to float at a time
# A sample counts as memorised when it is nearer its nearest training slice (by SSIM) than this
# percentile of the real test slices are to theirs: test slices are other people's, so their
# nearest training slices show what "not a copy" looks like. The key test_nn_ssim_p99 names it.
MEMORISATION_PERCENTILE = 99


# ---------------------------------------------------------------------------------------------
# Reconstructions


def to_unit_range(images, shift):
    """Scaled images (pixels / 255 - shift) back to [0, 1]."""
    return tf.clip_by_value(tf.cast(images, tf.float32) + shift, 0.0, 1.0)


def ssim(a, b):
    """Per-image SSIM of images (B, H, W, 1) in [0, 1]."""
    return tf.image.ssim(a, b, max_val=1.0)


def psnr(a, b):
    """Per-image PSNR (dB) of images in [0, 1]; identical images give the cap, not infinity."""
    mse = tf.reduce_mean(tf.square(a - b), axis=[1, 2, 3])
    return -10.0 * tf.math.log(tf.maximum(mse, MSE_FLOOR)) / tf.math.log(10.0)


def reconstructions(model, images, shift):
    """(originals, reconstructions) in [0, 1] of a dataset of scaled image batches."""
    pairs = [(to_unit_range(batch, shift), to_unit_range(model(batch), shift)) for batch in images]
    return tuple(np.concatenate(part) for part in zip(*pairs))


def reconstruction_metrics(originals, reconstructed):
    """Mean SSIM, PSNR and MSE of reconstructions against their originals, both in [0, 1]."""
    originals, reconstructed = tf.constant(originals), tf.constant(reconstructed)
    return {
        "test_ssim": float(tf.reduce_mean(ssim(originals, reconstructed))),
        "test_psnr": float(tf.reduce_mean(psnr(originals, reconstructed))),
        "test_mse": float(tf.reduce_mean(tf.square(originals - reconstructed))),
    }


# ---------------------------------------------------------------------------------------------
# Codes and the prior


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


def brain_code_positions(images, grid_shape):
    """Which positions of the code grid cover some brain: (N, h, w) booleans from images
    (N, H, W[, 1]) in [0, 1]. Most of a slice is background, which one or two codes carry, so
    the codebook's use inside the brain is what says how many codes describe anatomy."""
    images = as_gray(images)
    count, height, width = images.shape
    rows, columns = grid_shape
    # (N, H, W) -> (N, h, H/h, w, W/w): the pixels each code stands for
    patches = images.reshape(count, rows, height // rows, columns, width // columns)
    return patches.max(axis=(2, 4)) > BRAIN_THRESHOLD


def brain_codebook_perplexity(codes, images, num_embeddings):
    """The perplexity of the codes (N, h, w) at the positions that cover brain in images."""
    brain = brain_code_positions(images, codes.shape[1:])
    return float(2 ** entropy_bits(code_counts(codes[brain], num_embeddings)))


LEVEL_PREFIXES = ("", "bottom_")  # of each code level's metrics, top first


def codebook_metrics_by_level(codes, images, codebook_sizes):
    """How each level's codebook (of codebook_sizes codes) is used on code maps (one array per
    level, top first) of images in [0, 1]."""
    metrics = {}
    for prefix, level, num_embeddings in zip(LEVEL_PREFIXES, codes, codebook_sizes):
        brain_share = brain_code_positions(images, level.shape[1:]).mean()
        metrics |= {prefix + name: value for name, value in {
            **codebook_metrics(code_counts(level, num_embeddings)),
            "brain_codebook_perplexity": brain_codebook_perplexity(level, images, num_embeddings),
            "brain_code_share": float(brain_share)}.items()}
    return metrics


def prior_metrics_by_level(priors, codes, test_heights, batch_size, codebook_sizes):
    """Each level's prior on the test code maps (the bottom's given the top's), beside the code
    entropy on the training split, which a prior without context reaches, and log2 K, which a
    uniform guess costs. `codes` holds a {split: code maps} per level, top first."""
    metrics = {}
    for prefix, prior, level, top, num_embeddings in zip(LEVEL_PREFIXES, priors, codes,
                                                         [None, *codes], codebook_sizes):
        metrics[prefix + "test_nll_bits"] = prior_nll_bits(
            prior, level["test"], batch_size, test_heights, None if top is None else top["test"])
        metrics[prefix + "unigram_bits"] = entropy_bits(code_counts(level["train"],
                                                                    num_embeddings))
        metrics[prefix + "uniform_bits"] = math.log2(num_embeddings)
    return metrics


def prior_nll_bits(prior, codes, batch_size, heights=None, top_codes=None):
    """Mean negative log-likelihood per code, in bits, of code maps under the prior: -log2 p(c),
    or -log2 p(c | h) for a conditional prior given the maps' relative heights h (and
    -log2 p(c | top codes, h) for VQ-VAE-2's bottom prior)."""
    total, count = 0.0, 0
    for start in range(0, len(codes), batch_size):
        batch = codes[start:start + batch_size]
        batch_heights, batch_top = (None if given is None else given[start:start + batch_size]
                                    for given in (heights, top_codes))
        logits = prior(pixelcnn.prior_inputs(prior, batch, batch_heights, batch_top),
                       training=False)
        nll = keras.losses.sparse_categorical_crossentropy(batch, logits, from_logits=True)
        total += float(tf.reduce_sum(nll))
        count += int(tf.size(nll))
    return total / count / math.log(2)


# ---------------------------------------------------------------------------------------------
# Samples against the training set and each other


def resized(images, size):
    return tf.image.resize(images, (size, size), method="area").numpy()


def nearest_neighbour_ssim(samples, training_pixels):
    """For each sample (N, H, W, 1) in [0, 1], its SSIM to the nearest training image (uint8
    pixels as stored, so that OASIS's 9,664 slices take a quarter of float32's memory). Near 1
    would mean the prior copies training slices."""
    return nearest_training_images(samples, training_pixels)[0]


def training_images(training_pixels, indices):
    """Training images at `indices` in [0, 1] from their uint8 pixels."""
    return training_pixels[indices].astype("float32") / 255


def nearest_training_images(samples, training_pixels):
    """For each sample (N, H, W, 1) in [0, 1], the SSIM to its nearest training image and that
    image's index: the few nearest by pixel distance at a coarse size are scored by SSIM at full
    size, since scoring every pair would take hours on OASIS."""
    coarse = lambda x: resized(x, NEIGHBOUR_SEARCH_SIZE).reshape(len(x), -1)  # noqa: E731
    s = coarse(samples)
    t = np.concatenate([
        coarse(training_images(training_pixels, slice(start, start + NEIGHBOUR_CHUNK)))
        for start in range(0, len(training_pixels), NEIGHBOUR_CHUNK)])
    distances = (s**2).sum(1)[:, None] - 2 * s @ t.T + (t**2).sum(1)  # (S, T)
    candidates = np.argsort(distances, axis=1)[:, :NEIGHBOUR_CANDIDATES]
    scores = np.array([
        ssim(np.repeat(sample[None], len(nearest), 0),
             training_images(training_pixels, nearest)).numpy()
        for sample, nearest in zip(samples, candidates)])  # (S, NEIGHBOUR_CANDIDATES)
    best = np.argmax(scores, axis=1)
    rows = np.arange(len(best))
    return scores[rows, best], candidates[rows, best]


def memorisation(samples, test_images, training_pixels, nearest=None):
    """Whether the prior copies its training slices, which would pass every realism test: the
    samples' SSIM to their nearest training slices beside the real test slices' (the floor).
    Images in [0, 1], training slices as uint8 pixels; `nearest`, the samples'
    `nearest_training_images` when already found.

    Returns nn_ssim and test_nn_ssim (the means), test_nn_ssim_p99 (the test slices'
    MEMORISATION_PERCENTILE) and memorised_share: the share of samples nearer a training slice
    than that, about 1 - MEMORISATION_PERCENTILE / 100 for samples as new as test slices.
    """
    if nearest is None:
        nearest = nearest_training_images(samples, training_pixels)
    sample_scores = nearest[0]
    test_scores = nearest_neighbour_ssim(test_images, training_pixels)
    threshold = float(np.percentile(test_scores, MEMORISATION_PERCENTILE))
    return {"nn_ssim": float(sample_scores.mean()), "test_nn_ssim": float(test_scores.mean()),
            "test_nn_ssim_p99": threshold,
            "memorised_share": float((sample_scores > threshold).mean())}


def most_memorised(samples, training_pixels, count, nearest=None):
    """The `count` samples nearest to a training slice by SSIM, most similar first: (samples,
    their nearest training images in [0, 1], the SSIMs); `nearest`, the samples'
    `nearest_training_images` when already found."""
    if nearest is None:
        nearest = nearest_training_images(samples, training_pixels)
    scores, nearest = nearest
    shown = np.argsort(-scores)[:count]
    return samples[shown], training_images(training_pixels, nearest[shown]), scores[shown]


def pairwise_ssim(samples, seed):
    """Mean SSIM of disjoint random pairs of samples (lower is more diverse); all pairs would be
    quadratic in the number of samples, and independent pairs estimate the same mean."""
    order = np.random.default_rng(seed).permutation(len(samples))
    pairs = len(order) // 2
    first, second = samples[order[:pairs]], samples[order[pairs:2 * pairs]]
    return float(np.mean(ssim(first, second)))


# ---------------------------------------------------------------------------------------------
# Anatomy statistics


def as_gray(images):
    """(N, H, W, 1) or (N, H, W) -> float (N, H, W)."""
    images = np.asarray(images, dtype="float32")
    return images[..., 0] if images.ndim == 4 else images


def brain_pieces(mask):
    """Labels of the connected pieces of a mask that are large enough to count, largest first."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    large = np.flatnonzero(sizes >= MIN_PIECE_SHARE * mask.size) + 1
    return labels, large[np.argsort(-sizes[large - 1])]


def solidity(piece):
    """Area of a piece over the area of its convex hull (1 for a convex piece)."""
    edge = piece & ~ndimage.binary_erosion(piece)
    rows, cols = np.nonzero(edge)
    # the hull of the edge pixels' corners holds every pixel of the piece whole
    corners = np.concatenate([np.stack([rows + dr, cols + dc], 1)
                              for dr in (0, 1) for dc in (0, 1)])
    try:
        hull = spatial.ConvexHull(corners)
    except spatial.QhullError:  # a line of pixels: its own hull
        return 1.0
    return float(piece.sum() / hull.volume)  # a 2-D hull's "volume" is its area


def mirror_symmetry(mask):
    """Intersection over union of a mask and its mirror image about the mask's own vertical
    midline (its column centroid)."""
    columns = np.nonzero(mask)[1]
    width = mask.shape[1]
    # column c maps to 2 * centre - c; flipping maps it to width - 1 - c, so roll the difference
    shift = int(round(2 * columns.mean() - (width - 1)))
    mirrored = np.roll(mask[:, ::-1], shift, axis=1)
    return float((mask & mirrored).sum() / (mask | mirrored).sum())


def midline_contrast(image, mask):
    """Mean intensity on the brain's vertical midline (inside its outline) over the brain's mean
    intensity: below 1 where a dark fissure splits two hemispheres, about 1 for a blob, 0 where
    the midline misses the brain."""
    centre = int(round(np.nonzero(mask)[1].mean()))
    half_width = max(1, int(MIDLINE_HALF_WIDTH * image.shape[1]))
    band = slice(max(centre - half_width, 0), centre + half_width + 1)
    inside = ndimage.binary_fill_holes(mask)[:, band]
    if not inside.any():
        return 0.0
    return float(image[:, band][inside].mean() / image[mask].mean())


def sharpness(image, mask):
    """Root mean square of the image's Laplacian inside the brain (the mask eroded by
    SHARPNESS_MARGIN pixels) over the brain's mean intensity: fine detail relative to brightness,
    lowered by blur, raised by speckle. 0 for a brain with no inside."""
    inside = ndimage.binary_erosion(mask, iterations=SHARPNESS_MARGIN)
    if not inside.any():
        return 0.0
    laplacian = ndimage.laplace(image)
    return float(np.sqrt(np.mean(laplacian[inside] ** 2)) / image[mask].mean())


def anatomy_of(image):
    """The OUTLINE_STATISTICS of one image (H, W) in [0, 1]."""
    mask = image > BRAIN_THRESHOLD
    labels, pieces = brain_pieces(mask)
    if not len(pieces):
        return {"brain_area": float(mask.mean()), "pieces": 0.0, "symmetry": 0.0,
                "solidity": 0.0, "midline_contrast": 0.0}
    return {
        "brain_area": float(mask.mean()),
        "pieces": float(len(pieces)),
        "symmetry": mirror_symmetry(mask),
        "solidity": solidity(labels == pieces[0]),
        "midline_contrast": midline_contrast(image, mask),
    }


def touches_border(images):
    """Whether each image (N, H, W) in [0, 1] has brain within BORDER_SHARE of the side of an
    edge: a fragment at the image border, or a brain cut off by it."""
    images = as_gray(images)
    margin = max(1, round(BORDER_SHARE * images.shape[1]))
    frame = np.ones(images.shape[1:], bool)
    frame[margin:-margin, margin:-margin] = False
    return ((images > BRAIN_THRESHOLD) & frame).any(axis=(1, 2))


def anatomy_statistics(images):
    """{statistic: values per image}, each image's brain-pixel counts under "intensity_counts"
    and, under "intensity", the intensity histogram of all the images' brain pixels."""
    images = as_gray(images)
    per_image = [anatomy_of(image) for image in images]
    statistics = {name: np.array([s[name] for s in per_image]) for name in OUTLINE_STATISTICS}
    statistics["sharpness"] = np.array(
        [sharpness(image, image > BRAIN_THRESHOLD) for image in images])
    statistics["intensity_counts"] = np.stack([intensity_counts(image) for image in images])
    statistics["intensity"] = intensity_distribution(statistics["intensity_counts"])
    return statistics


def intensity_counts(image):
    """The counts of an image's brain pixels in INTENSITY_BINS bins over (BRAIN_THRESHOLD, 1]."""
    brain = image[image > BRAIN_THRESHOLD]
    return np.histogram(brain, bins=INTENSITY_BINS, range=(BRAIN_THRESHOLD, 1.0))[0]


def intensity_distribution(counts):
    """Per-image intensity counts (N, INTENSITY_BINS) summed into one distribution."""
    total = counts.sum(axis=0)
    return total / max(total.sum(), 1)


def intensity_bin_centres():
    edges = np.linspace(BRAIN_THRESHOLD, 1.0, INTENSITY_BINS + 1)
    return (edges[:-1] + edges[1:]) / 2


def spread(values, weights=None):
    """Standard deviation of values (optionally weighted)."""
    mean = np.average(values, weights=weights)
    return float(np.sqrt(np.average((values - mean) ** 2, weights=weights)))


def anatomy_distances(reference, other):
    """For each statistic, the 1-D Wasserstein distance between the two sets' distributions in
    units of the reference set's spread (0: the same; 1: off by a typical real difference)."""
    distances = {}
    for name in ANATOMY:
        if name == "intensity":
            centres = intensity_bin_centres()
            weights = reference[name], other[name]
            if not (weights[0].any() and weights[1].any()):  # a set without brain pixels
                distances[name] = math.inf
                continue
            distance = stats.wasserstein_distance(centres, centres, *weights)
            scale = spread(centres, weights[0])
        else:
            distance = stats.wasserstein_distance(reference[name], other[name])
            scale = spread(reference[name])
        distances[name] = float(distance / max(scale, SPREAD_FLOOR[name]))
    return distances


# ---------------------------------------------------------------------------------------------
# The classifier two-sample test


def gradient_histogram(images):
    """Share of pixels per bin of gradient magnitude: edges, blur and noise."""
    rows, cols = np.gradient(images, axis=(1, 2))
    magnitude = np.hypot(rows, cols).reshape(len(images), -1)
    edges = np.linspace(0, 0.5, GRADIENT_BINS + 1)
    return np.stack([np.histogram(m, bins=edges)[0] for m in magnitude]) / magnitude.shape[1]


def radial_spectrum(images):
    """Log power in up to SPECTRUM_BANDS log-spaced rings of spatial frequency: texture and
    sharpness."""
    # scipy's FFT: several times faster than numpy's on a stack of images
    power = np.abs(np.fft.fftshift(fft.fft2(images), axes=(1, 2))) ** 2
    size = images.shape[1]
    rows, cols = np.mgrid[:size, :size] - size // 2
    radius = np.hypot(rows, cols)
    # whole radii, so that a small image has no empty ring
    edges = np.unique(np.round(np.geomspace(1, size // 2, SPECTRUM_BANDS + 1)))
    bands = [(radius >= low) & (radius < high) for low, high in zip(edges[:-1], edges[1:])]
    return np.log1p(np.stack([power[:, band].mean(axis=1) for band in bands], axis=1))


def realism_features(images, statistics):
    """Fixed features per image: the image at FEATURE_GRID x FEATURE_GRID, its gradient-magnitude
    histogram, its radial power spectrum and its anatomy statistics."""
    coarse = resized(images[..., None], FEATURE_GRID).reshape(len(images), -1)
    anatomy = np.stack([statistics[name] for name in OUTLINE_STATISTICS], axis=1)
    return np.concatenate(
        [coarse, gradient_histogram(images), radial_spectrum(images), anatomy], axis=1)


def too_few_images(n_reference, n_other):
    """Why the two-sample test cannot compare sets of these sizes, or None when it can."""
    if min(n_reference, n_other) < MIN_IMAGES_PER_SET:
        return (f"the two-sample test needs at least {MIN_IMAGES_PER_SET} images in each set "
                f"({C2ST_FOLDS}-fold cross-validation), got {n_reference} and {n_other}")
    return None


def check_set_sizes(n_reference, n_other):
    reason = too_few_images(n_reference, n_other)
    if reason:
        raise ValueError(reason)


def two_sample_test(reference_features, other_features, seed):
    """Cross-validated accuracy of a classifier telling the two sets apart, and its standard
    error. Classes balance: the larger set is split into disjoint parts the size of the smaller,
    each tested against the whole smaller set, and the accuracies averaged, so that every image
    is held out once and no unlucky subsample decides the score. The standard error is one
    test's (their mean), which bounds the average's from above."""
    rng = np.random.default_rng(seed)
    reference, other = (x[rng.permutation(len(x))] for x in (reference_features, other_features))
    count = min(len(reference), len(other))
    parts = lambda x: np.split(x[: len(x) // count * count], len(x) // count)  # noqa: E731
    # one of the two sets is a single part: each part of the other is tested against it;
    # the fits are small, and parallel BLAS threads wait on each other longer than they save
    with threadpool_limits(limits=1):
        tests = [held_out_accuracy(reference_part, other_part, seed)
                 for reference_part in parts(reference) for other_part in parts(other)]
    return tuple(float(np.mean(values)) for values in zip(*tests))


def repeated_two_sample_test(reference_features, other_features, seed):
    """two_sample_test under C2ST_REPEATS seeds from `seed` on: the mean accuracy, the standard
    deviation of the accuracies (the test's own randomness: folds and parts, the images fixed)
    and the mean standard error (the images' share: what another draw of the sets could move)."""
    tests = [two_sample_test(reference_features, other_features, seed + repeat)
             for repeat in range(C2ST_REPEATS)]
    accuracies, errors = np.array(tests).T
    return float(accuracies.mean()), float(accuracies.std(ddof=1)), float(errors.mean())


def held_out_accuracy(reference, other, seed):
    """The share of 5-fold held-out predictions that tell two equal-size sets apart, and its
    standard error."""
    features = np.concatenate([reference, other])
    labels = np.r_[np.zeros(len(reference)), np.ones(len(other))]
    classifier = make_pipeline(
        StandardScaler(), LogisticRegression(C=C2ST_INVERSE_REGULARISATION, max_iter=1000))
    folds = StratifiedKFold(C2ST_FOLDS, shuffle=True, random_state=seed)
    correct = cross_val_predict(classifier, features, labels, cv=folds) == labels
    return correct.mean(), correct.std(ddof=1) / math.sqrt(len(correct))


def realism_summary(images):
    """Everything the realism test needs of one set of images in [0, 1]: computed once per set,
    so each set can be compared with several others."""
    images = as_gray(images)
    statistics = anatomy_statistics(images)
    return {"statistics": statistics, "features": realism_features(images, statistics),
            "count": len(images)}


def summary_subset(summary, indices):
    """The `realism_summary` of the images at `indices` of a summarised set."""
    statistics = {name: values[indices] for name, values in summary["statistics"].items()
                  if name != "intensity"}
    statistics["intensity"] = intensity_distribution(statistics["intensity_counts"])
    return {"statistics": statistics, "features": summary["features"][indices],
            "count": len(indices)}


def realism(reference, other, seed):
    """The two-sample test (`repeated_two_sample_test`) and the anatomy distances of `other`
    against `reference` (both from `realism_summary`)."""
    check_set_sizes(reference["count"], other["count"])
    accuracy, sd, stderr = repeated_two_sample_test(reference["features"], other["features"], seed)
    return {"c2st_accuracy": accuracy, "c2st_sd": sd, "c2st_stderr": stderr,
            "anatomy": anatomy_distances(reference["statistics"], other["statistics"])}


def realism_over_draws(reference, draws, seed):
    """`realism` against `reference` of independent draws of samples (each a `realism_summary`):
    the accuracy is the mean over the draws and its sd their spread, how far another draw could
    move it (with one draw, the test's own spread over its seeds); the standard error is the
    draws' mean, and the anatomy distances are the first draw's."""
    results = [realism(reference, draw, seed) for draw in draws]
    if len(results) == 1:
        return results[0]
    accuracies = [result["c2st_accuracy"] for result in results]
    return {**results[0], "c2st_accuracy": float(np.mean(accuracies)),
            "c2st_sd": float(np.std(accuracies, ddof=1)),
            "c2st_stderr": float(np.mean([result["c2st_stderr"] for result in results]))}


# ---------------------------------------------------------------------------------------------
# Floors: what the realism test scores for two sets of one kind


def random_halves(count, seed):
    """Indices of two disjoint random halves of `count` items."""
    order = np.random.default_rng(seed).permutation(count)
    half = count // 2
    return order[:half], order[half:2 * half]


def halves_realism(summary, seed):
    """`realism` of one random half of a summarised set against the other: the score of two
    sets of one kind at half the size, a floor for any pair of sets that size."""
    first, second = random_halves(summary["count"], seed)
    return realism(summary_subset(summary, first), summary_subset(summary, second), seed)


def training_subset(num_train, num_samples, seed):
    """Sorted indices of a random TRAIN_SUBSET_PER_SAMPLE * num_samples of the num_train
    training slices (all of them when there are fewer)."""
    size = min(num_train, TRAIN_SUBSET_PER_SAMPLE * num_samples)
    return np.sort(np.random.default_rng(seed).choice(num_train, size, replace=False))


# ---------------------------------------------------------------------------------------------
# Samples at a height: a conditional prior's samples against the real slices at their heights


def height_band(heights):
    """The index into HEIGHT_BANDS of each relative height in [0, 1]."""
    bands = len(HEIGHT_BANDS)
    return np.minimum((np.asarray(heights) * bands).astype(int), bands - 1)


def realism_by_band(real, real_heights, samples, sample_heights, seed):
    """`realism` of the samples against the real slices in each height band that holds at least
    MIN_IMAGES_PER_SET of both, with the counts: {band: {...}}. Images in [0, 1]."""
    results = {}
    real_bands, sample_bands = height_band(real_heights), height_band(sample_heights)
    for band, name in enumerate(HEIGHT_BANDS):
        real_in, samples_in = real[real_bands == band], samples[sample_bands == band]
        if min(len(real_in), len(samples_in)) < MIN_IMAGES_PER_SET:
            continue
        results[name] = {"n_real": len(real_in), "n_samples": len(samples_in),
                         **realism(realism_summary(real_in), realism_summary(samples_in), seed)}
    return results


def nearest_height(heights, levels):
    """Each height replaced by the nearest of `levels` (the data set's slice heights)."""
    levels = np.asarray(levels)
    return levels[np.abs(np.asarray(heights)[:, None] - levels[None]).argmin(axis=1)]


def brain_area_by_height(real_areas, real_heights, sample_areas, sample_heights):
    """The mean brain area of the real slices and of the samples at each of the real slices'
    heights (samples count at the nearest), over the heights both have, and the two curves'
    Pearson correlation: 1 when the samples' size follows the real slices' from bottom to top.

    Returns {"correlation": r, "correlation_undefined": None, or why r is nan,
             "by_height": {"0.43": {"real": .., "samples": ..}, ..}}.
    """
    levels = np.unique(real_heights)
    sample_levels = nearest_height(sample_heights, levels)
    shared = [level for level in levels if (sample_levels == level).any()]
    real = np.array([real_areas[real_heights == level].mean() for level in shared])
    drawn = np.array([sample_areas[sample_levels == level].mean() for level in shared])
    correlation, undefined = pearson_correlation(real, drawn)
    return {"correlation": correlation, "correlation_undefined": undefined,
            "by_height": {f"{level:.2f}": {"real": float(a), "samples": float(b)}
                          for level, a, b in zip(shared, real, drawn)}}


def pearson_correlation(real, drawn):
    """(Pearson's r of the real and the drawn curve, None), or (nan, why) where r is undefined:
    fewer than two points, or a curve that does not vary."""
    if len(real) < 2:
        return math.nan, f"{len(real)} height(s) shared by samples and real slices, not 2"
    flat = [name for name, curve in (("real slices'", real), ("samples'", drawn))
            if np.ptp(curve) == 0]
    if flat:
        return math.nan, f"the {' and the '.join(flat)} mean brain area is the same at every height"
    return float(np.corrcoef(real, drawn)[0, 1]), None


# ---------------------------------------------------------------------------------------------
# Negative controls: images and code maps the realism test must flag. Public because both its
# tests (tests/test_realism.py) and its table (benchmarks/realism.py) draw them.


def smooth_noise(size, rng, scale):
    """Gaussian noise smoothed over scale * size pixels, with unit spread."""
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), scale * size)
    return noise / noise.std()


def shuffled_tiles(images, rng, tiles=4):
    """Each image (N, S, S) cut into tiles x tiles squares, put back in a random order."""
    count, size = len(images), images.shape[1]
    side = size // tiles
    # (N, S, S) -> (N, tiles * tiles, side, side) and back
    blocks = images.reshape(count, tiles, side, tiles, side).transpose(0, 1, 3, 2, 4)
    blocks = blocks.reshape(count, tiles * tiles, side, side)
    blocks = np.stack([image_blocks[rng.permutation(tiles * tiles)] for image_blocks in blocks])
    blocks = blocks.reshape(count, tiles, tiles, side, side).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(images.shape)


def blurred(images, share=1 / 16):
    """Each image (N, S, S) blurred by a Gaussian of share * S pixels."""
    return ndimage.gaussian_filter(images, (0, share * images.shape[1], share * images.shape[1]))


def tadpoles(count, size, rng):
    """The seed's samples: filled ellipses with a tail, smooth noise inside: (N, S, S)."""
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    images = []
    for _ in range(count):
        radius_y, radius_x = rng.uniform(0.25, 0.4), rng.uniform(0.2, 0.35)
        centre_y, centre_x = rng.uniform(-0.05, 0.05, 2)
        body = ((rows - centre_y) / radius_y) ** 2 + ((cols - centre_x) / radius_x) ** 2 < 1
        tail = ((np.abs(cols - centre_x) < 0.04) & (rows > centre_y)
                & (rows < centre_y + radius_y + 0.12))
        texture = 0.5 + 0.25 * smooth_noise(size, rng, 1 / 16)
        images.append(np.clip((body | tail) * texture, 0, 1))
    return np.stack(images).astype("float32")


def unigram_code_maps(counts, num_maps, grid_shape, seed):
    """Code maps whose codes are drawn independently from the code frequencies `counts`: what a
    prior that learned nothing but the frequencies would draw (a control of the realism test)."""
    rng = np.random.default_rng(seed)
    return rng.choice(len(counts), size=(num_maps, *grid_shape), p=counts / counts.sum())


# ---------------------------------------------------------------------------------------------
# The realism results as metrics.json holds them, and as a run prints them


def realism_floors(train_real, real, train_reconstructions, seed):
    """{name: realism result} of the floors that the samples' scores are read against: real
    training slices against real test slices (the split is by person), and two random halves
    of the training slices' reconstructions. A floor the set sizes leave undefined is left out,
    and why is printed."""
    floors = {}
    reason = too_few_images(train_real["count"], real["count"])
    if reason is None:
        floors["floor_train_vs_test"] = realism(real, train_real, seed)
    else:
        print(f"  samples.floor_train_vs_test: nan ({reason})")
    half = train_reconstructions["count"] // 2
    reason = too_few_images(half, half)
    if reason is None:
        floors["floor_reconstruction_halves"] = halves_realism(
            train_reconstructions, seed)
    else:
        print(f"  samples.floor_reconstruction_halves: nan (halves of "
              f"{train_reconstructions['count']} training reconstructions: {reason})")
    return floors


def two_sample_metrics(result, name, anatomy_name):
    """A `realism` result as metrics: name (the mean accuracy), name_sd, name_stderr and
    anatomy_name (the anatomy distances)."""
    return {name: result["c2st_accuracy"], f"{name}_sd": result["c2st_sd"],
            f"{name}_stderr": result["c2st_stderr"], anatomy_name: result["anatomy"]}


def samples_by_height(real, sampled, seed):
    """The realism test per height band, and how well the samples' brain area follows the real
    slices' from bottom to top. `real` and `sampled` are (images, realism summary, heights)."""
    (real_images, real_summary, real_heights), (images, summary, heights) = real, sampled
    area = brain_area_by_height(
        real_summary["statistics"]["brain_area"], real_heights,
        summary["statistics"]["brain_area"], heights)
    if area["correlation_undefined"]:
        print(f"  samples.brain_area_height_correlation: nan ({area['correlation_undefined']})")
    return {"by_band": realism_by_band(real_images, real_heights, images, heights,
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
    if not prefix:
        print_beside_floors(metrics)


# (metrics group, accuracy key, what it compares): the two-sample accuracies, then their floors;
# a run of one code level has no bottom prior to score alone (driver.bottom_prior_realism)
TWO_SAMPLE_SCORES = (
    ("samples", "c2st_accuracy", "samples vs real test slices"),
    ("samples", "c2st_vs_reconstructions", "samples vs test reconstructions"),
    ("samples", "c2st_vs_train_reconstructions", "samples vs training reconstructions"),
    ("samples", "c2st_bottom_given_top", "bottom prior alone (given real top codes)"),
    ("vqvae", "c2st_reconstructions", "test reconstructions vs real test slices"),
    ("samples", "floor_train_vs_test", "floor: real training vs real test slices"),
    ("samples", "floor_reconstruction_halves", "floor: two halves of training reconstructions"),
)
ONE_LEVEL_LACKS = "c2st_bottom_given_top"


def print_beside_floors(metrics):
    """Each two-sample accuracy as mean ± sd, the samples' over their draws, the others' over
    the test's seeds, with one test's standard error, above the floors it is read against."""
    draws = metrics["samples"]["draws"]
    seeds = f"over {C2ST_REPEATS} seeds of the test (folds and parts, the images fixed)"
    print("\nTwo-sample accuracy: mean ± sd, and one test's standard error (the images' share)")
    print(f"  sd: the samples' over {draws} independent draws of them, the others' {seeds}"
          if draws > 1 else f"  sd: {seeds}")
    one_level = "bottom_test_nll_bits" not in metrics["pixelcnn"]
    for group, key, label in TWO_SAMPLE_SCORES:
        if key == ONE_LEVEL_LACKS and one_level:
            continue
        if key not in metrics[group]:
            print(f"  {label:<48} nan (too few images, see above)")
            continue
        # samples vs real slices keep their original names: c2st_sd, c2st_stderr
        stem = "c2st" if key == "c2st_accuracy" else key
        values = metrics[group]
        print(f"  {label:<48} {values[key]:.3f} ± {values[f'{stem}_sd']:.3f} "
              f"(s.e. {values[f'{stem}_stderr']:.3f})")
