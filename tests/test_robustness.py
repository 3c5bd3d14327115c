"""Runs that survive faults: resume after a kill, stop on NaN, atomic outputs, reproducibility."""

import json
import os
import signal
import time
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf

import data
import driver
import runs
import vqvae
from conftest import (BACKGROUND_RUNS, PIXEL_RANGE, TINY_RUN, Scenario, driver_process,
                      flattened, one_line_error, write_split_folders)

KILL_TIMEOUT = 300
KILLED_RUN_EPOCHS = 8
POLL_INTERVAL = 0.2  # seconds


def start_killed_run(root):
    """A tiny run killed once two epochs are in its history, then the same command again."""
    data = write_split_folders(root / "data")
    checkpoints = root / "checkpoints"
    command = ["--data", data, "--out", root / "out", "--checkpoint-dir", checkpoints, *TINY_RUN,
               "--epochs", KILLED_RUN_EPOCHS]
    history = checkpoints / "vqvae_history.json"

    def kill_then_rerun(processes):
        processes.append(run := driver_process(*command))
        deadline = time.time() + KILL_TIMEOUT
        while not (history.exists() and len(json.loads(history.read_text())) >= 2):
            assert run.process.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(POLL_INTERVAL)
        run.process.send_signal(signal.SIGKILL)
        run.process.wait()
        killed = json.loads(history.read_text())
        processes.append(rerun := driver_process(*command))
        return {"killed": killed, "rerun": rerun.result()}

    return {"checkpoints": checkpoints, "process": Scenario(kill_then_rerun)}


BACKGROUND_RUNS["killed_run"] = start_killed_run


@pytest.fixture
def killed_run(background_runs):
    return background_runs.finished("killed_run")


def test_a_killed_run_resumes_from_its_last_epoch(killed_run):
    epochs, checkpoints = KILLED_RUN_EPOCHS, killed_run["checkpoints"]
    killed, rerun = killed_run["result"]["killed"], killed_run["result"]["rerun"]
    assert len(killed) < epochs, "the run finished before it could be killed"
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # it did not start over
    assert f"Epoch {epochs}/{epochs}" in rerun.stdout and f"Epoch 1/{epochs}" not in rerun.stdout
    resumed = json.loads((checkpoints / "vqvae_history.json").read_text())
    # (a kill between an epoch's history and its backup repeats that one epoch)
    assert len(resumed) == epochs and resumed[:len(killed) - 1] == killed[:-1]
    assert (checkpoints / "vqvae.keras").exists() and (checkpoints / "pixelcnn.keras").exists()


class StartedTraining(Exception):
    """Stands in for training, which a test has seen start."""


def test_fresh_starts_over_and_other_settings_are_refused(copied_run, capsys, monkeypatch):
    checkpoints = copied_run["checkpoints"]
    common = ["--data", str(copied_run["data"]), "--out", str(copied_run["out"]),
              "--checkpoint-dir", str(checkpoints), *TINY_RUN]
    message = one_line_error(capsys, [*common, "--K", "8"])
    assert "--fresh" in message and "K" in message

    def train_vqvae(splits, settings, *rest):
        raise StartedTraining(f"K={settings.vqvae.K}")

    monkeypatch.setattr(driver, "train_vqvae", train_vqvae)
    with pytest.raises(StartedTraining, match="K=8"):
        driver.main([*common, "--K", "8", "--fresh"])
    # the old models are gone and the new settings saved: a rerun resumes the fresh run
    assert not list(checkpoints.glob("*.keras"))
    assert json.loads((checkpoints / runs.SETTINGS_FILE).read_text())["K"] == 8


@pytest.mark.parametrize("evaluate", [True, False])
def test_a_damaged_checkpoint_is_named_and_kept(copied_run, capsys, evaluate):
    """A finished run's .keras file cut short (a copy interrupted, a full disk), reloaded by
    --evaluate or by a rerun of the same command: one line naming it, and nothing deleted."""
    checkpoint = copied_run["checkpoints"] / "vqvae.keras"
    damaged = checkpoint.read_bytes()[: checkpoint.stat().st_size // 2]
    checkpoint.write_bytes(damaged)
    metrics = (copied_run["out"] / "metrics.json").read_bytes()
    # a rerun must name the data the run was made on (the copy's folder would be other settings)
    data = json.loads((copied_run["checkpoints"] / runs.SETTINGS_FILE).read_text())["data"]
    message = one_line_error(capsys, [
        "--data", data, "--out", str(copied_run["out"]),
        "--checkpoint-dir", str(copied_run["checkpoints"]), *TINY_RUN,
        *(["--evaluate"] if evaluate else [])])
    assert str(checkpoint) in message and "--fresh" in message, message
    assert checkpoint.read_bytes() == damaged
    assert (copied_run["out"] / "metrics.json").read_bytes() == metrics


def compiled_vqvae():
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model(np.zeros((1, 16, 16, 1), "float32"))
    return model


class PoisonWeights(keras.callbacks.Callback):
    """Keeps the weights after the first epoch, then turns them to NaN at the start of the
    second."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.weights = [weight.numpy() for weight in self.model.weights]
            for weight in self.model.trainable_weights:
                weight.assign(np.full(weight.shape, np.nan, "float32"))


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_epoch(tmp_path):
    model = compiled_vqvae()
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
    checkpoints = runs.Checkpoints.in_folder(tmp_path, "vqvae")
    after_first_epoch = PoisonWeights()
    with pytest.raises(runs.PipelineError, match="loss became nan.*lower the learning rate"):
        runs.fit(model, images, None, 3, checkpoints, tmp_path / "logs",
                   callbacks=[after_first_epoch])
    assert len(json.loads(checkpoints.history.read_text())) == 1
    # the backup holds the first epoch's weights, which the NaN never reached
    restored = compiled_vqvae()
    restore = runs.AtomicBackupAndRestore(str(checkpoints.backup))
    restore.set_model(restored)
    restore.on_train_begin()
    assert restored._initial_epoch == 1  # resumes with the second epoch
    for good, weight in zip(after_first_epoch.weights, restored.weights):
        np.testing.assert_array_equal(good, weight.numpy())


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.json"
    runs.save_json({"old": 1.0}, target)

    def write_half_then_fail(path):
        path.write_text('{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.replace_atomically(target, write_half_then_fail)
    assert json.loads(target.read_text()) == {"old": 1.0}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_a_kill_while_backing_up_keeps_the_previous_epochs_backup(tmp_path, monkeypatch):
    model = compiled_vqvae()
    backup = runs.AtomicBackupAndRestore(str(tmp_path / "backup"))
    backup.set_model(model)
    backup.on_epoch_end(0)
    saved = [w.numpy() for w in model.weights]

    def write_half_then_die(path):
        open(path, "wb").write(b"\x89HDF\r\n")
        raise KeyboardInterrupt

    for weight in model.trainable_weights:
        weight.assign(weight + 1.0)
    monkeypatch.setattr(model, "save_weights", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        backup.on_epoch_end(1)

    restored = compiled_vqvae()
    restore = runs.AtomicBackupAndRestore(str(tmp_path / "backup"))
    restore.set_model(restored)
    restore.on_train_begin()
    assert restored._initial_epoch == 1
    for expected, weight in zip(saved, restored.weights):
        np.testing.assert_array_equal(expected, weight.numpy())


def test_training_ends_with_the_best_validation_epoch_even_after_a_resume(tmp_path):
    model = compiled_vqvae()
    history = tmp_path / "history.json"
    keep = runs.KeepBest(tmp_path / "best.weights.h5", history)
    keep.set_model(model)
    keep.on_train_begin()
    best = [w.numpy() for w in model.weights]
    keep.on_epoch_end(0, {"val_loss": 1.0})
    runs.save_json([{"val_loss": 1.0}], history)
    for weight in model.trainable_weights:
        weight.assign(weight + 1.0)

    # a resumed run: a worse epoch does not replace the best one
    resumed = runs.KeepBest(tmp_path / "best.weights.h5", history)
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.on_epoch_end(1, {"val_loss": 1.5})
    resumed.on_train_end()
    for expected, weight in zip(best, model.weights):
        np.testing.assert_array_equal(expected, weight.numpy())


def test_unwritable_checkpoint_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    message = one_line_error(capsys, ["--data", str(tmp_path), "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(blocker / "ck")])
    assert "--checkpoint-dir" in message


def test_a_prior_starts_from_its_own_seed_whatever_drew_random_numbers_before(tmp_path,
                                                                             monkeypatch):
    """A run resumed after its VQ-VAE finished builds the prior an uninterrupted run builds,
    though the uninterrupted run drew random numbers for the VQ-VAE's training in between."""
    settings = driver.parse_args(["--out", str(tmp_path), *TINY_RUN, "--pcnn-dropout", "0.5"])
    codes = {split: np.zeros((4, 8, 8), "int32")
             for split in ("train", data.MIRRORED_TRAIN, "validate")}
    heights = {split: None for split in codes}
    checkpoints = SimpleNamespace(keras_file=tmp_path / "pixelcnn.keras")

    def fit(prior, *rest, **options):
        raise StartedTraining([weight.numpy() for weight in prior.weights])

    def initial_weights():
        with pytest.raises(StartedTraining) as started:
            driver.train_prior(codes, heights, None, settings, checkpoints,
                               tf.distribute.get_strategy())
        return started.value.args[0]

    monkeypatch.setattr(runs, "fit", fit)
    first = initial_weights()
    keras.random.normal((3,))  # what training another model draws
    np.random.random()
    tf.random.uniform((3,))
    for expected, weight in zip(first, initial_weights(), strict=True):
        np.testing.assert_array_equal(expected, weight)


def test_same_seed_same_metrics(tiny_run, tiny_rerun):
    """A second run with the shared tiny run's arguments, seed and (seeded) images, in another
    process and at the default --verbose (the tiny run is quiet), gives its metrics."""
    first = json.loads((tiny_run["out"] / "metrics.json").read_text())
    second = json.loads((tiny_rerun["out"] / "metrics.json").read_text())
    # float reductions on several threads may differ in the last bits
    assert flattened(second) == pytest.approx(flattened(first), rel=1e-4, abs=1e-5)
