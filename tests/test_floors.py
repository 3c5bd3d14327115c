"""The numbers the realism scores are read against, and the sharpness statistic: each must flag
something clearly bad (negative control) and pass real against real (positive control), on the
bundled demo slices."""

import warnings

import numpy as np
import pytest
from scipy import ndimage

import data
import evaluation

# What "different" and "same" mean, as tests/test_realism.py and the README state them.
DIFFERENT_ACCURACY = 0.85
SAME_ACCURACY = 0.62
LARGE_DISTANCE = 1.0
SMALL_DISTANCE = 0.5
ONE_PIXEL = 1.0  # the blur the sharpness statistic must see: a Gaussian of this sd in pixels
SPECKLE = 0.1  # sd of the noise added inside the brain: the speckled samples of issue 28


@pytest.fixture(scope="module", params=[64, 128])
def demo(request):
    """{split: demo slices in [0, 1], (N, S, S)} at the parametrised size."""
    splits = data.load_splits(data.DEMO_DATA, request.param, 0.5, 64, demo=True)
    return {split: splits.unit_range(split)[..., 0].astype("float32")
            for split in ("train", "test")}


def halves(images, seed=0):
    first, second = evaluation.random_halves(len(images), seed)
    return images[first], images[second]


# ---------------------------------------------------------------------------------------------
# Sharpness


def sharpness_distance(reference, other):
    return evaluation.anatomy_distances(evaluation.anatomy_statistics(reference),
                                        evaluation.anatomy_statistics(other))["sharpness"]


def test_a_one_pixel_blur_and_speckle_are_flagged(demo):
    real = demo["test"]
    blurred = ndimage.gaussian_filter(real, (0, ONE_PIXEL, ONE_PIXEL))
    assert sharpness_distance(real, blurred) >= LARGE_DISTANCE
    noise = np.random.default_rng(0).normal(0, SPECKLE, real.shape).astype("float32")
    speckled = np.where(real > evaluation.BRAIN_THRESHOLD, np.clip(real + noise, 0, 1), real)
    assert sharpness_distance(real, speckled) >= LARGE_DISTANCE


def test_two_halves_of_real_slices_are_equally_sharp(demo):
    assert sharpness_distance(*halves(demo["train"])) <= SMALL_DISTANCE
    assert sharpness_distance(demo["test"], demo["train"]) <= SMALL_DISTANCE


def test_sharpness_is_detail_inside_the_brain_relative_to_its_brightness():
    rows, cols = np.mgrid[:64, :64]
    brain = (rows - 32) ** 2 + (cols - 32) ** 2 < 20**2
    flat = 0.8 * brain
    assert evaluation.sharpness(flat, brain) == 0.0  # the outline's step does not count
    checkers = brain * (0.6 + 0.2 * ((rows + cols) % 2))
    textured = evaluation.sharpness(checkers, brain)
    assert textured > 0
    # a darker scan of the same brain is as sharp
    assert evaluation.sharpness(0.5 * checkers, brain) == pytest.approx(textured)
    assert evaluation.sharpness(checkers, np.zeros_like(brain)) == 0.0  # no inside


# ---------------------------------------------------------------------------------------------
# Floors


def test_floor_of_two_halves_passes_real_slices_and_mixes_its_halves(demo):
    summary = evaluation.realism_summary(demo["train"])
    result = evaluation.halves_realism(summary, seed=0)
    assert result["c2st_accuracy"] <= SAME_ACCURACY, result
    assert max(result["anatomy"].values()) <= SMALL_DISTANCE, result
    # a set that is half real, half heavily blurred: random halves hold both kinds alike,
    # while the set's own two halves in order differ plainly
    real = demo["train"][: len(demo["test"])]
    mixed = np.concatenate([real, evaluation.blurred(demo["test"])])
    summary = evaluation.realism_summary(mixed)
    assert evaluation.halves_realism(summary, seed=0)["c2st_accuracy"] <= SAME_ACCURACY
    in_order = np.arange(len(mixed)) < len(real)
    ordered = evaluation.realism(evaluation.summary_subset(summary, np.flatnonzero(in_order)),
                                 evaluation.summary_subset(summary, np.flatnonzero(~in_order)),
                                 seed=0)
    assert ordered["c2st_accuracy"] >= DIFFERENT_ACCURACY


def test_floor_of_training_against_test_slices_flags_a_blurred_test_split(demo):
    train = evaluation.realism_summary(demo["train"])
    floor = evaluation.realism(evaluation.realism_summary(demo["test"]), train, seed=0)
    # other people, not other images: below "different", but not necessarily "same"
    assert floor["c2st_accuracy"] < DIFFERENT_ACCURACY, floor
    blurred = evaluation.realism(evaluation.realism_summary(evaluation.blurred(demo["test"])),
                                 train, seed=0)
    assert blurred["c2st_accuracy"] >= DIFFERENT_ACCURACY
    assert max(blurred["anatomy"].values()) >= LARGE_DISTANCE


def test_a_subset_of_a_summary_is_the_summary_of_the_subset():
    images = evaluation.tadpoles(12, 32, np.random.default_rng(0))
    indices = np.array([1, 4, 5, 9])
    subset = evaluation.summary_subset(evaluation.realism_summary(images), indices)
    direct = evaluation.realism_summary(images[indices])
    assert subset["count"] == direct["count"] == 4
    np.testing.assert_allclose(subset["features"], direct["features"])
    for name, values in direct["statistics"].items():
        np.testing.assert_allclose(subset["statistics"][name], values, err_msg=name)


def test_training_subset_is_seeded_sorted_and_twice_the_samples():
    subset = evaluation.training_subset(100, 16, seed=3)
    assert len(subset) == evaluation.TRAIN_SUBSET_PER_SAMPLE * 16
    assert (np.diff(subset) > 0).all() and subset.max() < 100
    np.testing.assert_array_equal(subset, evaluation.training_subset(100, 16, seed=3))
    assert not np.array_equal(subset, evaluation.training_subset(100, 16, seed=4))
    np.testing.assert_array_equal(evaluation.training_subset(20, 16, seed=3), np.arange(20))


def test_an_undefined_floor_says_why_and_is_left_out(capsys):
    rng = np.random.default_rng(0)
    real = evaluation.realism_summary(evaluation.tadpoles(12, 32, rng))
    too_few = evaluation.realism_summary(evaluation.tadpoles(16, 32, rng))  # halves of 8
    floors = evaluation.realism_floors(too_few, real, too_few, seed=0)
    assert list(floors) == ["floor_train_vs_test"]
    printed = capsys.readouterr().out
    assert "samples.floor_reconstruction_halves: nan" in printed
    assert f"at least {evaluation.MIN_IMAGES_PER_SET}" in printed


# ---------------------------------------------------------------------------------------------
# Repeated two-sample tests


def test_repeats_are_the_test_under_consecutive_seeds():
    rng = np.random.default_rng(1)
    reference, other = rng.normal(size=(30, 3)), rng.normal(0.3, 1.0, size=(50, 3))
    accuracy, sd, stderr = evaluation.repeated_two_sample_test(reference, other, seed=7)
    tests = np.array([evaluation.two_sample_test(reference, other, 7 + repeat)
                      for repeat in range(evaluation.C2ST_REPEATS)])
    assert evaluation.C2ST_REPEATS >= 3
    assert accuracy == pytest.approx(tests[:, 0].mean())
    assert sd == pytest.approx(tests[:, 0].std(ddof=1))
    assert stderr == pytest.approx(tests[:, 1].mean())
    assert sd > 0  # other folds and parts: the test's own randomness shows


def test_plainly_different_sets_score_one_under_every_seed():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(40, 3))
    assert evaluation.repeated_two_sample_test(features, features + 100.0, seed=0) == (
        1.0, 0.0, 0.0)


def test_the_samples_accuracy_is_the_mean_and_spread_of_the_draws(demo):
    """Three draws against the real test slices, one of real training slices and two blurred:
    the accuracy is the draws' mean and its sd their spread, which the test's own seeds cannot
    show; the anatomy distances are the first draw's; one draw keeps the test's own spread."""
    real = evaluation.realism_summary(demo["test"])
    like = evaluation.realism_summary(demo["train"][: len(demo["test"])])
    unlike = evaluation.realism_summary(evaluation.blurred(demo["test"]))
    each = [evaluation.realism(real, draw, seed=0) for draw in (like, unlike)]
    result = evaluation.realism_over_draws(real, [like, unlike, unlike], seed=0)
    accuracies = [each[0]["c2st_accuracy"], *[each[1]["c2st_accuracy"]] * 2]
    assert result["c2st_accuracy"] == pytest.approx(np.mean(accuracies))
    assert result["c2st_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert result["c2st_sd"] > max(draw["c2st_sd"] for draw in each)
    assert result["anatomy"] == each[0]["anatomy"]
    assert evaluation.realism_over_draws(real, [like], seed=0) == each[0]


def test_the_accuracies_are_printed_beside_their_floors(capsys):
    scores = {"c2st_accuracy": 0.9, "c2st_sd": 0.01, "c2st_stderr": 0.04, "draws": 3}
    scores.update({f"{name}{end}": value for name in ("c2st_vs_reconstructions",
                                                     "c2st_vs_train_reconstructions",
                                                     "floor_train_vs_test")
                   for end, value in (("", 0.7), ("_sd", 0.02), ("_stderr", 0.05))})
    vq = {"c2st_reconstructions": 1.0, "c2st_reconstructions_sd": 0.0,
          "c2st_reconstructions_stderr": 0.0}
    evaluation.print_beside_floors({"samples": scores, "vqvae": vq, "pixelcnn": {}})
    printed = capsys.readouterr().out
    assert "samples vs real test slices" in printed and "0.900 ± 0.010 (s.e. 0.040)" in printed
    assert "the samples' over 3 independent draws" in printed
    assert "floor: real training vs real test slices" in printed
    (halves,) = [line for line in printed.splitlines() if "two halves" in line]
    assert "nan (too few images" in halves
    assert "bottom prior alone" not in printed  # one code level: no bottom prior
    two_levels = {"bottom_test_nll_bits": 1.0}
    evaluation.print_beside_floors({"samples": scores, "vqvae": vq, "pixelcnn": two_levels})
    (bottom,) = [line for line in capsys.readouterr().out.splitlines() if "bottom prior" in line]
    assert "nan (too few images" in bottom


# ---------------------------------------------------------------------------------------------
# An undefined correlation


def test_a_flat_curve_has_no_correlation_and_says_why_without_a_numpy_warning():
    real = np.array([0.1, 0.4, 0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, why = evaluation.pearson_correlation(real, np.zeros(3))
        assert np.isnan(r) and "samples' mean brain area is the same at every height" in why
        r, why = evaluation.pearson_correlation(real[:1], real[:1])
        assert np.isnan(r) and "1 height(s)" in why
    r, why = evaluation.pearson_correlation(real, 2 * real + 0.01)
    assert r == pytest.approx(1.0) and why is None
