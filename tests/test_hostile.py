"""A console a researcher trusts: hostile input refused in one line that names the file, and
progress that --verbose controls without changing any number."""

import struct
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import pixelcnn
import runs
from conftest import TINY_RUN, one_line_error, write_split_folders
from test_pixelcnn import GRID, random_prior

BOMB_SIDE = 30000  # pixels: 900 million, five times Pillow's refusal limit


def png_chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def write_bomb(path, side=BOMB_SIDE):
    """A real black 1-bit PNG of side x side pixels, compressed one row at a time: a few
    hundred KB on disk, and more than a gigabyte once decoded to 8 bits."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # the filter byte, then 8 pixels a byte
    compressed = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
                     + png_chunk(b"IDAT", compressed) + png_chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_in_one_line_naming_the_file(tmp_path, capsys):
    folder = write_split_folders(tmp_path / "data")
    bomb = folder / "keras_png_slices_train" / "case_999_slice_0.nii.png"
    write_bomb(bomb)
    assert bomb.stat().st_size < 1_000_000
    message = one_line_error(capsys, ["--data", str(folder), "--out", str(tmp_path / "out"),
                                      *map(str, TINY_RUN)])
    assert f"unreadable image {bomb}" in message and "decompression bomb" in message


def test_an_image_between_pillows_limit_and_twice_it_is_refused_too(tmp_path, monkeypatch):
    """There Pillow only warns, and decodes."""
    folder = write_split_folders(tmp_path / "data")
    side = 32  # the tiny splits' images
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", side * side - 1)
    with pytest.raises(runs.PipelineError, match="unreadable image .*case_000_slice_0"):
        data.load_splits(folder, side, 0.5, 8, demo=False)


def test_a_quiet_run_prints_results_and_no_progress(tiny_run):
    """tiny_run: --verbose 0."""
    result = tiny_run["result"]
    assert "\r" not in result.stdout and "\b" not in result.stdout
    assert "/step" not in result.stdout and "Epoch" not in result.stdout
    assert "Test-split evaluation" in result.stdout


def tiny_fit(tmp_path, verbose, epochs):
    """runs.fit of a one-weight model for `epochs` epochs of 4 steps."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs), name="tiny")
    model.compile(optimizer="sgd", loss="mse")
    x = np.linspace(0, 1, 16, dtype="float32")[:, None]
    batches = tf.data.Dataset.from_tensor_slices((x, 2 * x)).batch(4)
    runs.fit(model, batches, None, epochs, runs.Checkpoints.in_folder(tmp_path, "tiny"),
             tmp_path / "logs", verbose=verbose)


@pytest.mark.parametrize("verbose", [runs.QUIET, runs.LINES, runs.BARS])
def test_training_progress_follows_verbose(tmp_path, capsys, verbose):
    tiny_fit(tmp_path, verbose, epochs=3)
    printed = capsys.readouterr().out
    redraws, estimates = printed.count("\r"), printed.count("epochs left end around")
    if verbose == runs.QUIET:
        assert printed == ""
    elif verbose == runs.LINES:
        # a log file's lines: one per epoch, and the time left after the first
        assert redraws == 0 and estimates == 1 and printed.count("/step") == 3
    else:
        assert redraws > 0 and estimates == 1


def test_sampling_progress_reports_each_row_and_draws_the_same_codes():
    for kind, condition, heights in (("gated", "slice", [0.1, 0.5, 0.9]),
                                     ("plain", "none", None)):
        prior = random_prior(kind, condition=condition)
        quiet = pixelcnn.sample_codes(prior, 3, GRID, seed=7, heights=heights).numpy()
        rows = []
        reported = pixelcnn.sample_codes(prior, 3, GRID, seed=7, heights=heights,
                                         rows_done=rows.append).numpy()
        np.testing.assert_array_equal(reported, quiet)
        assert rows == list(range(1, GRID[0] + 1))


def test_progress_counts_rows_across_draws(capsys):
    """A sampler compiled once reports each draw's rows from 1 again: the progress counts calls,
    so two draws of 3 rows are rows 1 to 6 of 6."""
    rows_done = runs.progress_of_long_steps(6, runs.LINES, "row")
    for row in (1, 2, 3, 1, 2, 3):
        rows_done(row)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [f"{done}/6" for done in range(1, 7)]
    assert runs.progress_of_long_steps(6, runs.QUIET, "row") is None


def test_a_log_file_gets_one_line_per_sampled_row(capsys):
    rows = 3
    progress = runs.LinePerStep(rows, "row")
    for done in range(1, rows + 1):
        progress.update(done)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert "left" in lines[1] and "\r" not in "".join(lines)
