"""The two-level VQ-VAE (VQ-VAE-2): code maps, decoding, both levels' eq. 3 terms, training,
serialization and one step under tf.distribute, on 32x32 images with top 4x4 and bottom 8x8."""

import json
import shutil

import keras
import numpy as np
import pytest

import vqvae
from conftest import (BACKGROUND_RUNS, PIXEL_RANGE, TINY_MODELS, Scenario, assert_round_trip,
                      driver_process, mirrored_step_check, smooth_blobs, succeeded,
                      write_split_folders)

K, D, DOWNSAMPLE, SIZE = 16, 4, 8, 32
TOP_K = 8  # the tiny run's top codebook, smaller than the bottom one's K
IMAGES = np.random.default_rng(0).uniform(*PIXEL_RANGE, (4, SIZE, SIZE, 1)).astype("float32")


def two_level(quantizer="loss", **kwargs):
    """A built VQVAE2 (like the one-level model, it is built by its first call)."""
    model = vqvae.VQVAE2(K, D, pixel_range=PIXEL_RANGE, downsample=DOWNSAMPLE,
                         quantizer=quantizer, **kwargs)
    model(IMAGES[:1])
    return model


def quantizer_state(quantizer):
    return {weight.name: weight.numpy().copy() for weight in quantizer.weights}


def test_code_maps_have_the_top_and_bottom_grids():
    model = two_level()
    top, bottom = model.encode_to_indices(IMAGES)
    assert top.shape == (4, 4, 4) and bottom.shape == (4, 8, 8)
    for codes in (top, bottom):
        codes = np.asarray(codes)
        assert np.issubdtype(codes.dtype, np.integer)
        assert 0 <= codes.min() and codes.max() < K
    assert (model.levels, model.code_grids(256)) == (2, (32, 64))
    one_level = vqvae.VQVAE(K, D, pixel_range=PIXEL_RANGE, downsample=DOWNSAMPLE)
    assert (one_level.levels, one_level.code_grids(256)) == (1, (32,))


def test_the_top_codebook_may_be_smaller():
    model = two_level("ema", top_num_embeddings=TOP_K)
    top, bottom = (np.asarray(codes) for codes in model.encode_to_indices(IMAGES))
    assert model.codebook_sizes == (TOP_K, K)
    assert tuple(model.top_quantizer.embeddings.shape) == (TOP_K, D)
    assert tuple(model.quantizer.embeddings.shape) == (K, D)
    assert top.max() < TOP_K and bottom.max() < K
    copy = vqvae.VQVAE2.from_config(model.get_config())
    assert copy.codebook_sizes == (TOP_K, K)
    assert two_level().codebook_sizes == (K, K)  # VQ-VAE-2's one K for both, by default


def test_decoding_the_codes_gives_the_reconstructions():
    model = two_level()
    decoded = model.decode_indices(*model.encode_to_indices(IMAGES))
    np.testing.assert_allclose(decoded, model(IMAGES), atol=1e-6)


def test_decoding_the_top_alone_is_refused():
    model = two_level()
    top, _ = model.encode_to_indices(IMAGES)
    with pytest.raises(ValueError, match="sample the bottom codes given the top first"):
        model.decode_indices(top)


@pytest.mark.parametrize("downsample, message", [(2, "downsample >= 4"), (6, "power of 2")])
def test_a_downsample_without_two_grids_is_refused(downsample, message):
    with pytest.raises(ValueError, match=message):
        vqvae.VQVAE2(K, D, pixel_range=PIXEL_RANGE, downsample=downsample)


def test_a_top_code_reaches_further_than_a_bottom_code():
    """Each top code covers 2x2 bottom codes, so changing one moves the decoded image over a
    larger region than changing the bottom code at the same place; both change it."""
    keras.utils.set_random_seed(0)
    model = two_level()
    images = np.zeros((1, 64, 64, 1), "float32")
    top, bottom = (np.asarray(codes).copy() for codes in model.encode_to_indices(images))
    # codebooks far apart and outputs off the clip, so that every change shows
    for quantizer in (model.top_quantizer, model.quantizer):
        quantizer.embeddings.assign(np.random.default_rng(1).normal(size=(K, D)))
    model.decoder.get_layer("to_image").bias.assign([0.0])
    decoded = model.decode_indices(top, bottom).numpy()
    assert np.abs(decoded).max() < PIXEL_RANGE[1]
    other_top, other_bottom = top.copy(), bottom.copy()
    other_top[0, 4, 4] = (top[0, 4, 4] + 1) % K
    other_bottom[0, 8, 8] = (bottom[0, 8, 8] + 1) % K
    moved_by_top = model.decode_indices(other_top, bottom).numpy() != decoded
    moved_by_bottom = model.decode_indices(top, other_bottom).numpy() != decoded
    assert 0 < moved_by_bottom.sum() < moved_by_top.sum() < decoded.size
    assert moved_by_top[moved_by_bottom].all()


def eq3_quantizer_terms(quantizer, z_e, beta):
    """One level's eq. 3 terms in numpy: codebook and beta-weighted commitment for "loss", the
    commitment term alone for "ema"."""
    codebook = quantizer.embeddings.numpy()
    z_e = np.asarray(z_e)
    nearest = codebook[((z_e[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)]
    squared_error = ((z_e - nearest) ** 2).mean()
    codebook_term = 0.0 if isinstance(quantizer, vqvae.EMAVectorQuantizer) else squared_error
    return codebook_term + beta * squared_error


@pytest.mark.parametrize("quantizer", vqvae.QUANTIZERS)
def test_vq_loss_is_both_levels_eq3_terms(quantizer):
    beta = 0.5
    model = two_level(quantizer, beta=beta)
    _, _, vq_loss = model.eq3_losses(IMAGES, training=False)
    features = model.encoder(IMAGES)
    top_z_e = model.top_encoder(features)
    top = model.top_quantizer.lookup(model.top_quantizer.code_indices(top_z_e))
    bottom_z_e = model.bottom_latent(features, top)
    top_terms = eq3_quantizer_terms(model.top_quantizer, top_z_e, beta)
    bottom_terms = eq3_quantizer_terms(model.quantizer, bottom_z_e, beta)
    np.testing.assert_allclose(float(vq_loss), top_terms + bottom_terms, rtol=1e-5)


@pytest.mark.parametrize("quantizer", vqvae.QUANTIZERS)
def test_training_reduces_the_loss_and_updates_both_levels(quantizer):
    keras.utils.set_random_seed(0)
    images = smooth_blobs(8, SIZE, width=0.05) - 0.5
    model = two_level(quantizer)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, epochs=20, batch_size=4, verbose=0).history
    expected = {"loss", "reconstruction_loss", "vq_loss", "top_vq_loss", "bottom_vq_loss"}
    if quantizer == "ema":
        expected |= {"restarts", "top_restarts"}
        assert int(model.top_quantizer.updates.numpy()) == 40
        assert int(model.quantizer.updates.numpy()) == 40
    assert set(history) == expected
    assert history["loss"][-1] < 0.7 * history["loss"][0], history["loss"]
    np.testing.assert_allclose(np.add(history["top_vq_loss"], history["bottom_vq_loss"]),
                               history["vq_loss"], rtol=1e-5)


def test_config_round_trip():
    model = two_level("ema", beta=0.7, ema_decay=0.8, restart_threshold=0.5)
    config = model.get_config()
    assert config["downsample"] == DOWNSAMPLE
    copy = vqvae.VQVAE2.from_config(config)
    assert copy.get_config() == config
    assert isinstance(copy.top_quantizer, vqvae.EMAVectorQuantizer)
    assert (copy.top_quantizer.decay, copy.top_quantizer.restart_threshold) == (0.8, 0.5)


def test_save_load_round_trip_keeps_both_codebooks(tmp_path):
    keras.utils.set_random_seed(0)
    model = two_level("ema", beta=0.7, data_variance=0.05)
    for _ in range(2):
        model(IMAGES, training=True)  # two EMA updates of each codebook
    states = [quantizer_state(q) for q in (model.top_quantizer, model.quantizer)]
    loaded = assert_round_trip(model, IMAGES, tmp_path)
    assert type(loaded) is vqvae.VQVAE2 and loaded.get_config() == model.get_config()
    for codes, loaded_codes in zip(model.encode_to_indices(IMAGES),
                                   loaded.encode_to_indices(IMAGES)):
        np.testing.assert_array_equal(codes, loaded_codes)
    for state, level in zip(states, (loaded.top_quantizer, loaded.quantizer)):
        assert state["updates"] == 2 and state["ema_counts"].any()
        for name, value in quantizer_state(level).items():
            np.testing.assert_array_equal(value, state[name], err_msg=name)


# A check of conftest.mirrored_step_check: how far one step moved the weights and how far the
# two ways differ.
ONE_STEP_BOTH_WAYS = """
    import numpy as np
    import keras
    import vqvae

    def build(quantizer):
        # decay 0.5: in the first step codes with 2 or more vectors survive, the rest restart
        model = vqvae.VQVAE2(8, 2, pixel_range=(-0.5, 0.5), downsample=8, beta=0.5,
                             data_variance=0.1, quantizer=quantizer, ema_decay=0.5,
                             restart_threshold=1.0)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        model(np.zeros((1, 32, 32, 1), "float32"))
        return model

    x = np.random.default_rng(1).uniform(-0.5, 0.5, (4, 32, 32, 1)).astype("float32")
    results = {}
    # the EMA kind: both levels' codebook updates aggregate across replicas; the "loss" kind's
    # codebook gradients are reduced like any other weight's (tests/test_distribution.py)
    for quantizer in ("ema",):
        keras.utils.set_random_seed(0)
        single = build(quantizer)
        initial = single.get_weights()
        single.fit(x, batch_size=4, epochs=1, shuffle=False, verbose=0)
        with strategy.scope():
            mirrored = build(quantizer)
        mirrored.set_weights(initial)
        mirrored.fit(x, batch_size=4, epochs=1, shuffle=False, verbose=0)
        weights = single.get_weights(), mirrored.get_weights()
        results[quantizer] = {
            "moved": float(max(np.abs(a - b).max() for a, b in zip(weights[0], initial))),
            "gap": float(max(np.abs(a - b).max() for a, b in zip(*weights))),
        }
        if quantizer == "ema":
            results[quantizer]["updates"] = [
                [int(model.top_quantizer.updates.numpy()), int(model.quantizer.updates.numpy())]
                for model in (single, mirrored)]
    return results
"""


hierarchy_one_step_both_ways = mirrored_step_check("hierarchy", ONE_STEP_BOTH_WAYS)


def test_mirrored_step_matches_single_device_step(hierarchy_one_step_both_ways):
    """In the mirrored-step checks' process, which splits the CPU before TensorFlow starts; the
    weights compared include both EMA codebooks and their statistics."""
    results = hierarchy_one_step_both_ways
    for quantizer, result in results.items():
        assert result["moved"] > 1e-3, (quantizer, result)
        assert result["gap"] < 1e-5 * max(1.0, result["moved"]), (quantizer, result)
    assert results["ema"]["updates"] == [[1, 1], [1, 1]], results


# ---------------------------------------------------------------------------------------------
# The pipeline with --levels 2


def start_two_level_run(root):
    """A tiny two-level run: 32x32 slices of two heights, top 4x4 and bottom 8x8 codes, both
    priors conditioned on the height and the bottom one on the top codes, the top one trained on
    the mirrored slices too; its metrics.json copied to "trained_metrics" and what it printed to
    "trained_output", then the same command with --evaluate."""
    data = write_split_folders(root / "data", slices_per_case=2)
    out, trained_metrics = root / "out", root / "trained_metrics.json"
    trained_output = root / "trained_output.txt"
    args = ["--data", data, "--out", out, "--image-size", SIZE, "--downsample", DOWNSAMPLE,
            "--levels", "2", "--pcnn-mirror", *TINY_MODELS, "--top-K", TOP_K, "--num-samples", "10",
            "--verbose", "0"]

    def train_then_evaluate(processes):
        processes.append(run := driver_process(*args))
        trained = run.result()
        assert trained.returncode == 0, trained.stderr[-3000:]
        shutil.copy(out / "metrics.json", trained_metrics)
        trained_output.write_text(trained.stdout)
        processes.append(evaluation := driver_process(*args, "--evaluate"))
        return evaluation.result()

    return {"data": data, "out": out, "trained_metrics": trained_metrics,
            "trained_output": trained_output, "process": Scenario(train_then_evaluate)}


BACKGROUND_RUNS["two_level_run"] = start_two_level_run


@pytest.fixture(scope="module")
def two_level_run(background_runs):
    """The finished two-level run; "result" is its --evaluate's, and its out folder's
    metrics.json the one --evaluate wrote."""
    return background_runs.finished("two_level_run")


def test_a_two_level_run_writes_both_priors_and_each_levels_metrics(two_level_run):
    out = two_level_run["out"]
    assert {path.name for path in (out / "checkpoints").glob("*.keras")} == {
        "vqvae.keras", "pixelcnn.keras", "pixelcnn_bottom.keras"}
    metrics = json.loads(two_level_run["trained_metrics"].read_text())
    for level, codebook_size in (("", TOP_K), ("bottom_", K)):
        assert 0 < metrics["vqvae"][f"{level}codes_used"] <= 1
        assert metrics["pixelcnn"][f"{level}uniform_bits"] == np.log2(codebook_size)
        assert 0 < metrics["pixelcnn"][f"{level}test_nll_bits"] < 2 * np.log2(codebook_size)
    assert len(list((out / "samples").glob("*.png"))) == 10
    # the bottom prior scored alone, printed among the two-sample accuracies
    assert 0 <= metrics["samples"]["c2st_bottom_given_top"] <= 1
    printed = two_level_run["trained_output"].read_text()
    assert "bottom prior alone (given real top codes)" in printed, printed
    assert (out / "bottom_prior.png").exists()
    # each codebook's use on the validation slices, after every epoch
    (epoch,) = json.loads((out / "checkpoints" / "vqvae_history.json").read_text())
    for level, codebook_size in (("", TOP_K), ("bottom_", K)):
        assert 0 < epoch[f"val_{level}codes_used"] <= 1
        assert 1 <= epoch[f"val_{level}codebook_perplexity"] <= codebook_size


def test_only_the_top_prior_learns_from_the_mirror_images_too(two_level_run):
    import data

    training_slices = len(data.split_images(two_level_run["data"] / data.SPLIT_FOLDERS["train"]))
    printed = two_level_run["trained_output"].read_text()
    assert (f"on {2 * training_slices} code maps of 4x4 (the training slices and their mirror "
            "images)") in printed, printed
    assert f"on {training_slices} code maps of 8x8\n" in printed, printed


def test_mirrored_code_maps_are_the_codes_of_the_mirror_images():
    """Each level's: the encoder's codes of the mirrored images, which are not the codes of the
    images mirrored (a convolution's weights are not symmetric), so they add maps to learn."""
    import data
    import runs
    import tensorflow as tf

    model = two_level()
    shift = -PIXEL_RANGE[0]
    pixels = np.round((IMAGES + shift) * data.PIXEL_MAX).astype("uint8")
    images = tf.data.Dataset.from_tensor_slices(pixels)
    splits = data.Splits(images, images, images, shift, batch_size=3, file_paths={})
    codes = data.code_maps(model, splits, runs.QUIET, mirrored=True)
    mirror_images = pixels[:, :, ::-1].astype("float32") / data.PIXEL_MAX - shift
    for level, expected in zip(codes, model.encode_to_indices(mirror_images)):
        np.testing.assert_array_equal(level[data.MIRRORED_TRAIN], expected)
        assert not np.array_equal(level[data.MIRRORED_TRAIN], level["train"][:, :, ::-1])
    assert all(data.MIRRORED_TRAIN not in level
               for level in data.code_maps(model, splits, runs.QUIET))


def test_the_bottom_nll_is_the_bottom_priors_on_the_test_codes(two_level_run):
    """Recomputed from the saved models by hand: the bottom prior's cross-entropy on the test
    slices' bottom codes, given their heights and top codes. (After one epoch the top codes
    barely move the logits, so this cannot tell them from another slice's; the conditioning
    itself is tested in test_code_condition.py.)"""
    import data

    out = two_level_run["out"]
    model = keras.models.load_model(out / "checkpoints" / "vqvae.keras")
    bottom_prior = keras.models.load_model(out / "checkpoints" / "pixelcnn_bottom.keras")
    splits = data.load_splits(two_level_run["data"], SIZE, 0.5, 8, demo=False)
    top, bottom = data.encode(model, splits.scaled("test"))
    logits = bottom_prior([bottom, splits.heights("test"), top], training=False)
    nll = keras.losses.sparse_categorical_crossentropy(bottom, logits, from_logits=True)
    saved = json.loads(two_level_run["trained_metrics"].read_text())["pixelcnn"][
        "bottom_test_nll_bits"]
    assert saved == pytest.approx(float(np.mean(nll)) / np.log(2), rel=1e-5)


def test_a_two_level_run_evaluates_again_to_the_same_metrics(two_level_run):
    succeeded(two_level_run)
    before = json.loads(two_level_run["trained_metrics"].read_text())
    assert json.loads((two_level_run["out"] / "metrics.json").read_text()) == before


def test_two_levels_need_a_downsample_of_at_least_4(capsys):
    from conftest import one_line_error

    message = one_line_error(capsys, ["--levels", "2", "--downsample", "2"])
    assert "--levels" in message and "--downsample >= 4" in message


def test_two_levels_are_the_default_and_the_demo_keeps_one(capsys):
    import driver
    from conftest import one_line_error

    assert driver.parse_args([]).vqvae.levels == 2
    assert driver.parse_args(["--demo"]).vqvae.levels == 1
    message = one_line_error(capsys, ["--pcnn-type", "plain"])
    assert "--levels" in message and "use --levels 1" in message


# ---------------------------------------------------------------------------------------------
# The bottom prior scored alone, given real top codes (driver.bottom_prior_realism)


class BlockCodec:
    """A stand-in two-level VQ-VAE whose codes are readable: a top code is the brightness of an
    8x8 block, quantised to TOP_LEVELS; a bottom code c adds TEXTURE * (c / K - 1/2) to a 4x4
    block. The bottom codes it reconstructs with are K/2 everywhere (flat: no texture) or
    uniformly random ones."""

    TOP_LEVELS, TEXTURE = 5, 0.6

    def __init__(self, uniform_bottoms):
        self.uniform_bottoms, self.shift = uniform_bottoms, -PIXEL_RANGE[0]
        self.rng = np.random.default_rng(1)

    def code_grids(self, image_size):
        return [image_size // DOWNSAMPLE, 2 * image_size // DOWNSAMPLE]

    def top_codes(self, images):
        blocks = keras.ops.average_pool(images + self.shift, DOWNSAMPLE, DOWNSAMPLE)
        return np.round(np.asarray(blocks)[..., 0] * (self.TOP_LEVELS - 1)).astype("int32")

    def decode_indices(self, top, bottom):
        brightness = np.kron(np.asarray(top) / (self.TOP_LEVELS - 1), np.ones((8, 8)))
        texture = np.kron(np.asarray(bottom) / K - 0.5, np.ones((4, 4)))
        return (brightness + self.TEXTURE * texture - self.shift)[..., None].astype("float32")

    def __call__(self, images):
        top = self.top_codes(images)
        shape = (len(top), 8, 8)
        bottom = self.rng.integers(0, K, shape) if self.uniform_bottoms else np.full(shape, K // 2)
        return self.decode_indices(top, bottom)


@pytest.mark.parametrize("uniform_bottoms, flagged", [(True, False), (False, True)])
def test_the_bottom_prior_alone_is_flagged_only_when_its_draws_differ_from_the_codes(
        uniform_bottoms, flagged):
    """A bottom prior that draws every code with probability 1/K, given real top codes. Positive
    control: the VQ-VAE's own bottom codes are uniformly random too, so the two sets differ in
    their draws, not in their distribution: near chance. Negative control: its bottom codes are
    flat, and the prior's draws show as speckle the reconstructions lack: told apart."""
    import driver
    import pixelcnn
    from conftest import brain_like_image

    rng = np.random.default_rng(0)
    count = 40
    pixels = np.stack([brain_like_image(rng, SIZE) for _ in range(count)])[..., None]
    codec = BlockCodec(uniform_bottoms)
    top = codec.top_codes(pixels.astype("float32") / 255 - codec.shift)
    prior = pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=1,
                                    condition="none", top_embeddings=BlockCodec.TOP_LEVELS,
                                    top_grid=top.shape[1:])
    for weight in prior.get_layer("horizontal_stack").get_layer("logits").weights:
        weight.assign(np.zeros(weight.shape))  # uniform over the K codes
    settings = driver.parse_args(["--image-size", str(SIZE), "--downsample", str(DOWNSAMPLE),
                                  "--num-samples", str(count), "--sample-draws", "1",
                                  "--condition", "none"])
    metrics, alone = driver.bottom_prior_realism(codec, prior, top, None, pixels, settings)
    accuracy = metrics["c2st_bottom_given_top"]
    assert (accuracy > 0.9) if flagged else (accuracy < 0.7), accuracy
    # what its figure shows (test_figures.py): each slice, its reconstruction and drawn detail
    np.testing.assert_allclose(alone.originals, pixels / 255, atol=1e-6)
    if not uniform_bottoms:
        flat = codec.decode_indices(top, np.full((count, 8, 8), K // 2)) + codec.shift
        np.testing.assert_allclose(alone.reconstructions, np.clip(flat, 0, 1), atol=1e-6)
    assert not np.allclose(alone.drawn, alone.reconstructions)
