"""driver.py as a user meets it: flags, a whole tiny run, and bad input."""

import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import driver
import evaluation
import runs
from conftest import (TINY_RUN, flattened, one_line_error, run_in_process,
                      write_split_folders)

FIGURES = ("loss_plot.png", "ssim_plot.png", "codebook_results.png", "samples.png",
           "codebook_usage.png", "realism.png")


def test_help_lists_every_flag():
    text = runs.build_parser(data.DEMO_DEFAULTS).format_help()
    for flag in ("--data", "--K", "--D", "--beta", "--epochs", "--batch_size", "--learning_rate",
                 "--shift", "--pcnn-epochs", "--pcnn-learning-rate", "--pcnn-filters",
                 "--pcnn-res-blocks", "--pcnn-layers", "--out", "--checkpoint-dir",
                 "--image-size", "--seed", "--demo", "--evaluate", "--fresh", "--num-samples",
                 "--temperature", "--pcnn-type", "--strategy", "--mixed-precision", "--condition",
                 "--slice", "--pcnn-positions"):
        assert flag in text, flag


def split_images(data_folder, split):
    """A split's slices read with PIL, not the pipeline's loader: (N, H, W, 1) in [0, 1], in
    file-name order (the tiny splits are at the run's image size)."""
    files = sorted((data_folder / data.SPLIT_FOLDERS[split]).glob("*.png"))
    return np.stack([np.asarray(Image.open(file), "float32") for file in files])[..., None] / 255


def in_batches(function, inputs, batch_size):
    """function over inputs in the run's batches: the same float rounding as the run's."""
    return np.concatenate([np.asarray(function(inputs[start:start + batch_size]))
                           for start in range(0, len(inputs), batch_size)])


def codebook_use(codes, num_embeddings):
    """(codes used, perplexity) of code maps, counted in numpy."""
    p = np.bincount(codes.ravel(), minlength=num_embeddings) / codes.size
    return (p > 0).mean(), 2 ** -(p[p > 0] * np.log2(p[p > 0])).sum()


def test_tiny_run_writes_every_output(tiny_run):
    out, checkpoints, result = tiny_run["out"], tiny_run["checkpoints"], tiny_run["result"]
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 0, figure
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vqvae", "pixelcnn", "samples"}
    expected = {f"{group}.{name}" for group, name in [
        ("samples", "c2st_accuracy"), ("samples", "c2st_stderr"), ("samples", "n_real"),
        ("samples", "n_samples"), ("samples", "c2st_vs_reconstructions"),
        ("vqvae", "brain_codebook_perplexity"), ("vqvae", "brain_code_share"),
        ("vqvae", "c2st_reconstructions"), ("samples", "touching_border"),
        ("samples", "real_touching_border")]}
    expected |= {f"samples.{key}.{name}" for key in ("anatomy", "anatomy_vs_reconstructions")
                 for name in evaluation.ANATOMY}
    assert expected <= set(flattened(metrics))
    # two steps may leave the decoder drawing only black: then no brain intensities to compare
    assert all(np.isfinite(value) or (name.endswith(".intensity") and value == np.inf)
               for name, value in flattened(metrics).items())
    assert str(out) in result.stdout and str(checkpoints / "vqvae.keras") in result.stdout
    assert list((out / "logs").glob("vqvae/train/events.out.tfevents.*"))
    assert list((out / "logs").glob("pixelcnn/validation/events.out.tfevents.*"))

    # The numbers again, from the saved models and the PNG files, without the pipeline's loader
    settings = json.loads((out / "run_settings.json").read_text())
    shift, batch, K = settings["shift"], settings["batch_size"], settings["K"]
    model = keras.models.load_model(checkpoints / "vqvae.keras", safe_mode=True)
    prior = keras.models.load_model(checkpoints / "pixelcnn.keras", safe_mode=True)
    images = {split: split_images(tiny_run["data"], split) for split in data.SPLIT_FOLDERS}
    codes = {split: in_batches(model.encode_to_indices, images[split] - shift, batch)
             for split in images}

    def ssim_of_reconstructions(split):
        reconstructed = np.clip(in_batches(model, images[split] - shift, batch) + shift, 0, 1)
        return float(np.mean(tf.image.ssim(images[split], reconstructed, max_val=1.0)))

    # one epoch: the validation quality logged during training is the saved model's
    (epoch,) = json.loads((checkpoints / "vqvae_history.json").read_text())
    assert epoch["val_ssim"] == pytest.approx(ssim_of_reconstructions("validate"), rel=1e-5)
    assert (epoch["val_codes_used"], epoch["val_codebook_perplexity"]) == pytest.approx(
        codebook_use(codes["validate"], K))
    vq = metrics["vqvae"]
    assert vq["test_ssim"] == pytest.approx(ssim_of_reconstructions("test"), rel=1e-5)
    assert (vq["codes_used"], vq["codebook_perplexity"]) == pytest.approx(
        codebook_use(codes["test"], K))
    # each code stands for a downsample x downsample patch; brain where a pixel is bright
    grid, patch = codes["test"].shape[1], settings["downsample"]
    patches = images["test"][..., 0].reshape(-1, grid, patch, grid, patch)
    assert vq["brain_code_share"] == pytest.approx(
        (patches.max(axis=(2, 4)) > evaluation.BRAIN_THRESHOLD).mean())
    # the prior's NLL: log-softmax of its logits in numpy, at the codes the test maps hold
    logits = in_batches(prior, codes["test"], batch).astype("float64")
    log_p = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    chosen = np.take_along_axis(log_p, codes["test"][..., None], axis=-1)
    train_use = np.bincount(codes["train"].ravel(), minlength=K) / codes["train"].size
    assert metrics["pixelcnn"] == pytest.approx({
        "test_nll_bits": -chosen.mean() / np.log(2), "uniform_bits": np.log2(K),
        "unigram_bits": -(train_use[train_use > 0] * np.log2(train_use[train_use > 0])).sum()},
        rel=1e-5)
    assert (metrics["samples"]["n_real"], metrics["samples"]["n_samples"]) == (
        len(images["test"]), len(list((out / "samples").iterdir())))


def test_every_sample_is_saved_as_a_png_like_the_input_slices(tiny_run):
    pngs = sorted((tiny_run["out"] / "samples").iterdir())
    assert [png.name for png in pngs] == [f"sample_{i:03d}.png" for i in range(10)]
    for png in pngs:
        with Image.open(png) as image:
            assert (image.mode, image.size) == ("L", (32, 32))


def test_the_draws_are_independent_and_the_first_is_saved(tiny_run):
    """The run's models drawn from again with its settings: each draw gives other samples, and
    the first is the saved PNGs."""
    checkpoints = tiny_run["checkpoints"]
    model = keras.models.load_model(checkpoints / "vqvae.keras", safe_mode=True)
    prior = keras.models.load_model(checkpoints / "pixelcnn.keras", safe_mode=True)
    settings = driver.parse_args([*TINY_RUN, "--verbose", "0"])
    draws = driver.sample(model, [prior], None, settings)
    assert len(draws) == settings.sample_draws == runs.DEFAULT_DRAWS
    for earlier, draw in zip(draws, draws[1:]):
        assert (earlier.codes != draw.codes).any()
    saved = np.stack([np.asarray(Image.open(png)) for png in
                      sorted((tiny_run["out"] / "samples").iterdir())])
    np.testing.assert_array_equal(np.round(draws[0].images[..., 0] * 255), saved)
    metrics = json.loads((tiny_run["out"] / "metrics.json").read_text())["samples"]
    assert metrics["draws"] == runs.DEFAULT_DRAWS


def test_evaluate_reloads_and_recomputes_everything(copied_run):
    out, checkpoints = copied_run["out"], copied_run["checkpoints"]
    before = json.loads((out / "metrics.json").read_text())
    models = {path: path.read_bytes() for path in checkpoints.glob("*.keras")}
    (out / "samples.png").unlink()
    shutil.rmtree(out / "samples")
    printed = run_in_process("--data", copied_run["data"], "--out", out,
                             "--checkpoint-dir", checkpoints, "--evaluate", *TINY_RUN)
    assert "Training the" not in printed
    assert len(models) == 2 and all(path.read_bytes() == saved for path, saved in models.items())
    assert (out / "samples.png").exists() and len(list((out / "samples").iterdir())) == 10
    # the same models, seed and data, in another process: the same numbers, the realism test
    # included
    after = json.loads((out / "metrics.json").read_text())
    assert flattened(after) == pytest.approx(flattened(before), rel=1e-4, abs=1e-5)


def test_a_rerun_replaces_the_samples_folder_whole(tmp_path):
    folder = tmp_path / "samples"
    images = np.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8, 1)
    runs.save_sample_pngs(images, folder)
    (folder / "stale.png").write_bytes(b"")

    def fail_half_way(temporary):
        (temporary / "sample_000.png").write_bytes(b"")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.replace_folder_atomically(folder, fail_half_way)
    assert sorted(p.name for p in folder.iterdir()) == [
        "sample_000.png", "sample_001.png", "sample_002.png", "stale.png"]
    runs.save_sample_pngs(images[:2], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["sample_000.png", "sample_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "sample_001.png")),
                                  np.round(images[1, ..., 0] * 255).astype(np.uint8))


def test_too_few_samples_for_the_realism_test(capsys):
    message = one_line_error(capsys, ["--num-samples", "4"])
    assert "--num-samples" in message and str(evaluation.MIN_IMAGES_PER_SET) in message


def test_too_few_test_images_for_the_realism_test(capsys, tmp_path):
    data = write_split_folders(tmp_path / "data", sizes={"train": 4, "validate": 2, "test": 3})
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    message = one_line_error(capsys, ["--data", str(data), "--out", str(out),
                                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert "keras_png_slices_test" in message and "3" in message
    assert str(evaluation.MIN_IMAGES_PER_SET) in message
    assert (out / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("flag, value", [
    ("--K", "0"), ("--D", "0"), ("--beta", "-1"), ("--epochs", "-1"), ("--batch_size", "0"),
    ("--learning_rate", "0"), ("--pcnn-learning-rate", "-0.1"), ("--shift", "1.5"),
    ("--K", "many"), ("--image-size", "30"), ("--pcnn-epochs", "-2"), ("--temperature", "0"),
    ("--downsample", "6"), ("--image-size", "36"), ("--pcnn-dropout", "1"),
])
def test_invalid_flag_values(capsys, flag, value):
    message = one_line_error(capsys, [flag, value])
    assert flag in message and value in message


def test_missing_data_folder_points_to_oasis_and_demo(capsys, tmp_path):
    message = one_line_error(capsys, ["--data", str(tmp_path / "nowhere"),
                                      "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert "nowhere" in message and "--demo" in message and "OASIS" in message
    assert "keras_png_slices_train" in message


def test_the_bundled_demo_slices_load_through_the_oasis_loader():
    splits = data.load_splits(data.DEMO_DATA, 32, 0.5, 64, demo=True)
    sizes = {split: sum(len(batch) for batch in splits.scaled(split))
             for split in ("train", "validate", "test")}
    assert sizes == {"train": 384, "validate": 64, "test": 64}
    batch = next(iter(splits.scaled("train"))).numpy()
    assert batch.shape[1:] == (32, 32, 1)
    assert batch.min() == -0.5 and 0.0 < batch.max() <= 0.5  # black background, bright brain


def test_no_pipeline_runs_the_autotuner():
    """Its thread made each iterator's end wait for its next wake-up: epochs doubled at random."""
    splits = data.load_splits(data.DEMO_DATA, 32, 0.5, 64, demo=True)
    codes, heights = np.zeros((8, 4, 4), "int32"), np.zeros(8, "float32")
    pipelines = [splits.scaled("test"), splits.shuffled_train(seed=0), splits.test,
                 data.code_dataset(codes, None, 4), data.code_dataset(codes, heights, 4, 0)]
    assert not any(pipeline.options().autotune.enabled for pipeline in pipelines)


def test_demo_run_at_a_tiny_setting(demo_run):
    """--demo's image size, downsampling and prior end to end (demo_run: 1 epoch each)."""
    out = demo_run["out"]
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["demo"] is True and settings["condition"] == "slice"
    size, downsample = data.DEMO_DEFAULTS["image_size"], data.DEMO_DEFAULTS["downsample"]
    assert (settings["image_size"], settings["downsample"]) == (size, downsample)
    for figure in FIGURES:
        assert (out / figure).exists(), figure
    for png in (out / "samples").iterdir():
        with Image.open(png) as image:
            assert image.size == (size, size), png.name
    model = keras.models.load_model(out / "checkpoints" / "vqvae.keras", safe_mode=True)
    grid = size // downsample
    assert model.encode_to_indices(np.zeros((1, size, size, 1))).shape == (1, grid, grid)


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_missing_or_empty_split(capsys, tmp_path, damage):
    data = write_split_folders(tmp_path / "data")
    folder = data / "keras_png_slices_validate"
    for png in folder.iterdir():
        png.unlink()
    if damage == "missing":
        folder.rmdir()
    message = one_line_error(capsys, ["--data", str(data), "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert "keras_png_slices_validate" in message


def test_corrupt_png_is_named(capsys, tmp_path):
    data = write_split_folders(tmp_path / "data")
    victim = data / "keras_png_slices_train" / "case_003_slice_0.nii.png"
    victim.write_bytes(victim.read_bytes()[:60])  # truncated
    message = one_line_error(capsys, ["--data", str(data), "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(tmp_path / "ck")])
    assert "case_003_slice_0.nii.png" in message


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    message = one_line_error(capsys, ["--data", str(tmp_path), "--out", str(blocker / "out")])
    assert "--out" in message


def test_non_image_files_are_ignored_and_odd_images_converted(tmp_path, capsys):
    folder = write_split_folders(tmp_path / "data")
    train = folder / "keras_png_slices_train"
    (train / "notes.txt").write_text("not an image")
    Image.new("RGB", (40, 24), (200, 10, 10)).save(train / "case_099_slice_0.nii.png")
    splits = data.load_splits(folder, 32, 0.5, batch_size=4, demo=False)
    images = list(splits.train.as_numpy_iterator())
    assert len(images) == 17 and all(image.shape == (32, 32, 1) for image in images)
    assert "converted" in capsys.readouterr().err
