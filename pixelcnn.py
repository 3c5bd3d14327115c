"""PixelCNN priors over VQ-VAE code maps, and their sampler.

The prior models p(c) = prod_i p(c_i | c_1 .. c_{i-1}) over a code map c in raster order
(van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"). Two
architectures share one interface, integer code maps (B, h, w) -> logits (B, h, w, K):

- "plain": masked convolutions (mask A for the first layer, mask B after it) and residual blocks,
  as in the seed and the keras.io example;
- "gated": the paper's gated PixelCNN, with a vertical and a horizontal stack (no blind spot),
  gated tanh x sigmoid units, residual and skip connections.

Either may dilate its blocks' masked convolutions in cycles 1, 2, 4, .. (as WaveNet does), so that
a few blocks see a whole code map.

The gated prior may also be conditioned on each slice's relative height h in [0, 1] (section 2.3 of
the paper): it then models p(c | h), and takes (codes, heights) -> logits. And it may be told
where each code is: a learned embedding of its row and column added to its code's embedding.
"""

import abc
import collections
import math

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from keras import layers, ops

PACKAGE = "brain_pixelcnn"

# The first layer sees a 7x7 neighbourhood (the paper's and the seed's choice); later ones 3x3.
FIRST_KERNEL = 7
BLOCK_KERNEL = 3
# The height embedding interpolates between learned vectors at this many evenly spaced heights:
# the demo's 8 heights per case each get their own, OASIS's 32 share them with their neighbours.
HEIGHT_KNOTS = 8
# Residual blocks over the top codes in a prior conditioned on them: rosinality's VQ-VAE-2 bottom
# prior runs three.
TOP_BLOCKS = 3
# The size of the causal self-attention's queries and keys: PixelSNAIL's.
ATTENTION_KEY_DIM = 16


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
        dilation_rate: spacing of the kernel's taps, in rows and columns; a dilated tap is still
            above, or left of, its output, so the mask keeps its meaning.
    """

    def __init__(self, filters, kernel_size, mask_type, dilation_rate=1, **kwargs):
        super().__init__(**kwargs)
        if mask_type not in ("A", "B", "V"):
            raise ValueError(f"mask_type must be 'A', 'B' or 'V', got {mask_type!r}")
        if dilation_rate < 1:
            raise ValueError(f"dilation_rate must be at least 1, got {dilation_rate!r}")
        self.filters = filters
        self.kernel_size = (
            (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        )
        self.mask_type = mask_type
        self.dilation_rate = dilation_rate

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
        kernel = self.used_taps(self.compute_dtype)
        padding = [[0, 0], [self.rows_above, 0], [self.columns_left, self.columns_right], [0, 0]]
        return ops.conv(ops.pad(x, padding), kernel, padding="valid",
                        dilation_rate=self.dilation_rate) + self.bias

    def at_column(self, input_back):
        """For a one-row kernel: this layer's output at one column of a row, where
        input_back(n) gives its input n columns to the left (zeros left of the row), each
        (B, 1, 1, C). The sum over the unmasked taps of input times tap matrix, as the
        convolution computes it."""
        if self.kernel_size[0] != 1:
            raise ValueError(f"{self.name}: at_column needs a one-row kernel")
        centre = self.kernel_size[1] // 2
        output = self.bias
        for tap in range(self.used_columns):
            if self.mask[0, tap, 0, 0]:
                back = (centre - tap) * self.dilation_rate
                output = output + ops.matmul(input_back(back), self.kernel[0, tap])
        return output

    def at_row(self, input_back):
        """This layer's output at one row of the map, where input_back(n) gives its input n rows
        above (zeros above the map), each (B, 1, w, C): the sum over the kernel's unmasked rows
        of each row's one-row convolution, as the 2-D convolution computes it."""
        kernel = self.used_taps(self.kernel.dtype)
        padding = [[0, 0], [0, 0], [self.columns_left, self.columns_right], [0, 0]]
        centre = self.kernel_size[0] // 2
        output = self.bias
        for tap in range(self.used_rows):
            above = ops.pad(input_back((centre - tap) * self.dilation_rate), padding)
            # one kernel row: only its columns are dilated (a (d, d) dilation of one row
            # convolves d x d sub-maps, most of them zero rows, and slows as d grows)
            output = output + ops.conv(above, kernel[tap : tap + 1], padding="valid",
                                       dilation_rate=(1, self.dilation_rate))
        return output

    def used_taps(self, dtype):
        """The masked kernel's rows and columns that hold an unmasked tap. Cut out with a slice,
        whose gradient is a pad: a strided slice's gradient cost more than the convolution."""
        used = lambda x: ops.slice(  # noqa: E731
            ops.cast(x, dtype), (0, 0, 0, 0), (self.used_rows, self.used_columns, *x.shape[2:]))
        return used(self.kernel) * used(self.mask)

    @property
    def used_rows(self):
        """Kernel rows with an unmasked tap: those above the centre, and the centre."""
        return self.kernel_size[0] // 2 + 1

    @property
    def rows_above(self):
        """How many rows above its output this layer reads."""
        return (self.used_rows - 1) * self.dilation_rate

    @property
    def used_columns(self):
        """Kernel columns with an unmasked tap."""
        height, width = self.kernel_size
        return width // 2 + 1 if height == 1 else width

    @property
    def columns_left(self):
        """How many columns left of its output this layer reads."""
        return self.kernel_size[1] // 2 * self.dilation_rate

    @property
    def columns_right(self):
        """How many columns right of its output this layer reads."""
        return (self.used_columns - 1 - self.kernel_size[1] // 2) * self.dilation_rate

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters, kernel_size=list(self.kernel_size), mask_type=self.mask_type,
            dilation_rate=self.dilation_rate,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ShiftDown(layers.Layer):
    """Shifts a feature map down one row (zeros enter at the top), so that the vertical stack's
    features at row i only describe rows above i when they reach the horizontal stack."""

    rows_above, columns_left, columns_right = 1, 0, 0

    def call(self, x):
        # a slice, not x[:, :-1]: a slice's gradient is a pad, a strided slice's a much slower op
        batch, height, width, channels = ops.shape(x)
        above = ops.slice(x, (0, 0, 0, 0), (batch, height - 1, width, channels))
        return ops.pad(above, [[0, 0], [1, 0], [0, 0], [0, 0]])

    def at_row(self, input_back):
        """The output at one row: the input one row above (see `MaskedConv2D.at_row`)."""
        return input_back(1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedActivation(layers.Layer):
    """tanh(W_f * x) * sigmoid(W_g * x), eq. 2 of the PixelCNN decoders paper; x holds both
    halves along the channel axis."""

    def call(self, x):
        features, gates = ops.split(x, 2, axis=-1)
        return ops.tanh(features) * ops.sigmoid(gates)


@keras.saving.register_keras_serializable(package=PACKAGE)
class HeightEmbedding(layers.Layer):
    """Relative heights (B,) in [0, 1] -> learned vectors (B, filters): the linear interpolation
    between `knots` learned vectors at evenly spaced heights, so that nearby heights share what
    they learn and every height in [0, 1] has a vector.

    Args:
        filters: size of each vector.
        knots: how many learned vectors, at heights 0, 1 / (knots - 1), .., 1.
    """

    def __init__(self, filters, knots, **kwargs):
        super().__init__(**kwargs)
        if knots < 2:
            raise ValueError(f"knots must be at least 2, got {knots!r}")
        self.filters = filters
        self.knots = knots

    def build(self, input_shape):
        self.vectors = self.add_weight(name="vectors", shape=(self.knots, self.filters),
                                       initializer="random_normal")

    def call(self, heights):
        position = ops.clip(ops.cast(heights, self.compute_dtype), 0.0, 1.0) * (self.knots - 1)
        below = ops.minimum(ops.floor(position), self.knots - 2)  # height 1 uses the last pair
        weight = (position - below)[:, None]  # (B, 1): the share of the knot above
        below = ops.cast(below, "int32")
        return ((1.0 - weight) * ops.take(self.vectors, below, axis=0)
                + weight * ops.take(self.vectors, below + 1, axis=0))

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, knots=self.knots)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionEmbedding(layers.Layer):
    """Embedded codes (B, h, w, F) + a learned vector for each position's row and one for its
    column, so that the prior knows where in the map a code is: where the map ends, whose last
    row and column the encoder's padding fills with codes of their own, a convolution could
    only count from the top edge. PixelSNAIL reads positions from its input likewise. A
    position's vectors depend on no code, so they change neither causality nor the receptive
    field; the prior then takes only maps of `grid_shape`.

    Args:
        grid_shape: (h, w) of the code maps.
    """

    rows_above, columns_left, columns_right = 0, 0, 0

    def __init__(self, grid_shape, **kwargs):
        super().__init__(**kwargs)
        self.grid_shape = tuple(grid_shape)

    def build(self, input_shape):
        height, width = self.grid_shape
        filters = input_shape[-1]
        self.rows = self.add_weight(name="rows", shape=(height, filters),
                                    initializer="random_normal")
        self.columns = self.add_weight(name="columns", shape=(width, filters),
                                       initializer="random_normal")

    def check_grid(self, grid_shape):
        if tuple(grid_shape) != self.grid_shape:
            raise ValueError(f"{self.name}: this prior knows positions on code maps of "
                             f"{self.grid_shape}, got maps of {tuple(grid_shape)}")

    def call(self, embedded):
        if None not in embedded.shape[1:3]:
            self.check_grid(embedded.shape[1:3])
        return embedded + self.at()

    def at(self, row=None, col=None):
        """The position vectors to add at one row (1, 1, w, F), at one code (1, 1, 1, F), or
        everywhere (1, h, w, F)."""
        rows = self.rows[:, None, :] if row is None else self.rows[row][None, None, :]
        columns = self.columns[None] if col is None else self.columns[col][None, None, :]
        return ops.cast(rows + columns, self.compute_dtype)[None]

    def get_config(self):
        config = super().get_config()
        config.update(grid_shape=self.grid_shape)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddCondition(layers.Layer):
    """x (B, h, w, C) + V^T h (B, C) at every position: the conditioning term of eq. 4. The same
    at every position, so it changes neither causality nor the receptive field."""

    rows_above, columns_left, columns_right = 0, 0, 0

    def call(self, x, projected_height):
        return x + ops.cast(projected_height, x.dtype)[:, None, None, :]


@keras.saving.register_keras_serializable(package=PACKAGE)
class TopCodeStack(layers.Layer):
    """Top code maps (B, th, tw) -> features (B, th, tw, filters): a learned embedding, then
    residual blocks of unmasked 3x3 convolutions, VQ-VAE-2's conditioning stack for the bottom
    prior. Unmasked: the whole top map is drawn before any bottom code, so every bottom code may
    read all of it. It reads no bottom code, so it adds nothing to the reach over them.

    Args:
        num_embeddings: K of the top level's codebook.
        filters: channels of the embedding and of every block.
        residual_blocks: how many blocks ReLU, 3x3 conv, ReLU, 1x1 conv, each added to its input.
    """

    rows_above, columns_left, columns_right = 0, 0, 0

    def __init__(self, num_embeddings, filters, residual_blocks, **kwargs):
        super().__init__(**kwargs)
        self.num_embeddings = num_embeddings
        self.filters = filters
        self.residual_blocks = residual_blocks
        self.embedding = layers.Embedding(num_embeddings, filters, name="embedding")
        self.blocks = [
            (layers.Conv2D(filters, BLOCK_KERNEL, padding="same", name=f"res{i + 1}_conv1"),
             layers.Conv2D(filters, 1, name=f"res{i + 1}_conv2"))
            for i in range(residual_blocks)
        ]

    def build(self, input_shape):
        self.embedding.build(input_shape)
        features_shape = (*input_shape, self.filters)
        for conv1, conv2 in self.blocks:
            conv1.build(features_shape)
            conv2.build(features_shape)

    def call(self, top_codes):
        x = self.embedding(top_codes)
        for conv1, conv2 in self.blocks:
            x = x + conv2(ops.relu(conv1(ops.relu(x))))
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.filters)

    def get_config(self):
        config = super().get_config()
        config.update(num_embeddings=self.num_embeddings, filters=self.filters,
                      residual_blocks=self.residual_blocks)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class NearestUpsample(layers.Layer):
    """Top features (B, th, tw, F) -> the same on the bottom grid (B, h, w, F), each top position's
    features repeated over the bottom positions it covers (nearest-neighbour upsampling, as
    rosinality's VQ-VAE-2 bottom prior does). Called with the embedded bottom codes, only for
    their grid: it reads no bottom code, so it adds nothing to the reach over them."""

    rows_above, columns_left, columns_right = 0, 0, 0

    def call(self, features, bottom):
        return self.to_grid(features, ops.shape(bottom)[1:3])

    def to_grid(self, features, grid_shape):
        """The features repeated onto a grid (h, w) that is a whole multiple of theirs."""
        if all(isinstance(size, int) for size in (*grid_shape, *features.shape[1:3])):
            check_multiple(grid_shape, features.shape[1:3], self.name)
        height, width = grid_shape
        x = ops.repeat(features, height // ops.shape(features)[1], axis=1)
        return ops.repeat(x, width // ops.shape(features)[2], axis=2)

    def compute_output_shape(self, features_shape, bottom_shape):
        return (*bottom_shape[:3], features_shape[-1])


def written_at(cache, index, new, axis):
    """cache with `new` in place of its slice `index` along `axis` (new has size 1 there): a
    one-hot blend, so that the sampler's compiled loops carry tensors of one fixed shape."""
    here = ops.cast(ops.arange(cache.shape[axis]) == index, cache.dtype)
    here = ops.reshape(here, [-1 if dim == axis else 1 for dim in range(len(cache.shape))])
    return cache * (1 - here) + here * new


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalSelfAttention(layers.Layer):
    """PixelSNAIL's causal self-attention (Chen et al. 2018), one head: features x (B, h, w, C)
    -> x + W_o softmax(q k^T / sqrt(d_k)) v, where position i attends to every position j <= i in
    raster order, with q, k, v = x W_q, x W_k, x W_v. A convolution stack plans a map only as far
    as its reach; this lets each code read everything drawn before it.

    Its input must already be causal (the features at j read only codes before j): then j <= i
    keeps the output at i reading only codes before i. It reads every earlier position, rows
    above included, so its reach is unbounded.

    Args:
        key_dim: d_k, the size of the queries and keys; the values keep the input's C channels.
    """

    rows_above = columns_left = columns_right = math.inf

    def __init__(self, key_dim, **kwargs):
        super().__init__(**kwargs)
        self.key_dim = key_dim

    def build(self, input_shape):
        channels = input_shape[-1]
        self.query, self.key = (
            self.add_weight(name=name, shape=(channels, self.key_dim), initializer="glorot_uniform")
            for name in ("query", "key"))
        self.value, self.output_projection = (
            self.add_weight(name=name, shape=(channels, channels), initializer="glorot_uniform")
            for name in ("value", "output_projection"))

    def keys_and_values(self, x):
        return ops.matmul(x, self.key), ops.matmul(x, self.value)

    def attend(self, x, blocks):
        """x + W_o softmax(q k^T / sqrt(d_k)) v for queries x (B, n, C), the softmax taken over
        the positions of all blocks (keys (B, m, d_k), values (B, m, C), allowed (n, m)) at
        once, each position j counted where allowed is true."""
        query = ops.matmul(x, self.query)
        scores = [ops.where(allowed, ops.cast(ops.matmul(query, ops.swapaxes(keys, 1, 2)),
                                              "float32") / math.sqrt(self.key_dim),
                            -1e9)  # finite: -inf - -inf would be nan
                  for keys, _, allowed in blocks]
        weights = ops.softmax(ops.concatenate(scores, axis=-1), axis=-1)
        if len(blocks) > 1:  # (the sampler's blocks, whose sizes are known)
            weights = ops.split(weights, np.cumsum([block[0].shape[1] for block in blocks])[:-1],
                                axis=-1)
        else:
            weights = [weights]
        attended = sum(ops.matmul(ops.cast(weight, x.dtype), values)
                       for weight, (_, values, _) in zip(weights, blocks))
        return x + ops.matmul(attended, self.output_projection)

    def call(self, x):
        batch, height, width, channels = ops.shape(x)
        flat = ops.reshape(x, (batch, height * width, channels))
        keys, values = self.keys_and_values(flat)
        position = ops.arange(height * width)
        allowed = position[:, None] >= position[None, :]  # j <= i
        return ops.reshape(self.attend(flat, [(keys, values, allowed)]), ops.shape(x))

    def at_position(self, x, row, col, above, in_row):
        """The output at (row, col) of a map computed in raster order, for x (B, 1, 1, C) there.
        above: the keys (B, h, w, d_k) and values (B, h, w, C) of the rows above (any values
        below); in_row: those of the row's columns (B, w, ..), right of col unused. Returns the
        output (B, 1, 1, C) and in_row with this position's keys and values written in."""
        x = x[:, 0]  # (B, 1, C)
        keys, values = above
        height, width = keys.shape[1:3]
        in_row = tuple(written_at(cache, col, new, axis=1)
                       for cache, new in zip(in_row, self.keys_and_values(x)))
        flat = [ops.reshape(cache, (-1, height * width, cache.shape[-1])) for cache in above]
        output = self.attend(x, [(*flat, ops.arange(height * width)[None] < row * width),
                                 (*in_row, ops.arange(width)[None] <= col)])
        return output[:, :, None], in_row

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(key_dim=self.key_dim)
        return config


def check_multiple(grid_shape, top_grid, who):
    """Refuses a bottom grid that is not a whole multiple of the top grid along each axis."""
    if any(size % top for size, top in zip(grid_shape, top_grid)):
        raise ValueError(f"{who}: the bottom grid {tuple(grid_shape)} must be a whole multiple of "
                         f"the top grid {tuple(top_grid)} (VQ-VAE-2's is twice it); pass bottom "
                         "maps of such a grid")


def block_dilations(residual_blocks, dilation_cycle):
    """Dilation of each block after the first masked layer: 1, 2, 4, .. 2 ** (dilation_cycle - 1),
    then 1 again (WaveNet's cycle), so that the reach grows exponentially with depth. A block's
    dilation never exceeds the columns its input already reads (3 + 1 + 2 + ..), so the reach
    has no gaps."""
    return [2 ** (block % dilation_cycle) for block in range(residual_blocks)]


def dropped(x, rate, name):
    """Dropout of rate (none at 0) on a block's activations before its last 1x1 convolutions,
    where PixelCNN++ (Salimans et al. 2017) and rosinality's VQ-VAE-2 priors place it.
    Pointwise, so it changes neither causality nor the receptive field; sampling runs without
    it."""
    return layers.Dropout(rate, name=f"{name}_dropout")(x) if rate else x


def plain_residual_block(x, filters, dilation, name, dropout=0.0):
    """1x1 conv to filters/2, masked 3x3 conv (mask B), 1x1 back to filters, added to x."""
    h = layers.Conv2D(filters // 2, 1, activation="relu", name=f"{name}_conv1")(x)
    h = MaskedConv2D(filters // 2, BLOCK_KERNEL, "B", dilation, name=f"{name}_pixel_conv")(h)
    h = dropped(layers.ReLU(name=f"{name}_relu")(h), dropout, name)
    h = layers.Conv2D(filters, 1, activation="relu", name=f"{name}_conv2")(h)
    return layers.Add(name=f"{name}_add")([x, h])


def plain_stack(embedded, filters, residual_blocks, dilation_cycle, dropout=0.0):
    x = MaskedConv2D(filters, FIRST_KERNEL, "A", name="pixel_conv_a")(embedded)
    x = layers.ReLU(name="pixel_conv_a_relu")(x)
    for i, dilation in enumerate(block_dilations(residual_blocks, dilation_cycle)):
        x = plain_residual_block(x, filters, dilation, name=f"res{i + 1}", dropout=dropout)
    return x


def gated_layers(residual_blocks, dilation_cycle):
    """(kernel size, dilation) of each gated layer: the first 7x7, the blocks after it 3x3 and
    dilated."""
    return [(FIRST_KERNEL, 1)] + [
        (BLOCK_KERNEL, dilation) for dilation in block_dilations(residual_blocks, dilation_cycle)
    ]


def conditioned(x, height, top, name):
    """x + V^T h + V * s before a gate (eq. 4 of the paper, and its form for a map s), h the
    embedded height, s the top codes' features on x's grid; a term is left out when its
    condition is None. A 1x1 convolution of s adds to each position only s there, so it changes
    neither causality nor the receptive field."""
    if height is not None:
        projected = layers.Dense(x.shape[-1], name=f"{name}_condition")(height)
        x = AddCondition(name=f"{name}_conditioned")(x, projected)
    if top is not None:
        projected = layers.Conv2D(x.shape[-1], 1, name=f"{name}_top_condition")(top)
        x = layers.Add(name=f"{name}_top_conditioned")([x, projected])
    return x


def height_input(filters, conditional, name):
    """The embedded heights (B, filters) a conditional stack takes after the codes, or None."""
    return keras.Input(shape=(filters,), name=name) if conditional else None


def top_input(filters, on_top, name):
    """The top codes' features on the bottom grid (B, h, w, filters) that a stack conditioned on
    the top codes takes as its last input, or None."""
    return keras.Input(shape=(None, None, filters), name=name) if on_top else None


def vertical_stack(filters, residual_blocks, dilation_cycle, conditional=False, on_top=False):
    """The gated PixelCNN's vertical stack (fig. 2 of the paper): embedded codes (and, when
    conditional, embedded heights; when on_top, the top codes' features) -> one map per gated
    layer, added into the horizontal stack, whose row i describes only the rows above i.

    A model of its own, so that the sampler can walk its layers one row at a time.
    """
    embedded = keras.Input(shape=(None, None, filters), name="vertical_input")
    height = height_input(filters, conditional, "vertical_condition_input")
    top = top_input(filters, on_top, "vertical_top_input")
    vertical, links = embedded, []
    for layer, (kernel, dilation) in enumerate(gated_layers(residual_blocks, dilation_cycle)):
        name = f"gated{layer}"
        pre = MaskedConv2D(2 * filters, kernel, "V", dilation, name=f"{name}_vertical")(vertical)
        shifted = ShiftDown(name=f"{name}_shift")(pre)  # row i now sees rows < i only
        links.append(layers.Conv2D(2 * filters, 1, name=f"{name}_v_to_h")(shifted))
        if layer < residual_blocks:  # the last layer's vertical output would feed nothing
            vertical = GatedActivation(name=f"{name}_vertical_gate")(
                conditioned(pre, height, top, f"{name}_vertical"))
    inputs = [embedded] + [x for x in (height, top) if x is not None]
    return keras.Model(inputs, links, name="vertical_stack")


def horizontal_stack(num_embeddings, filters, residual_blocks, output_layers, dilation_cycle,
                     conditional=False, on_top=False, dropout=0.0, attention=False):
    """The horizontal stack and the output layers: the embedded codes, the vertical stack's
    maps (and, when conditional, the embedded heights; when on_top, the top codes' features)
    -> logits (B, h, w, K). A position reads
    only its own row, at and left of itself (its own code never: the first layer's mask is A),
    plus the vertical maps.

    Each gated layer computes tanh(W_f * x + V_f^T h) * sigmoid(W_g * x + V_g^T h) (eq. 2, or
    eq. 4 when conditional) on the sum of its masked 1xk convolution and the vertical map, then a
    1x1 skip output and, after the first, a residual connection; `dropout` drops the gate's
    outputs in training. With `attention`, the sum of the skip outputs passes through
    `CausalSelfAttention` before the output layers.
    """
    embedded = keras.Input(shape=(None, None, filters), name="horizontal_input")
    links = [keras.Input(shape=(None, None, 2 * filters), name=f"gated{layer}_link_input")
             for layer in range(residual_blocks + 1)]
    height = height_input(filters, conditional, "horizontal_condition_input")
    top = top_input(filters, on_top, "horizontal_top_input")
    horizontal, skips = embedded, []
    for layer, ((kernel, dilation), link) in enumerate(
        zip(gated_layers(residual_blocks, dilation_cycle), links)
    ):
        name = f"gated{layer}"
        pre = MaskedConv2D(
            2 * filters, (1, kernel), "B" if layer else "A", dilation, name=f"{name}_horizontal"
        )(horizontal)
        gated = dropped(GatedActivation(name=f"{name}_horizontal_gate")(conditioned(
            layers.Add(name=f"{name}_link")([pre, link]), height, top, f"{name}_horizontal")),
            dropout, f"{name}_horizontal")
        skips.append(layers.Conv2D(filters, 1, name=f"{name}_skip")(gated))
        if layer < residual_blocks:
            residual = layers.Conv2D(filters, 1, name=f"{name}_residual")(gated)
            # the first layer's input is the raw embedding, which must not reach the output
            horizontal = (layers.Add(name=f"{name}_add")([horizontal, residual]) if layer
                          else residual)
    x = layers.Add(name="skips")(skips) if len(skips) > 1 else skips[0]
    if attention:
        x = CausalSelfAttention(ATTENTION_KEY_DIM, name="attention")(x)
    logits = output_head(x, num_embeddings, filters, output_layers)
    inputs = [embedded, *links] + [x for x in (height, top) if x is not None]
    return keras.Model(inputs, logits, name="horizontal_stack")


def output_head(x, num_embeddings, filters, output_layers):
    """ReLU and 1x1 convolutions, then logits over the K codes."""
    for i in range(output_layers):
        x = layers.ReLU(name=f"out{i + 1}_relu")(x)
        x = layers.Conv2D(filters, 1, name=f"out{i + 1}")(x)
    x = layers.ReLU(name="logits_relu")(x)
    return layers.Conv2D(num_embeddings, 1, dtype="float32", name="logits")(x)


KINDS = ("gated", "plain")
CONDITIONS = ("none", "slice")


def build_pixelcnn(num_embeddings, filters, residual_blocks, output_layers, kind,
                   dilation_cycle, condition="none", positions=None, top_embeddings=None,
                   top_grid=None, dropout=0.0, attention=False):
    """A PixelCNN prior: code maps (B, h, w) -> logits (B, h, w, K). Conditioned, it takes
    [code maps, relative heights (B,) in [0, 1] (condition "slice"), top code maps (B, th, tw)
    (top_grid)], those it is conditioned on, in this order. driver.py's flags hold the defaults.

    Args:
        num_embeddings: K, the number of codes.
        filters: channels of every hidden layer.
        residual_blocks: residual (plain) or gated (gated) blocks after the first masked layer.
        output_layers: 1x1 ReLU layers between the stack and the logits.
        kind: "plain" or "gated".
        dilation_cycle: block i's masked convolutions are dilated by 2 ** (i % dilation_cycle),
            so that the reach grows exponentially with the blocks, not linearly (see
            `block_dilations`); 1 dilates nothing.
        condition: "none", or "slice": a learned embedding of the height is added before every
            gate of both stacks (eq. 4 of the paper); gated priors only.
        positions: None, or the code grid (h, w): each code's embedding is then added to a
            learned embedding of its row and column (`PositionEmbedding`); gated priors only.
        top_embeddings, top_grid: None, or K and the grid (th, tw) of a top level's codes: the
            prior is then VQ-VAE-2's bottom prior, over code maps whose grid is a whole multiple
            of top_grid, conditioned on the top code map. A non-causal stack reads the whole top
            map (`TopCodeStack`), its features are upsampled to the bottom grid and a 1x1
            projection of them is added before every gate of both stacks; gated priors only.
        dropout: the rate at which each block drops its activations in training (`dropped`); 0,
            the PixelCNN paper's, drops none.
        attention: whether the horizontal stack ends in PixelSNAIL's causal self-attention
            (`CausalSelfAttention`), so that each code reads every code before it, not only
            those in the stacks' reach; gated priors only.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dilation_cycle < 1:
        raise ValueError(f"dilation_cycle must be at least 1, got {dilation_cycle!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition != "none" and kind != "gated":
        raise ValueError(f"condition {condition!r} needs the gated prior, got kind {kind!r}")
    if positions is not None and kind != "gated":
        raise ValueError(f"positions need the gated prior, got kind {kind!r}")
    if (top_embeddings is None) != (top_grid is None):
        raise ValueError("a prior conditioned on top codes needs both top_embeddings and "
                         f"top_grid, got {top_embeddings!r} and {top_grid!r}")
    if attention and kind != "gated":
        raise ValueError(f"attention needs the gated prior, got kind {kind!r}")
    if top_grid is not None and kind != "gated":
        raise ValueError(f"top codes need the gated prior, got kind {kind!r}")
    if top_grid is not None and positions is not None:
        check_multiple(positions, top_grid, "build_pixelcnn")
    codes = keras.Input(shape=(None, None) if positions is None else tuple(positions),
                        dtype="int32", name="codes")
    # A learned embedding is a one-hot input times a K x filters matrix, without the K-wide
    # one-hot tensor.
    embedded = layers.Embedding(num_embeddings, filters, name="embedding")(codes)
    if positions is not None:
        embedded = PositionEmbedding(positions, name="position_embedding")(embedded)
    if condition == "slice":
        heights = keras.Input(shape=(), name="heights")
        embedded_heights = [HeightEmbedding(filters, HEIGHT_KNOTS,
                                            name="height_embedding")(heights)]
    else:
        heights, embedded_heights = None, []
    if top_grid is not None:
        top_codes = keras.Input(shape=tuple(top_grid), dtype="int32", name="top_codes")
        top_features = TopCodeStack(top_embeddings, filters, TOP_BLOCKS,
                                    name="top_stack")(top_codes)  # (B, th, tw, F)
        top = [NearestUpsample(name="top_upsample")(top_features, embedded)]  # (B, h, w, F)
    else:
        top_codes, top = None, []
    conditional = heights is not None
    if kind == "gated":
        vertical = vertical_stack(filters, residual_blocks, dilation_cycle, conditional, bool(top))
        links = keras.tree.flatten(vertical([embedded, *embedded_heights, *top]))
        logits = horizontal_stack(
            num_embeddings, filters, residual_blocks, output_layers, dilation_cycle, conditional,
            bool(top), dropout, attention,
        )([embedded, *links, *embedded_heights, *top])
    else:
        stack = plain_stack(embedded, filters, residual_blocks, dilation_cycle, dropout)
        logits = output_head(stack, num_embeddings, filters, output_layers)
    inputs = [x for x in (codes, heights, top_codes) if x is not None]
    return keras.Model(inputs if len(inputs) > 1 else codes, logits, name=f"{kind}_pixelcnn")


def is_conditional(prior):
    """Whether a prior from `build_pixelcnn` takes the slices' heights beside the codes."""
    return any(layer.name == "height_embedding" for layer in prior.layers)


def check_heights(prior, heights):
    """Refuses heights for an unconditional prior, and a conditional prior without them."""
    if is_conditional(prior) != (heights is not None):
        raise ValueError("a conditional prior needs the heights, an unconditional one takes none"
                         f" ({prior.name}, heights {'given' if heights is not None else 'None'})")


def top_grid(prior):
    """The grid (th, tw) of the top code maps a prior from `build_pixelcnn` is conditioned on,
    or None."""
    if not any(layer.name == "top_codes" for layer in prior.layers):
        return None
    return tuple(prior.get_layer("top_codes").batch_shape[1:])


def check_top_codes(prior, top_codes, codes_shape):
    """Refuses top codes for a prior not conditioned on them, a prior conditioned on them
    without them, and top codes that are not one (th, tw) map per bottom map of codes_shape
    (N, h, w), whose grid must be a whole multiple of (th, tw)."""
    grid = top_grid(prior)
    if grid is None:
        if top_codes is not None:
            raise ValueError(f"{prior.name} is not conditioned on top codes: pass top_codes=None")
        return
    expected = (codes_shape[0], *grid)
    if top_codes is None:
        raise ValueError(f"{prior.name} is conditioned on a top code map: pass top_codes, one "
                         f"map per bottom map, of shape {expected}")
    if tuple(np.shape(top_codes)) != expected:
        raise ValueError(f"{prior.name}: top_codes must have shape {expected}, one map of the "
                         f"top grid {grid} per bottom map, got {tuple(np.shape(top_codes))}; "
                         "pass the top codes the prior was built for")
    check_multiple(codes_shape[1:], grid, prior.name)


def prior_inputs(prior, codes, heights, top_codes=None):
    """What `prior` takes: the codes, or a list of the codes and what it is conditioned on (the
    heights, the top codes)."""
    check_heights(prior, heights)
    check_top_codes(prior, top_codes, np.shape(codes))
    inputs = [x for x in (codes, heights, top_codes) if x is not None]
    return inputs if len(inputs) > 1 else codes


Reach = collections.namedtuple("Reach", ["rows_above", "columns_left", "columns_right"])


Step = collections.namedtuple("Step", ["layer", "reads", "arguments"])
LayerGraph = collections.namedtuple("LayerGraph", ["steps", "inputs", "outputs"])


def layer_graph(model):
    """How a functional model's layers are wired: the one place that reads it from Keras (from
    the model's serialized config), so that `receptive_field` and the sampler, which re-run the
    graph, break here, loudly, if a Keras version serializes models differently.

    Returns:
        LayerGraph(steps, inputs, outputs). steps: a Step(layer, reads, arguments) per layer in
        topological order (input layers too): `reads`, the names of the layers whose outputs
        its call reads; `arguments`, the call's positional arguments with each tensor replaced
        by the name of the layer it is an output of (an Add takes one list of names,
        AddCondition two names). A layer's several outputs all go by its name. inputs, outputs:
        the names of the model's input and output layers, in the model's order.

    Raises:
        ValueError: the model is not functional, calls a layer more than once, passes a layer
        a tensor by keyword, or its config is not laid out as this function expects.
    """

    def refuse(problem):
        raise ValueError(f"layer_graph: {model.name}: {problem} (Keras {keras.__version__}; the "
                         "sampler reads functional models as Keras 3 serializes them)")

    def named(argument, reads):
        """The argument with the name of its layer in place of each tensor; each name is also
        appended to `reads`."""
        if isinstance(argument, (list, tuple)):
            return [named(item, reads) for item in argument]
        if not isinstance(argument, dict):
            return argument
        history = argument.get("config", {}).get("keras_history")
        if argument.get("class_name") != "__keras_tensor__" or not (
                isinstance(history, (list, tuple)) and len(history) == 3):
            refuse(f"an argument is neither a tensor with a [layer, node, index] history nor a "
                   f"plain value: {argument!r}")
        reads.append(history[0])
        return history[0]

    def layer_names(entries, what):
        """The names in config["input_layers"] or ["output_layers"]: one [name, node, index],
        or a list of them."""
        entries = [entries] if entries and isinstance(entries[0], str) else entries
        if not all(isinstance(entry, (list, tuple)) and len(entry) == 3 for entry in entries):
            refuse(f"its {what} are not [layer, node, index] entries: {entries!r}")
        return [name for name, _, _ in entries]

    config = model.get_config()
    if not {"layers", "input_layers", "output_layers"} <= set(config):
        refuse("not a functional model (no layers, input_layers and output_layers in its config)")
    steps = []
    for layer_config in config["layers"]:
        layer = model.get_layer(layer_config["name"])
        nodes = layer_config.get("inbound_nodes")
        expected = 0 if isinstance(layer, layers.InputLayer) else 1
        if not isinstance(nodes, (list, tuple)) or len(nodes) != expected:
            refuse(f"layer {layer.name!r} has inbound nodes {nodes!r}; every layer but the "
                   "inputs must be called exactly once")
        if not nodes:
            steps.append(Step(layer, (), []))
            continue
        (node,) = nodes
        if not (isinstance(node, dict) and isinstance(node.get("args"), (list, tuple))
                and isinstance(node.get("kwargs"), dict)):
            refuse(f"layer {layer.name!r}'s call is not an args list and a kwargs dict: {node!r}")
        keyword_tensors, reads = [], []
        named(list(node["kwargs"].values()), keyword_tensors)
        if keyword_tensors:
            refuse(f"layer {layer.name!r} takes a tensor by keyword; the sampler passes only "
                   "positional arguments")
        arguments = named(node["args"], reads)
        reads = tuple(dict.fromkeys(reads))
        if not reads or not set(reads) <= {step.layer.name for step in steps}:
            refuse(f"layer {layer.name!r} reads {reads!r}, not layers listed before it")
        steps.append(Step(layer, reads, arguments))
    inputs = layer_names(config["input_layers"], "inputs")
    outputs = layer_names(config["output_layers"], "outputs")
    names = {step.layer.name for step in steps}
    if not set(inputs) | set(outputs) <= names:
        refuse(f"its inputs {inputs} or outputs {outputs} are not among its layers")
    return LayerGraph(steps, inputs, outputs)


# Layers that compute each position from that position alone.
POINTWISE_LAYERS = (layers.InputLayer, layers.Embedding, layers.ReLU, layers.Activation,
                    layers.Add, layers.Dense, layers.Dropout, GatedActivation, HeightEmbedding)


def _is_pointwise_conv(layer):
    return (isinstance(layer, layers.Conv2D) and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1))


def layer_reach(layer):
    """How far above, left and right of a position one layer reads. Refuses a layer whose reach
    it cannot know: assuming none would make the fast sampler silently wrong."""
    if isinstance(layer, keras.Model):
        return receptive_field(layer)
    if all(hasattr(layer, axis) for axis in Reach._fields):
        return Reach(*(getattr(layer, axis) for axis in Reach._fields))
    if isinstance(layer, POINTWISE_LAYERS) or _is_pointwise_conv(layer):
        return Reach(0, 0, 0)
    raise ValueError(f"receptive_field: cannot tell how far layer {layer.name!r} "
                     f"({type(layer).__name__}) reads; give it rows_above, columns_left and "
                     "columns_right attributes, as MaskedConv2D has")


def receptive_field(model):
    """How far above, left and right of a position a model's outputs there can look: along each
    axis, the longest path through the layer graph of the reaches of its layers (a nested model
    counts as its own longest path). An upper bound; exact for the plain prior and for each of
    the gated prior's two stacks."""
    graph = layer_graph(model)
    reach = {}
    for layer, reads, _ in graph.steps:  # in topological order
        own = layer_reach(layer)
        inputs = [reach[name] for name in reads]
        reach[layer.name] = Reach(*(
            own[axis] + max((r[axis] for r in inputs), default=0) for axis in range(len(own))
        ))
    return Reach(*(max(reach[name][axis] for name in graph.outputs) for axis in range(3)))


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


class RasterSteps(abc.ABC):
    """How `code_sampler` computes a prior's logits in raster order. Inside one compiled graph,
    for B maps at once, it calls:

        conditions = steps.conditions(heights, top_codes)   # once
        map_state = steps.begin_map(codes)                  # once, before the first row
        for row in range(h):
            row_state = steps.start_row(codes, row, map_state, conditions)
            for col in range(w):
                logits, row_state = steps.logits_at(codes, row, col, row_state, conditions)
                drawn = <a code (B,) drawn from logits (B, K)>; codes[:, row, col] = drawn
                row_state = steps.after_draw(row_state, row, col, drawn)
            map_state = steps.end_row(codes, row, map_state, row_state, conditions)

    codes (B, h, w) int32 holds the codes drawn so far, 0 where none is drawn yet; heights
    (B,) are a conditional prior's relative heights (zeros for an unconditional one); top_codes
    (B, th, tw) int32 the top code maps of a prior conditioned on them (zeros (B, 1, 1) for
    another). conditions: what the prior computes from those alone, before any code is drawn
    (nothing for an unconditional prior). map_state: what finished rows leave for later
    rows. row_state: what the row's codes so far leave for its later codes. Each state is a
    tensor or a nest of them whose structure and shapes stay the same from one step to the
    next: the compiled loops carry them.
    """

    def conditions(self, heights, top_codes):
        """Computed once per call, so that no position computes them again."""
        return {}

    @abc.abstractmethod
    def begin_map(self, codes):
        """The map_state before the first row."""

    @abc.abstractmethod
    def start_row(self, codes, row, map_state, conditions):
        """The row_state before the row's first code."""

    @abc.abstractmethod
    def logits_at(self, codes, row, col, row_state, conditions):
        """(logits (B, K) of the code at (row, col), the row_state after computing them)."""

    def after_draw(self, row_state, row, col, drawn):
        """The row_state once the codes `drawn` (B,) are written at (row, col)."""
        return row_state

    def end_row(self, codes, row, map_state, row_state, conditions):
        """The map_state once every code of the row is drawn."""
        return map_state


class _WindowedSteps(RasterSteps):
    """How `code_sampler` computes any prior's logits in raster order: at (row, col) from the
    smallest window of the map that the prior's receptive field covers, which gives the same
    logits as the whole map. The windows read the drawn codes from the map itself: the
    row_state is only the top row of the row's windows, and there is no map_state."""

    def __init__(self, prior, grid_shape):
        if is_conditional(prior) or top_grid(prior) is not None:
            raise ValueError(f"{prior.name}: the windowed sampler takes no heights or top codes")
        self.prior = prior
        self.height, self.width = grid_shape
        self.reach = receptive_field(prior)
        self.rows = min(self.height, self.reach.rows_above + 1)
        self.columns = min(self.width, self.reach.columns_left + self.reach.columns_right + 1)

    def begin_map(self, codes):
        return tf.zeros((), tf.int32)

    def start_row(self, codes, row, map_state, conditions):
        return tf.clip_by_value(row - self.rows + 1, 0, self.height - self.rows)

    def logits_at(self, codes, row, col, row_state, conditions):
        top = row_state
        left = tf.clip_by_value(col - self.reach.columns_left, 0, self.width - self.columns)
        context = codes[:, top : top + self.rows, left : left + self.columns]  # (B, rows, cols)
        return self.prior(context, training=False)[:, row - top, col - left], top  # (B, K)


def _layer_or_none(model, name):
    return model.get_layer(name) if any(layer.name == name for layer in model.layers) else None


def _called(step, values):
    """A layer's output on its call's arguments (see `layer_graph`), each layer's output they
    name read from `values`."""
    return step.layer(*keras.tree.map_structure(
        lambda argument: values[argument] if argument in step.reads else argument,
        step.arguments))


def _run_on(steps, values):
    """Runs, once, the layers that read only what `values` holds (by layer name), adding their
    outputs to it: given a conditional prior's embedded heights, their projections V^T h, the
    same at every position."""
    for step in steps:
        if step.reads and all(source in values for source in step.reads):
            values[step.layer.name] = _called(step, values)
    return values


def _run_at(steps, values, method, earlier, attend=None):
    """Runs a model's layers at one position (a row, or a column of a row) of their outputs.
    `values` holds the inputs there, by layer name, and receives every layer's output there;
    a layer whose output it already holds (see `_run_on`) is not run again. A layer that reads
    other positions has `method` (at_row or at_column), which asks earlier(source, n) for its
    input n positions back, or takes values[source] for n = 0; a CausalSelfAttention, which
    reads every earlier position, is run by attend(layer, its input here); every other layer
    must be pointwise."""
    for step in steps:
        layer = step.layer
        if isinstance(layer, layers.InputLayer) or layer.name in values:
            continue
        if isinstance(layer, CausalSelfAttention) and attend is not None:
            (source,) = step.reads
            values[layer.name] = attend(layer, values[source])
        elif hasattr(layer, method):
            (source,) = step.reads
            values[layer.name] = getattr(layer, method)(
                lambda n, source=source: values[source] if n == 0 else earlier(source, n))
        elif _is_pointwise_conv(layer):
            (source,) = step.reads
            values[layer.name] = _as_matmul(layer, values[source])
        elif layer_reach(layer) == Reach(0, 0, 0):  # layer_reach refuses what it cannot measure
            values[layer.name] = _called(step, values)
        else:
            raise ValueError(f"the sampler runs {layer.name!r} at one position at a time, but "
                             "it reads other positions and has no " + method)
    return values


def _as_matmul(conv, x):
    """A 1x1 convolution's output on x (B, h, w, C), computed as the matmul it is, which
    TensorFlow runs faster than a 1x1 convolution on the sampler's one-code maps."""
    kernel = ops.reshape(conv.kernel, conv.kernel.shape[2:])  # (C, C')
    outputs = ops.matmul(ops.reshape(x, (-1, x.shape[-1])), kernel)
    if conv.use_bias:
        outputs = tf.nn.bias_add(outputs, conv.bias)  # fused into the matmul on CPU
    return ops.reshape(conv.activation(outputs), (*ops.shape(x)[:-1], kernel.shape[-1]))


def _reads_back(steps, method, reach):
    """{source layer name: how many positions back its readers reach} for the layers whose
    outputs a layer with `method` reads at earlier positions."""
    back = {}
    for layer, reads, _ in steps:
        if hasattr(layer, method):
            (source,) = reads
            back[source] = max(back.get(source, 0), reach(layer))
    return back


class _GatedSteps(RasterSteps):
    """How `code_sampler` computes the gated prior's logits in raster order, each layer at each
    position once, never a window of the map again:

    - the vertical stack, whose maps at row i read only rows above i, runs one row at a time
      (start_row); the map_state keeps each of its layers' last outputs that a later row reads,
      and a finished row's outputs join them (end_row);
    - the horizontal stack runs one code at a time (logits_at); the row_state keeps the
      vertical stack's links into the row, its layers' outputs at the codes left of it that a
      later code reads, and the drawn codes' embeddings (after_draw);
    - a causal self-attention keeps the keys and values of every position it has run at: of
      the finished rows in the map_state, of the row's codes so far in the row_state.

    What the prior is conditioned on enters once: the heights' projections, the same at every
    position, before the loops; the top codes' features too, on the top grid, then each row
    takes its row of them upsampled to the bottom grid, and each code its own.
    """

    def __init__(self, prior, grid_shape):
        self.height, self.width = grid_shape
        self.embedding = prior.get_layer("embedding")
        self.position = _layer_or_none(prior, "position_embedding")
        if self.position is not None:
            self.position.check_grid(grid_shape)
        self.vertical = prior.get_layer("vertical_stack")
        self.horizontal = prior.get_layer("horizontal_stack")
        vertical, horizontal = layer_graph(self.vertical), layer_graph(self.horizontal)
        self.vertical_steps, self.horizontal_steps = vertical.steps, horizontal.steps
        self.links = vertical.outputs
        self.height_embedding = _layer_or_none(prior, "height_embedding")
        self.top_stack = _layer_or_none(prior, "top_stack")
        self.top_upsample = _layer_or_none(prior, "top_upsample")
        if self.top_stack is not None:
            check_multiple(grid_shape, top_grid(prior), prior.name)
        # After the codes (and the horizontal stack's links) each stack takes a conditional
        # prior's embedded heights, then the top codes' features of a prior conditioned on them.
        self.vertical_input, *vertical_conditions = vertical.inputs
        self.embedded_input, *self.link_inputs = horizontal.inputs
        self.link_inputs, horizontal_conditions = (self.link_inputs[: len(self.links)],
                                                   self.link_inputs[len(self.links) :])
        on_top = int(self.top_stack is not None)
        self.condition_inputs = (vertical_conditions[: len(vertical_conditions) - on_top]
                                 + horizontal_conditions[: len(horizontal_conditions) - on_top])
        self.vertical_top, self.horizontal_top = ((vertical_conditions[-1],
                                                   horizontal_conditions[-1])
                                                  if on_top else (None, None))
        (self.logits,) = horizontal.outputs
        self.rows_back = _reads_back(self.vertical_steps, "at_row", lambda layer: layer.rows_above)
        self.columns_back = _reads_back(self.horizontal_steps, "at_column",
                                        lambda layer: layer.columns_left)
        self.pad = max(self.columns_back.values())  # zero columns left of the row
        self.attentions = [step.layer for step in self.horizontal_steps
                           if isinstance(step.layer, CausalSelfAttention)]

    def channels(self, model, name):
        return model.get_layer(name).output.shape[-1]

    def embedded(self, codes, row, col=None):
        """The prior's embedding of the codes at one row (B, 1, w) or at one code (B, 1, 1)."""
        embedded = self.embedding(codes)
        return embedded if self.position is None else embedded + self.position.at(row, col)

    def conditions(self, heights, top_codes):
        """everywhere: the stacks' height inputs, the embedded heights (B, F), and every layer
        that reads only them (the projections V^T h, (B, 2F)), by name; or none. top: the top
        codes' features (B, th, tw, F), or None. Computed once per call, not at every
        position."""
        everywhere = {}
        if self.height_embedding is not None:
            embedded = self.height_embedding(heights)
            values = {name: embedded for name in self.condition_inputs}
            everywhere = _run_on(self.horizontal_steps, _run_on(self.vertical_steps, values))
        top = None if self.top_stack is None else self.top_stack(top_codes)
        return {"everywhere": everywhere, "top": top}

    def top_row(self, conditions, row):
        """The top codes' features at one row of the bottom grid, (B, 1, w, F)."""
        features = conditions["top"]  # (B, th, tw, F)
        above = row // (self.height // features.shape[1])  # the top row that covers it
        return self.top_upsample.to_grid(features[:, above : above + 1], (1, self.width))

    def attention_cache(self, codes, grid_shape):
        """For each causal self-attention: zero keys and values (B, *grid_shape, d_k or C)."""
        batch = tf.shape(codes)[0]
        return {layer.name: tuple(tf.zeros((batch, *grid_shape, weights.shape[-1]))
                                  for weights in (layer.key, layer.value))
                for layer in self.attentions}

    def begin_map(self, codes):
        """rows: for each vertical layer a later row reads, its outputs at the rows above (zeros
        above the map), (B, rows back, w, C); attention: each attention's keys and values of the
        finished rows (zeros for the others)."""
        batch = tf.shape(codes)[0]
        rows = {name: tf.zeros((batch, back, self.width, self.channels(self.vertical, name)))
                for name, back in self.rows_back.items()}
        return {"rows": rows, "attention": self.attention_cache(codes, (self.height, self.width))}

    def vertical_row(self, codes, row, map_state, conditions):
        """The vertical stack's outputs at `row`, from the codes there."""
        values = {self.vertical_input: self.embedded(codes[:, row : row + 1], row),  # (B, 1, w, F)
                  **conditions["everywhere"]}
        if self.vertical_top is not None:
            values[self.vertical_top] = self.top_row(conditions, row)
        return _run_at(self.vertical_steps, values, "at_row",
                       lambda source, n: map_state["rows"][source][:, -n, None])

    def start_row(self, codes, row, map_state, conditions):
        """The vertical stack's links into this row, (B, w, 2F) each, which read only rows
        above it (so the row's undrawn codes, still 0, do not matter); and for each horizontal
        layer a later code reads, an array of its outputs at the row's columns; the horizontal
        stack's projections of the row's top features, (B, 1, w, 2F) each; and each attention's
        keys and values, of the rows above and (none yet) of this row."""
        values = self.vertical_row(codes, row, map_state, conditions)
        links = [values[name][:, 0] for name in self.links]
        batch = tf.shape(codes)[0]
        history = {}
        for name in self.columns_back:
            channels = self.channels(self.horizontal, name)
            array = tf.TensorArray(tf.float32, size=self.pad + self.width,
                                   element_shape=(None, 1, 1, channels))
            for col in range(self.pad):
                array = array.write(col, tf.zeros((batch, 1, 1, channels)))
            history[name] = array
        top = ({} if self.horizontal_top is None else _run_on(
            self.horizontal_steps, {self.horizontal_top: self.top_row(conditions, row)}))
        in_row = self.attention_cache(codes, (self.width,))
        attention = {name: {"above": above, "row": in_row[name]}
                     for name, above in map_state["attention"].items()}
        return {"links": links, "history": history, "top": top, "attention": attention}

    def logits_at(self, codes, row, col, row_state, conditions):
        history = row_state["history"]
        values = {name: link[:, col, None, None]
                  for name, link in zip(self.link_inputs, row_state["links"])}
        values.update(conditions["everywhere"])
        values.update({name: row_top[:, :, col : col + 1]  # (B, 1, 1, C)
                       for name, row_top in row_state["top"].items()})
        # The code at col is not drawn yet: zeros stand in, which the first layer's mask A
        # never reads.
        values[self.embedded_input] = tf.zeros(
            (tf.shape(codes)[0], 1, 1, self.embedding.output_dim))
        attention = dict(row_state["attention"])

        def attend(layer, x):
            cache = attention[layer.name]
            output, in_row = layer.at_position(x, row, col, cache["above"], cache["row"])
            attention[layer.name] = {**cache, "row": in_row}
            return output

        values = _run_at(self.horizontal_steps, values, "at_column",
                         lambda source, n: history[source].read(col - n + self.pad), attend)
        history = {name: array if name == self.embedded_input
                   else array.write(col + self.pad, values[name])
                   for name, array in history.items()}
        return values[self.logits][:, 0, 0], {**row_state, "history": history,  # (B, K)
                                              "attention": attention}

    def after_draw(self, row_state, row, col, drawn):
        history = dict(row_state["history"])
        history[self.embedded_input] = history[self.embedded_input].write(
            col + self.pad, self.embedded(drawn[:, None, None], row, col))
        return {**row_state, "history": history}

    def end_row(self, codes, row, map_state, row_state, conditions):
        """The finished row's vertical outputs join the rows above, and its attention keys and
        values those of the finished rows."""
        values = self.vertical_row(codes, row, map_state, conditions)
        # (the shape restated: the loop that carries it needs the window's height fixed)
        rows = {name: tf.ensure_shape(ops.concatenate([above[:, 1:], values[name]], axis=1),
                                      above.shape)
                for name, above in map_state["rows"].items()}
        attention = {name: tuple(written_at(cache, row, in_row[:, None], axis=1)
                                 for cache, in_row in zip(state["above"], state["row"]))
                     for name, state in row_state["attention"].items()}
        return {"rows": rows, "attention": attention}


def sample_codes(prior, num_samples, grid_shape, temperature=1.0, seed=0, heights=None,
                 rows_done=None, top_codes=None):
    """Draw code maps from the prior, one code at a time in raster order.

    Exact, and fast: the loop runs inside one compiled graph and computes no more of the prior
    than the next code's logits need (see `RasterSteps`). To sample
    one prior repeatedly without compiling it again, call `code_sampler` once.

    Args:
        prior: a model from `build_pixelcnn`.
        num_samples: how many code maps to draw.
        grid_shape: (h, w) of the code maps.
        temperature: divides the logits; below 1 sharpens, above 1 flattens the distribution.
        seed: integer; the same seed gives the same samples.
        heights: a conditional prior's relative heights in [0, 1], one per sample (None for an
            unconditional prior).
        rows_done: None, or a function called with the number of rows drawn in every map so
            far, after each row (a progress bar's update); the codes do not depend on it.
        top_codes: the top code maps (num_samples, th, tw) of a prior conditioned on them (see
            `build_pixelcnn`'s top_grid), one per sample, drawn before these; None for another.

    Returns:
        int32 tensor (num_samples, h, w).
    """
    return code_sampler(prior, grid_shape, rows_done)(num_samples, temperature, seed, heights,
                                                      top_codes)


def code_sampler(prior, grid_shape, rows_done=None):
    """`sample_codes` for one prior and grid, compiled once: (num_samples, temperature, seed,
    heights, top_codes) -> int32 code maps (num_samples, h, w), calling rows_done(rows) after
    each row."""
    height, width = grid_shape
    is_gated = any(layer.name == "vertical_stack" for layer in prior.layers)
    steps = (_GatedSteps if is_gated else _WindowedSteps)(prior, grid_shape)

    def sample_all(num_samples, temperature, seed, heights, top_codes):
        codes = tf.zeros((num_samples, height, width), tf.int32)
        conditions = steps.conditions(heights, top_codes)
        map_state = steps.begin_map(codes)
        for row in tf.range(height):
            row_state = steps.start_row(codes, row, map_state, conditions)
            for col in tf.range(width):
                logits, row_state = steps.logits_at(codes, row, col, row_state, conditions)
                drawn = draw_codes(logits, temperature, seed, row * width + col)
                codes = _write_codes(codes, row, col, drawn)
                row_state = steps.after_draw(row_state, row, col, drawn)
            map_state = steps.end_row(codes, row, map_state, row_state, conditions)
            if rows_done is not None:
                with tf.control_dependencies([codes]):  # once the row's codes are drawn
                    tf.py_function(lambda done: rows_done(int(done)), [row + 1], [])
        return codes

    # AutoGraph turns the loops over tf.range into graph loops. The functions they call are
    # plain Python over tensors: left unconverted, they trace in a fraction of the time.
    sample_all = tf.function(tf.autograph.to_graph(sample_all, recursive=False),
                             autograph=False)

    def sample(num_samples, temperature=1.0, seed=0, heights=None, top_codes=None):
        check_heights(prior, heights)
        check_top_codes(prior, top_codes, (num_samples, height, width))
        # a prior's functions ignore what it is not conditioned on: zeros keep one signature
        heights = tf.zeros([num_samples]) if heights is None else heights
        heights = tf.reshape(tf.cast(heights, tf.float32), [num_samples])
        top_codes = tf.zeros((num_samples, 1, 1), tf.int32) if top_codes is None else top_codes
        # tensors, so that other values reuse the compiled graph
        return sample_all(tf.constant(num_samples, tf.int32),
                          tf.constant(temperature, tf.float32), tf.constant(seed, tf.int32),
                          heights, tf.cast(top_codes, tf.int32))

    return sample


def sample_codes_naive(prior, num_samples, grid_shape, temperature=1.0, seed=0, num_codes=None,
                       heights=None, top_codes=None):
    """The reference sampler: one `predict` on the whole map per code, as in the seed.

    Draws the same codes as `sample_codes` for the same seed, heights and top codes; kept to
    test and benchmark it. `num_codes` draws only the first codes in raster order and leaves the
    rest 0, so that benchmarks/sampling.py can time a few and extrapolate (default: all).
    """
    height, width = grid_shape
    codes = np.zeros((num_samples, height, width), dtype="int32")
    heights = None if heights is None else np.asarray(heights, "float32").reshape(num_samples)
    top_codes = None if top_codes is None else np.asarray(top_codes, "int32")
    for step in range(height * width if num_codes is None else num_codes):
        row, col = divmod(step, width)
        inputs = prior_inputs(prior, codes, heights, top_codes)
        logits = prior.predict(inputs, verbose=0)[:, row, col]
        codes[:, row, col] = draw_codes(logits, temperature, tf.constant(seed),
                                        tf.constant(step, tf.int32))
    return tf.constant(codes)
