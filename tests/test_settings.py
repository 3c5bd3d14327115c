"""The settings' one home (runs.py's configs), where each run's files go, and settings files that
survive moving the clone."""

import dataclasses
import json
from pathlib import Path

import pytest

import data
import driver
import pixelcnn
import runs
from conftest import one_line_error


def test_every_flag_is_a_setting_and_every_setting_a_flag():
    flags = {action.dest for action in runs.build_parser(data.DEMO_DEFAULTS)._actions
             if action.dest != "help"}
    config_fields = {field.name for config in (runs.DataConfig, runs.VQVAEConfig,
                                               runs.PriorConfig)
                     for field in dataclasses.fields(config)}
    options = {field.name for field in dataclasses.fields(runs.Settings)} - set(
        runs.MODEL_CONFIGS)
    assert flags == config_fields | options
    assert not config_fields & options


def test_flag_defaults_are_the_configs_defaults():
    settings = driver.parse_args([])
    assert settings.data == runs.DataConfig()
    assert settings.vqvae == runs.VQVAEConfig()
    assert settings.prior == runs.PriorConfig()


def test_demo_resolves_to_its_defaults_and_explicit_flags_win():
    demo = driver.parse_args(["--demo"]).flat()
    expected = {name: runs.portable(value) for name, value in data.DEMO_DEFAULTS.items()}
    assert {name: demo[name] for name in expected} == expected
    changed = {name for name, value in driver.parse_args([]).flat().items() if demo[name] != value}
    assert changed == set(expected) | {"demo", "checkpoint_dir"}
    assert driver.parse_args(["--demo", "--epochs", "3"]).vqvae.epochs == 3


def test_the_seeds_flag_spellings_still_work():
    settings = driver.parse_args(["--batch_size", "8", "--learning_rate", "0.01"])
    assert (settings.data.batch_size, settings.vqvae.learning_rate) == (8, 0.01)
    assert driver.parse_args(["--batch-size", "8"]).data.batch_size == 8


def test_the_demo_and_an_oasis_run_keep_separate_folders():
    """The README's sequence, the demo and then OASIS, must not refuse on the demo's checkpoints
    nor overwrite its figures."""
    demo, oasis = driver.parse_args(["--demo"]), driver.parse_args([])
    assert demo.out != oasis.out
    assert demo.checkpoint_dir == demo.out / "checkpoints"
    assert oasis.checkpoint_dir == oasis.out / "checkpoints"
    assert driver.parse_args(["--checkpoint-dir", "elsewhere"]).checkpoint_dir == Path(
        "elsewhere")


def test_paths_inside_the_repository_are_kept_relative(tmp_path):
    assert runs.portable(runs.REPOSITORY / "demo_data") == "demo_data"
    assert runs.portable(tmp_path / "data") == str(tmp_path / "data")
    assert driver.parse_args(["--demo"]).model_settings()["data"] == "demo_data"


def test_a_moved_clone_resumes_its_run(tmp_path, monkeypatch):
    """settings.json written in one clone matches the same run's settings in the clone moved
    elsewhere, where an absolute path would have refused the resume."""
    def settings_in_clone(clone):
        monkeypatch.setattr(runs, "REPOSITORY", clone)
        return driver.parse_args(["--data", str(clone / "demo_data")]).model_settings()

    checkpoints = tmp_path / "checkpoints"
    runs.prepare_checkpoints(checkpoints, settings_in_clone(tmp_path / "clone"), False, False)
    assert json.loads((checkpoints / runs.SETTINGS_FILE).read_text())["data"] == "demo_data"
    runs.prepare_checkpoints(checkpoints, settings_in_clone(tmp_path / "moved"), False, False)
    with pytest.raises(runs.PipelineError, match="data"):
        runs.prepare_checkpoints(checkpoints, settings_in_clone(tmp_path / "moved") | {
            "data": str(tmp_path / "other")}, False, False)


def test_attention_goes_into_the_top_prior_only():
    """--pcnn-attention: the top (or only) prior attends; the bottom prior, over a map four times
    larger, does not."""
    def attends(model):
        return any(isinstance(layer, pixelcnn.CausalSelfAttention)
                   for layer in model.get_layer("horizontal_stack").layers)

    tiny = ["--pcnn-filters", "8", "--pcnn-res-blocks", "1"]
    prior = driver.parse_args([*tiny, "--pcnn-attention"]).prior
    assert attends(prior.build(8, (4, 4)))
    assert not attends(prior.build(8, (8, 8), top_grid=(4, 4)))
    assert not attends(driver.parse_args(tiny).prior.build(8, (4, 4)))


def test_the_top_codebook_size_reaches_both_priors():
    """--top-K: the top prior draws top codes and the bottom prior reads them; both have K_top
    of them, while the bottom prior draws K."""
    tiny = ["--pcnn-filters", "8", "--pcnn-res-blocks", "1"]
    settings = driver.parse_args([*tiny, "--K", "16", "--top-K", "4"])
    top_k, k = settings.vqvae.codebook_sizes
    top_prior = settings.prior.build(top_k, (4, 4))
    bottom_prior = settings.prior.build(k, (8, 8), top_grid=(4, 4), top_embeddings=top_k)
    assert (top_k, k) == (4, 16)
    assert top_prior.output_shape[-1] == 4 and bottom_prior.output_shape[-1] == 16
    (top_stack,) = [layer for layer in bottom_prior.layers
                    if isinstance(layer, pixelcnn.TopCodeStack)]
    assert top_stack.num_embeddings == 4
    assert driver.parse_args(["--K", "16"]).vqvae.codebook_sizes == (16, 16)
    assert driver.parse_args(["--levels", "1", "--K", "16"]).vqvae.codebook_sizes == (16,)


def test_a_top_codebook_without_a_top_level_is_refused(capsys):
    message = one_line_error(capsys, ["--levels", "1", "--top-K", "8"])
    assert "--top-K" in message and "--levels 1" in message
