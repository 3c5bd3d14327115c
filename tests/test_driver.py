"""driver.py as a user meets it: flags, a whole tiny run, and bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import driver
from conftest import write_split_folders

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("loss_plot.png", "ssim_plot.png", "codebook_results.png", "samples.png",
           "codebook_usage.png")
TINY_RUN = ["--image-size", "32", "--epochs", "1", "--pcnn-epochs", "1", "--K", "16", "--D", "4",
            "--batch_size", "8", "--pcnn-filters", "16", "--num-samples", "4"]


def run_driver(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "driver.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_every_flag():
    result = run_driver("-h")
    assert result.returncode == 0
    for flag in ("--data", "--K", "--D", "--beta", "--epochs", "--batch_size", "--learning_rate",
                 "--shift", "--pcnn-epochs", "--pcnn-learning-rate", "--pcnn-filters",
                 "--pcnn-res-blocks", "--pcnn-layers", "--out", "--checkpoint-dir",
                 "--image-size", "--seed", "--demo", "--evaluate", "--fresh", "--num-samples",
                 "--temperature", "--pcnn-type"):
        assert flag in result.stdout, flag


def test_tiny_run_writes_every_output_then_evaluate_reloads(tmp_path):
    data = write_split_folders(tmp_path / "data")
    out, checkpoints = tmp_path / "out", tmp_path / "checkpoints"
    result = run_driver("--data", data, "--out", out, "--checkpoint-dir", checkpoints, *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    for figure in FIGURES:
        assert (out / figure).stat().st_size > 0, figure
    assert (checkpoints / "vqvae.keras").exists() and (checkpoints / "pixelcnn.keras").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"vqvae", "pixelcnn", "samples"}
    assert all(isinstance(v, float) for group in metrics.values() for v in group.values())
    history = json.loads((checkpoints / "vqvae_history.json").read_text())
    assert len(history) == 1 and 0 < history[0]["val_ssim"] <= 1
    assert str(out) in result.stdout and str(checkpoints / "vqvae.keras") in result.stdout

    (out / "samples.png").unlink()
    again = run_driver("--data", data, "--out", out, "--checkpoint-dir", checkpoints, "--evaluate",
                       *TINY_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Training" not in again.stdout
    assert (out / "samples.png").exists()
    assert json.loads((out / "metrics.json").read_text())["vqvae"] == metrics["vqvae"]


def one_line_error(capsys, argv):
    """Run main(argv) in-process; return its stderr, asserting a single line and a failure."""
    with pytest.raises(SystemExit) as stop:
        driver.main(argv)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert stop.value.code not in (0, None)
    assert message.strip().count("\n") == 0 and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("flag, value", [
    ("--K", "0"), ("--D", "0"), ("--beta", "-1"), ("--epochs", "-1"), ("--batch_size", "0"),
    ("--learning_rate", "0"), ("--pcnn-learning-rate", "-0.1"), ("--shift", "1.5"),
    ("--K", "many"), ("--image-size", "30"), ("--pcnn-epochs", "-2"), ("--temperature", "0"),
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
    splits = driver.load_splits(driver.DEMO_DATA, 32, 0.5, 64, demo=True)
    sizes = {split: sum(len(batch) for batch in splits.scaled(split))
             for split in ("train", "validate", "test")}
    assert sizes == {"train": 384, "validate": 64, "test": 64}
    batch = next(iter(splits.scaled("train"))).numpy()
    assert batch.shape[1:] == (32, 32, 1)
    assert batch.min() == -0.5 and 0.0 < batch.max() <= 0.5  # black background, bright brain


def test_demo_run_at_a_tiny_setting(tmp_path):
    """--demo on a few of the bundled slices, 1 epoch each: the demo path end to end."""
    data = tmp_path / "demo"
    for folder in driver.SPLIT_FOLDERS.values():
        (data / folder).mkdir(parents=True)
        for image in sorted((driver.DEMO_DATA / folder).glob("*.png"))[::16]:
            shutil.copy(image, data / folder)
    out = tmp_path / "out"
    result = run_driver("--demo", "--data", data, "--out", out,
                        "--checkpoint-dir", tmp_path / "checkpoints", *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_settings.json").read_text())["demo"] is True
    for figure in FIGURES:
        assert (out / figure).exists(), figure


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
    data = write_split_folders(tmp_path / "data")
    train = data / "keras_png_slices_train"
    (train / "notes.txt").write_text("not an image")
    Image.new("RGB", (40, 24), (200, 10, 10)).save(train / "case_099_slice_0.nii.png")
    splits = driver.load_splits(data, 32, 0.5, batch_size=4, demo=False)
    images = list(splits.train.as_numpy_iterator())
    assert len(images) == 17 and all(image.shape == (32, 32, 1) for image in images)
    assert "converted" in capsys.readouterr().err
