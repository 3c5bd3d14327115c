"""The realism test must be able to fail: clearly bad images it must flag (negative controls)
and real images it must pass (positive controls), on the bundled demo slices and on synthetic
brains the test builds; and the anatomy statistics on shapes with known answers."""

import keras
import numpy as np
import pytest
from PIL import Image

import data
import evaluation
import vqvae

SIZE = 64  # the demo's image size
# What "different" and "same" mean, as the README states them.
DIFFERENT_ACCURACY = 0.85
SAME_ACCURACY = 0.62
LARGE_DISTANCE = 1.0  # at least one statistic this many real standard deviations off
SMALL_DISTANCE = 0.5  # every statistic within this many


def demo_images(split):
    """The demo slices of a split at SIZE x SIZE, in [0, 1]: (N, SIZE, SIZE)."""
    files = sorted((data.DEMO_DATA / f"keras_png_slices_{split}").glob("*.png"))
    return np.stack([np.asarray(Image.open(f).resize((SIZE, SIZE), Image.BILINEAR), "float32")
                     for f in files]) / 255


def synthetic_brains(count, rng):
    """Two hemispheres split by a dark fissure, two dark ventricles, textured tissue."""
    rows, cols = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    images = []
    for _ in range(count):
        ry, rx = rng.uniform(0.3, 0.42), rng.uniform(0.25, 0.36)
        brain = (rows / ry) ** 2 + (cols / rx) ** 2 < 1
        fissure = np.abs(cols) < 0.015
        ventricles = ((rows / 0.12) ** 2 + ((np.abs(cols) - 0.06) / 0.035) ** 2) < 1
        tissue = np.clip(0.6 + 0.12 * evaluation.smooth_noise(SIZE, rng, 0.03), 0.2, 1)
        images.append(brain * ~fissure * ~ventricles * tissue)
    return np.stack(images).astype("float32")


def unigram_decoded(train, count, rng):
    """Images decoded from code maps whose codes are drawn independently from the code
    frequencies of a VQ-VAE briefly trained on `train`."""
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(32, 8, pixel_range=(-0.5, 0.5), data_variance=float(train.var()))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train[..., None] - 0.5, epochs=8, batch_size=16, verbose=0)
    codes = model.encode_to_indices(train[..., None] - 0.5).numpy()
    maps = evaluation.unigram_code_maps(evaluation.code_counts(codes, 32), count, codes.shape[1:],
                                        seed=int(rng.integers(1 << 30)))
    return np.clip(model.decode_indices(maps).numpy()[..., 0] + 0.5, 0, 1)


@pytest.fixture(scope="module")
def sources():
    """{name: (real reference images, training images)}: two real sets of one kind; the
    positive controls split the second in halves, the unigram control trains on it."""
    rng = np.random.default_rng(0)
    train = demo_images("train")
    synthetic = synthetic_brains(256, rng)
    return {"demo": (demo_images("test"), train),
            "synthetic": (synthetic[:64], synthetic[64:])}


def negative_controls(name, real, train):
    rng = np.random.default_rng(1)
    controls = {"shuffled tiles": evaluation.shuffled_tiles(real, rng),
                "heavy blur": evaluation.blurred(real),
                "tadpoles": evaluation.tadpoles(len(real), SIZE, rng)}
    if name == "demo":
        controls["unigram codes"] = unigram_decoded(train, len(real), rng)
    return controls


@pytest.mark.parametrize("name", ["demo", "synthetic"])
def test_clearly_bad_images_are_flagged(sources, name):
    real, train = sources[name]
    reference = evaluation.realism_summary(real)
    for control, images in negative_controls(name, real, train).items():
        result = evaluation.realism(reference, evaluation.realism_summary(images), seed=0)
        assert result["c2st_accuracy"] >= DIFFERENT_ACCURACY, (control, result)
        assert max(result["anatomy"].values()) >= LARGE_DISTANCE, (control, result)


@pytest.mark.parametrize("name", ["demo", "synthetic"])
def test_two_halves_of_real_images_pass(sources, name):
    _, images = sources[name]
    order = np.random.default_rng(2).permutation(len(images))
    half = len(images) // 2
    first, second = (evaluation.realism_summary(images[part])
                     for part in (order[:half], order[half:]))
    result = evaluation.realism(first, second, seed=0)
    assert result["c2st_accuracy"] <= SAME_ACCURACY, result
    assert max(result["anatomy"].values()) <= SMALL_DISTANCE, result
    assert 0 < result["c2st_stderr"] < 0.05


@pytest.mark.parametrize("name", ["demo", "synthetic"])
def test_brain_at_the_border_is_flagged_and_real_slices_are_not(sources, name):
    real, train = sources[name]
    assert not evaluation.touches_border(real).any()
    assert not evaluation.touches_border(train).any()
    moved = evaluation.shuffled_tiles(real, np.random.default_rng(1))  # brain in corner tiles
    assert evaluation.touches_border(moved).mean() >= 0.9


def test_the_border_is_the_outer_thirty_second_of_the_side():
    image = np.zeros((1, SIZE, SIZE), "float32")
    margin = SIZE // 32
    inside, at_the_edge = image.copy(), image.copy()
    inside[0, margin, margin:-margin] = 1  # the first row inside the border
    at_the_edge[0, SIZE - margin, SIZE // 2] = 1  # one pixel in the bottom border
    assert not evaluation.touches_border(inside)[0]
    assert evaluation.touches_border(at_the_edge)[0]


def test_the_test_is_seeded():
    images = synthetic_brains(40, np.random.default_rng(3))
    first, second = evaluation.realism_summary(images[:20]), evaluation.realism_summary(images[20:])
    assert evaluation.realism(first, second, seed=4) == evaluation.realism(first, second, seed=4)


def test_too_few_images_are_refused():
    images = evaluation.realism_summary(synthetic_brains(12, np.random.default_rng(4)))
    few = evaluation.realism_summary(synthetic_brains(evaluation.MIN_IMAGES_PER_SET - 1,
                                                      np.random.default_rng(5)))
    with pytest.raises(ValueError, match=f"at least {evaluation.MIN_IMAGES_PER_SET}"):
        evaluation.realism(images, few, seed=0)


def test_accuracy_and_standard_error_of_separable_and_identical_sets():
    rng = np.random.default_rng(6)
    features = rng.normal(size=(40, 3))
    accuracy, stderr = evaluation.two_sample_test(features, features + 100.0, seed=0)
    assert (accuracy, stderr) == (1.0, 0.0)
    # the same features in both sets: no classifier can beat chance on average
    accuracy, stderr = evaluation.two_sample_test(features, features.copy(), seed=0)
    assert accuracy <= 0.6
    np.testing.assert_allclose(stderr, np.sqrt(accuracy * (1 - accuracy) / 79), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Anatomy statistics on shapes with known answers


def disk(centre, radius, size=SIZE):
    rows, cols = np.mgrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_one_disk():
    image = 0.8 * disk((32, 20), 12)
    stats = evaluation.anatomy_of(image)
    assert stats["brain_area"] == disk((32, 20), 12).mean()
    assert stats["pieces"] == 1
    assert stats["symmetry"] == 1.0  # mirrored about its own midline, not the image's
    assert 0.9 < stats["solidity"] <= 1.0
    assert stats["midline_contrast"] == pytest.approx(1.0)


def test_pieces_count_only_meaningful_sizes():
    image = 0.8 * (disk((20, 20), 8) | disk((45, 45), 8) | disk((5, 60), 1))
    assert evaluation.anatomy_of(image)["pieces"] == 2  # the 5-pixel speck does not count


def test_a_dark_fissure_and_a_notch():
    image = 0.8 * disk((32, 32), 20)
    image[:, 31:34] = 0.0  # two hemispheres
    stats = evaluation.anatomy_of(image)
    assert stats["pieces"] == 2 and stats["midline_contrast"] < 0.2
    notched = 0.8 * disk((32, 32), 20)
    notched[12:32, 32:52] = 0.0  # a quarter cut away: neither convex nor mirror-symmetric
    stats = evaluation.anatomy_of(notched)
    assert stats["solidity"] < 0.85 and stats["symmetry"] < 0.8


def test_an_empty_image_has_no_brain():
    assert evaluation.anatomy_of(np.zeros((SIZE, SIZE))) == {
        "brain_area": 0.0, "pieces": 0.0, "symmetry": 0.0, "solidity": 0.0,
        "midline_contrast": 0.0}


def test_anatomy_distance_is_in_units_of_the_reference_spread():
    rng = np.random.default_rng(7)
    # spread 1, above every statistic's floor
    reference = {name: rng.normal(1.0, 1.0, 500) for name in evaluation.ANATOMY}
    reference["intensity"] = np.histogram(rng.uniform(0.2, 0.8, 5000), bins=32,
                                          range=(evaluation.BRAIN_THRESHOLD, 1))[0] / 5000.0
    shifted = {name: values + 2.0 for name, values in reference.items() if name != "intensity"}
    shifted["intensity"] = reference["intensity"]
    distances = evaluation.anatomy_distances(reference, shifted)
    assert distances.pop("intensity") == pytest.approx(0.0, abs=1e-12)  # the same histogram
    for name, distance in distances.items():
        # shifting every value by 2 moves the distribution by 2: about 2 standard deviations
        assert distance == pytest.approx(2.0 / reference[name].std(), rel=1e-9)


@pytest.mark.parametrize("empty", ["reference", "other"])
def test_a_set_without_brain_is_infinitely_far(empty):
    """An untrained decoder draws black images: their intensities cannot be compared."""
    brains = evaluation.anatomy_statistics(np.stack([0.8 * disk((32, 32), 20)] * 4))
    black = evaluation.anatomy_statistics(np.zeros((4, SIZE, SIZE)))
    sets = (black, brains) if empty == "reference" else (brains, black)
    assert evaluation.anatomy_distances(*sets)["intensity"] == np.inf


def test_every_image_of_the_larger_set_is_scored():
    # Half of the larger set is plainly different: its parts are tested in turn against the
    # smaller set, so the score is 0.75 whichever seed shuffles it. A single subsample the size
    # of the smaller set would hold a seed-dependent share of the different half.
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        reference, other = rng.normal(size=(32, 4)), rng.normal(size=(320, 4))
        other[:160] += 100.0
        accuracy, _ = evaluation.two_sample_test(reference, other, seed)
        assert accuracy == pytest.approx(0.75, abs=0.01), seed
        accuracy, _ = evaluation.two_sample_test(other, reference, seed)
        assert accuracy == pytest.approx(0.75, abs=0.01), seed
