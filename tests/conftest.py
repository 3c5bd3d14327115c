"""Shared fixtures and helpers: tiny PNG folders in the OASIS layout, written into a temporary
directory; driver.py run as a user runs it, or in the test's process; one tiny trained run that
tests only read; small models and images that several test files use."""

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The smallest models and runs; with --demo they run at the demo's image size and downsampling.
TINY_MODELS = ["--epochs", "1", "--pcnn-epochs", "1", "--K", "16", "--D", "4", "--batch_size", "8",
               "--pcnn-filters", "16", "--pcnn-res-blocks", "2", "--num-samples", "10"]
# Unconditional: the tiny splits name every slice slice_0, one height.
TINY_RUN = ["--image-size", "32", "--downsample", "4", *TINY_MODELS, "--condition", "none"]

# The scaled pixel range at the default --shift of 0.5.
PIXEL_RANGE = (-0.5, 0.5)
SPLIT_SIZES = {"train": 16, "validate": 4, "test": 10}
TINY_SIZE = 32


def brain_like_image(rng, size):
    """A bright ellipse with a dark 'ventricle' on black: enough structure to train on."""
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    radius_y, radius_x = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
    brain = (rows / radius_y) ** 2 + (cols / radius_x) ** 2 < 1
    ventricle = (rows / 0.12) ** 2 + (cols / 0.06) ** 2 < 1
    return (brain * rng.uniform(150, 250) * ~ventricle).astype(np.uint8)


def write_split_folders(root, sizes=SPLIT_SIZES, image_size=TINY_SIZE, seed=0,
                        slices_per_case=1):
    """Tiny splits in the OASIS layout, named case_<case>_slice_<n>.nii.png with n counting
    0 .. slices_per_case - 1 in each case."""
    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for image_number in range(count):
            case, index = divmod(image_number, slices_per_case)
            image = Image.fromarray(brain_like_image(rng, image_size))
            image.save(folder / f"case_{case:03d}_slice_{index}.nii.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return write_split_folders(tmp_path / "data")


def smooth_blobs(count, size, seed=0, width=0.03):
    """Gaussian blobs at random centres, in [0, 1]: (count, size, size, 1) float32. Smooth
    structure an autoencoder can learn and SSIM can score, unlike white noise."""
    rows, cols = np.mgrid[:size, :size] / size
    centres = np.random.default_rng(seed).uniform(0.3, 0.7, size=(count, 2))
    squared_distances = (rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2
    return np.exp(-squared_distances / width)[..., None].astype("float32")


def fixed_logits_prior(logits):
    """A 'prior' whose logits are the same at every position, whatever the codes."""
    import keras

    codes = keras.Input(shape=(None, None), dtype="int32")
    silent = keras.layers.Embedding(len(logits), 1, embeddings_initializer="zeros")(codes)
    out = keras.layers.Conv2D(len(logits), 1, kernel_initializer="zeros",
                              bias_initializer=keras.initializers.Constant(logits))(silent)
    return keras.Model(codes, out)


def assert_round_trip(model, inputs, tmp_path):
    """Saves the model as a .keras file and loads it in safe mode; the loaded model must compute
    what the model computes on inputs, bit for bit. Returns it for checks of its own."""
    import keras

    expected = keras.ops.convert_to_numpy(model(inputs))  # (which also builds the model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(inputs)), expected)
    return loaded


def flattened(metrics, prefix=""):
    """Nested metrics as one level: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for name, value in metrics.items():
        flat.update(flattened(value, f"{prefix}{name}.") if isinstance(value, dict)
                    else {prefix + name: value})
    return flat


def run_driver(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "driver.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def run_in_process(*args):
    """driver.main(args) in this process, for a run that needs no process of its own: no
    TensorFlow start-up. Returns what it printed."""
    import driver

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        driver.main([str(arg) for arg in args])
    return printed.getvalue()


def one_line_error(capsys, argv):
    """Run driver.main(argv) in-process; return its stderr, asserting a single line and a
    failure."""
    import driver

    with pytest.raises(SystemExit) as stop:
        driver.main(argv)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert stop.value.code not in (0, None)
    assert message.strip().count("\n") == 0 and "Traceback" not in message, message
    return message


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny run (data, out, checkpoints, the CompletedProcess), shared by the tests
    that only read its outputs; a test that changes them works on a copy (`copied_run`). Quiet
    (--verbose 0), so that its console is also the one a quiet run prints."""
    root = tmp_path_factory.mktemp("tiny_run")
    data = write_split_folders(root / "data")
    out, checkpoints = root / "out", root / "checkpoints"
    result = run_driver("--data", data, "--out", out, "--checkpoint-dir", checkpoints, *TINY_RUN,
                        "--verbose", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "out": out, "checkpoints": checkpoints, "result": result}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """--demo at the demo's image size, downsampling and slice-conditional prior, on a few of
    the bundled slices, 1 epoch each, sampled at the lowest and the highest slice (--slice
    indices); in this process, shared by the tests that only read its outputs."""
    import data

    demo = tmp_path_factory.mktemp("demo_run") / "data"
    for folder in data.SPLIT_FOLDERS.values():
        (demo / folder).mkdir(parents=True)
        # every 15th slice, which steps through the heights of a case; enough test slices for
        # the realism test
        stride = 5 if folder == data.SPLIT_FOLDERS["test"] else 15
        for image in sorted((data.DEMO_DATA / folder).glob("*.png"))[::stride]:
            shutil.copy(image, demo / folder)
    top_slice = max(map(data.slice_index, (demo / data.SPLIT_FOLDERS["train"]).iterdir()))
    out = demo.parent / "out"
    printed = run_in_process("--demo", "--data", demo, "--out", out, *TINY_MODELS,
                             "--slice", f"0,{top_slice}")
    return {"data": demo, "out": out, "printed": printed}


@pytest.fixture
def copied_run(tiny_run, tmp_path):
    """The shared tiny run's folders, copied for a test to change."""
    copy = {"result": tiny_run["result"]}
    for name in ("data", "out", "checkpoints"):
        copy[name] = Path(shutil.copytree(tiny_run[name], tmp_path / name))
    return copy
