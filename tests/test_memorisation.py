"""The memorisation audit on the bundled demo slices: samples that are training slices must be
flagged (negative control), real slices of other people must pass (positive control); and its
gallery figure."""

import numpy as np
import pytest

import data
import driver
import evaluation
import runs

SIZE = 64
NOISE = 0.01  # sd of the noise on the copies: a copy need not be bit for bit
COPIES = 32
# A share of real slices above the test slices' 99th percentile: about 1%, a few more by chance.
FEW = 0.1
MOST = 0.9


@pytest.fixture(scope="module")
def demo():
    """{split: the demo's slices at SIZE}: train as uint8 pixels, the others in [0, 1]."""
    splits = data.load_splits(data.DEMO_DATA, SIZE, 0.5, 16, demo=True)
    return {"train": splits.pixels("train"),
            **{split: splits.unit_range(split).astype("float32") for split in ("validate", "test")}}


def noisy_copies(demo, seed=0):
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(demo["train"]), COPIES, replace=False)
    copies = evaluation.training_images(demo["train"], chosen)
    return np.clip(copies + rng.normal(0, NOISE, copies.shape), 0, 1).astype("float32"), chosen


def test_copies_of_training_slices_are_memorised(demo):
    copies, chosen = noisy_copies(demo)
    result = evaluation.memorisation(copies, demo["test"], demo["train"])
    assert result["memorised_share"] >= MOST, result
    assert result["nn_ssim"] > result["test_nn_ssim_p99"] > result["test_nn_ssim"]
    # and the search finds the slice each was copied from
    _, nearest = evaluation.nearest_training_images(copies, demo["train"])
    np.testing.assert_array_equal(nearest, chosen)


def test_other_peoples_slices_are_not_memorised(demo):
    result = evaluation.memorisation(demo["validate"], demo["test"], demo["train"])
    assert result["memorised_share"] <= FEW, result


def test_nearest_neighbour_ssim_is_the_nearest_images_ssim(demo):
    images = demo["validate"][:8]
    scores, nearest = evaluation.nearest_training_images(images, demo["train"])
    np.testing.assert_array_equal(evaluation.nearest_neighbour_ssim(images, demo["train"]), scores)
    direct = evaluation.ssim(images, evaluation.training_images(demo["train"], nearest)).numpy()
    np.testing.assert_allclose(direct, scores, rtol=1e-6)


def test_most_memorised_shows_the_copies_first_beside_their_originals(demo):
    copies, chosen = noisy_copies(demo)
    images = np.concatenate([demo["validate"][:20], copies[:3]])
    shown, nearest, scores = evaluation.most_memorised(images, demo["train"], 3)
    assert np.all(np.diff(scores) <= 0)
    # which image each shown one is: the copies, at positions 20, 21, 22
    positions = [np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0] for image in shown]
    assert sorted(positions) == [20, 21, 22]
    originals = chosen[np.array(positions) - 20]
    np.testing.assert_array_equal(nearest, evaluation.training_images(demo["train"], originals))


def test_memorisation_figure(demo, tmp_path):
    copies, _ = noisy_copies(demo)
    images = np.concatenate([demo["validate"][:10], copies[:2]])
    shown = evaluation.most_memorised(images, demo["train"], driver.MEMORISATION_SHOWN)
    fig = driver.plot_memorisation(*shown, 0.9, tmp_path / "memorisation.png")
    assert (tmp_path / "memorisation.png").exists()
    images_drawn = [ax for ax in fig.axes if ax.get_images()]
    assert len(images_drawn) == 2 * driver.MEMORISATION_SHOWN
    labels = [text.get_text() for ax in fig.axes for text in ax.texts]
    assert labels[:2] == [f"SSIM {score:.3f}" for score in shown[2][:2]]
    assert fig.get_figwidth() == runs.FIGURE_WIDTH
