"""The prior's math: causal masks, the exact fast sampler, sampling from the model's
distribution."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import pixelcnn
from conftest import assert_round_trip, compiled_forward, fixed_logits_prior, naive_codes

KINDS = pixelcnn.KINDS
K = 6
GRID = (6, 7)
# (kind, dilation_cycle) of two-block priors: undilated, as before dilation existed, and dilated
# by 1 then 2
PRIORS = [(kind, cycle) for cycle in (1, 2) for kind in KINDS]


# Heights of a conditional prior's tests: the ends, a knot and between knots.
HEIGHTS = np.array([0.0, 0.37, 3 / 7, 1.0], "float32")


def random_prior(kind, seed=0, residual_blocks=2, dilation_cycle=1, condition="none",
                 positions=None, dropout=0.0):
    keras.utils.set_random_seed(seed)
    prior = pixelcnn.build_pixelcnn(K, filters=8, residual_blocks=residual_blocks,
                                    output_layers=1, kind=kind, dilation_cycle=dilation_cycle,
                                    condition=condition, positions=positions, dropout=dropout)
    # random biases too, so that no layer's output is trivially zero
    for weight in prior.weights:
        if "bias" in weight.path:
            weight.assign(np.random.default_rng(seed).normal(size=weight.shape) * 0.5)
    return prior


def test_causal_masks():
    mask = pixelcnn.causal_mask
    np.testing.assert_array_equal(mask(3, 3, "A"), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask(3, 3, "B"), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask(3, 3, "V"), [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(mask(1, 3, "A"), [[1, 0, 0]])


@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("kernel_size, mask_type",
                         [(7, "A"), (3, "B"), (3, "V"), ((1, 7), "A"), ((1, 3), "B")])
def test_masked_conv_is_a_same_padded_conv_with_the_masked_kernel(kernel_size, mask_type,
                                                                  dilation):
    """It skips the masked-out rows and columns; the result must not change."""
    conv = pixelcnn.MaskedConv2D(4, kernel_size, mask_type, dilation_rate=dilation)
    x = np.random.default_rng(0).normal(size=(2, 9, 10, 3)).astype("float32")
    y = conv(x).numpy()
    reference = tf.nn.conv2d(x, conv.kernel * conv.mask, 1, "SAME", dilations=dilation) + conv.bias
    np.testing.assert_allclose(y, reference.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind, dilation_cycle", PRIORS)
def test_logits_never_depend_on_the_same_or_later_codes(kind, dilation_cycle):
    prior = random_prior(kind, dilation_cycle=dilation_cycle)
    rng = np.random.default_rng(1)
    codes = rng.integers(0, K, size=(1, *GRID))
    base = prior(codes).numpy()[0]
    height, width = GRID
    for row in range(height):
        for col in range(width):
            changed = codes.copy()
            changed[0, row, col] = (codes[0, row, col] + 1 + rng.integers(K - 1)) % K
            moved = np.abs(prior(changed).numpy()[0] - base).max(axis=-1) > 1e-6  # (h, w)
            position = np.arange(height * width).reshape(GRID)
            here = row * width + col
            assert not moved[position <= here].any(), (row, col)
            # and the model does use its context: the next code to the right, or below, sees it
            if col + 1 < width:
                assert moved[row, col + 1], (row, col)
            elif row + 1 < height:
                assert moved[row + 1, col], (row, col)


def test_gated_prior_has_no_blind_spot():
    """In the plain PixelCNN, a code up and to the right falls in the blind spot of a 3x3 stack;
    the gated one's vertical stack sees every row above."""
    prior = random_prior("gated")
    codes = np.zeros((1, 8, 8), "int64")
    base = prior(codes).numpy()[0, 4, 1]
    codes[0, 2, 6] = 3  # two rows up, five columns right
    assert np.abs(prior(codes).numpy()[0, 4, 1] - base).max() > 1e-6


@pytest.fixture
def float64():
    """Through a deep random stack a far code's effect falls below float32's resolution; tests of
    a deep prior's reach build it in float64."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")  # the inputs' dtype
    keras.config.set_dtype_policy("float64")  # the layers'
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def moved(outputs, base):
    """Where outputs (..., C) differ from base by more than rounding: (...)."""
    return np.abs(outputs - base).max(axis=-1) > 8 * np.finfo(outputs.dtype).eps


def before_the_head(horizontal):
    """The horizontal stack without its output head, which is pointwise (it moves where its input
    moves) and ends in float32 logits that would round a far code's effect away."""
    return keras.Model(horizontal.inputs, horizontal.get_layer("skips").output)


def reach_of_one_code(model, inputs_for, reach):
    """Positions of the output that change with the code at (1, columns_right + 2), and that
    position, on a map large enough for the bound `reach`."""
    height, width = reach.rows_above + 4, reach.columns_left + reach.columns_right + 5
    row, col = 1, reach.columns_right + 2
    codes = np.random.default_rng(2).integers(0, K, size=(1, height, width))
    changed = codes.copy()
    changed[0, row, col] = (codes[0, row, col] + 1) % K
    rows, cols = np.nonzero(moved(model(inputs_for(changed)).numpy(),
                                  model(inputs_for(codes)).numpy())[0])
    return rows, cols, row, col


@pytest.mark.parametrize("kind, dilation_cycle", PRIORS)
def test_receptive_field_bounds_what_a_code_changes(kind, dilation_cycle):
    """A code changes only logits whose receptive field holds it; rows and the plain prior's
    columns exactly."""
    prior = random_prior(kind, dilation_cycle=dilation_cycle)
    reach = pixelcnn.receptive_field(prior)
    rows, cols, row, col = reach_of_one_code(prior, lambda codes: codes, reach)
    assert rows.max() == row + reach.rows_above
    assert cols[rows > row].min() == col - reach.columns_right
    assert cols[rows > row].max() <= col + reach.columns_left
    if kind == "plain":
        assert cols[rows > row].max() == col + reach.columns_left


@pytest.mark.parametrize("residual_blocks, dilation_cycle, rows_above, columns_left",
                         [(2, 1, 3 + 2 + 1, 3 + 2), (2, 2, 3 + 3 + 1, 3 + 3),
                          (8, 4, 3 + 30 + 1, 3 + 30)])
def test_gated_stacks_have_exact_receptive_fields(residual_blocks, dilation_cycle, rows_above,
                                                  columns_left, float64):
    """The sampler windows each stack by its own receptive field: the first layer's 3 rows and
    columns, plus each block's dilation, plus the vertical stack's shift by one row."""
    prior = random_prior("gated", residual_blocks=residual_blocks, dilation_cycle=dilation_cycle)
    embedding = prior.get_layer("embedding")
    vertical = prior.get_layer("vertical_stack")
    reach = pixelcnn.receptive_field(vertical)
    assert reach == (rows_above, columns_left, columns_left)
    rows, cols, row, col = reach_of_one_code(
        lambda x: keras.ops.concatenate(keras.tree.flatten(vertical(x)), axis=-1),
        embedding, reach)
    assert rows.min() == row + 1  # shifted: a row never sees itself
    assert rows.max() == row + reach.rows_above
    assert (cols.min(), cols.max()) == (col - reach.columns_right, col + reach.columns_left)

    horizontal = prior.get_layer("horizontal_stack")
    reach = pixelcnn.receptive_field(horizontal)
    assert reach == (0, columns_left, 0)
    no_vertical = lambda codes: [tf.zeros((*codes.shape, link.shape[-1]), link.dtype)  # noqa: E731
                                 for link in horizontal.inputs[1:]]
    rows, cols, row, col = reach_of_one_code(
        lambda codes: before_the_head(horizontal)([embedding(codes), *no_vertical(codes)]),
        lambda c: c, reach)
    assert set(rows) == {row}
    assert (cols.min(), cols.max()) == (col + 1, col + reach.columns_left)


def test_dilated_gated_prior_sees_the_whole_map(float64):
    """With dilations 1, 2, 4, 8, 1, 2, 4, 8 each code of a 32x32 map sees every code before it
    (the code at (0, 0) moves all the others), and its whole row to the left, without gaps."""
    prior = random_prior("gated", residual_blocks=8, dilation_cycle=4)
    height, width = 32, 32
    assert pixelcnn.receptive_field(prior.get_layer("vertical_stack")).rows_above >= height - 1
    assert pixelcnn.receptive_field(prior.get_layer("horizontal_stack")).columns_left >= width - 1
    embedding, vertical = prior.get_layer("embedding"), prior.get_layer("vertical_stack")
    head_input = before_the_head(prior.get_layer("horizontal_stack"))
    codes = np.random.default_rng(4).integers(0, K, size=(height, width))
    changed = np.repeat(codes[None], height + 1, axis=0)  # map r: code (r, 0) changed; map h: none
    changed[np.arange(height), np.arange(height), 0] = (codes[:, 0] + 1) % K
    embedded = embedding(changed)
    features = head_input([embedded, *keras.tree.flatten(vertical(embedded))]).numpy()
    changes = moved(features[:height], features[height])  # (h, h, w)
    position = np.arange(height * width).reshape(height, width)
    np.testing.assert_array_equal(changes[0], position > 0)  # all codes after (0, 0)
    assert changes[np.arange(height), np.arange(height), 1:].all()  # all of row r after (r, 0)
    assert not (changes & (position <= position[:, :1, None])).any()  # none before


@pytest.mark.parametrize("condition", pixelcnn.CONDITIONS)
def test_compiled_forward_computes_what_predict_computes(condition):
    prior = positioned_prior(condition)
    codes = np.random.default_rng(3).integers(0, K, size=(len(HEIGHTS), *GRID)).astype("int32")
    inputs = pixelcnn.prior_inputs(prior, codes, HEIGHTS if condition == "slice" else None)
    np.testing.assert_array_equal(compiled_forward(prior)(inputs),
                                  prior.predict(inputs, verbose=0))


@pytest.mark.parametrize("kind, dilation_cycle", PRIORS)
def test_fast_sampler_draws_what_the_naive_loop_draws(kind, dilation_cycle):
    prior = random_prior(kind, dilation_cycle=dilation_cycle)
    reach = pixelcnn.receptive_field(prior)
    # larger than the window in both directions
    grid = (reach.rows_above + 4, reach.columns_left + reach.columns_right + 4)
    fast = pixelcnn.sample_codes(prior, 3, grid, temperature=1.0, seed=7).numpy()
    naive = naive_codes(prior, 3, grid, temperature=1.0, seed=7).numpy()
    assert fast.shape == (3, *grid) and fast.dtype == np.int32
    assert ((fast >= 0) & (fast < K)).all()
    np.testing.assert_array_equal(fast, naive)


def test_sampler_is_reproducible_and_seeded():
    prior = random_prior("gated")
    first = pixelcnn.sample_codes(prior, 4, GRID, seed=3).numpy()
    sampler = pixelcnn.code_sampler(prior, GRID)  # compiled once, called with other values
    np.testing.assert_array_equal(first, sampler(4, 1.0, 3).numpy())
    assert (first != sampler(4, 1.0, 4).numpy()).any()
    assert sampler(2, 0.5, 3).shape == (2, *GRID)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draw_frequencies_match_the_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.0, -1.0, 0.5], "float32")
    codes = pixelcnn.sample_codes(fixed_logits_prior(logits), 200, (5, 5), temperature, seed=0)
    frequencies = np.bincount(codes.numpy().ravel(), minlength=len(logits)) / codes.numpy().size
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    # 5,000 draws: the standard error of each frequency is below 0.007
    np.testing.assert_allclose(frequencies, expected, atol=0.025)


@pytest.mark.parametrize("kind, dilation_cycle", PRIORS)
def test_save_load_round_trip(kind, dilation_cycle, tmp_path):
    prior = random_prior(kind, dilation_cycle=dilation_cycle)
    codes = np.random.default_rng(3).integers(0, K, size=(2, *GRID))
    assert_round_trip(prior, codes, tmp_path)


def test_receptive_field_refuses_a_layer_it_cannot_measure():
    """A plain 3x3 convolution added to a prior reads rows below and columns right of a position:
    assuming it reads nothing would make the windowed sampler silently wrong."""
    codes = keras.Input(shape=(None, None), dtype="int32")
    x = keras.layers.Embedding(K, 4)(codes)
    x = pixelcnn.MaskedConv2D(4, 3, "A")(x)
    x = keras.layers.Conv2D(K, 3, padding="same", name="unmasked")(x)
    with pytest.raises(ValueError, match="unmasked"):
        pixelcnn.receptive_field(keras.Model(codes, x))
    with pytest.raises(ValueError, match="unmasked"):
        pixelcnn.code_sampler(keras.Model(codes, x), GRID)


def wired_model():
    """Two inputs, a layer reading a list (Add) and one reading two tensors (AddCondition), and
    two outputs in the opposite order to the layers that compute them."""
    x = keras.Input(shape=(None, None, 4), name="x")
    h = keras.Input(shape=(4,), name="h")
    conv = pixelcnn.MaskedConv2D(4, 3, "A", name="conv")(x)
    added = keras.layers.Add(name="add")([x, conv])
    conditioned = pixelcnn.AddCondition(name="conditioned")(added, h)
    return keras.Model([x, h], [conditioned, conv])


def test_layer_graph_reads_each_layer_its_sources_and_arguments():
    graph = pixelcnn.layer_graph(wired_model())
    wiring = {step.layer.name: (step.reads, step.arguments) for step in graph.steps}
    assert wiring == {"x": ((), []), "h": ((), []), "conv": (("x",), ["x"]),
                      "add": (("x", "conv"), [["x", "conv"]]),
                      "conditioned": (("add", "h"), ["add", "h"])}
    seen = set()
    for step in graph.steps:  # topological: a layer comes after the layers it reads
        assert set(step.reads) <= seen, step.layer.name
        seen.add(step.layer.name)
    assert (graph.inputs, graph.outputs) == (["x", "h"], ["conditioned", "conv"])


def test_layer_graph_of_a_prior_names_its_stacks_inputs_in_order():
    prior = random_prior("gated", condition="slice")
    assert pixelcnn.layer_graph(prior).outputs == ["horizontal_stack"]
    for model in (prior, prior.get_layer("vertical_stack"), prior.get_layer("horizontal_stack")):
        assert pixelcnn.layer_graph(model).inputs == [tensor.name for tensor in model.inputs]
    horizontal = {step.layer.name: step.reads for step in pixelcnn.layer_graph(prior).steps}
    assert horizontal["horizontal_stack"] == ("embedding", "vertical_stack", "height_embedding")


def keras2_config(model):
    """The model's config with its calls serialized as Keras 2 did: [[[layer, node, index,
    kwargs], ..]] in place of {"args": .., "kwargs": ..}."""
    config = model.get_config()
    for layer in config["layers"]:
        if layer["inbound_nodes"]:
            layer["inbound_nodes"] = [[["x", 0, 0, {}]]]
    return config


def test_layer_graph_refuses_what_it_cannot_read(monkeypatch):
    """A Keras that serializes models differently, and models the sampler cannot re-run, fail
    in layer_graph with its name, not somewhere in the sampler."""
    changed = wired_model()
    monkeypatch.setattr(changed, "get_config", lambda: keras2_config(wired_model()))
    sequential = keras.Sequential([keras.Input((None, None, 4)), keras.layers.Dense(4)])
    x = keras.Input(shape=(None, None, 4))
    shared = keras.layers.Dense(4, name="shared")
    called_twice = keras.Model(x, shared(shared(x)))
    h = keras.Input(shape=(4,))
    by_keyword = keras.Model([x, h], pixelcnn.AddCondition()(x, projected_height=h))
    for model, problem in [(changed, "args list"), (sequential, "not a functional model"),
                           (called_twice, "called exactly once"), (by_keyword, "by keyword")]:
        with pytest.raises(ValueError, match=f"layer_graph: .*{problem}"):
            pixelcnn.layer_graph(model)
    with pytest.raises(ValueError, match="layer_graph: .*args list"):
        pixelcnn.receptive_field(changed)


def test_build_refuses_an_unknown_kind_dilation_or_dropout():
    with pytest.raises(ValueError, match="gated"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gatd", dilation_cycle=1)
    with pytest.raises(ValueError, match="dilation_cycle"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=0)
    with pytest.raises(ValueError, match="dropout"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=1, dropout=1.0)
    with pytest.raises(ValueError, match="dilation_rate"):
        pixelcnn.MaskedConv2D(4, 3, "B", dilation_rate=0)


# ---------------------------------------------------------------------------------------------
# Dropout

DROPOUT = 0.5


def dropout_rates(model):
    """The rates of a model's Dropout layers, those of its nested models included."""
    rates = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            rates += dropout_rates(layer)
        elif isinstance(layer, keras.layers.Dropout):
            rates.append(layer.rate)
    return rates


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_drops_in_training_only_and_keeps_the_reach(kind):
    """One Dropout per block (the gated prior's first layer is a block of its own), active in
    training; at inference the prior computes what the same weights compute without it, so
    causality and the sampler's reach are the dropout-free prior's."""
    prior, undropped = (random_prior(kind, dilation_cycle=2, dropout=rate)
                        for rate in (DROPOUT, 0.0))
    undropped.set_weights(prior.get_weights())  # (Dropout's seed moves the initializers' draws)
    blocks = 2 + (kind == "gated")
    assert dropout_rates(prior) == [DROPOUT] * blocks and dropout_rates(undropped) == []
    codes = np.random.default_rng(1).integers(0, K, size=(2, *GRID))
    inference = prior(codes).numpy()
    np.testing.assert_array_equal(undropped(codes).numpy(), inference)
    trained = [prior(codes, training=True).numpy() for _ in range(2)]
    assert np.abs(trained[0] - inference).max() > 1e-3
    assert np.abs(trained[0] - trained[1]).max() > 1e-3
    assert pixelcnn.receptive_field(prior) == pixelcnn.receptive_field(undropped)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_sampler_draws_what_the_naive_loop_draws_with_dropout(kind, tmp_path):
    prior = random_prior(kind, dilation_cycle=2, dropout=DROPOUT)
    fast = pixelcnn.sample_codes(prior, 3, GRID, temperature=1.0, seed=7).numpy()
    np.testing.assert_array_equal(fast, naive_codes(prior, 3, GRID, temperature=1.0,
                                                    seed=7).numpy())
    loaded = assert_round_trip(prior, fast, tmp_path)
    assert dropout_rates(loaded) == dropout_rates(prior)


# ---------------------------------------------------------------------------------------------
# The slice-conditional prior


def test_height_embedding_interpolates_between_its_knots():
    embedding = pixelcnn.HeightEmbedding(3, knots=8)
    vectors = embedding(np.array([0.0, 2 / 7, 2.5 / 7, 1.0], "float32")).numpy()
    knots = embedding.vectors.numpy()
    np.testing.assert_allclose(vectors[[0, 1, 3]], knots[[0, 2, 7]], atol=1e-6)
    np.testing.assert_allclose(vectors[2], (knots[2] + knots[3]) / 2, atol=1e-6)


def test_the_height_reaches_the_logits():
    prior = random_prior("gated", condition="slice")
    codes = np.random.default_rng(5).integers(0, K, size=(1, *GRID)).repeat(len(HEIGHTS), 0)
    logits = prior([codes, HEIGHTS]).numpy()
    for low, high in zip(logits[:-1], logits[1:]):
        assert moved(high, low).all()  # every position, the first code's too


def assert_causal_at_every_height(prior):
    """No logit of a conditional prior moves when its own or a later code changes, and the next
    code's always does, for every height: one map per height, all perturbed at once."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, K, size=(1, *GRID)).repeat(len(HEIGHTS), 0)
    base = prior([codes, HEIGHTS]).numpy()
    position = np.arange(np.prod(GRID)).reshape(GRID)
    for here, (row, col) in enumerate(np.ndindex(*GRID)):
        changed = codes.copy()
        changed[:, row, col] = (codes[:, row, col] + 1) % K
        changes = moved(prior([changed, HEIGHTS]).numpy(), base)  # (heights, h, w)
        assert not changes[:, position <= here].any(), (row, col)
        assert changes[:, position == here + 1].all() or here + 1 == position.size, (row, col)


def test_conditional_logits_never_depend_on_the_same_or_later_codes(float64):
    """(In float64, as the positioned prior's: in float32 the next code's logits move by little
    more than the threshold of `moved`.)"""
    assert_causal_at_every_height(random_prior("gated", dilation_cycle=2, condition="slice"))


def test_conditioning_keeps_the_receptive_field():
    for stack in ("vertical_stack", "horizontal_stack"):
        reaches = [pixelcnn.receptive_field(random_prior("gated", dilation_cycle=2,
                                                         condition=condition).get_layer(stack))
                   for condition in pixelcnn.CONDITIONS]
        assert reaches[0] == reaches[1], stack


def test_fast_sampler_draws_what_the_naive_loop_draws_at_each_height():
    prior = random_prior("gated", dilation_cycle=2, condition="slice")
    reach = pixelcnn.receptive_field(prior.get_layer("vertical_stack"))
    grid = (reach.rows_above + 3, reach.columns_left + 3)  # larger than the windows
    fast = pixelcnn.sample_codes(prior, len(HEIGHTS), grid, seed=7, heights=HEIGHTS).numpy()
    naive = naive_codes(prior, len(HEIGHTS), grid, seed=7, heights=HEIGHTS).numpy()
    np.testing.assert_array_equal(fast, naive)


def test_sampler_refuses_missing_or_unexpected_heights():
    with pytest.raises(ValueError, match="heights"):
        pixelcnn.sample_codes(random_prior("gated", condition="slice"), 2, GRID)
    with pytest.raises(ValueError, match="heights"):
        pixelcnn.sample_codes(random_prior("gated"), 2, GRID, heights=[0.5, 0.5])


def test_conditional_save_load_round_trip(tmp_path):
    prior = random_prior("gated", dilation_cycle=2, condition="slice")
    codes = np.random.default_rng(3).integers(0, K, size=(len(HEIGHTS), *GRID))
    assert pixelcnn.is_conditional(assert_round_trip(prior, [codes, HEIGHTS], tmp_path))


def test_build_refuses_an_unknown_or_plain_condition():
    with pytest.raises(ValueError, match="condition"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=1, condition="slcie")
    with pytest.raises(ValueError, match="gated"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="plain", dilation_cycle=1, condition="slice")


# ---------------------------------------------------------------------------------------------
# The position-aware prior


def positioned_prior(condition="none", grid=GRID):
    return random_prior("gated", dilation_cycle=2, condition=condition, positions=grid)


def test_a_position_reaches_every_later_code_and_never_its_own():
    """The logits at (0, 0) read no position (nothing comes before the first code); every later
    code's read its left neighbour's or the row above's."""
    prior = positioned_prior()
    codes = np.random.default_rng(2).integers(0, K, size=(1, *GRID))
    base = prior(codes).numpy()[0]
    for vectors in prior.get_layer("position_embedding").weights:
        vectors.assign(np.zeros(vectors.shape))
    changes = moved(prior(codes).numpy()[0], base)
    position = np.arange(np.prod(GRID)).reshape(GRID)
    np.testing.assert_array_equal(changes, position > 0)


def test_positioned_logits_never_depend_on_the_same_or_later_codes(float64):
    """(In float64: in float32 the far corner of the reach moves the next code by less than
    float32 rounding.)"""
    assert_causal_at_every_height(positioned_prior(condition="slice"))


def test_positions_keep_the_receptive_field():
    reaches = [pixelcnn.receptive_field(prior)
               for prior in (random_prior("gated", dilation_cycle=2), positioned_prior())]
    assert reaches[0] == reaches[1]


@pytest.mark.parametrize("condition", pixelcnn.CONDITIONS)
def test_fast_sampler_draws_what_the_naive_loop_draws_with_positions(condition):
    reach = pixelcnn.receptive_field(random_prior("gated", dilation_cycle=2))
    grid = (reach.rows_above + 3, reach.columns_left + 3)  # larger than the windows
    prior = positioned_prior(condition, grid)
    heights = HEIGHTS if condition == "slice" else None
    fast = pixelcnn.sample_codes(prior, len(HEIGHTS), grid, seed=7, heights=heights).numpy()
    naive = naive_codes(prior, len(HEIGHTS), grid, seed=7, heights=heights).numpy()
    np.testing.assert_array_equal(fast, naive)


def test_positioned_save_load_round_trip(tmp_path):
    prior = positioned_prior(condition="slice")
    codes = np.random.default_rng(3).integers(0, K, size=(len(HEIGHTS), *GRID))
    assert_round_trip(prior, [codes, HEIGHTS], tmp_path)


def test_a_positioned_prior_refuses_another_grid():
    prior = positioned_prior()
    with pytest.raises(ValueError, match="code maps of"):
        pixelcnn.sample_codes(prior, 2, (GRID[0] + 1, GRID[1]))
    with pytest.raises(ValueError, match="gated"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="plain", dilation_cycle=1, positions=GRID)


# ---------------------------------------------------------------------------------------------
# The attending prior (PixelSNAIL's causal self-attention at the end of the horizontal stack)


def attending_prior(condition="none", grid=GRID):
    keras.utils.set_random_seed(0)
    return pixelcnn.build_pixelcnn(K, filters=8, residual_blocks=2, output_layers=1, kind="gated",
                                   dilation_cycle=1, condition=condition, positions=grid,
                                   attention=True)


def test_causal_self_attention_computes_its_equation():
    """x + W_o softmax(q k^T / sqrt(d_k)) v with position i attending to j <= i in raster order,
    written out in numpy."""
    layer = pixelcnn.CausalSelfAttention(key_dim=3)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")
    output = layer(x).numpy()
    flat = x.reshape(2, 12, 5)
    q, k, v = (flat @ w.numpy() for w in (layer.query, layer.key, layer.value))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(3)
    scores = np.where(np.tril(np.ones((12, 12), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = flat + weights @ v @ layer.output_projection.numpy()
    np.testing.assert_allclose(output, expected.reshape(x.shape), rtol=1e-5, atol=1e-5)


def test_an_attending_code_reads_every_earlier_code_and_never_its_own_or_later(float64):
    """Exact reach: a code moves the logits at the first later position whose convolutional
    features read it (the next one, within a row) and at every position after that, and no
    others; the convolutions alone do not reach along a row this long."""
    grid = (3, 20)
    prior = attending_prior(grid=grid)
    assert pixelcnn.receptive_field(prior) == (np.inf,) * 3
    codes = np.random.default_rng(1).integers(0, K, size=(1, *grid))
    position = np.arange(np.prod(grid)).reshape(grid)
    base = prior(codes).numpy()
    for here, (row, col) in enumerate(np.ndindex(*grid)):
        changed = codes.copy()
        changed[0, row, col] = (codes[0, row, col] + 1) % K
        changes = moved(prior(changed).numpy(), base)[0]
        first = position[changes].min() if changes.any() else position.size
        np.testing.assert_array_equal(changes, position >= first)
        assert first == here + 1 if col + 1 < grid[1] else first > here, (row, col)
    unattending = random_prior("gated", dilation_cycle=1, positions=grid)
    changed = codes.copy()
    changed[0, 0, 0] = (codes[0, 0, 0] + 1) % K
    assert not moved(unattending(changed).numpy(), unattending(codes).numpy())[0, 0, -1]


@pytest.mark.parametrize("condition", pixelcnn.CONDITIONS)
def test_fast_sampler_draws_what_the_naive_loop_draws_with_attention(condition):
    prior = attending_prior(condition)
    heights = HEIGHTS if condition == "slice" else None
    fast = pixelcnn.sample_codes(prior, len(HEIGHTS), GRID, seed=7, heights=heights).numpy()
    naive = naive_codes(prior, len(HEIGHTS), GRID, seed=7, heights=heights).numpy()
    np.testing.assert_array_equal(fast, naive)


def test_attending_save_load_round_trip(tmp_path):
    codes = np.random.default_rng(3).integers(0, K, size=(len(HEIGHTS), *GRID))
    loaded = assert_round_trip(attending_prior("slice"), [codes, HEIGHTS], tmp_path)
    assert isinstance(loaded.get_layer("horizontal_stack").get_layer("attention"),
                      pixelcnn.CausalSelfAttention)


def test_attention_needs_the_gated_prior():
    with pytest.raises(ValueError, match="attention needs the gated prior"):
        pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="plain", dilation_cycle=1, attention=True)
