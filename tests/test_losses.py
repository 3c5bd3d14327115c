"""Reconstruction losses beyond eq. 3's squared error (Zhao et al.'s L1/MS-SSIM mix, the spectral
loss) and VQGAN's patch discriminator (hinge losses, start step, adaptive weight), with its
weights and optimizer saved, loaded and resumed, and one step under tf.distribute; on 32x32
images."""


import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import PIXEL_RANGE, mirrored_step_check, smooth_blobs

import vqvae

SIZE = 32
IMAGES = smooth_blobs(4, SIZE, width=0.02) - 0.5  # in PIXEL_RANGE


def adversarial_model(discriminator_start=0, optimizer=None, **kwargs):
    """A compiled, built VQ-VAE with a discriminator."""
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, data_variance=0.1, adversarial_weight=0.8,
                        discriminator_start=discriminator_start, **kwargs)
    model.compile(optimizer=optimizer or keras.optimizers.Adam(1e-3))
    model(IMAGES[:1])
    return model


def numpy_of(variables):
    return [np.array(variable) for variable in variables]


def assert_all_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a, b)


def discriminator_state(model):
    """The discriminator's weights, its optimizer's variables (iterations, learning rate,
    moments) and the step count."""
    return (numpy_of(model.discriminator.weights),
            numpy_of(model.discriminator_optimizer.variables), int(model.training_steps.numpy()))


def adam_moments(optimizer):
    return numpy_of(v for v in optimizer.variables if v.path.endswith(("momentum", "velocity")))


def assert_same_state(model, other):
    assert_all_equal(model.get_weights(), other.get_weights())
    assert_all_equal(numpy_of(model.optimizer.variables), numpy_of(other.optimizer.variables))
    weights, optimizer, steps = discriminator_state(model)
    other_weights, other_optimizer, other_steps = discriminator_state(other)
    assert_all_equal(weights, other_weights)
    assert_all_equal(optimizer, other_optimizer)
    assert steps == other_steps


# ---------------------------------------------------------------------------------------------
# The defaults are eq. 3 as before


def test_defaults_are_eq3_step_for_step():
    """A default model's step is eq. 3's step written out: MSE / data variance plus the
    quantizer's terms, one gradient step; no discriminator, no new metric."""
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, data_variance=0.1)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model(IMAGES[:1])
    reference = keras.models.clone_model(model)
    reference(IMAGES[:1])
    reference.set_weights(model.get_weights())
    assert model.discriminator is None
    assert [id(w) for w in model.trainable_weights] == [id(w) for w in model.weights]
    with tf.GradientTape() as tape:
        reconstructions = reference(IMAGES, training=True)
        loss = (keras.ops.mean((IMAGES - reconstructions) ** 2) / 0.1
                + keras.ops.sum(reference.losses))
    gradients = tape.gradient(loss, reference.trainable_weights)
    keras.optimizers.SGD(0.1).apply_gradients(zip(gradients, reference.trainable_weights))
    history = model.fit(IMAGES, batch_size=len(IMAGES), epochs=1, shuffle=False,
                        verbose=0).history
    assert set(history) == {"loss", "reconstruction_loss", "vq_loss"}
    # fit runs the step as a graph, the reference eagerly: float32 rounding apart, the same
    np.testing.assert_allclose(history["loss"], [float(loss)], rtol=1e-6)
    for weight, expected in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(weight, expected, rtol=1e-5, atol=1e-8)


def test_library_defaults_add_nothing_to_eq3():
    config = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE).get_config()
    assert {name: config[name] for name in ("reconstruction", "spectral_weight",
                                            "adversarial_weight", "discriminator_start",
                                            "discriminator_learning_rate")} == dict(
        reconstruction="mse", spectral_weight=0.0, adversarial_weight=0.0,
        discriminator_start=10000, discriminator_learning_rate=2e-4)


@pytest.mark.parametrize("arguments", [dict(reconstruction="l2"), dict(spectral_weight=-1.0),
                                       dict(adversarial_weight=-0.1),
                                       dict(discriminator_start=-1)])
def test_vqvae_refuses_unknown_or_negative_loss_settings(arguments):
    name = next(iter(arguments))
    with pytest.raises(ValueError, match=name):
        vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, **arguments)


# ---------------------------------------------------------------------------------------------
# Zhao et al.'s L1/MS-SSIM mix


def gaussian_window(size=vqvae.SSIM_WINDOW, sigma=1.5):
    offsets = np.arange(size) - (size - 1) / 2
    weights = np.exp(-offsets**2 / (2 * sigma**2))
    return np.outer(weights, weights) / weights.sum() ** 2


def filtered(image, window):
    """The window's weighted mean around every position where it fits: (H, W) -> (H-10, W-10)."""
    patches = np.lib.stride_tricks.sliding_window_view(image, window.shape)
    return np.einsum("ijkl,kl->ij", patches, window)


def normalised_msssim(x, y, max_val, factors):
    """Wang et al. 2003 in numpy (float64): at each scale the mean contrast-structure term cs,
    at the coarsest the mean SSIM, each mapped from [-1, 1] to [0, 1] and raised to its power;
    2x2 means between scales."""
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    window = gaussian_window()
    terms = []
    for scale in range(len(factors)):
        if scale:
            x, y = (a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean((1, 3)) for a in (x, y))
        mean_x, mean_y = filtered(x, window), filtered(y, window)
        var_x = filtered(x * x, window) - mean_x**2
        var_y = filtered(y * y, window) - mean_y**2
        covariance = filtered(x * y, window) - mean_x * mean_y
        luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
        cs = (2 * covariance + c2) / (var_x + var_y + c2)
        terms.append((luminance * cs).mean() if scale == len(factors) - 1 else cs.mean())
    return np.prod(((np.asarray(terms) + 1) / 2) ** np.asarray(factors))


@pytest.mark.parametrize("size, scales", [(161, 5), (160, 4), (32, 2), (21, 2), (11, 1)])
def test_msssim_keeps_the_scales_its_window_fits(size, scales):
    assert vqvae.msssim_scales(size, 1000) == scales


def test_msssim_refuses_an_image_smaller_than_its_window():
    with pytest.raises(ValueError, match="11x11"):
        vqvae.msssim_scales(10, 32)


def test_l1_msssim_is_zhaos_mix():
    """On a pair of 32x32 images in [-0.25, 0.75]: 0.84 (1 - MS-SSIM) + 0.16 L1, the normalised
    MS-SSIM of the two finest scales (their exponents rescaled to sum to 1) on the images
    shifted to [0, 1]."""
    low, high = -0.25, 0.75
    x = smooth_blobs(2, SIZE, width=0.02) + low
    y = np.clip(x + np.random.default_rng(0).normal(0, 0.15, x.shape), low, high)
    y = y.astype("float32")
    factors = np.array(vqvae.MSSSIM_POWER_FACTORS[:2]) / sum(vqvae.MSSSIM_POWER_FACTORS[:2])
    expected_msssim = np.mean([normalised_msssim(a[..., 0] - low, b[..., 0] - low, high - low,
                                                 factors)
                               for a, b in zip(x.astype("float64"), y.astype("float64"))])
    assert 0.3 < expected_msssim < 0.95  # the pair is neither alike nor unrelated
    expected = 0.84 * (1 - expected_msssim) + 0.16 * np.abs(x - y).mean()
    np.testing.assert_allclose(float(vqvae.l1_msssim_loss(x, y, (low, high))), expected,
                               rtol=1e-5)
    assert abs(float(vqvae.l1_msssim_loss(x, x, (low, high)))) < 1e-6


def test_msssim_terms_make_tf_images_msssim():
    rng = np.random.default_rng(0)
    x = tf.nn.avg_pool2d(rng.uniform(0, 1, (3, 64, 64, 1)).astype("float32"), 3, 1, "SAME")
    y = tf.clip_by_value(x + rng.normal(0, 0.05, x.shape).astype("float32"), 0, 1)
    factors = np.array([0.2, 0.3, 0.5], "float32")
    terms = vqvae.msssim_terms(x, y, 1.0, len(factors))
    np.testing.assert_allclose(np.prod(np.asarray(terms) ** factors, axis=-1),
                               tf.image.ssim_multiscale(x, y, 1.0, power_factors=factors),
                               atol=1e-5)


def test_normalised_msssim_has_finite_gradients_where_msssim_has_none():
    """tf.image's MS-SSIM clips a negative term at 0, where its power's gradient is infinite;
    the normalised terms keep the gradient finite, and identical images still score 1."""
    rng = np.random.default_rng(0)
    x = tf.nn.avg_pool2d(rng.uniform(0, 1, (2, 64, 64, 1)).astype("float32"), 3, 1, "SAME")
    inverted = tf.Variable(1 - x)
    factors = [0.2, 0.3, 0.5]
    for similarity, finite in [(vqvae.normalised_msssim, True),
                               (lambda a, b, top, f: tf.image.ssim_multiscale(
                                   a, b, top, power_factors=f), False)]:
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(similarity(inverted, x, 1.0, factors))
        assert np.all(np.isfinite(tape.gradient(value, inverted))) == finite
    np.testing.assert_allclose(vqvae.normalised_msssim(x, x, 1.0, factors), 1.0, rtol=1e-6)


def test_l1_msssim_trains_from_an_untrained_decoder():
    """Its gradients stay finite from the first step, where the reconstructions are flat."""
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, reconstruction="l1_msssim")
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(IMAGES, batch_size=2, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert history["reconstruction_loss"][-1] < history["reconstruction_loss"][0]


# ---------------------------------------------------------------------------------------------
# The spectral loss


def textured_brain(seed=0):
    """A bright disc with fine random texture on black, in PIXEL_RANGE: (1, 32, 32, 1)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE] / SIZE - 0.5
    brain = rows**2 + cols**2 < 0.35**2
    image = brain * (0.7 + 0.2 * rng.uniform(-1, 1, (SIZE, SIZE)))
    return (image + PIXEL_RANGE[0])[None, ..., None].astype("float32")


def box_blurred(images):
    """Each pixel replaced by the mean of its 3x3 neighbourhood (edges repeated)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return np.mean([padded[:, i:i + SIZE, j:j + SIZE] for i in range(3) for j in range(3)],
                   axis=0).astype("float32")


def test_spectral_loss_is_the_mean_log_amplitude_distance():
    x = textured_brain()
    y = box_blurred(x)
    amplitude = [np.log1p(np.abs(np.fft.fft2(image[0, ..., 0] - PIXEL_RANGE[0])) / SIZE)
                 for image in (x, y)]
    np.testing.assert_allclose(float(vqvae.spectral_loss(x, y, PIXEL_RANGE)),
                               np.abs(amplitude[0] - amplitude[1]).mean(), rtol=1e-4)
    assert float(vqvae.spectral_loss(x, x, PIXEL_RANGE)) == 0.0


def test_spectral_loss_sees_a_blur_that_mse_ranks_below_an_intensity_shift():
    """A 3x3 blur loses the texture; a brightening of every pixel moves only the mean. MSE
    calls the shift the larger error, the spectral loss the blur: the point of adding it."""
    x = textured_brain()
    blurred, brighter = box_blurred(x), x + 0.15

    def mse(y):
        return float(np.mean((x - y) ** 2))

    assert mse(brighter) > mse(blurred)
    assert (float(vqvae.spectral_loss(x, blurred, PIXEL_RANGE))
            > 10 * float(vqvae.spectral_loss(x, brighter, PIXEL_RANGE)))


def test_spectral_weight_adds_the_logged_spectral_loss():
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, data_variance=0.1, spectral_weight=0.5)
    reconstructions, terms = model.loss_terms(IMAGES, training=False)
    np.testing.assert_allclose(
        float(terms["spectral_loss"]),
        float(vqvae.spectral_loss(IMAGES, reconstructions, PIXEL_RANGE)))
    np.testing.assert_allclose(
        float(terms["loss"]),
        float(terms["reconstruction_loss"] + 0.5 * terms["spectral_loss"] + terms["vq_loss"]),
        rtol=1e-6)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    names = {"loss", "reconstruction_loss", "vq_loss", "spectral_loss"}
    assert set(model.train_step(IMAGES)) == set(model.test_step(IMAGES)) == names


# ---------------------------------------------------------------------------------------------
# VQGAN's discriminator


def test_hinge_losses_on_given_logits():
    real = np.array([[2.0, 0.5], [-1.0, 1.0]], "float32")
    fake = np.array([[-2.0, 0.0], [0.5, -0.5]], "float32")
    # relu(1 - real) = 0, 0.5, 2, 0; relu(1 + fake) = 0, 1, 1.5, 0.5
    assert float(vqvae.hinge_discriminator_loss(real, fake)) == 0.625 + 0.75
    assert float(vqvae.hinge_generator_loss(fake)) == 0.5


def test_adaptive_weight_is_clipped():
    assert float(vqvae.adaptive_weight(np.full(4, 3.0), np.zeros(4))) == vqvae.ADAPTIVE_WEIGHT_MAX
    np.testing.assert_allclose(float(vqvae.adaptive_weight(np.full(4, 3.0), np.full(4, 2.0))),
                               6 / (4 + 1e-4))


def test_the_discriminator_maps_patches_to_logits():
    model = adversarial_model()
    logits = model.discriminator(IMAGES)
    assert logits.shape == (4, SIZE // 8, SIZE // 8, 1) and logits.dtype == "float32"
    # its weights are its own optimizer's, not the compiled one's
    assert model.discriminator.trainable_weights
    ours = {id(w) for w in model.trainable_weights}
    assert not ours & {id(w) for w in model.discriminator.weights}
    assert ours == {id(w) for w in model.encoder.weights + model.quantizer.weights
                    + model.decoder.weights}
    assert [id(w) for w in model.trainable_variables] == [id(w) for w in model.trainable_weights]


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    """Checked against gradients taken here with a GradientTape, and the step's loss is eq. 3
    plus adversarial_weight * lambda * L_GAN."""
    keras.utils.set_random_seed(0)
    model = adversarial_model(optimizer=keras.optimizers.SGD(0.1))
    kernel = model.decoder.get_layer("to_image").kernel
    with tf.GradientTape(persistent=True) as tape:
        reconstructions = model(IMAGES, training=True)
        reconstruction = keras.ops.mean((IMAGES - reconstructions) ** 2) / 0.1
        generator = -keras.ops.mean(model.discriminator(reconstructions))
    ratio = (np.linalg.norm(tape.gradient(reconstruction, kernel))
             / (np.linalg.norm(tape.gradient(generator, kernel)) + 1e-4))
    vq_loss = float(keras.ops.sum(model.losses))
    logs = {name: float(value) for name, value in model.train_step(IMAGES).items()}
    assert 1e-3 < ratio < vqvae.ADAPTIVE_WEIGHT_MAX
    np.testing.assert_allclose(logs["adaptive_weight"], ratio, rtol=1e-5)
    np.testing.assert_allclose(logs["adversarial_loss"], float(generator), rtol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], float(reconstruction) + vq_loss + 0.8 * ratio * float(generator),
        rtol=1e-5)


def test_the_discriminator_trains_from_its_start_step():
    """Before discriminator_start its weights and Adam's moments stay as they are and the loss is
    eq. 3 alone; from it they move."""
    keras.utils.set_random_seed(0)
    model = adversarial_model(discriminator_start=2)
    initial = numpy_of(model.discriminator.weights)
    for step in range(2):
        model.reset_metrics()  # each step's logs its own
        logs = model.train_step(IMAGES)
        assert float(logs["loss"]) == float(logs["reconstruction_loss"] + logs["vq_loss"])
        assert_all_equal(numpy_of(model.discriminator.weights), initial)
        assert int(model.training_steps.numpy()) == step + 1
    assert not any(m.any() for m in adam_moments(model.discriminator_optimizer))
    model.reset_metrics()
    logs = model.train_step(IMAGES)
    assert float(logs["loss"]) != float(logs["reconstruction_loss"] + logs["vq_loss"])
    # every kernel moves (the last bias's hinge gradients cancel while all logits are within
    # the margins: -1 from the real patches, +1 from the reconstructed)
    kernels = [(a, b) for a, b in zip(numpy_of(model.discriminator.weights), initial) if a.ndim > 1]
    assert len(kernels) == len(vqvae.DISCRIMINATOR_FILTERS) + 1
    assert all(np.any(a != b) for a, b in kernels)


def test_adversarial_metrics_are_logged_and_validation_keeps_eq3():
    keras.utils.set_random_seed(0)
    model = adversarial_model(discriminator_start=1)
    history = model.fit(IMAGES, batch_size=2, epochs=2, verbose=0,
                        validation_data=(IMAGES,)).history
    adversarial = {"adversarial_loss", "discriminator_loss", "adaptive_weight"}
    eq3 = {"loss", "reconstruction_loss", "vq_loss"}
    assert set(history) == eq3 | adversarial | {f"val_{name}" for name in eq3}
    assert all(np.isfinite(values).all() for values in history.values())
    assert int(model.training_steps.numpy()) == 4


def test_save_load_keeps_the_discriminator_its_optimizer_and_the_step(tmp_path):
    """model.save / load_model: the discriminator's weights, its Adam's iterations and moments
    and the step count come back, and one more step after loading is the step without saving."""
    keras.utils.set_random_seed(0)
    model = adversarial_model(discriminator_start=1)
    for batch in (IMAGES[:2], IMAGES[2:]):
        model.train_step(batch)
    assert int(model.training_steps.numpy()) == 2
    assert int(model.discriminator_optimizer.iterations.numpy()) == 2
    assert all(m.any() for m in adam_moments(model.discriminator_optimizer) if m.ndim > 1)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert type(loaded) is vqvae.VQVAE and loaded.get_config() == model.get_config()
    assert_same_state(loaded, model)
    for each in (model, loaded):
        each.train_step(IMAGES[:2])
    assert discriminator_state(model)[2] == 3
    assert_same_state(loaded, model)


def test_backup_and_restore_resumes_the_discriminator(tmp_path):
    """save_weights / load_weights through BackupAndRestore, as a resumed run uses them: a fresh
    model resumed after one epoch ends its second epoch where the uninterrupted model does."""
    keras.utils.set_random_seed(0)
    model = adversarial_model()
    backup = str(tmp_path / "backup")
    model.fit(IMAGES, batch_size=2, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)])
    resumed = adversarial_model()
    resumed.fit(IMAGES, batch_size=2, epochs=2, shuffle=False, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(backup)])
    model.fit(IMAGES, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert discriminator_state(model)[2] == 4
    assert_same_state(resumed, model)


def test_config_round_trip():
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, reconstruction="l1_msssim",
                        spectral_weight=0.3, adversarial_weight=0.5, discriminator_start=7,
                        discriminator_learning_rate=1e-4)
    copy = vqvae.VQVAE.from_config(model.get_config())
    assert copy.get_config() == model.get_config()
    assert (copy.reconstruction, copy.spectral_weight, copy.adversarial_weight,
            copy.discriminator_start) == ("l1_msssim", 0.3, 0.5, 7)
    assert float(copy.discriminator_optimizer.learning_rate) == pytest.approx(1e-4)
    assert (copy.discriminator_optimizer.beta_1, copy.discriminator_optimizer.beta_2) == (0.5, 0.9)
    assert copy.discriminator.get_config() == model.discriminator.get_config()


# ---------------------------------------------------------------------------------------------
# Under tf.distribute

# One step of a model with a discriminator and the spectral loss, on two logical CPU devices and
# on one (MS-SSIM, a mean over each replica's images as MSE is, would only slow it), a check of
# conftest.mirrored_step_check: how far the step moved each model's weights and how far the two
# ways differ.
ONE_STEP_BOTH_WAYS = """
    import numpy as np
    import keras
    import vqvae

    def build():
        model = vqvae.VQVAE(8, 2, pixel_range=(-0.5, 0.5), spectral_weight=0.5,
                            adversarial_weight=0.8, discriminator_start=0,
                            discriminator_learning_rate=0.01)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        model(np.zeros((1, 32, 32, 1), "float32"))
        return model

    def state(model):
        return [*model.get_weights(), *map(np.array, model.discriminator_optimizer.variables)]

    def moved(weights, initial):
        return float(max(np.abs(np.array(a) - b).max() for a, b in zip(weights, initial)))

    x = np.random.default_rng(1).uniform(-0.5, 0.5, (4, 32, 32, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    single = build()
    initial = single.get_weights()
    initial_parts = [list(map(np.array, weights)) for weights in
                     (single.trainable_weights, single.discriminator.weights)]
    logs = single.fit(x, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    with strategy.scope():
        mirrored = build()
    mirrored.set_weights(initial)
    mirrored_logs = mirrored.fit(x, batch_size=4, epochs=1, shuffle=False, verbose=0).history
    return {
        "replicas": strategy.num_replicas_in_sync,
        "moved": [moved(weights, start) for weights, start in zip(
            (single.trainable_weights, single.discriminator.weights), initial_parts)],
        "gap": moved(state(mirrored), state(single)),
        "logs": [logs, mirrored_logs],
    }
"""


losses_one_step_both_ways = mirrored_step_check("losses", ONE_STEP_BOTH_WAYS)


def test_mirrored_step_matches_single_device_step(losses_one_step_both_ways):
    """The adaptive weight, both hinge losses and both optimizers' steps on the global batch."""
    results = losses_one_step_both_ways
    assert results["replicas"] == 2
    assert min(results["moved"]) > 1e-3, results  # both the autoencoder and the discriminator
    assert results["gap"] < 1e-5 * max(1.0, *results["moved"]), results
    single, mirrored = results["logs"]
    assert single.keys() == mirrored.keys()
    for name in single:
        np.testing.assert_allclose(mirrored[name], single[name], rtol=1e-5, err_msg=name)
