"""PixelCNN priors over VQ-VAE code maps, and their sampler.

The prior models p(c) = prod_i p(c_i | c_1 .. c_{i-1}) over a code map c in raster order
(van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"). Two
architectures share one interface, integer code maps (B, h, w) -> logits (B, h, w, K):

- "plain": masked convolutions (mask A for the first layer, mask B after it) and residual blocks,
  as in the seed and the keras.io example;
- "gated": the paper's gated PixelCNN, with a vertical and a horizontal stack (no blind spot),
  gated tanh x sigmoid units, residual and skip connections.
"""

import collections

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers, ops

PACKAGE = "brain_pixelcnn"

# The first layer sees a 7x7 neighbourhood (the paper's and the seed's choice); later ones 3x3.
FIRST_KERNEL = 7
BLOCK_KERNEL = 3


def causal_mask(kernel_height, kernel_width, mask_type):
    """Which kernel taps a masked convolution may use, centred on the output pixel.

    "A": rows above and pixels to the left (excludes the centre: first layer, so a pixel's
    logits never see its own code). "B": also the centre. "V": the vertical stack's
    rows above and the centre row in full; its output is shifted down one row before use.
    """
    mask = np.zeros((kernel_height, kernel_width), dtype="float32")
    centre_row, centre_col = kernel_height // 2, kernel_width // 2
    mask[:centre_row] = 1.0
    if mask_type == "V":
        mask[centre_row] = 1.0
    else:
        mask[centre_row, : centre_col + (mask_type == "B")] = 1.0
    return mask


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedConv2D(layers.Layer):
    """A 'same'-padded 2-D convolution whose kernel is multiplied by a causal mask.

    Args:
        filters: output channels.
        kernel_size: int or (height, width).
        mask_type: "A", "B" or "V" (see `causal_mask`).
    """

    def __init__(self, filters, kernel_size, mask_type, **kwargs):
        super().__init__(**kwargs)
        if mask_type not in ("A", "B", "V"):
            raise ValueError(f"mask_type must be 'A', 'B' or 'V', got {mask_type!r}")
        self.filters = filters
        self.kernel_size = (
            (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        )
        self.mask_type = mask_type

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(*self.kernel_size, input_shape[-1], self.filters),
            initializer="glorot_uniform",
        )
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
        self.mask = causal_mask(*self.kernel_size, self.mask_type)[:, :, None, None]

    def call(self, x):
        # Rows below the centre, and for one-row kernels the columns right of it, are masked out:
        # convolving with the taps that remain, on an input padded as "same" padding would pad it
        # but only where those taps reach, gives the same output for up to half the work.
        mask = ops.cast(self.mask, self.compute_dtype)
        kernel = (self.kernel * mask)[: self.rows_above + 1, : self.used_columns]
        width = self.kernel_size[1]
        padding = [[0, 0], [self.rows_above, 0],
                   [width // 2, self.used_columns - 1 - width // 2], [0, 0]]
        return ops.conv(ops.pad(x, padding), kernel, padding="valid") + self.bias

    @property
    def rows_above(self):
        """How many rows above its output this layer reads."""
        return self.kernel_size[0] // 2

    @property
    def used_columns(self):
        """Kernel columns with an unmasked tap."""
        height, width = self.kernel_size
        return width // 2 + 1 if height == 1 else width

    @property
    def columns_left(self):
        """How many columns left of its output this layer reads."""
        return self.kernel_size[1] // 2

    @property
    def columns_right(self):
        """How many columns right of its output this layer reads."""
        return self.used_columns - 1 - self.kernel_size[1] // 2

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=list(self.kernel_size), mask_type=self.mask_type
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShiftDown(layers.Layer):
    """Shifts a feature map down one row (zeros enter at the top), so that the vertical stack's
    features at row i only describe rows above i when they reach the horizontal stack."""

    rows_above = 1

    def call(self, x):
        return ops.pad(x, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedActivation(layers.Layer):
    """tanh(W_f * x) * sigmoid(W_g * x), eq. 2 of the PixelCNN decoders paper; x holds both
    halves along the channel axis."""

    def call(self, x):
        features, gates = ops.split(x, 2, axis=-1)
        return ops.tanh(features) * ops.sigmoid(gates)


def plain_residual_block(x, filters, name):
    """1x1 conv to filters/2, masked 3x3 conv (mask B), 1x1 back to filters, added to x."""
    h = layers.Conv2D(filters // 2, 1, activation="relu", name=f"{name}_conv1")(x)
    h = MaskedConv2D(filters // 2, BLOCK_KERNEL, "B", name=f"{name}_pixel_conv")(h)
    h = layers.ReLU(name=f"{name}_relu")(h)
    h = layers.Conv2D(filters, 1, activation="relu", name=f"{name}_conv2")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def plain_stack(embedded, filters, residual_blocks):
    x = MaskedConv2D(filters, FIRST_KERNEL, "A", name="pixel_conv_a")(embedded)
    x = layers.ReLU(name="pixel_conv_a_relu")(x)
    for i in range(residual_blocks):
        x = plain_residual_block(x, filters, name=f"res{i + 1}")
    return x


def gated_block(vertical, horizontal, filters, kernel, first, name):
    """One layer of fig. 2 of the paper: returns the new vertical, horizontal and skip maps."""
    vertical_pre = MaskedConv2D(2 * filters, kernel, "V", name=f"{name}_vertical")(vertical)
    horizontal_pre = MaskedConv2D(
        2 * filters, (1, kernel), "A" if first else "B", name=f"{name}_horizontal"
    )(horizontal)
    vertical_to_horizontal = layers.Conv2D(2 * filters, 1, name=f"{name}_v_to_h")(
        ShiftDown(name=f"{name}_shift")(vertical_pre)
    )
    horizontal_pre = layers.Add(name=f"{name}_link")([horizontal_pre, vertical_to_horizontal])
    vertical_out = GatedActivation(name=f"{name}_vertical_gate")(vertical_pre)
    gated = GatedActivation(name=f"{name}_horizontal_gate")(horizontal_pre)
    skip = layers.Conv2D(filters, 1, name=f"{name}_skip")(gated)
    horizontal_out = layers.Conv2D(filters, 1, name=f"{name}_residual")(gated)
    if not first:  # the first layer's input is the raw embedding, which it must not see
        horizontal_out = layers.Add(name=f"{name}_add")([horizontal, horizontal_out])
    return vertical_out, horizontal_out, skip


def gated_stack(embedded, filters, residual_blocks):
    vertical, horizontal, skip = gated_block(
        embedded, embedded, filters, FIRST_KERNEL, first=True, name="gated0"
    )
    skips = [skip]
    for i in range(residual_blocks):
        vertical, horizontal, skip = gated_block(
            vertical, horizontal, filters, BLOCK_KERNEL, first=False, name=f"gated{i + 1}"
        )
        skips.append(skip)
    return layers.Add(name="skips")(skips) if len(skips) > 1 else skips[0]


STACKS = {"plain": plain_stack, "gated": gated_stack}


def build_pixelcnn(num_embeddings, filters=128, residual_blocks=2, output_layers=2, kind="gated"):
    """A PixelCNN prior: code maps (B, h, w) -> logits (B, h, w, K).

    Args:
        num_embeddings: K, the number of codes.
        filters: channels of every hidden layer.
        residual_blocks: residual (plain) or gated (gated) blocks after the first masked layer.
        output_layers: 1x1 ReLU layers between the stack and the logits.
        kind: "plain" or "gated".
    """
    codes = keras.Input(shape=(None, None), dtype="int32", name="codes")
    # A learned embedding is a one-hot input times a K x filters matrix, without the K-wide
    # one-hot tensor.
    embedded = layers.Embedding(num_embeddings, filters, name="embedding")(codes)
    x = STACKS[kind](embedded, filters, residual_blocks)
    for i in range(output_layers):
        x = layers.ReLU(name=f"out{i + 1}_relu")(x)
        x = layers.Conv2D(filters, 1, name=f"out{i + 1}")(x)
    x = layers.ReLU(name="logits_relu")(x)
    logits = layers.Conv2D(num_embeddings, 1, dtype="float32", name="logits")(x)
    return keras.Model(codes, logits, name=f"{kind}_pixelcnn")


Reach = collections.namedtuple("Reach", ["rows_above", "columns_left", "columns_right"])


def _input_layer_names(inbound_nodes):
    """Names of the layers whose outputs a layer reads, from its serialized inbound nodes."""
    if isinstance(inbound_nodes, dict):
        if "keras_history" in inbound_nodes:
            return [inbound_nodes["keras_history"][0]]
        inbound_nodes = list(inbound_nodes.values())
    if isinstance(inbound_nodes, (list, tuple)):
        return [name for item in inbound_nodes for name in _input_layer_names(item)]
    return []


def receptive_field(prior):
    """How far above, left and right of a position the prior's logits there can look: along
    each axis, the longest path through the layer graph of the reaches of its layers."""
    reach = {}
    config = prior.get_config()
    for layer_config in config["layers"]:  # in topological order
        name = layer_config["name"]
        layer = prior.get_layer(name)
        inputs = [reach[n] for n in _input_layer_names(layer_config["inbound_nodes"])]
        reach[name] = Reach(*(
            getattr(layer, axis, 0) + max((r[i] for r in inputs), default=0)
            for i, axis in enumerate(Reach._fields)
        ))
    return reach[name]  # the last layer in topological order is the logits


def draw_codes(logits, temperature, seed, step):
    """One categorical draw per row of logits (B, K), reproducible from (seed, step)."""
    distribution = tfp.distributions.Categorical(logits=logits / temperature)
    return tf.cast(distribution.sample(seed=tf.stack([seed, step])), tf.int32)


def _write_codes(codes, row, col, values):
    """codes[:, row, col] = values."""
    batch = tf.shape(codes)[0]
    positions = tf.stack(
        [tf.range(batch), tf.fill([batch], row), tf.fill([batch], col)], axis=1
    )  # (B, 3): one (b, row, col) index per sample
    return tf.tensor_scatter_nd_update(codes, positions, values)


def sample_codes(prior, num_samples, grid_shape, temperature=1.0, seed=0):
    """Draw code maps from the prior, one code at a time in raster order.

    Exact, and fast: the loop runs inside one compiled graph, and the logits at (i, j) are
    computed on the window of the map that the prior's receptive field covers (rows i - R to i,
    columns j - L to j + R'), which gives the same logits as the whole map.

    Args:
        prior: a model from `build_pixelcnn`.
        num_samples: how many code maps to draw.
        grid_shape: (h, w) of the code maps.
        temperature: divides the logits; below 1 sharpens, above 1 flattens the distribution.
        seed: integer; the same seed gives the same samples.

    Returns:
        int32 tensor (num_samples, h, w).
    """
    height, width = grid_shape
    reach = receptive_field(prior)
    rows = min(height, reach.rows_above + 1)
    columns = min(width, reach.columns_left + reach.columns_right + 1)

    @tf.function
    def sample_all(seed):
        codes = tf.zeros((num_samples, height, width), tf.int32)
        for row in tf.range(height):
            top = tf.clip_by_value(row - rows + 1, 0, height - rows)
            for col in tf.range(width):
                left = tf.clip_by_value(col - reach.columns_left, 0, width - columns)
                # (B, rows, columns): the part of the map that position (row, col) can see
                context = codes[:, top : top + rows, left : left + columns]
                logits = prior(context, training=False)[:, row - top, col - left]  # (B, K)
                values = draw_codes(logits, temperature, seed, row * width + col)
                codes = _write_codes(codes, row, col, values)
        return codes

    return sample_all(tf.constant(seed, tf.int32))


def sample_codes_naive(prior, num_samples, grid_shape, temperature=1.0, seed=0):
    """The reference sampler: one `predict` on the whole map per code, as in the seed.

    Draws the same codes as `sample_codes` for the same seed; kept to test and benchmark it.
    """
    height, width = grid_shape
    codes = np.zeros((num_samples, height, width), dtype="int32")
    for row in range(height):
        for col in range(width):
            logits = prior.predict(codes, verbose=0)[:, row, col]
            step = tf.constant(row * width + col, tf.int32)
            codes[:, row, col] = draw_codes(logits, temperature, tf.constant(seed), step)
    return tf.constant(codes)
