"""The VQ-VAE's math: nearest-code assignment, straight-through gradient, eq. 3, serialization."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import vqvae
from conftest import PIXEL_RANGE


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


def test_vqvae_shapes_and_codes():
    model = vqvae.VQVAE(num_embeddings=8, embedding_dim=2, pixel_range=PIXEL_RANGE)
    images = np.zeros((2, 32, 32, 1), "float32")
    assert model(images).shape == (2, 32, 32, 1)
    codes = model.encode_to_indices(images)
    assert codes.shape == (2, 32 // vqvae.DOWNSAMPLING, 32 // vqvae.DOWNSAMPLING)
    assert model.decode_indices(codes).shape == (2, 32, 32, 1)


def test_training_reduces_loss():
    keras.utils.set_random_seed(0)
    # smooth blobs: structure an autoencoder can learn, unlike white noise
    rows, cols = np.mgrid[:16, :16] / 16
    centres = np.random.default_rng(0).uniform(0.3, 0.7, size=(8, 2))
    images = np.exp(-((rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2) / 0.05)
    images = (images[..., None] - 0.5).astype("float32")
    model = vqvae.VQVAE(16, 4, pixel_range=PIXEL_RANGE, beta=0.25,
                        data_variance=float(images.var()))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(images, epochs=30, batch_size=8, verbose=0).history
    assert set(history) == {"loss", "reconstruction_loss", "vq_loss"}
    assert history["loss"][-1] < 0.7 * history["loss"][0]


def test_save_load_round_trip(tmp_path):
    model = vqvae.VQVAE(8, 3, beta=0.7, data_variance=0.05, pixel_range=(-0.25, 0.75))
    images = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, 16, 16, 1)).astype("float32")
    model(images)
    model.save(tmp_path / "vqvae.keras")
    loaded = keras.models.load_model(tmp_path / "vqvae.keras", safe_mode=True)
    np.testing.assert_array_equal(model(images).numpy(), loaded(images).numpy())
    np.testing.assert_array_equal(model.encode_to_indices(images), loaded.encode_to_indices(images))
    assert (loaded.beta, loaded.data_variance, loaded.pixel_range) == (0.7, 0.05, (-0.25, 0.75))


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
