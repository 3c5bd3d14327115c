"""The custom train steps under tf.distribute: one step on two logical CPU devices under
MirroredStrategy matches one step on one device with the same global batch, the EMA codebook's
statistics and restarts included (in a process of its own, which splits the CPU before
TensorFlow starts); and under mixed_float16."""

import contextlib

import keras
import numpy as np
import pytest

import pixelcnn
import vqvae
from conftest import mirrored_step_check

# A check of conftest.mirrored_step_check: how far one step moved the weights and how far the
# two ways differ.
ONE_STEP_BOTH_WAYS = """
    import numpy as np
    import tensorflow as tf
    import keras
    import pixelcnn
    import vqvae

    def build(kind):
        if kind.startswith("vqvae"):
            # decay 0.5: in the first step codes with 2 or more vectors survive, the rest restart
            quantizer = dict(quantizer="ema", ema_decay=0.5, restart_threshold=1.0)
            model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), beta=0.5, data_variance=0.1,
                                **(quantizer if kind == "vqvae_ema" else {}))
            model.compile(optimizer=keras.optimizers.SGD(0.5))
            model(np.zeros((1, 16, 16, 1), "float32"))
        else:
            model = pixelcnn.build_pixelcnn(8, 8, 1, 1, kind="gated", dilation_cycle=1)
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def data(kind, rng):
        if kind.startswith("vqvae"):
            x = rng.uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
            return x, None
        codes = rng.integers(0, 8, (4, 5, 5)).astype("int32")
        return codes, codes

    results = {}
    for kind in ("vqvae", "vqvae_ema", "pixelcnn"):
        keras.utils.set_random_seed(0)
        single = build(kind)
        initial = single.get_weights()
        x, y = data(kind, np.random.default_rng(1))
        single.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        with strategy.scope():
            mirrored = build(kind)
        mirrored.set_weights(initial)
        logs = mirrored.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0).history
        weights = single.get_weights(), mirrored.get_weights()
        results[kind] = {
            "moved": float(max(np.abs(a - b).max() for a, b in zip(weights[0], initial))),
            "gap": float(max(np.abs(a - b).max() for a, b in zip(*weights))),
        }
        if kind == "vqvae_ema":
            one, two = single.quantizer, mirrored.quantizer
            results[kind].update(
                restarts=[int(one.restarts.numpy()), int(two.restarts.numpy())],
                updates=[int(one.updates.numpy()), int(two.updates.numpy())],
                logged_restarts=logs["restarts"],
                state_gap=float(max(np.abs(getattr(one, name).numpy()
                                           - getattr(two, name).numpy()).max()
                                    for name in ("embeddings", "ema_counts", "ema_sums"))),
            )

    # uneven shares of a batch of 4 rows: replica 0 holds row 0, replica 1 rows 1-3
    rows = np.arange(8.0, dtype="float32").reshape(4, 2)
    shares = strategy.experimental_distribute_values_from_function(
        lambda context: rows[:1] if context.replica_id_in_sync_group == 0 else rows[1:])
    gathered = strategy.run(tf.function(lambda share: vqvae.global_batch((share, share[:, 0]))),
                            args=(shares,))
    results["global_batch"] = [[value.numpy().tolist()
                                for value in strategy.experimental_local_results(part)]
                               for part in gathered]
    # outside strategy.run there is no replica whose share to update from
    with strategy.scope():
        quantizer = vqvae.EMAVectorQuantizer(4, 2)
        try:
            quantizer(rows, training=True)
            results["outside_run"] = "updated"
        except RuntimeError as error:
            results["outside_run"] = str(error)
    return results
"""


one_step_both_ways = mirrored_step_check("distribution", ONE_STEP_BOTH_WAYS)


def test_mirrored_step_matches_single_device_step(one_step_both_ways):
    results = one_step_both_ways
    # every replica sees the global batch, its rows in replica order
    rows = [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    assert results.pop("global_batch") == [[rows, rows], [[0.0, 2.0, 4.0, 6.0]] * 2]
    assert "strategy.run" in results.pop("outside_run")
    for kind, result in results.items():
        assert result["moved"] > 1e-3, (kind, result)  # the step did something
        assert result["gap"] < 1e-5 * max(1.0, result["moved"]), (kind, result)
    ema = results["vqvae_ema"]
    # some codes restarted and some followed the moving averages: both paths are compared
    assert 0 < ema["restarts"][0] < 8 and ema["restarts"][0] == ema["restarts"][1], ema
    assert ema["updates"] == [1, 1] and ema["logged_restarts"] == [ema["restarts"][1]], ema
    assert ema["state_gap"] < 1e-5, ema


RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
CODES = RNG.integers(0, 8, (4, 5, 5))


def trained(kind):
    """A VQ-VAE (kind: its quantizer) or the prior, trained 3 steps from seed 0, and its losses."""
    keras.utils.set_random_seed(0)
    if kind == "prior":
        model = pixelcnn.build_pixelcnn(8, 8, 1, 1, kind="gated", dilation_cycle=1)
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model, model.fit(CODES, CODES, epochs=3, verbose=0).history["loss"]
    model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), data_variance=0.1, quantizer=kind)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    return model, model.fit(IMAGES, epochs=3, verbose=0).history["loss"]


def outputs(model, kind):
    """The logits, or the reconstructions and the code maps."""
    if kind == "prior":
        return model(CODES), None
    return model(IMAGES), model.encode_to_indices(IMAGES)


@contextlib.contextmanager
def global_policy(name):
    """Keras' global dtype policy set to name, and restored after."""
    policy = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(policy)


@pytest.mark.parametrize("kind", ["loss", "ema", "prior"])
def test_mixed_float16_trains_like_float32(kind):
    """Trained under float32 and then under mixed_float16 from the same seed; the mixed model is
    also run on the float32 model's weights."""
    reference, float32_losses = trained(kind)
    with global_policy("mixed_float16"):
        model, losses = trained(kind)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        if kind != "prior":
            assert all(w.dtype in ("float32", "int64") for w in model.quantizer.weights)
        model.set_weights(reference.get_weights())
        (output, indices), (expected, expected_indices) = (outputs(model, kind),
                                                           outputs(reference, kind))
    assert output.dtype == "float32", output.dtype
    # eq. 3 (or the prior's cross-entropy) before any step: float16 rounding apart, the same
    assert abs(losses[0] - float32_losses[0]) < 1e-3 * float32_losses[0], (losses, float32_losses)
    # on the float32 model's weights: the same outputs and codes, float16 rounding apart
    assert np.abs(output.numpy() - expected.numpy()).max() < 2e-3
    if kind == "prior":
        # no step overflows at the initial loss scale: each follows the float32 step
        assert max(abs(a - b) for a, b in zip(losses, float32_losses)) < 1e-3, losses
        assert float32_losses[0] - float32_losses[-1] > 1e-2, float32_losses
    else:
        # the loss-scaled steps train (the first may be skipped while the scale settles)
        assert losses[-1] < 0.7 * losses[0], losses
        assert np.mean(indices.numpy() == expected_indices.numpy()) > 0.9
    if kind == "ema":
        assert int(model.quantizer.updates.numpy()) == 3
