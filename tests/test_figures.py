"""Each figure drawn from tiny synthetic inputs: the PNG is written, and what the figure must say
(axis labels, scales, titles, a legend off the data) is read back from its matplotlib Figure."""

import math

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.layout_engine import ConstrainedLayoutEngine
from PIL import Image

import driver
import evaluation
import runs

K = 16
EPOCHS = 4
# what a README column shows unscaled: wider figures shrink, and their fonts with them
README_WIDTH_PIXELS = runs.FIGURE_WIDTH * runs.FIGURE_DPI


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def vq_history(rng):
    keys = ("loss", "reconstruction_loss", "vq_loss")
    history = {key: sorted(rng.uniform(0.05, 0.5, EPOCHS), reverse=True) for key in keys}
    history.update({f"val_{key}": list(rng.uniform(0.05, 0.5, EPOCHS)) for key in keys})
    history.update(val_ssim=list(rng.uniform(0, 1, EPOCHS)),
                   val_codes_used=list(rng.uniform(0, 1, EPOCHS)),
                   val_codebook_perplexity=list(rng.uniform(1, K, EPOCHS)))
    return history


def prior_history(rng):
    return {"loss": list(rng.uniform(1, 3, EPOCHS)), "val_loss": list(rng.uniform(1, 3, EPOCHS))}


def images(rng, count, size=16):
    return rng.uniform(0, 1, (count, size, size, 1)).astype(np.float32)


def assert_written_legibly(fig, path):
    """The PNG exists, fits a README column, and was laid out so that labels do not collide."""
    assert path.exists()
    assert Image.open(path).width <= README_WIDTH_PIXELS * 1.05
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)


def boxes_overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_loss_plot_has_a_panel_for_the_prior_and_labels_every_axis(tmp_path, rng):
    vq, prior = vq_history(rng), prior_history(rng)
    vq_only = driver.plot_losses(vq, [], tmp_path / "vq.png")
    both = driver.plot_losses(vq, [prior], tmp_path / "both.png", unigram_bits=[3.5])
    assert_written_legibly(both, tmp_path / "both.png")
    assert len(vq_only.axes) == len(driver.VQ_LOSSES)
    assert len(both.axes) == len(driver.VQ_LOSSES) + 1
    for ax in both.axes:
        assert ax.get_ylabel() and ax.get_xlabel() == "epoch"
    *vq_axes, prior_axis = both.axes
    assert all(ax.get_yscale() == "log" for ax in vq_axes)
    assert "PixelCNN" in prior_axis.get_title()
    training, validation = (line.get_ydata() for line in prior_axis.get_lines()[:2])
    np.testing.assert_allclose(training, np.array(prior["loss"]) / math.log(2))  # nats -> bits
    np.testing.assert_allclose(validation, np.array(prior["val_loss"]) / math.log(2))
    assert any(np.allclose(line.get_ydata(), 3.5) for line in prior_axis.get_lines())
    labels = [text.get_text() for legend in both.legends for text in legend.get_texts()]
    assert {"training", "validation"} <= set(labels)


def test_loss_plot_has_a_panel_for_each_levels_prior(tmp_path, rng):
    top, bottom = prior_history(rng), prior_history(rng)
    fig = driver.plot_losses(vq_history(rng), [top, bottom], tmp_path / "loss.png",
                             unigram_bits=[3.5, 4.5])
    *vq_axes, top_axis, bottom_axis = fig.axes
    assert len(vq_axes) == len(driver.VQ_LOSSES)
    assert top_axis.get_title().startswith("top") and bottom_axis.get_title().startswith("bottom")
    for axis, history, bits in ((top_axis, top, 3.5), (bottom_axis, bottom, 4.5)):
        training = axis.get_lines()[0].get_ydata()
        np.testing.assert_allclose(training, np.array(history["loss"]) / math.log(2))
        assert any(np.allclose(line.get_ydata(), bits) for line in axis.get_lines())
    # a level without a history file (an earlier version's checkpoint) has no panel
    fig = driver.plot_losses(None, [top, None], tmp_path / "top_only.png")
    assert [axis.get_title() for axis in fig.axes] == ["top PixelCNN prior: cross-entropy"]


def test_loss_plot_marks_the_kept_epoch(tmp_path, rng):
    prior = {"loss": [3.0, 2.0, 1.5, 1.0], "val_loss": [2.5, 1.8, 2.0, 2.2]}
    fig = driver.plot_losses(None, [prior], tmp_path / "loss.png")
    (marker,) = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("kept")]
    assert list(marker.get_xdata()) == [2] and list(marker.get_ydata()) == [1.8 / math.log(2)]


def test_validation_quality_has_whole_epochs(tmp_path, rng):
    fig = driver.plot_validation_quality(vq_history(rng), (K,), tmp_path / "ssim.png")
    assert_written_legibly(fig, tmp_path / "ssim.png")
    for ax in fig.axes:
        ticks = [tick for tick in ax.get_xticks() if 1 <= tick <= EPOCHS]
        assert ticks and all(float(tick).is_integer() for tick in ticks)


def test_validation_quality_draws_each_levels_codebook(tmp_path, rng):
    one = driver.plot_validation_quality(vq_history(rng), (K,), tmp_path / "one.png")
    history = vq_history(rng)
    history.update(val_bottom_codes_used=list(rng.uniform(0, 1, EPOCHS)),
                   val_bottom_codebook_perplexity=list(rng.uniform(1, K, EPOCHS)))
    two = driver.plot_validation_quality(history, (K // 2, K), tmp_path / "two.png")
    labels = {line.get_label(): line for line in two.axes[1].get_lines()}
    assert {line.get_label() for line in one.axes[1].get_lines()} == {"codes used",
                                                                      "perplexity / K"}
    assert set(labels) == {"codes used", "perplexity / K", "bottom codes used",
                           "bottom perplexity / K"}
    np.testing.assert_allclose(labels["perplexity / K"].get_ydata(),
                               np.array(history["val_codebook_perplexity"]) / (K // 2))
    np.testing.assert_allclose(labels["bottom perplexity / K"].get_ydata(),
                               np.array(history["val_bottom_codebook_perplexity"]) / K)
    assert one.axes[1].get_title() == f"validation codebook use (K = {K})"
    assert two.axes[1].get_title() == f"validation codebook use (K = {K // 2} top, K = {K} bottom)"


def test_code_colours_are_categorical_and_fixed():
    colours = runs.code_colours(K)
    assert colours.shape == (K, 3)
    assert len(np.unique(colours, axis=0)) == K
    np.testing.assert_array_equal(colours, runs.code_colours(K))
    # shuffled: neighbouring indices are not neighbouring palette colours
    palette_order = np.argsort(np.argsort(colours.sum(axis=1)))
    assert np.abs(np.diff(palette_order)).mean() > 2


def test_codebook_results_draw_codes_in_their_fixed_colours(tmp_path, rng):
    originals, reconstructions = images(rng, 2), images(rng, 2)
    codes = rng.integers(0, K, (2, 4, 4))
    fig = driver.plot_codebook_results(originals, codes, reconstructions, [0.5, 0.75], K,
                                       tmp_path / "results.png")
    assert_written_legibly(fig, tmp_path / "results.png")
    code_axes = fig.axes[1::3]
    for ax, code in zip(code_axes, codes):
        np.testing.assert_array_equal(ax.get_images()[0].get_array(), runs.code_colours(K)[code])
    texts = [text.get_text() for ax in fig.axes for text in ax.texts]
    assert texts == ["SSIM 0.500", "SSIM 0.750"]
    assert "arbitrary" in fig.get_supxlabel()


@pytest.mark.parametrize("heights", [None, np.array([0.0, 0.25, 1.0])])
def test_samples_are_titled_with_their_heights(tmp_path, rng, heights):
    codes = rng.integers(0, K, (3, 4, 4))
    fig = driver.plot_samples(codes, images(rng, 3), heights, K, tmp_path / "samples.png")
    assert_written_legibly(fig, tmp_path / "samples.png")
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == (["", "", ""] if heights is None else ["h = 0.00", "h = 0.25", "h = 1.00"])
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(),
                                  runs.code_colours(K)[codes[0]])


def test_codebook_usage_is_on_a_log_scale(tmp_path):
    counts = np.array([560, 0, *range(1, K - 1)])
    fig = driver.plot_codebook_usage(counts, tmp_path / "usage.png")
    assert_written_legibly(fig, tmp_path / "usage.png")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert f"{K - 1} of {K}" in ax.get_title()
    assert any(np.allclose(line.get_ydata(), 1 / K) for line in ax.get_lines())


def anatomy(rng, count):
    statistics = {name: rng.uniform(0, 1, count) for name in evaluation.ANATOMY}
    statistics["pieces"] = rng.integers(1, 4, count).astype(float)
    weights = rng.uniform(0, 1, len(evaluation.intensity_bin_centres()))
    statistics["intensity"] = weights / weights.sum()
    return statistics


def test_realism_says_what_its_distances_are_and_keeps_the_legend_off_the_data(tmp_path, rng):
    statistics = {"real test slices": anatomy(rng, 20), "reconstructions": anatomy(rng, 20),
                  "samples": anatomy(rng, 10)}
    distances = {name: 0.5 + index for index, name in enumerate(evaluation.ANATOMY)}
    fig = driver.plot_realism(statistics, distances, tmp_path / "realism.png")
    assert_written_legibly(fig, tmp_path / "realism.png")
    panels = fig.axes[:len(evaluation.ANATOMY)]
    for ax, name in zip(panels, evaluation.ANATOMY):
        assert f"samples {distances[name]:.2f} sd from real" in ax.get_title()
        assert ax.get_legend() is None
    assert "real test slices" in fig.get_suptitle()
    # one legend: below the panels, or in the spare panel of an odd number
    (legend,) = fig.legends + [ax.get_legend() for ax in fig.axes[len(panels):]]
    assert [text.get_text() for text in legend.get_texts()] == list(statistics)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    legend_box = legend.get_window_extent(renderer)
    assert not any(boxes_overlap(legend_box, ax.get_window_extent(renderer)) for ax in panels)
    pieces_axis = panels[evaluation.ANATOMY.index("pieces")]
    edges = {round(patch.get_path().vertices[:, 0].min(), 6) for patch in pieces_axis.patches}
    assert edges == {0.5}  # integer counts get unit bins centred on the integers


def test_samples_by_slice_labels_each_row_with_its_height(tmp_path, rng):
    heights = np.repeat([0.0, 0.5, 1.0], 2)
    fig = driver.plot_samples_by_slice(images(rng, 6), heights, images(rng, 3),
                                       np.array([0.1, 0.5, 0.9]), tmp_path / "by_slice.png")
    assert (tmp_path / "by_slice.png").exists()
    rows = fig.axes[::2 * driver.IMAGES_PER_HEIGHT]
    assert [ax.get_ylabel() for ax in rows] == ["h = 1.00", "h = 0.50", "h = 0.00"]


def test_the_bottom_prior_figure_shows_slices_spread_over_the_heights(tmp_path, rng):
    count = 3 * driver.BOTTOM_ALONE_SHOWN
    heights = rng.permutation(np.linspace(0, 1, count))
    alone = driver.BottomAlone(images(rng, count), images(rng, count), images(rng, count),
                               heights)
    fig = driver.plot_bottom_prior(alone, tmp_path / "bottom_prior.png")
    assert_written_legibly(fig, tmp_path / "bottom_prior.png")
    rows = [subfig.axes for subfig in fig.subfigs]
    assert [len(axes) for axes in rows] == [driver.BOTTOM_ALONE_SHOWN] * 3
    labels = [float(ax.texts[0].get_text().removeprefix("h = ")) for ax in rows[0]]
    assert labels[0] == 0 and labels[-1] == 1 and labels == sorted(labels)
    # each column is one slice: its original, its reconstruction and its drawn detail
    (first,) = np.flatnonzero(heights == 0)
    for axes, shown in zip(rows, (alone.originals, alone.reconstructions, alone.drawn)):
        np.testing.assert_array_equal(axes[0].images[0].get_array(), shown[first, ..., 0])
