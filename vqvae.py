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

Beyond eq. 3, and off by default: the reconstruction term may be Zhao et al. 2017's mix of
MS-SSIM and L1 (`l1_msssim_loss`), a spectral loss may be added (`spectral_loss`), and a patch
discriminator trained beside the autoencoder (VQGAN, Esser et al. 2021) may add an adversarial
term (`VQVAE.train_step`).
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

# The reconstruction term: eq. 3's squared error, or Zhao et al. 2017's mix of MS-SSIM and L1.
RECONSTRUCTIONS = ("mse", "l1_msssim")
PAPER_RECONSTRUCTION = "mse"
# Zhao et al.'s weight alpha of 1 - MS-SSIM in their mix; L1 has 1 - alpha.
ZHAO_ALPHA = 0.84
# MS-SSIM's exponents of its five scales, finest first (Wang et al. 2003), and the side of its
# Gaussian window: tf.image.ssim_multiscale's defaults.
MSSSIM_POWER_FACTORS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Added to |F|^2 under the square root: the amplitude's gradient stays finite at a zero Fourier
# coefficient, which a flat image has at every frequency but zero.
TINY_POWER = 1e-12
# VQGAN's adaptive weight: delta in ||grad L_rec|| / (||grad L_GAN|| + delta), and its upper clip.
ADAPTIVE_WEIGHT_DELTA = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4
# The patch discriminator: pix2pix's first three widths (64, 128, 256) halved, as it trains
# beside the autoencoder on a CPU; pix2pix's 4x4 kernels, LeakyReLU slope and N(0, 0.02) initial
# weights (DCGAN's).
DISCRIMINATOR_FILTERS = (32, 64, 128)
DISCRIMINATOR_KERNEL = 4
LEAKY_SLOPE = 0.2
GAN_INIT_STDDEV = 0.02
# The step at which VQGAN switches the discriminator on (configs/custom_vqgan.yaml, disc_start).
VQGAN_DISCRIMINATOR_START = 10000
# The discriminator's Adam: VQGAN's betas; pix2pix's learning rate for a PatchGAN trained from
# scratch (VQGAN's 4.5e-6 per image of the batch is tuned to its autoencoder's equally small
# rate, where ours trains at 1e-3).
VQGAN_ADAM_BETAS = (0.5, 0.9)
PIX2PIX_LEARNING_RATE = 2e-4


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


def msssim_scales(height, width):
    """How many of MS-SSIM's five scales fit an image of height x width: each scale halves the
    previous one (rounding up, as tf.image.ssim_multiscale pads odd sizes), and the coarsest must
    still hold the 11-pixel window, so all five need at least 161 pixels a side. A smaller image
    keeps the finest scales, where the detail a reconstruction loses shows."""
    size, scales = min(height, width), 0
    while scales < len(MSSSIM_POWER_FACTORS) and size >= SSIM_WINDOW:
        scales += 1
        size = -(-size // 2)
    if scales == 0:
        raise ValueError(f"MS-SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {height}x{width}")
    return scales


def l1_msssim_loss(images, reconstructions, pixel_range):
    """Zhao et al. 2017's mix alpha (1 - MS-SSIM(x, x_hat)) + (1 - alpha) ||x - x_hat||_1, each
    a mean over the batch, alpha = 0.84. (They weight L1 by MS-SSIM's coarsest Gaussian too, as
    their loss is that of a patch's centre pixel; averaged over whole images that weighting goes.)

    MS-SSIM (Wang et al. 2003) takes images in [0, max_val] (its luminance term is not
    shift-invariant), so both are shifted there from pixel_range. An image too small for the
    five scales keeps the finest that fit (`msssim_scales`), their exponents rescaled to sum to
    1 as the five do, so identical images still score 1. Its terms are normalised
    (`normalised_msssim`) so that training cannot diverge. Needs a static image size."""
    low, high = pixel_range
    height, width = images.shape[1:3]
    if height is None or width is None:
        raise ValueError("l1_msssim needs images of a static size to choose MS-SSIM's scales")
    factors = MSSSIM_POWER_FACTORS[:msssim_scales(height, width)]
    similarity = normalised_msssim(images - low, reconstructions - low, high - low,
                                   [factor / sum(factors) for factor in factors])
    l1 = ops.mean(ops.abs(images - reconstructions))
    return ZHAO_ALPHA * (1 - ops.mean(similarity)) + (1 - ZHAO_ALPHA) * l1


def gaussian_filter(images):
    """The mean of each SSIM_WINDOW x SSIM_WINDOW patch under a Gaussian of SSIM_SIGMA, where
    the window fits (no padding), per channel."""
    offsets = tf.range(SSIM_WINDOW, dtype=images.dtype) - (SSIM_WINDOW - 1) / 2
    weights = tf.exp(-offsets**2 / (2 * SSIM_SIGMA**2))
    weights /= tf.reduce_sum(weights)
    window = weights[:, None] * weights[None, :]
    kernel = tf.tile(window[:, :, None, None], [1, 1, tf.shape(images)[-1], 1])
    return tf.nn.depthwise_conv2d(images, kernel, [1, 1, 1, 1], "VALID")


def ssim_terms(x, y, max_val):
    """Per image, the mean SSIM and the mean contrast-structure term cs (Wang et al. 2004)."""
    c1, c2 = (SSIM_K1 * max_val) ** 2, (SSIM_K2 * max_val) ** 2
    mean_x, mean_y = gaussian_filter(x), gaussian_filter(y)
    var_x = gaussian_filter(x * x) - mean_x**2
    var_y = gaussian_filter(y * y) - mean_y**2
    covariance = gaussian_filter(x * y) - mean_x * mean_y
    luminance = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
    cs = (2 * covariance + c2) / (var_x + var_y + c2)
    return tf.reduce_mean(luminance * cs, [1, 2, 3]), tf.reduce_mean(cs, [1, 2, 3])


def msssim_terms(x, y, max_val, scales):
    """MS-SSIM's terms (Wang et al. 2003) of images in [0, max_val], (B, scales): the mean cs
    term of every scale but the coarsest, then the coarsest's mean SSIM; 2x2 means between
    scales. MS-SSIM is the product of their powers."""
    terms = []
    for scale in range(scales):
        if scale:
            x, y = (tf.nn.avg_pool2d(image, 2, 2, "SAME") for image in (x, y))
        ssim, cs = ssim_terms(x, y, max_val)
        terms.append(ssim if scale == scales - 1 else cs)
    return tf.stack(terms, axis=-1)


def normalised_msssim(x, y, max_val, factors):
    """MS-SSIM with each term mapped from [-1, 1] to [0, 1] before its power, one per image; 1
    for identical images. The terms' powers are below 1, so their gradients are infinite at 0:
    MS-SSIM itself (tf.image clips a negative term at 0) made the VQ-VAE's losses diverge within
    two epochs on the demo slices, which are mostly black, where a flat reconstruction's terms
    are near 0. Mapped, a term reaches 0 only at perfect anticorrelation (pytorch-msssim's
    `normalize`, for the same reason)."""
    normalised = (msssim_terms(x, y, max_val, len(factors)) + 1) / 2
    return tf.reduce_prod(normalised ** tf.constant(factors, normalised.dtype), axis=-1)


def log_amplitude(images, pixel_range):
    """log(1 + |F(x)|) of each image's 2-D DFT, orthonormal (Parseval: the amplitudes' squares
    sum to the pixels' squares), with the black background at 0: (B, H, W, C) -> (B, C, H, W)."""
    x = ops.transpose(images - pixel_range[0], (0, 3, 1, 2))  # the DFT runs over the last two
    real, imaginary = ops.fft2((x, ops.zeros_like(x)))
    size = ops.cast(ops.shape(x)[2] * ops.shape(x)[3], x.dtype)
    return ops.log1p(ops.sqrt(real**2 + imaginary**2 + TINY_POWER) / ops.sqrt(size))


def spectral_loss(images, reconstructions, pixel_range):
    """mean |log(1 + |F(x)|) - log(1 + |F(x_hat)|)| over every Fourier coefficient.

    The spectral loss of Jukebox (Dhariwal et al. 2020, section 3.3), which brain-MRI VQ-VAEs
    add to the pixel loss (Tudosiu et al. 2020; MONAI's JukeboxLoss), compares the amplitudes
    |F|. An image's amplitudes fall steeply with frequency, so a distance between them is all
    low frequencies, which the pixel loss fits already; the logarithm, as in the log-magnitude
    term of DDSP's spectral loss (Engel et al. 2020), lets the weak high frequencies of folds and
    edges count, and L1 keeps one large difference from dominating."""
    return ops.mean(ops.abs(log_amplitude(images, pixel_range)
                            - log_amplitude(reconstructions, pixel_range)))


def hinge_discriminator_loss(real_logits, fake_logits):
    """The discriminator's hinge loss (Lim and Ye 2017; VQGAN's, which halves it, to no effect on
    Adam's steps): mean relu(1 - D(x)) + mean relu(1 + D(x_hat))."""
    return ops.mean(ops.relu(1 - real_logits)) + ops.mean(ops.relu(1 + fake_logits))


def hinge_generator_loss(fake_logits):
    """The generator's side of the hinge loss, L_GAN = -mean D(x_hat)."""
    return -ops.mean(fake_logits)


def adaptive_weight(reconstruction_gradient, generator_gradient):
    """VQGAN's lambda = ||grad L_rec|| / (||grad L_GAN|| + delta) (Esser et al. 2021, eq. 7) from
    the two gradients at the decoder's last layer, clipped to [0, 1e4] as VQGAN's code does and
    under sg[.]: the adversarial term's pull on the decoder matches the reconstruction's."""
    ratio = ops.norm(ops.reshape(reconstruction_gradient, (-1,))) / (
        ops.norm(ops.reshape(generator_gradient, (-1,))) + ADAPTIVE_WEIGHT_DELTA)
    return ops.stop_gradient(ops.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX))


def build_discriminator():
    """pix2pix's PatchGAN (Isola et al. 2017) as VQGAN uses it, smaller: stride-2 4x4
    convolutions with LeakyReLU(0.2), then a 4x4 convolution to one logit per patch, image (B, H,
    W, 1) -> logits (B, H/2^n, W/2^n, 1) for n strided convolutions, each logit judging a patch of
    the image as real or reconstructed. No normalisation layers (VQGAN's has BatchNorm): batch
    statistics would differ between a replica's share of the batch and the whole, and between
    the real and the reconstructed halves the discriminator sees. float32 even under mixed
    precision: its own optimizer has no loss scaling."""
    images = keras.Input(shape=(None, None, 1), name="images")
    initializer = keras.initializers.RandomNormal(stddev=GAN_INIT_STDDEV)
    x = images
    for i, filters in enumerate(DISCRIMINATOR_FILTERS):
        x = layers.Conv2D(filters, DISCRIMINATOR_KERNEL, strides=2, padding="same",
                          kernel_initializer=initializer, dtype="float32", name=f"down{i + 1}")(x)
        x = layers.LeakyReLU(LEAKY_SLOPE, dtype="float32", name=f"down{i + 1}_leaky_relu")(x)
    logits = layers.Conv2D(1, DISCRIMINATOR_KERNEL, padding="same", kernel_initializer=initializer,
                           dtype="float32", name="to_logits")(x)
    return keras.Model(images, logits, name="discriminator")


def build_optimizer(model):
    """Creates the compiled optimizer's variables before training. Keras otherwise creates them
    inside the first traced training step, and tf.function then traces the step a second time:
    half of a small model's start-up."""
    if model.built and not model.optimizer.built:
        with model.distribute_strategy.scope():
            model.optimizer.build(model.trainable_variables)


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
        reconstruction: the reconstruction term, "mse" for eq. 3's squared error divided by
            data_variance (the default), "l1_msssim" for Zhao et al. 2017's mix of MS-SSIM and
            L1 (`l1_msssim_loss`), which does not use data_variance.
        spectral_weight: weight of the spectral loss (`spectral_loss`) added to the
            reconstruction term; 0, the default, adds none.
        adversarial_weight: weight of VQGAN's adversarial term on top of its adaptive weight
            (VQGAN's disc_weight); 0, the default, builds no discriminator.
        discriminator_start: the training step from which the discriminator trains and its term
            counts (VQGAN's 10000 by default; adversarial_weight > 0 only).
        discriminator_learning_rate: of the discriminator's Adam (pix2pix's 2e-4 by default;
            adversarial_weight > 0 only).

    With adversarial_weight > 0 the model holds the discriminator (`discriminator`, trained by
    its own optimizer `discriminator_optimizer`) and the training step count
    (`training_steps`), all saved and restored with the model's weights.
    """

    def __init__(self, num_embeddings, embedding_dim, *, pixel_range,
                 downsample=PAPER_DOWNSAMPLE, beta=PAPER_BETA, data_variance=1.0,
                 quantizer=PAPER_QUANTIZER, ema_decay=PAPER_EMA_DECAY,
                 restart_threshold=RESTART_THRESHOLD, reconstruction=PAPER_RECONSTRUCTION,
                 spectral_weight=0.0, adversarial_weight=0.0,
                 discriminator_start=VQGAN_DISCRIMINATOR_START,
                 discriminator_learning_rate=PIX2PIX_LEARNING_RATE, **kwargs):
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, "
                             f"got {reconstruction!r}")
        for name, value in [("spectral_weight", spectral_weight),
                            ("adversarial_weight", adversarial_weight),
                            ("discriminator_start", discriminator_start)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
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
        self.reconstruction = reconstruction
        self.spectral_weight = spectral_weight
        self.adversarial_weight = adversarial_weight
        self.discriminator_start = discriminator_start
        self.discriminator_learning_rate = discriminator_learning_rate
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
        optional_terms = ["spectral_loss"] if spectral_weight > 0 else []
        self.discriminator = self.discriminator_optimizer = None
        if adversarial_weight > 0:
            self.discriminator = build_discriminator()
            # Built here, not at the first step, so that load_model and BackupAndRestore find
            # the optimizer's variables to restore into (an unbuilt optimizer skips its state).
            self.discriminator_optimizer = keras.optimizers.Adam(
                discriminator_learning_rate, *VQGAN_ADAM_BETAS, name="discriminator_optimizer")
            self.discriminator_optimizer.build(self.discriminator.trainable_weights)
            self.training_steps = self.add_weight(
                name="training_steps", shape=(), dtype="int64", initializer="zeros",
                trainable=False, aggregation="only_first_replica")
            optional_terms += ["adversarial_loss", "discriminator_loss", "adaptive_weight"]
        self.optional_trackers = [keras.metrics.Mean(name=name) for name in optional_terms]

    @property
    def trainable_weights(self):
        """The autoencoder's trainable weights, which the compiled optimizer trains; the
        discriminator's are its own optimizer's. Keras builds the compiled optimizer on these
        when it loads a model or a backup, and on the weights of the first step otherwise: the
        two must agree for its saved state to load."""
        return self.without_discriminator(super().trainable_weights)

    @property
    def trainable_variables(self):
        return self.without_discriminator(super().trainable_variables)

    def make_train_function(self, force=False):
        build_optimizer(self)
        return super().make_train_function(force)

    def without_discriminator(self, variables):
        if self.discriminator is None:
            return variables
        theirs = {id(variable) for variable in self.discriminator.weights}
        return [variable for variable in variables if id(variable) not in theirs]

    def call(self, images, training=False):
        z_e = self.encoder(images, training=training)
        return self.decoder(self.quantizer(z_e, training=training))

    @property
    def codebook_sizes(self):
        """K of each level's codebook, top first: one level here."""
        return (self.num_embeddings,)

    def encode_to_indices(self, images):
        """Images (B, H, W, 1) -> code maps (B, H/s, W/s) of codes in [0, K), s = downsample."""
        return self.quantizer.code_indices(self.encoder(images))

    def decode_indices(self, indices):
        """Code maps (B, h, w) -> images (B, s*h, s*w, 1)."""
        return self.decoder(self.quantizer.lookup(indices))

    # levels of code maps; `VQVAE2` has two
    levels = 1

    def code_grids(self, image_size):
        """Side of the code map of square images of side image_size, one per level."""
        return (image_size // self.downsample,)

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.vq_loss_tracker,
                *self.optional_trackers]

    def eq3_losses(self, images, training):
        """Eq. 3 as computed here, each squared norm a mean over its elements:

            L = ||x - D(z_q(x))||^2 / data_variance
                + ||sg[z_e(x)] - e||^2 + beta * ||z_e(x) - sg[e]||^2

        The EMA quantizer has no codebook term (the moving averages move the codebook).
        reconstruction="l1_msssim" replaces the first term by `l1_msssim_loss`, and
        spectral_weight > 0 adds spectral_weight * `spectral_loss` to it (`loss_terms`).
        Returns L, the reconstruction term and the quantizer's terms (`vq_loss`)."""
        _, terms = self.loss_terms(images, training)
        return terms["loss"], terms["reconstruction_loss"], terms["vq_loss"]

    def loss_terms(self, images, training):
        """The reconstructions and {"loss": L of `eq3_losses`, "reconstruction_loss": its first
        term, "vq_loss": the quantizer's terms, and "spectral_loss" if spectral_weight > 0}."""
        reconstructions = self(images, training=training)
        if self.reconstruction == "mse":
            reconstruction_loss = ops.mean((images - reconstructions) ** 2) / self.data_variance
        else:
            reconstruction_loss = l1_msssim_loss(images, reconstructions, self.pixel_range)
        terms = {"reconstruction_loss": reconstruction_loss, "vq_loss": ops.sum(self.losses)}
        if self.spectral_weight > 0:
            terms["spectral_loss"] = spectral_loss(images, reconstructions, self.pixel_range)
        terms["loss"] = self.reconstruction_objective(terms) + terms["vq_loss"]
        return reconstructions, terms

    def reconstruction_objective(self, terms):
        """The reconstruction term plus the weighted spectral loss: VQGAN's L_rec."""
        if self.spectral_weight > 0:
            return terms["reconstruction_loss"] + self.spectral_weight * terms["spectral_loss"]
        return terms["reconstruction_loss"]

    def _track(self, terms):
        """Updates the trackers of the terms given; returns their results."""
        tracked = [m for m in self.metrics if m.name in terms]
        for tracker in tracked:
            tracker.update_state(terms[tracker.name])
        return {m.name: m.result() for m in tracked}

    def train_step(self, images):
        """One step on eq. 3 (`loss_terms`); with a discriminator, VQGAN's (Esser et al. 2021,
        eq. 5-6) in one forward pass: the autoencoder minimises L + on * adversarial_weight *
        lambda * L_GAN (`adaptive_weight`) while the discriminator minimises on * its hinge
        loss, with on = 0 before step discriminator_start and 1 from it. Logged as
        adversarial_loss (L_GAN), discriminator_loss and adaptive_weight (lambda)."""
        # Replicas' gradients are summed under tf.distribute, so each replica's mean loss is
        # divided by the replica count to give the gradient of the global-batch mean.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        adversarial = self.discriminator is not None
        with tf.GradientTape(persistent=adversarial) as tape:
            reconstructions, terms = self.loss_terms(images, training=True)
            if adversarial:
                on = ops.cast(self.training_steps >= self.discriminator_start, "float32")
                real, fake = ops.split(
                    self.discriminator(ops.concatenate([images, reconstructions])), 2)
                terms["adversarial_loss"] = hinge_generator_loss(fake)
                terms["discriminator_loss"] = hinge_discriminator_loss(real, fake)
                reconstruction = self.reconstruction_objective(terms)
                with tape.stop_recording():
                    terms["adaptive_weight"] = self.last_layer_adaptive_weight(
                        tape, reconstruction, terms["adversarial_loss"], replicas)
                terms["loss"] += (on * self.adversarial_weight * terms["adaptive_weight"]
                                  * terms["adversarial_loss"])
                discriminator_loss = on * terms["discriminator_loss"] / replicas
            scaled_loss = self.optimizer.scale_loss(terms["loss"] / replicas)
        gradients = tape.gradient(scaled_loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        if adversarial:
            # Before the start the gradients are 0, and Adam, its moments still 0, leaves the
            # discriminator as it is (VQGAN likewise multiplies this loss by 0 until then).
            weights = self.discriminator.trainable_weights
            gradients = tape.gradient(discriminator_loss, weights)
            self.discriminator_optimizer.apply_gradients(zip(gradients, weights))
            self.training_steps.assign_add(1)
        logs = self._track(terms)
        if self.quantizer_kind == "ema":
            # the quantizer's cumulative count, not a per-epoch metric: it survives a resume
            logs["restarts"] = ops.cast(self.quantizer.restarts, "float32")
        return logs

    def last_layer_adaptive_weight(self, tape, reconstruction_loss, generator_loss, replicas):
        """VQGAN's lambda (`adaptive_weight`) from the gradients at the kernel of the decoder's
        last layer. Each replica's gradients are of its mean, so their sum over the replicas, as
        the optimizer takes it, is the global batch's, and every replica gets the same lambda."""
        kernel = self.decoder.get_layer("to_image").kernel
        gradients = [tape.gradient(loss, kernel) / replicas
                     for loss in (reconstruction_loss, generator_loss)]
        return adaptive_weight(*cross_replica_sum(gradients))

    def test_step(self, images):
        """Eq. 3's terms on held-out images; no adversarial terms, whose lambda needs
        gradients and whose discriminator is a moving target."""
        _, terms = self.loss_terms(images, training=False)
        return self._track(terms)

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
            "reconstruction": self.reconstruction,
            "spectral_weight": self.spectral_weight,
            "adversarial_weight": self.adversarial_weight,
            "discriminator_start": self.discriminator_start,
            "discriminator_learning_rate": self.discriminator_learning_rate,
            "name": self.name,
        }


# ---------------------------------------------------------------------------------------------
# Two levels of codes (VQ-VAE-2, Razavi et al. 2019, section 3.1 and figure 2a)


def build_top_encoder(embedding_dim):
    """Bottom features (B, h, w, D) -> top z_e (B, h/2, w/2, D): one more stride-2 convolution,
    then the residual blocks and the 1x1 convolution to D that end `build_encoder`."""
    features = keras.Input(shape=(None, None, embedding_dim), name="features")
    x = layers.Conv2D(FILTERS, 3, strides=2, padding="same", name="down")(features)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, FILTERS, name=f"res{i + 1}")
    x = layers.ReLU(name="out_relu")(x)
    z_e = layers.Conv2D(embedding_dim, 1, name="to_latent")(x)
    return keras.Model(features, z_e, name="top_encoder")


def build_top_decoder(embedding_dim):
    """Top z_q (B, h, w, D) -> (B, 2h, 2w, D) at the bottom grid, for the bottom quantizer's
    input: the start of `build_decoder` (3x3 convolution, residual blocks) and one stride-2
    transposed convolution."""
    latents = keras.Input(shape=(None, None, embedding_dim), name="latents")
    x = layers.Conv2D(FILTERS, 3, padding="same", name="from_latent")(latents)
    for i in range(RESIDUAL_BLOCKS):
        x = residual_block(x, FILTERS, name=f"res{i + 1}")
    x = layers.ReLU(name="up_relu")(x)
    x = layers.Conv2DTranspose(embedding_dim, 3, strides=2, padding="same", name="up")(x)
    return keras.Model(latents, x, name="top_decoder")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE2(VQVAE):
    """A `VQVAE` with two levels of codes (VQ-VAE-2, figure 2a): top codes on the grid of
    `downsample` for global structure, bottom codes on the grid twice as fine for detail, chosen
    given the top.

        features = E_bottom(x)                                 image / (downsample / 2)
        z_q_top = VQ_top(E_top(features))                      image / downsample
        z_q_bottom = VQ_bottom(conv1x1[features, D_top(z_q_top)])
        x_hat = D(conv1x1[z_q_bottom, upsample(z_q_top)])

    E_bottom, VQ_bottom and D are the one-level model's encoder, quantizer and decoder at
    downsample / 2 (`encoder`, `quantizer`, `decoder`); the top level adds `top_encoder`,
    `top_quantizer` (a quantizer of the same kind and D) and `top_decoder`. Training is the
    one-level model's: its reconstruction losses, with eq. 3's quantizer terms summed over both
    levels (`vq_loss`, also logged per level as `top_vq_loss` and `bottom_vq_loss`).

    Args: those of `VQVAE`, whose `num_embeddings` is the bottom codebook's K; `downsample`, the
    top grid's, must be at least 4; `top_num_embeddings`, the top codebook's K (VQ-VAE-2's two
    levels share K = 512: `num_embeddings`, by default).
    """

    levels = 2

    def __init__(self, num_embeddings, embedding_dim, *, pixel_range,
                 downsample=PAPER_DOWNSAMPLE, top_num_embeddings=None, **kwargs):
        downsampling_filters(downsample)  # refuses a downsample that is not a power of 2
        if downsample < 4:
            raise ValueError("a two-level model needs downsample >= 4 (its bottom codes are at "
                             f"downsample / 2 >= 2), got {downsample}")
        super().__init__(num_embeddings, embedding_dim, pixel_range=pixel_range,
                         downsample=downsample // 2, **kwargs)
        # the parent built the bottom level at downsample / 2; the model's grid is the top's
        self.downsample = downsample
        self.top_num_embeddings = top_num_embeddings or num_embeddings
        self.top_encoder = build_top_encoder(embedding_dim)
        self.top_quantizer = self.quantizer.from_config(
            {**self.quantizer.get_config(), "num_embeddings": self.top_num_embeddings,
             "name": "top_quantizer"})
        self.top_decoder = build_top_decoder(embedding_dim)
        self.bottom_join = layers.Conv2D(embedding_dim, 1, name="bottom_join")
        self.top_upsample = layers.Conv2DTranspose(
            embedding_dim, 3, strides=2, padding="same", name="top_upsample")
        self.decoder_join = layers.Conv2D(embedding_dim, 1, name="decoder_join")
        self.top_vq_loss_tracker = keras.metrics.Mean(name="top_vq_loss")
        self.bottom_vq_loss_tracker = keras.metrics.Mean(name="bottom_vq_loss")

    @property
    def codebook_sizes(self):
        return (self.top_num_embeddings, self.num_embeddings)

    def get_config(self):
        return {**super().get_config(), "top_num_embeddings": self.top_num_embeddings}

    def code_grids(self, image_size):
        """Sides of the top and bottom code maps of square images of side image_size."""
        return (image_size // self.downsample, 2 * image_size // self.downsample)

    def bottom_latent(self, features, top):
        """The bottom quantizer's input: the bottom features beside the top decoded to their
        grid, mixed by a 1x1 convolution, so the bottom codes add what the top lacks."""
        return self.bottom_join(ops.concatenate([features, self.top_decoder(top)], axis=-1))

    def decoder_latent(self, bottom, top):
        """The decoder's input: z_q of both levels at the bottom grid, mixed by a 1x1 convolution
        to the D channels the decoder takes."""
        return self.decoder_join(ops.concatenate([bottom, self.top_upsample(top)], axis=-1))

    def call(self, images, training=False):
        features = self.encoder(images, training=training)
        top = self.top_quantizer(self.top_encoder(features), training=training)
        bottom = self.quantizer(self.bottom_latent(features, top), training=training)
        return self.decoder(self.decoder_latent(bottom, top))

    def encode_to_indices(self, images):
        """Images (B, H, W, 1) -> top code maps (B, H/s, W/s) of codes in [0, K_top) and bottom
        code maps (B, 2H/s, 2W/s) of codes in [0, K), s = downsample."""
        features = self.encoder(images)
        top = self.top_quantizer.code_indices(self.top_encoder(features))
        bottom_latent = self.bottom_latent(features, self.top_quantizer.lookup(top))
        return top, self.quantizer.code_indices(bottom_latent)

    def decode_indices(self, top, bottom=None):
        """Top code maps (B, h, w) and bottom code maps (B, 2h, 2w) -> images (B, s*h, s*w, 1)."""
        if bottom is None:
            raise ValueError("a two-level model decodes top and bottom codes together; sample "
                             "the bottom codes given the top first")
        return self.decoder(self.decoder_latent(self.quantizer.lookup(bottom),
                                                self.top_quantizer.lookup(top)))

    @property
    def metrics(self):
        return [*super().metrics, self.top_vq_loss_tracker, self.bottom_vq_loss_tracker]

    def train_step(self, images):
        logs = self._track_levels(super().train_step(images))
        if self.quantizer_kind == "ema":
            # `restarts` are the bottom codebook's
            logs["top_restarts"] = ops.cast(self.top_quantizer.restarts, "float32")
        return logs

    def test_step(self, images):
        return self._track_levels(super().test_step(images))

    def _track_levels(self, logs):
        """Adds each level's eq.-3 quantizer terms in the step just taken; their sum is
        `vq_loss`."""
        self.top_vq_loss_tracker.update_state(ops.sum(self.top_quantizer.losses))
        self.bottom_vq_loss_tracker.update_state(ops.sum(self.quantizer.losses))
        logs.update(top_vq_loss=self.top_vq_loss_tracker.result(),
                    bottom_vq_loss=self.bottom_vq_loss_tracker.result())
        return logs
