"""The custom train steps under tf.distribute: one step on two logical CPU devices under
MirroredStrategy matches one step on one device with the same global batch, the EMA codebook's
statistics and restarts included."""

import json
import subprocess
import sys
import textwrap

from conftest import REPO

# Prints, as JSON, how far one step moved the weights and how far the two ways differ.
ONE_STEP_BOTH_WAYS = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
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

    # one strategy for both: a second one in the same process reuses collective op keys
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
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
    print(json.dumps(results))
""")


def test_mirrored_step_matches_single_device_step():
    result = subprocess.run([sys.executable, "-c", ONE_STEP_BOTH_WAYS], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    for kind, result in results.items():
        assert result["moved"] > 1e-3, (kind, result)  # the step did something
        assert result["gap"] < 1e-5 * max(1.0, result["moved"]), (kind, result)
    ema = results["vqvae_ema"]
    # some codes restarted and some followed the moving averages: both paths are compared
    assert 0 < ema["restarts"][0] < 8 and ema["restarts"][0] == ema["restarts"][1], ema
    assert ema["updates"] == [1, 1] and ema["logged_restarts"] == [ema["restarts"][1]], ema
    assert ema["state_gap"] < 1e-5, ema


MIXED_PRECISION_STEPS = textwrap.dedent("""
    import keras
    import numpy as np
    import pixelcnn
    import vqvae
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(0)
    images = rng.uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
    for quantizer in ("loss", "ema"):
        model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), data_variance=0.1, quantizer=quantizer)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        losses = model.fit(images, epochs=2, verbose=0).history["loss"]
        assert np.isfinite(losses).all(), (quantizer, losses)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert model(images).dtype == "float32"
        assert all(w.dtype in ("float32", "int64") for w in model.quantizer.weights)
    assert np.isfinite(model.quantizer.embeddings.numpy()).all()
    assert int(model.quantizer.updates.numpy()) == 2
    prior = pixelcnn.build_pixelcnn(8, 8, 1, 1, kind="gated", dilation_cycle=1)
    prior.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    codes = rng.integers(0, 8, (4, 5, 5))
    assert np.isfinite(prior.fit(codes, codes, epochs=2, verbose=0).history["loss"]).all()
    assert prior(codes).dtype == "float32"
    print("mixed precision ok")
""")


def test_mixed_float16_trains_with_float32_outputs():
    result = subprocess.run([sys.executable, "-c", MIXED_PRECISION_STEPS], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision ok" in result.stdout
