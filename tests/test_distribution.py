"""The custom train steps under tf.distribute: one step on two logical CPU devices under
MirroredStrategy matches one step on one device with the same global batch."""

import subprocess
import sys
import textwrap

from test_driver import REPO

ONE_STEP_BOTH_WAYS = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import pixelcnn
    import vqvae

    def build(kind):
        if kind == "vqvae":
            model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), beta=0.5, data_variance=0.1)
            model.compile(optimizer=keras.optimizers.SGD(0.5))
            model(np.zeros((1, 16, 16, 1), "float32"))
        else:
            model = pixelcnn.build_pixelcnn(8, 8, 1, 1, kind="gated")
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def data(kind, rng):
        if kind == "vqvae":
            x = rng.uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
            return x, None
        codes = rng.integers(0, 8, (4, 5, 5)).astype("int32")
        return codes, codes

    # one strategy for both: a second one in the same process reuses collective op keys
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    for kind in ("vqvae", "pixelcnn"):
        keras.utils.set_random_seed(0)
        single = build(kind)
        initial = single.get_weights()
        x, y = data(kind, np.random.default_rng(1))
        single.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        with strategy.scope():
            mirrored = build(kind)
        mirrored.set_weights(initial)
        mirrored.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        moved = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), initial))
        gap = max(np.abs(a - b).max() for a, b in zip(single.get_weights(), mirrored.get_weights()))
        assert moved > 1e-3, (kind, moved)
        assert gap < 1e-5 * max(1.0, moved), (kind, gap, moved)
        print(kind, "moved", moved, "gap", gap)
""")


def test_mirrored_step_matches_single_device_step():
    result = subprocess.run([sys.executable, "-c", ONE_STEP_BOTH_WAYS], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vqvae moved" in result.stdout and "pixelcnn moved" in result.stdout


MIXED_PRECISION_STEPS = textwrap.dedent("""
    import keras
    import numpy as np
    import pixelcnn
    import vqvae
    keras.mixed_precision.set_global_policy("mixed_float16")
    rng = np.random.default_rng(0)
    model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), data_variance=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = rng.uniform(-0.5, 0.5, (4, 16, 16, 1)).astype("float32")
    losses = model.fit(images, epochs=2, verbose=0).history["loss"]
    assert np.isfinite(losses).all(), losses
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model(images).dtype == "float32" and model.quantizer.embeddings.dtype == "float32"
    prior = pixelcnn.build_pixelcnn(8, 8, 1, 1)
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
