"""VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning").

An encoder maps an image x to z_e(x); the `VectorQuantizer` replaces every D-vector of z_e(x) by
its nearest codebook vector e_k, giving z_q(x); a decoder maps z_q(x) back to an image. Training
minimises eq. 3 of the paper:

    L = ||x - D(z_q(x))||^2 + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2

with the straight-through estimator carrying the decoder's gradient past the argmin
(`VQVAE.eq3_losses` divides the reconstruction term by the data variance).
`EMAVectorQuantizer` instead moves the codebook by exponential moving averages (the paper's
appendix A.1) and restarts codes that fall out of use (Jukebox, Dhariwal et al. 2020) where the
codebook quantizes worst (k-means++'s seeding), so only the
commitment term of eq. 3 remains a loss.
"""

import math

import keras
import tensorflow as tf
from keras import layers, ops

PACKAGE = "brain_vqvae"

# The library's defaults are the paper's (driver.py's flags choose others); the rest are named
# for where they come from.
# The paper's code grid: its 128x128 images -> 32x32 codes, downsampling 4 in each direction.
PAPER_DOWNSAMPLE = 4
# The seed's encoder: two stride-2 3x3 convolutions (32 then 64 filters) for the paper's
# downsampling 4; a coarser grid adds stride-2 convolutions of 64 filters.
FIRST_FILTERS, FILTERS = 32, 64
# Residual 3x3 blocks after the strided convolutions (section 4.1 of the paper uses two).
RESIDUAL_BLOCKS = 2
# The commitment weight of the paper (section 3.2).
PAPER_BETA = 0.25
# The paper's main text learns the codebook by eq. 3's codebook term; "ema" is its appendix A.1.
QUANTIZERS = ("loss", "ema")
PAPER_QUANTIZER = "loss"
# The EMA codebook's decay gamma (appendix A.1 of the paper and sonnet's VectorQuantizerEMA).
PAPER_EMA_DECAY = 0.99
# Sonnet's Laplace smoothing of the EMA counts: keeps an unused code's count above zero.
LAPLACE_EPSILON = 1e-5
# Ours, not the paper's (it has no restarts; Jukebox restarts below 1): a code whose EMA count
# (its vectors per batch, averaged over about 1 / (1 - decay) batches) falls below this is
# restarted. A code that gets a few of a batch's thousands of vectors carries almost no
# information, and codes that rare went missing from the 256x256 test split; restarting them
# used more of the codebook and reconstructed the test split better (README, "What we tried").
# The count averages a live code's Poisson noise over many batches, so a code used a little more
# than this per batch is not restarted by chance.
RESTART_THRESHOLD = 4.0
# Added to the squared errors that weight the restarts' draw: keeps their logarithm finite.
TINY_ERROR = 1e-12


def codebook_initializer(num_embeddings):
    return keras.initializers.RandomUniform(-1.0 / num_embeddings, 1.0 / num_embeddings)


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
            initializer=codebook_initializer(self.num_embeddings),
            trainable=True,
        )

    def code_indices(self, z_e):
        """Index of the nearest codebook vector (Euclidean) for every D-vector of z_e."""
        # A direct call is not autocast: a mixed-precision encoder's float16 output meets the
        # codebook's dtype here.
        z_e = ops.cast(z_e, self.compute_dtype)
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


def replica_context():
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError("an EMA codebook update under a tf.distribute strategy must run "
                           "in strategy.run (as fit does), where each replica has its share")
    return context


def cross_replica_sum(values):
    """A (nest of) tensor(s) summed over the replicas of a tf.distribute strategy, the same on
    every replica; on one device, the values. Each replica holds a share of the batch, and the
    codebook follows the global batch, so its statistics are aggregated across replicas
    explicitly."""
    return replica_context().all_reduce("sum", values)


def global_batch(shares):
    """Every replica's share of the batch, concatenated in replica order: (n_r, ...) -> (sum_r
    n_r, ...) for each tensor of `shares`, the same on every replica. Shares may differ in size
    (the last batch of an epoch) or be empty."""
    context = replica_context()
    replicas, replica = context.num_replicas_in_sync, context.replica_id_in_sync_group
    size = ops.shape(tf.nest.flatten(shares)[0])[0]
    # (replicas,) row counts; this replica holds global rows before .. before + size - 1
    sizes = cross_replica_sum(ops.one_hot(replica, replicas, dtype="int32") * size)
    before = ops.sum(ops.where(ops.arange(replicas) < replica, sizes, 0))
    after = ops.sum(sizes) - before - size

    def padded(share):  # zeros where the other replicas' rows go, which their sum fills exactly
        return ops.pad(share, [[before, after]] + [[0, 0]] * (len(share.shape) - 1))

    return cross_replica_sum(tf.nest.map_structure(padded, shares))


@keras.saving.register_keras_serializable(package=PACKAGE)
class EMAVectorQuantizer(VectorQuantizer):
    """A `VectorQuantizer` whose codebook follows exponential moving averages of the encoder
    outputs assigned to each code (appendix A.1 of the paper, sonnet's VectorQuantizerEMA), with
    restarts of codes that fall out of use (Jukebox) at encoder outputs drawn in proportion to
    their squared quantization error (k-means++'s seeding).

    Args:
        num_embeddings: K, the number of codebook vectors.
        embedding_dim: D, the size of each codebook vector.
        beta: weight of the commitment loss (the paper's 0.25 by default).
        decay: gamma of the moving averages (the paper's 0.99 by default).
        restart_threshold: a code whose EMA count of vectors per batch falls below this is moved
            to an encoder output of the batch (see `restart_vectors`); 0 never restarts.
        epsilon: Laplace smoothing of the EMA counts.

    Calling the layer with training=True updates the codebook from the (global) batch; calling it
    returns z_q and adds `beta * commitment_loss` to `self.losses`. The codebook, the EMA counts
    N_i and sums m_i, the number of updates and the cumulative number of restarts are
    non-trainable weights, so they are saved and restored with the model.
    """

    def __init__(self, num_embeddings, embedding_dim, beta=PAPER_BETA, decay=PAPER_EMA_DECAY,
                 restart_threshold=RESTART_THRESHOLD, epsilon=LAPLACE_EPSILON, **kwargs):
        super().__init__(num_embeddings, embedding_dim, beta, **kwargs)
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if restart_threshold < 0:
            raise ValueError(f"restart_threshold must be >= 0, got {restart_threshold}")
        self.decay = decay
        self.restart_threshold = restart_threshold
        self.epsilon = epsilon

    def build(self, input_shape):
        # Every replica computes the same update from all-reduced statistics, so the first
        # replica's value is everyone's.
        state = dict(trainable=False, aggregation="only_first_replica")
        shape = (self.num_embeddings, self.embedding_dim)
        self.embeddings = self.add_weight(
            name="embeddings", shape=shape,
            initializer=codebook_initializer(self.num_embeddings), **state)
        # Zero statistics: the first update sets each surviving code to the mean of its vectors
        # and restarts the others, a codebook initialised from the first batch.
        self.ema_counts = self.add_weight(
            name="ema_counts", shape=(self.num_embeddings,), initializer="zeros", **state)
        self.ema_sums = self.add_weight(name="ema_sums", shape=shape, initializer="zeros", **state)
        self.updates = self.add_weight(
            name="updates", shape=(), dtype="int64", initializer="zeros", **state)
        self.restarts = self.add_weight(
            name="restarts", shape=(), dtype="int64", initializer="zeros", **state)

    def call(self, z_e, training=False):
        indices = self.code_indices(z_e)
        quantized = self.lookup(indices)  # the codebook the indices were chosen from
        if training:
            self.update_codebook(z_e, indices)
        # Of eq. 3 only the commitment term is a loss: the moving averages replace the codebook
        # term.
        commitment_loss = ops.mean((z_e - ops.stop_gradient(quantized)) ** 2)
        self.add_loss(self.beta * commitment_loss)
        return z_e + ops.stop_gradient(quantized - z_e)

    def update_codebook(self, z_e, indices):
        """One EMA step (appendix A.1) on the global batch, then the dead-code restart."""
        flat = ops.reshape(z_e, (-1, self.embedding_dim))  # (B, h, w, D) -> (B*h*w, D)
        indices = ops.reshape(indices, (-1,))  # (B, h, w) -> (B*h*w,)
        counts, sums = self.moving_averages(flat, indices)
        codebook = sums / self.laplace_smoothed(counts)[:, None]  # e_i = m_i / N_i
        # ||z_e - e_k||^2 to the codebook the indices were chosen from, before it moves
        errors = ops.sum((flat - self.lookup(indices)) ** 2, axis=-1)
        codebook, counts, sums, dead = self.restart_dead_codes(
            codebook, counts, sums, flat, errors)
        self.embeddings.assign(codebook)
        self.ema_counts.assign(counts)
        self.ema_sums.assign(sums)
        self.restarts.assign_add(ops.sum(ops.cast(dead, "int64")))
        self.updates.assign_add(1)

    def moving_averages(self, flat, indices):
        """Appendix A.1: N_i = gamma N_i + (1 - gamma) n_i and m_i = gamma m_i + (1 - gamma)
        sum_j z_ij, with n_i the number of encoder outputs z_ij nearest to code i in the global
        batch."""
        n, z_sum = cross_replica_sum((
            ops.segment_sum(ops.ones_like(flat[:, 0]), indices, self.num_embeddings),
            ops.segment_sum(flat, indices, self.num_embeddings),
        ))
        counts = self.decay * self.ema_counts + (1 - self.decay) * n
        sums = self.decay * self.ema_sums + (1 - self.decay) * z_sum
        return counts, sums

    def laplace_smoothed(self, counts):
        """Sonnet's Laplace smoothing of the counts N_i: none is zero, and they still sum to N."""
        total = ops.sum(counts)
        return (counts + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total

    def restart_dead_codes(self, codebook, counts, sums, flat, errors):
        """Jukebox's restarts: a code whose count fell below the threshold moves to an encoder
        output of the batch (`restart_vectors`). Returns the codebook, counts and sums after the
        restarts, and which codes restarted."""
        # A restarted code enters with the count that one update decays to the threshold (and
        # the matching sum), so it survives its next update even if that batch gives it no
        # vector; comparing against decay * entry_count rather than the threshold keeps that
        # true under float32 rounding.
        entry_count = ops.convert_to_tensor(self.restart_threshold / self.decay, "float32")
        dead = counts < self.decay * entry_count
        vectors = self.restart_vectors(flat, errors)
        return (ops.where(dead[:, None], vectors, codebook),
                ops.where(dead, entry_count, counts),
                ops.where(dead[:, None], entry_count * vectors, sums),
                dead)

    def restart_vectors(self, flat, errors):
        """K rows of the global batch's (B*h*w, D) encoder outputs, each drawn with probability
        proportional to its squared quantization error (k-means++'s seeding), the same rows on
        every replica. Jukebox draws uniformly; on brain slices most outputs are background,
        which one code already represents, and a code restarted there dies again."""
        flat, errors = global_batch((flat, errors))
        # Seeded by the update count, which every replica shares, so all draw the same rows.
        # A batch quantized exactly (all errors 0) draws uniformly.
        seed = ops.stack([self.updates.value, ops.zeros((), "int64")])
        log_weights = ops.log(errors + TINY_ERROR)[None]  # (1, B*h*w)
        rows = tf.random.stateless_categorical(
            log_weights, self.num_embeddings, seed, dtype="int32")[0]
        return ops.take(flat, rows, axis=0)  # (B*h*w, D) -> (K, D)

    def get_config(self):
        config = super().get_config()
        config.update(
            decay=self.decay, restart_threshold=self.restart_threshold, epsilon=self.epsilon
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


def downsampling_filters(downsample):
    """Filters of the encoder's stride-2 convolutions: (32, 64) for the seed's 4, one more
    convolution of 64 per further halving."""
    halvings = round(math.log2(downsample))
    if downsample < 2 or 2**halvings != downsample:
        raise ValueError(f"downsample must be a power of 2 >= 2, got {downsample}")
    return (FIRST_FILTERS, *[FILTERS] * (halvings - 1))


def upsampling_filters(downsample):
    """Filters of the decoder's stride-2 transposed convolutions: each upsampling outputs the
    channels the encoder's convolution at that resolution took in, and the last, at full
    resolution, FIRST_FILTERS (the encoder took in the image's one channel there)."""
    strided = downsampling_filters(downsample)
    return (*reversed(strided[:-1]), FIRST_FILTERS)


def build_encoder(embedding_dim, downsample):
    """Image (B, H, W, 1) -> z_e (B, H/s, W/s, D), s = downsample; H and W divisible by s."""
    images = keras.Input(shape=(None, None, 1), name="images")
    x = images
    strided = downsampling_filters(downsample)
    for i, filters in enumerate(strided):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"down{i + 1}")(x)
        if i < len(strided) - 1:
            x = layers.ReLU(name=f"down{i + 1}_relu")(x)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, strided[-1], name=f"res{i + 1}")
    x = layers.ReLU(name="out_relu")(x)
    z_e = layers.Conv2D(embedding_dim, 1, name="to_latent")(x)
    return keras.Model(images, z_e, name="encoder")


def build_decoder(embedding_dim, pixel_range, downsample):
    """z_q (B, h, w, D) -> image (B, s*h, s*w, 1) in pixel_range, s = downsample; mirrors the
    encoder with transposed convs, channel for channel (`upsampling_filters`)."""
    latents = keras.Input(shape=(None, None, embedding_dim), name="latents")
    strided = downsampling_filters(downsample)
    x = layers.Conv2D(strided[-1], 3, padding="same", name="from_latent")(latents)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, strided[-1], name=f"res{i + 1}")
    for i, filters in enumerate(upsampling_filters(downsample)):
        x = layers.ReLU(name=f"up{i + 1}_relu")(x)
        x = layers.Conv2DTranspose(filters, 3, strides=2, padding="same", name=f"up{i + 1}")(x)
    x = layers.ReLU(name="out_relu")(x)
    # float32 output keeps the loss exact under a mixed-precision policy; the output starts at
    # the black background (most of a skull-stripped slice), so training goes to the brain
    x = layers.Conv2D(1, 3, padding="same", dtype="float32", name="to_image",
                      bias_initializer=keras.initializers.Constant(pixel_range[0]))(x)
    images = ClipToPixelRange(*pixel_range, dtype="float32", name="clip")(x)
    return keras.Model(latents, images, name="decoder")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """Encoder, vector quantizer and decoder, trained on eq. 3 (see `eq3_losses`).

    Defaults are the paper's; driver.py's flags choose others.

    Args:
        num_embeddings: K, the codebook size.
        embedding_dim: D, the size of each code vector.
        pixel_range: (low, high) of the scaled pixels; reconstructions are clipped to it.
        downsample: the code grid is the image / downsample in each direction (a power of 2;
            the paper's 4 by default).
        beta: commitment weight of eq. 3 (the paper's 0.25 by default).
        data_variance: pixel variance of the training split; the reconstruction MSE is divided by
            it so the loss scale does not depend on the intensity range (as in the paper's code;
            1 by default, eq. 3 as printed).
        quantizer: "loss" trains the codebook by eq. 3's codebook term (`VectorQuantizer`),
            "ema" by moving averages with restarts of unused codes (`EMAVectorQuantizer`), whose
            cumulative restart count training then logs as "restarts" (the paper's "loss" by
            default).
        ema_decay: gamma of the moving averages (quantizer="ema" only).
        restart_threshold: EMA count below which a code is restarted (quantizer="ema" only;
            ours, as the paper has no restarts: see RESTART_THRESHOLD).
    """

    def __init__(self, num_embeddings, embedding_dim, *, pixel_range,
                 downsample=PAPER_DOWNSAMPLE, beta=PAPER_BETA, data_variance=1.0,
                 quantizer=PAPER_QUANTIZER, ema_decay=PAPER_EMA_DECAY,
                 restart_threshold=RESTART_THRESHOLD, **kwargs):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        super().__init__(**kwargs)
        self.pixel_range = tuple(pixel_range)
        self.downsample = downsample
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.beta = beta
        self.data_variance = data_variance
        self.quantizer_kind = quantizer
        self.ema_decay = ema_decay
        self.restart_threshold = restart_threshold
        self.encoder = build_encoder(embedding_dim, downsample)
        # float32 even under mixed precision: nearest-code distances need the precision
        if quantizer == "ema":
            self.quantizer = EMAVectorQuantizer(
                num_embeddings, embedding_dim, beta, decay=ema_decay,
                restart_threshold=restart_threshold, dtype="float32", name="quantizer"
            )
        else:
            self.quantizer = VectorQuantizer(
                num_embeddings, embedding_dim, beta, dtype="float32", name="quantizer"
            )
        self.decoder = build_decoder(embedding_dim, self.pixel_range, downsample)
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.vq_loss_tracker = keras.metrics.Mean(name="vq_loss")

    def call(self, images, training=False):
        z_e = self.encoder(images, training=training)
        return self.decoder(self.quantizer(z_e, training=training))

    def encode_to_indices(self, images):
        """Images (B, H, W, 1) -> code maps (B, H/s, W/s) of codes in [0, K), s = downsample."""
        return self.quantizer.code_indices(self.encoder(images))

    def decode_indices(self, indices):
        """Code maps (B, h, w) -> images (B, s*h, s*w, 1)."""
        return self.decoder(self.quantizer.lookup(indices))

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.vq_loss_tracker]

    def eq3_losses(self, images, training):
        """Eq. 3 as computed here, each squared norm a mean over its elements:

            L = ||x - D(z_q(x))||^2 / data_variance
                + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2

        The EMA quantizer has no codebook term (the moving averages move the codebook).
        Returns L, the reconstruction term and the quantizer's terms (`vq_loss`)."""
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
        logs = self._track(total_loss, reconstruction_loss, vq_loss)
        if self.quantizer_kind == "ema":
            # the quantizer's cumulative count, not a per-epoch metric: it survives a resume
            logs["restarts"] = ops.cast(self.quantizer.restarts, "float32")
        return logs

    def test_step(self, images):
        return self._track(*self.eq3_losses(images, training=False))

    def get_config(self):
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "beta": self.beta,
            "data_variance": self.data_variance,
            "pixel_range": self.pixel_range,
            "downsample": self.downsample,
            "quantizer": self.quantizer_kind,
            "ema_decay": self.ema_decay,
            "restart_threshold": self.restart_threshold,
            "name": self.name,
        }
