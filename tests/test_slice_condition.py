"""The slice-conditional prior in the pipeline: heights read from file names, --slice, sample
names, the per-height metrics and a tiny conditional run."""

import json

import numpy as np
import pytest

import data
import driver
import evaluation
import runs
from conftest import TINY_RUN, one_line_error, write_split_folders

SLICES_PER_CASE = 4


@pytest.mark.parametrize("name, index", [("case_001_slice_0.nii.png", 0),
                                         ("case_301_slice_31.nii.png", 31),
                                         ("case_057_slice_7.nii.png", 7)])
def test_slice_index_from_oasis_and_demo_names(name, index):
    assert data.slice_index(f"/data/keras_png_slices_train/{name}") == index


def test_a_name_without_a_slice_index_is_refused_by_name():
    with pytest.raises(runs.PipelineError, match="brain_17.png") as error:
        data.slice_index("/data/keras_png_slices_train/brain_17.png")
    assert "\n" not in str(error.value)


def test_heights_are_relative_to_the_slices_per_case(tmp_path):
    folder = write_split_folders(tmp_path / "data", slices_per_case=SLICES_PER_CASE)
    splits = data.load_splits(folder, 32, 0.5, 8, demo=False)
    assert splits.top_slice == SLICES_PER_CASE - 1
    heights = splits.heights("test")
    # file order is the datasets' order: case_000_slice_0, case_000_slice_1, ..
    np.testing.assert_allclose(heights[:SLICES_PER_CASE], [0, 1 / 3, 2 / 3, 1], atol=1e-6)
    demo = data.load_splits(data.DEMO_DATA, 32, 0.5, 8, demo=True)
    assert demo.top_slice == 7 and set(np.round(demo.heights("test") * 7)) == set(range(8))


@pytest.mark.parametrize("text, values", [("0.5", [0.5]), ("0.2,0.5,0.8", [0.2, 0.5, 0.8]),
                                          ("3,4", [3, 4]), ("0,1.0", [0, 1.0])])
def test_slice_flag_takes_heights_or_indices(text, values):
    parsed = driver.parse_args(["--condition", "slice", "--slice", text]).slice
    assert parsed == values
    assert [type(v) for v in parsed] == [type(v) for v in values]


@pytest.mark.parametrize("text", ["1.5", "-1", "top", "0.2,,0.8"])
def test_bad_slice_values_are_one_line_errors(capsys, text):
    message = one_line_error(capsys, ["--condition", "slice", "--slice", text])
    assert "--slice" in message


def test_slice_without_a_conditional_prior_is_refused(capsys):
    assert "--condition slice" in one_line_error(capsys, ["--condition", "none", "--slice", "0.5"])


# The plain prior, with the one code level it can model
PLAIN_ONE_LEVEL = ["--pcnn-type", "plain", "--levels", "1"]


def test_the_plain_prior_is_unconditional_and_refuses_conditioning(capsys):
    assert driver.parse_args([]).prior.condition == "slice"
    assert driver.parse_args(PLAIN_ONE_LEVEL).prior.condition == "none"
    message = one_line_error(capsys, ["--pcnn-type", "plain", "--condition", "slice"])
    assert "--condition" in message and "gated" in message


def test_the_plain_prior_learns_no_positions(capsys):
    assert driver.parse_args([]).prior.pcnn_positions == "learned"
    assert driver.parse_args(PLAIN_ONE_LEVEL).prior.pcnn_positions == "none"
    message = one_line_error(capsys, ["--pcnn-type", "plain", "--pcnn-positions", "learned"])
    assert "--pcnn-positions" in message and "gated" in message


def test_sample_heights():
    test_heights = np.array([1, 0.5, 0, 0.5, 1, 0])
    # without --slice: the test slices' heights, as many samples at each as the test split has
    np.testing.assert_allclose(data.sample_heights(None, 6, 7, test_heights),
                               [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(data.sample_heights(None, 3, 7, test_heights), [0, 0.5, 1])
    np.testing.assert_allclose(data.sample_heights([0.2, 7], 4, 7, test_heights),
                               [0.2, 0.2, 1, 1])
    with pytest.raises(runs.PipelineError, match="8"):
        data.sample_heights([8], 4, 7, test_heights)


def test_conditional_sample_names_carry_the_height(tmp_path):
    images = np.zeros((2, 8, 8, 1))
    runs.save_sample_pngs(images, tmp_path / "samples", heights=[0.5, 1 / 3])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "sample_000_slice_0.50.png", "sample_001_slice_0.33.png"]


def test_brain_area_by_height_follows_the_heights():
    real_heights = np.repeat([0.0, 0.5, 1.0], 4)
    real_areas = np.repeat([0.1, 0.4, 0.2], 4)
    sample_heights = np.array([0.05, 0.45, 0.55, 0.9])  # counted at the nearest real height
    result = evaluation.brain_area_by_height(real_areas, real_heights,
                                             np.array([0.12, 0.38, 0.42, 0.25]), sample_heights)
    assert result["by_height"]["0.50"] == pytest.approx({"real": 0.4, "samples": 0.4})
    assert result["correlation"] > 0.95


def test_realism_by_band_compares_each_band_alone_and_skips_small_ones():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(40, 32, 32, 1))
    heights = np.r_[np.zeros(15), np.full(20, 0.5), np.ones(5)]
    samples = np.where(heights[:, None, None, None] == 0.5, images / 2, images)
    order = rng.permutation(len(images))  # the samples come in another order than the slices
    bands = evaluation.realism_by_band(images, heights, samples[order], heights[order], seed=0)
    assert set(bands) == {"low", "middle"}  # only 5 high slices
    assert [(band["n_real"], band["n_samples"]) for band in bands.values()] == [(15, 15), (20, 20)]
    # the low band's samples are its own slices: chance; the middle band's are darker: told apart
    assert bands["low"]["c2st_accuracy"] <= 0.6, bands["low"]
    assert bands["middle"]["c2st_accuracy"] == 1.0, bands["middle"]


def test_conditional_run_refuses_a_name_without_a_slice_index(tmp_path, capsys):
    data = write_split_folders(tmp_path / "data", slices_per_case=SLICES_PER_CASE)
    bad = data / "keras_png_slices_validate" / "case_000_slice_1.nii.png"
    bad.rename(bad.with_name("case_000_top.nii.png"))
    message = one_line_error(capsys, ["--data", str(data), "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(tmp_path / "ck"), *TINY_RUN,
                                      "--condition", "slice"])
    assert "case_000_top.nii.png" in message


def test_the_conditional_demo_run_samples_at_the_given_slices(demo_run):
    """demo_run: --slice 0,<top slice>, indices of the lowest and the highest slice."""
    out = demo_run["out"]
    names = sorted(p.name for p in (out / "samples").iterdir())
    assert names[0] == "sample_000_slice_0.00.png" and names[-1] == "sample_009_slice_1.00.png"
    assert (out / "samples_by_slice.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "brain_area_height_correlation" in metrics["samples"]
    assert set(metrics["samples"]["brain_area_by_height"]) == {"0.00", "1.00"}


def test_conditional_nll_is_given_the_heights():
    import keras
    import pixelcnn

    keras.utils.set_random_seed(0)
    prior = pixelcnn.build_pixelcnn(6, 8, 1, 1, kind="gated", dilation_cycle=1, condition="slice")
    codes = np.random.default_rng(0).integers(0, 6, size=(4, 5, 5)).astype("int32")
    heights = np.array([0.0, 0.3, 0.6, 1.0], "float32")

    def nll_bits(heights):
        """-log2 p(c | h) per code: the log-softmax of the prior's logits, in numpy."""
        logits = prior([codes, heights]).numpy().astype("float64")
        log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        return -np.take_along_axis(log_p, codes[..., None], axis=-1).mean() / np.log(2)

    # batches of 3 and 1 map: each batch's heights must go with its maps
    assert evaluation.prior_nll_bits(prior, codes, 3, heights) == pytest.approx(
        nll_bits(heights), rel=1e-5)
    assert nll_bits(heights[::-1]) != pytest.approx(nll_bits(heights), rel=1e-5)


def test_models_saved_before_the_condition_flag_are_evaluated_unconditionally(tmp_path):
    defaults = driver.parse_args([])
    settings = defaults.model_settings()
    settings["data"] = "somewhere"
    del settings["condition"]
    (tmp_path / runs.SETTINGS_FILE).write_text(json.dumps(settings))
    given = driver.parse_args(["--evaluate", "--checkpoint-dir", str(tmp_path)])
    assert given.prior.condition == "slice"  # the default now
    assert given.as_trained().prior.condition == "none"
