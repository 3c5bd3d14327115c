"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

An encoder maps an image x to z_e(x); the `VectorQuantizer` replaces every D-vector of z_e(x) by
its nearest codebook vector e_k, giving z_q(x); a decoder maps z_q(x) back to an image. Training
minimises eq. 3 of the paper:

    L = ||x - D(z_q(x))||^2 + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2

with the straight-through estimator carrying the decoder's gradient past the argmin.
"""

import keras
import tensorflow as tf
from keras import layers, ops

PACKAGE = "brain_vqvae"

# The seed's encoder: two stride-2 3x3 convolutions (32 then 64 filters), so the code grid is
# the image downsampled by 4 in each direction.
ENCODER_FILTERS = (32, 64)
DOWNSAMPLING = 2 ** len(ENCODER_FILTERS)
# Residual 3x3 blocks after the strided convolutions (section 4.1 of the paper uses two).
RESIDUAL_BLOCKS = 2
# The commitment weight of the paper (section 3.2); driver.py's --beta defaults to the seed's.
PAPER_BETA = 0.25


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(layers.Layer):
    """Nearest-neighbour lookup into a learned codebook of K vectors of size D.

    Args:
        num_embeddings: K, the number of codebook vectors.
        embedding_dim: D, the size of each codebook vector (the encoder's channel count).
        beta: weight of the commitment loss in eq. 3 (the paper's 0.25 by default).

    Calling the layer on z_e of shape (..., D) returns z_q of the same shape and adds
    `codebook_loss + beta * commitment_loss` to `self.losses`.
    """

    def __init__(self, num_embeddings, embedding_dim, beta=PAPER_BETA, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.num_embeddings, self.embedding_dim),
            initializer=keras.initializers.RandomUniform(
                -1.0 / self.num_embeddings, 1.0 / self.num_embeddings
            ),
            trainable=True,
        )

    def code_indices(self, z_e):
        """Index of the nearest codebook vector (Euclidean) for every D-vector of z_e."""
        flat = ops.reshape(z_e, (-1, self.embedding_dim))  # (B, H, W, D) -> (B*H*W, D)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, without materialising every difference.
        distances = (
            ops.sum(flat**2, axis=1, keepdims=True)
            - 2 * ops.matmul(flat, ops.transpose(self.embeddings))
            + ops.sum(self.embeddings**2, axis=1)
        )
        indices = ops.argmin(distances, axis=1)
        return ops.reshape(indices, ops.shape(z_e)[:-1])  # (B*H*W,) -> (B, H, W)

    def lookup(self, indices):
        """The codebook vectors e_k for integer codes k: (...,) -> (..., D)."""
        return ops.take(self.embeddings, ops.cast(indices, "int32"), axis=0)

    def call(self, z_e):
        quantized = self.lookup(self.code_indices(z_e))
        # Eq. 3: the codebook term moves e towards the encoder output, the commitment term keeps
        # the encoder output close to the codebook it chose.
        codebook_loss = ops.mean((ops.stop_gradient(z_e) - quantized) ** 2)
        commitment_loss = ops.mean((z_e - ops.stop_gradient(quantized)) ** 2)
        self.add_loss(codebook_loss + self.beta * commitment_loss)
        # Straight-through estimator: the forward pass gives z_q, the backward pass copies the
        # decoder's gradient to z_e unchanged.
        return z_e + ops.stop_gradient(quantized - z_e)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim, beta=self.beta
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClipToPixelRange(layers.Layer):
    """Clips the decoder's output to the range the scaled pixels can take, passing gradients
    straight through.

    On skull-stripped slices most pixels are the black background, the range's minimum. An
    unclipped decoder leaves a small offset there, and SSIM, whose constants are about 1% of the
    range, halves on a 1% offset in a flat region. Clipped, every output below the minimum is
    exactly black. The straight-through gradient still pulls a brain pixel out of the clipped
    region, which a plain clip (zero gradient there) would leave stuck.
    """

    def __init__(self, low, high, **kwargs):
        super().__init__(**kwargs)
        self.low = low
        self.high = high

    def call(self, x):
        return x + ops.stop_gradient(ops.clip(x, self.low, self.high) - x)

    def get_config(self):
        config = super().get_config()
        config.update(low=self.low, high=self.high)
        return config


def residual_block(x, filters, name):
    """ReLU, 3x3 conv, ReLU, 1x1 conv, added to the input (section 4.1 of the paper)."""
    h = layers.ReLU(name=f"{name}_relu1")(x)
    h = layers.Conv2D(filters, 3, padding="same", name=f"{name}_conv3x3")(h)
    h = layers.ReLU(name=f"{name}_relu2")(h)
    h = layers.Conv2D(filters, 1, name=f"{name}_conv1x1")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def build_encoder(embedding_dim):
    """Image (B, H, W, 1) -> z_e (B, H/4, W/4, D); any H and W divisible by 4."""
    images = keras.Input(shape=(None, None, 1), name="images")
    x = images
    for i, filters in enumerate(ENCODER_FILTERS):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"down{i + 1}")(x)
        if i < len(ENCODER_FILTERS) - 1:
            x = layers.ReLU(name=f"down{i + 1}_relu")(x)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, ENCODER_FILTERS[-1], name=f"res{i + 1}")
    x = layers.ReLU(name="out_relu")(x)
    z_e = layers.Conv2D(embedding_dim, 1, name="to_latent")(x)
    return keras.Model(images, z_e, name="encoder")


def build_decoder(embedding_dim, pixel_range):
    """z_q (B, h, w, D) -> image (B, 4h, 4w, 1) in pixel_range; mirrors the encoder with
    transposed convs."""
    latents = keras.Input(shape=(None, None, embedding_dim), name="latents")
    x = layers.Conv2D(ENCODER_FILTERS[-1], 3, padding="same", name="from_latent")(latents)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, ENCODER_FILTERS[-1], name=f"res{i + 1}")
    for i, filters in enumerate(reversed(ENCODER_FILTERS)):
        x = layers.ReLU(name=f"up{i + 1}_relu")(x)
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", name=f"up{i + 1}")(x)
    x = layers.ReLU(name="out_relu")(x)
    # float32 output keeps the loss exact under a mixed-precision policy
    x = layers.Conv2D(1, 3, padding="same", dtype="float32", name="to_image")(x)
    images = ClipToPixelRange(*pixel_range, dtype="float32", name="clip")(x)
    return keras.Model(latents, images, name="decoder")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """Encoder, vector quantizer and decoder, trained on eq. 3.

    Args:
        num_embeddings: K, the codebook size.
        embedding_dim: D, the size of each code vector.
        pixel_range: (low, high) of the scaled pixels; reconstructions are clipped to it.
        beta: commitment weight of eq. 3 (the paper's 0.25 by default).
        data_variance: pixel variance of the training split; the reconstruction MSE is divided by
            it so the loss scale does not depend on the intensity range (as in the paper's code).
    """

    def __init__(self, num_embeddings, embedding_dim, *, pixel_range, beta=PAPER_BETA,
                 data_variance=1.0, **kwargs):
        super().__init__(**kwargs)
        self.pixel_range = tuple(pixel_range)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.data_variance = data_variance
        self.encoder = build_encoder(embedding_dim)
        # float32 even under mixed precision: nearest-code distances need the precision
        self.quantizer = VectorQuantizer(
            num_embeddings, embedding_dim, beta, dtype="float32", name="quantizer"
        )
        self.decoder = build_decoder(embedding_dim, self.pixel_range)
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.vq_loss_tracker = keras.metrics.Mean(name="vq_loss")

    def call(self, images, training=False):
        return self.decoder(self.quantizer(self.encoder(images, training=training)))

    def encode_to_indices(self, images):
        """Images (B, H, W, 1) -> code maps (B, H/4, W/4) of integers in [0, K)."""
        return self.quantizer.code_indices(self.encoder(images))

    def decode_indices(self, indices):
        """Code maps (B, h, w) -> images (B, 4h, 4w, 1)."""
        return self.decoder(self.quantizer.lookup(indices))

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.vq_loss_tracker]

    def eq3_losses(self, images, training):
        """Total loss of eq. 3 and its two parts: reconstruction and the quantizer's terms."""
        reconstructions = self(images, training=training)
        reconstruction_loss = ops.mean((images - reconstructions) ** 2) / self.data_variance
        vq_loss = ops.sum(self.losses)
        return reconstruction_loss + vq_loss, reconstruction_loss, vq_loss

    def _track(self, total_loss, reconstruction_loss, vq_loss):
        self.total_loss_tracker.update_state(total_loss)
        self.reconstruction_loss_tracker.update_state(reconstruction_loss)
        self.vq_loss_tracker.update_state(vq_loss)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, images):
        with tf.GradientTape() as tape:
            total_loss, reconstruction_loss, vq_loss = self.eq3_losses(images, training=True)
            # Replicas' gradients are summed under tf.distribute, so each replica's mean loss is
            # divided by the replica count to give the gradient of the global-batch mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(total_loss / replicas)
        gradients = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._track(total_loss, reconstruction_loss, vq_loss)

    def test_step(self, images):
        return self._track(*self.eq3_losses(images, training=False))

    def get_config(self):
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "beta": self.beta,
            "data_variance": self.data_variance,
            "pixel_range": self.pixel_range,
            "name": self.name,
        }
