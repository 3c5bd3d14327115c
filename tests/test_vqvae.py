"""The VQ-VAE's math: nearest-code assignment, straight-through gradient, eq. 3, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import vqvae
from conftest import PIXEL_RANGE, assert_round_trip, smooth_blobs


def built_quantizer(num_embeddings=7, embedding_dim=3, beta=0.25, seed=0):
    quantizer = vqvae.VectorQuantizer(num_embeddings, embedding_dim, beta)
    quantizer.build((None, embedding_dim))
    codebook = np.random.default_rng(seed).normal(size=(num_embeddings, embedding_dim))
    quantizer.embeddings.assign(codebook.astype("float32"))
    return quantizer, codebook


def test_nearest_code_matches_brute_force():
    quantizer, codebook = built_quantizer()
    z_e = np.random.default_rng(1).normal(size=(2, 5, 4, 3)).astype("float32")
    distances = ((z_e[..., None, :] - codebook) ** 2).sum(-1)  # (2, 5, 4, K)
    np.testing.assert_array_equal(quantizer.code_indices(z_e).numpy(), distances.argmin(-1))
    np.testing.assert_allclose(quantizer(z_e).numpy(), codebook[distances.argmin(-1)], atol=1e-6)


def test_codebook_is_initialised_uniformly_and_trainable():
    quantizer = vqvae.VectorQuantizer(512, 4)
    quantizer.build((None, 4))
    values = quantizer.embeddings.numpy()
    assert np.abs(values).max() <= 1 / 512
    # distinct draws (a few may coincide: float32 uniforms take 2^23 values)
    assert len(np.unique(values)) > 0.99 * values.size
    assert quantizer.trainable_weights == [quantizer.embeddings]


def test_straight_through_gradient_is_identity():
    quantizer, _ = built_quantizer()
    z_e = tf.constant(np.random.default_rng(2).normal(size=(1, 3, 3, 3)).astype("float32"))
    upstream = tf.constant(np.random.default_rng(3).normal(size=(1, 3, 3, 3)).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(z_e)
        z_q = quantizer(z_e)
    np.testing.assert_allclose(tape.gradient(z_q, z_e, upstream).numpy(), upstream.numpy())


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.5])
def test_vq_loss_is_eq3_terms(beta):
    quantizer, codebook = built_quantizer(beta=beta)
    z_e = np.random.default_rng(4).normal(size=(2, 3, 3, 3)).astype("float32")
    quantizer(z_e)
    nearest = codebook[((z_e[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)]
    squared_error = ((z_e - nearest) ** 2).mean()
    # both terms have the same value; they differ in where the gradient flows
    np.testing.assert_allclose(float(sum(quantizer.losses)), (1 + beta) * squared_error, rtol=1e-5)


def test_vq_loss_gradients_flow_as_in_eq3():
    beta = 0.5
    quantizer, codebook = built_quantizer(beta=beta)
    z_e = tf.constant(np.random.default_rng(5).normal(size=(1, 2, 2, 3)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z_e)
        quantizer(z_e)
        loss = sum(quantizer.losses)
    nearest = codebook[((z_e.numpy()[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)]
    count = z_e.numpy().size
    # commitment term: d/dz_e of beta * mean((z_e - sg[e])^2)
    np.testing.assert_allclose(tape.gradient(loss, z_e).numpy(),
                               beta * 2 * (z_e.numpy() - nearest) / count, rtol=1e-4, atol=1e-7)
    # codebook term: d/de of mean((sg[z_e] - e)^2), summed over the vectors assigned to e
    expected = np.zeros_like(codebook)
    indices = quantizer.code_indices(z_e).numpy().ravel()
    for vector, index in zip(z_e.numpy().reshape(-1, 3), indices):
        expected[index] += 2 * (codebook[index] - vector) / count
    codebook_gradient = tf.convert_to_tensor(tape.gradient(loss, quantizer.embeddings))
    np.testing.assert_allclose(codebook_gradient.numpy(), expected,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("downsample", [vqvae.PAPER_DOWNSAMPLE, 8, 16])
def test_vqvae_shapes_and_codes(downsample):
    model = vqvae.VQVAE(num_embeddings=8, embedding_dim=2, pixel_range=PIXEL_RANGE,
                        downsample=downsample)
    images = np.zeros((2, 32, 64, 1), "float32")
    assert model(images).shape == (2, 32, 64, 1)
    codes = model.encode_to_indices(images)
    assert codes.shape == (2, 32 // downsample, 64 // downsample)
    assert model.decode_indices(codes).shape == (2, 32, 64, 1)


def test_downsampling_must_be_a_power_of_two():
    assert vqvae.downsampling_filters(vqvae.PAPER_DOWNSAMPLE) == (32, 64)  # the seed's
    with pytest.raises(ValueError, match="power of 2"):
        vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, downsample=6)


@pytest.mark.parametrize("downsample", [2, 4, 8, 16])
def test_the_decoder_mirrors_the_encoder(downsample):
    """Each upsampling outputs the channels the encoder's convolution at the resolution it
    reaches took in; at full resolution, where the encoder took in the image, FIRST_FILTERS."""
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, downsample=downsample)
    encoder, decoder = model.encoder, model.decoder
    halvings = len(vqvae.downsampling_filters(downsample))
    took_in = [encoder.get_layer(f"down{i + 1}").input.shape[-1] for i in range(halvings)]
    outputs = [decoder.get_layer(f"up{i + 1}").output.shape[-1] for i in range(halvings)]
    assert outputs == [*reversed(took_in[1:]), vqvae.FIRST_FILTERS]


def test_library_defaults_are_the_papers():
    """Section 3.2's beta, the 128x128 -> 32x32 grid, eq. 3's codebook term as printed (no
    division by the data variance); the EMA decay of appendix A.1."""
    config = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE).get_config()
    assert {name: config[name] for name in
            ("beta", "downsample", "quantizer", "data_variance", "ema_decay")} == dict(
        beta=0.25, downsample=4, quantizer="loss", data_variance=1.0, ema_decay=0.99)


def test_an_untrained_decoder_draws_the_black_background():
    model = vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE)
    images = np.random.default_rng(0).uniform(*PIXEL_RANGE, size=(2, 32, 32, 1))
    assert abs(float(np.mean(model(images))) - PIXEL_RANGE[0]) < 0.05


def test_training_reduces_loss():
    keras.utils.set_random_seed(0)
    images = smooth_blobs(8, 16, width=0.05) - 0.5
    model = vqvae.VQVAE(16, 4, pixel_range=PIXEL_RANGE, beta=0.25,
                        data_variance=float(images.var()))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, epochs=30, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "reconstruction_loss", "vq_loss"}
    assert history["loss"][-1] < 0.7 * history["loss"][0]


def test_save_load_round_trip(tmp_path):
    model = vqvae.VQVAE(8, 3, beta=0.7, data_variance=0.05, pixel_range=(-0.25, 0.75),
                        downsample=8)
    images = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, 16, 16, 1)).astype("float32")
    loaded = assert_round_trip(model, images, tmp_path)
    np.testing.assert_array_equal(model.encode_to_indices(images), loaded.encode_to_indices(images))
    assert (loaded.beta, loaded.data_variance, loaded.pixel_range, loaded.downsample) == (
        0.7, 0.05, (-0.25, 0.75), 8)


def test_reconstructions_are_clipped_with_a_straight_through_gradient():
    clip = vqvae.ClipToPixelRange(-0.5, 0.5)
    x = tf.constant([-0.9, -0.5, -0.2, 0.4, 0.5, 1.3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = clip(x)
        loss = tf.reduce_sum(y * tf.range(1.0, 7.0))
    np.testing.assert_allclose(y.numpy(), [-0.5, -0.5, -0.2, 0.4, 0.5, 0.5])
    # d loss / dx is the weight of each element, clipped or not
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), np.arange(1.0, 7.0))


# ---------------------------------------------------------------------------------------------
# The EMA codebook (appendix A.1) with restarts of unused codes (Jukebox, k-means++ seeding)


def ema_quantizer(codebook, counts, decay=0.9, restart_threshold=0.0, beta=0.25,
                  epsilon=vqvae.LAPLACE_EPSILON):
    """An EMAVectorQuantizer in a given state: codebook, EMA counts and sums consistent with
    them (sum = count * code)."""
    num_embeddings, embedding_dim = codebook.shape
    quantizer = vqvae.EMAVectorQuantizer(num_embeddings, embedding_dim, beta=beta, decay=decay,
                                         restart_threshold=restart_threshold, epsilon=epsilon)
    quantizer.build((None, embedding_dim))
    quantizer.embeddings.assign(codebook.astype("float32"))
    quantizer.ema_counts.assign(counts.astype("float32"))
    quantizer.ema_sums.assign((counts[:, None] * codebook).astype("float32"))
    return quantizer


def ema_step(codebook, counts, sums, z_e, decay, epsilon=vqvae.LAPLACE_EPSILON):
    """Appendix A.1 in numpy (float64): nearest codes, EMA of counts and sums, smoothed division."""
    flat = z_e.reshape(-1, codebook.shape[1])
    nearest = ((flat[:, None] - codebook) ** 2).sum(-1).argmin(1)
    assigned = np.zeros_like(sums)
    np.add.at(assigned, nearest, flat)
    counts = decay * counts + (1 - decay) * np.bincount(nearest, minlength=len(codebook))
    sums = decay * sums + (1 - decay) * assigned
    total = counts.sum()
    smoothed = (counts + epsilon) / (total + len(codebook) * epsilon) * total
    return sums / smoothed[:, None], counts, sums


def restart_step(codebook, counts, sums, vectors, threshold, decay):
    """The dead-code restart in numpy: codes counted below the threshold move to `vectors`
    and enter with the count that one update decays to the threshold."""
    dead = counts < threshold
    entry = threshold / decay
    return (np.where(dead[:, None], vectors, codebook), np.where(dead, entry, counts),
            np.where(dead[:, None], entry * vectors, sums), dead)


def quantizer_state(quantizer):
    return {weight.name: weight.numpy().copy() for weight in quantizer.weights}


def test_ema_update_matches_numpy_after_one_and_two_steps():
    rng = np.random.default_rng(0)
    codebook = rng.normal(size=(6, 3))
    codebook[-1] = 10.0  # far from every output: only decays
    counts = rng.uniform(0.5, 3.0, size=6)
    sums = counts[:, None] * codebook
    # a large epsilon, so that a missing or wrong Laplace smoothing shows
    quantizer = ema_quantizer(codebook, counts, decay=0.9, epsilon=0.1)
    for step in range(2):
        z_e = rng.normal(size=(2, 3, 4, 3)).astype("float32")
        z_q = quantizer(z_e, training=True).numpy()
        # the output is quantized with the codebook the indices were chosen from
        nearest = ((z_e[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
        np.testing.assert_allclose(z_q, codebook[nearest], atol=1e-5)
        assert (nearest != len(codebook) - 1).all()
        codebook, counts, sums = ema_step(codebook, counts, sums, z_e, decay=0.9, epsilon=0.1)
        np.testing.assert_allclose(quantizer.ema_counts.numpy(), counts, rtol=1e-5)
        np.testing.assert_allclose(quantizer.ema_sums.numpy(), sums, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(quantizer.embeddings.numpy(), codebook, rtol=1e-5, atol=1e-6)
        assert int(quantizer.updates.numpy()) == step + 1
    assert int(quantizer.restarts.numpy()) == 0  # threshold 0 never restarts


def test_unused_code_is_restarted_to_a_batch_vector():
    rng = np.random.default_rng(1)
    # codes 0-2 sit in the data, code 3 far away where no encoder output goes
    codebook = np.array([[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [50.0, 50.0]])
    counts = np.full(4, 3.0)
    sums = counts[:, None] * codebook
    quantizer = ema_quantizer(codebook, counts, decay=0.5, restart_threshold=1.0)

    def near_used_codes():
        return (np.repeat(codebook[:3], 8, axis=0)
                + rng.normal(scale=0.1, size=(24, 2))).reshape(2, 3, 4, 2).astype("float32")

    # code 3's count 3 decays to 1.5 (kept), then to 0.75 < 1: restarted in the second step
    for step, restarts in enumerate([0, 1]):
        z_e = near_used_codes()
        quantizer(z_e, training=True)
        codebook, counts, sums = ema_step(codebook, counts, sums, z_e, decay=0.5)
        assert int(quantizer.restarts.numpy()) == restarts
        # used codes follow the moving averages, never a restart
        np.testing.assert_allclose(quantizer.embeddings.numpy()[:3], codebook[:3], rtol=1e-5)
        np.testing.assert_allclose(quantizer.ema_counts.numpy()[:3], counts[:3], rtol=1e-5)
    restarted = quantizer.embeddings.numpy()[3]
    assert np.all(restarted == z_e.reshape(-1, 2), axis=1).any(), restarted
    # it enters with the count that decays to the threshold, and the matching sum
    entry = quantizer.ema_counts.numpy()[3]
    np.testing.assert_allclose(entry, 1.0 / 0.5)
    np.testing.assert_allclose(quantizer.ema_sums.numpy()[3], entry * restarted, rtol=1e-6)

    # outputs exactly on codes 0-2 give the restarted code nothing: it survives one such step
    # (its vector only moves by the Laplace smoothing) and is restarted in the next
    on_used_codes = np.tile(quantizer.embeddings.numpy()[:3], (8, 1)).reshape(2, 3, 4, 2)
    quantizer(on_used_codes, training=True)
    assert int(quantizer.restarts.numpy()) == 1
    np.testing.assert_allclose(quantizer.embeddings.numpy()[3], restarted, rtol=1e-4)
    quantizer(on_used_codes, training=True)
    assert int(quantizer.restarts.numpy()) == 2
    assert np.all(quantizer.embeddings.numpy()[3] == on_used_codes.reshape(-1, 2), axis=1).any()


def test_ema_step_with_restarts_matches_numpy():
    rng = np.random.default_rng(4)
    codebook = rng.normal(size=(8, 3))
    counts = np.array([4.0, 3.0, 2.5, 0.5, 0.0, 6.0, 0.2, 5.0])
    sums = counts[:, None] * codebook
    quantizer = ema_quantizer(codebook, counts, decay=0.8, restart_threshold=2.0, epsilon=0.1)
    z_e = rng.normal(size=(2, 3, 4, 3)).astype("float32")
    quantizer(z_e, training=True)
    flat = z_e.reshape(-1, 3)
    ema_codebook, counts, sums = ema_step(codebook, counts, sums, z_e, decay=0.8, epsilon=0.1)
    # which rows the restarts drew is the seeded draw's; each is a row of the batch
    drawn = quantizer.embeddings.numpy()
    codebook, counts, sums, dead = restart_step(ema_codebook, counts, sums, drawn,
                                                threshold=2.0, decay=0.8)
    assert 0 < dead.sum() < len(dead), counts
    assert all(np.all(drawn[i] == flat, axis=1).any() for i in np.flatnonzero(dead)), drawn
    assert int(quantizer.restarts.numpy()) == dead.sum()
    np.testing.assert_allclose(quantizer.embeddings.numpy(), codebook, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(quantizer.ema_counts.numpy(), counts, rtol=1e-5)
    np.testing.assert_allclose(quantizer.ema_sums.numpy(), sums, rtol=1e-5, atol=1e-6)


def test_on_one_device_the_global_batch_is_the_batch():
    values = np.arange(6.0, dtype="float32").reshape(3, 2)
    batch, column = vqvae.global_batch((values, values[:, 0]))
    np.testing.assert_array_equal(batch, values)
    np.testing.assert_array_equal(column, values[:, 0])
    np.testing.assert_array_equal(vqvae.cross_replica_sum(values), values)


def test_restarts_go_where_the_codebook_quantizes_worst():
    """Restarted codes are drawn in proportion to the squared quantization error: outputs that a
    code already represents exactly (a black background) are never drawn, however many."""
    codebook = np.array([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [60.0, 60.0]])
    background = np.zeros((22, 2))  # exactly code 0
    brain = np.array([[1.5, 1.0], [1.0, 3.0]])  # code 1's, squared errors 0.25 and 4
    z_e = np.concatenate([background, brain]).reshape(2, 3, 4, 2).astype("float32")
    draws = []
    for seed in range(20):
        # codes 2 and 3 are dead and restart in this step
        quantizer = ema_quantizer(codebook, np.array([3.0, 3.0, 0.0, 0.0]), decay=0.5,
                                  restart_threshold=1.0)
        quantizer.updates.assign(seed)  # which seeds the draw
        quantizer(z_e, training=True)
        draws.extend(map(tuple, quantizer.embeddings.numpy()[2:]))
    assert set(draws) <= {(1.5, 1.0), (1.0, 3.0)}, set(draws)
    # 4 : 0.25, so the larger error is drawn about 16 times as often
    assert draws.count((1.0, 3.0)) > 30, draws


def test_inference_call_changes_nothing():
    rng = np.random.default_rng(2)
    quantizer = ema_quantizer(rng.normal(size=(5, 2)), np.full(5, 0.5), restart_threshold=1.0)
    z_e = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    before = quantizer_state(quantizer)
    quantizer(z_e, training=False)
    quantizer(z_e)
    quantizer.code_indices(z_e)
    for name, value in quantizer_state(quantizer).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    # the same call in training mode would have changed every part of the state
    quantizer(z_e, training=True)
    after = quantizer_state(quantizer)
    assert all(np.any(after[name] != before[name]) for name in before), after


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.5])
def test_ema_loss_is_the_commitment_term_with_a_straight_through_gradient(beta):
    rng = np.random.default_rng(3)
    codebook = rng.normal(size=(7, 3))
    quantizer = ema_quantizer(codebook, np.ones(7), beta=beta)
    assert quantizer.trainable_weights == []
    z_e = tf.constant(rng.normal(size=(2, 2, 3, 3)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, 2, 3, 3)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z_e)
        z_q = quantizer(z_e, training=True)
        loss = sum(quantizer.losses)
    nearest = codebook[((z_e.numpy()[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)]
    # beta * mean((z_e - sg[e])^2) alone: no codebook term
    assert len(quantizer.losses) == 1
    np.testing.assert_allclose(float(loss), beta * ((z_e.numpy() - nearest) ** 2).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss, z_e).numpy(),
                               beta * 2 * (z_e.numpy() - nearest) / z_e.numpy().size,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tape.gradient(z_q, z_e, upstream).numpy(), upstream.numpy())


def test_vqvae_refuses_an_unknown_quantizer():
    with pytest.raises(ValueError, match="quantizer"):
        vqvae.VQVAE(8, 2, pixel_range=PIXEL_RANGE, quantizer="kmeans")


def test_ema_vqvae_logs_cumulative_restarts():
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(16, 2, pixel_range=PIXEL_RANGE, quantizer="ema", ema_decay=0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (8, 16, 16, 1)).astype("float32")
    history = model.fit(images, epochs=2, batch_size=4, verbose=0).history
    assert set(history) == {"loss", "reconstruction_loss", "vq_loss", "restarts"}
    assert isinstance(model.quantizer, vqvae.EMAVectorQuantizer)
    assert 0 < history["restarts"][0] <= history["restarts"][1]
    assert history["restarts"][-1] == int(model.quantizer.restarts.numpy())
    assert int(model.quantizer.updates.numpy()) == 4


def test_ema_vqvae_save_load_round_trip_keeps_the_codebook_state(tmp_path):
    keras.utils.set_random_seed(0)
    model = vqvae.VQVAE(8, 3, pixel_range=PIXEL_RANGE, quantizer="ema", ema_decay=0.8,
                        restart_threshold=0.5)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    images = np.random.default_rng(0).uniform(-0.5, 0.5, (8, 16, 16, 1)).astype("float32")
    model.fit(images, epochs=1, batch_size=2, verbose=0)
    state = quantizer_state(model.quantizer)
    assert state["updates"] == 4 and state["restarts"] > 0 and state["ema_counts"].any()
    loaded = assert_round_trip(model, images, tmp_path)
    assert isinstance(loaded.quantizer, vqvae.EMAVectorQuantizer)
    assert (loaded.quantizer.decay, loaded.quantizer.restart_threshold) == (0.8, 0.5)
    for name, value in quantizer_state(loaded.quantizer).items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
