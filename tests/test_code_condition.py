"""The bottom prior conditioned on a top code map (VQ-VAE-2): causal in the bottom codes, not in
the top ones; the exact sampler against the naive loop and against the model's distribution;
the receptive field, saving and the errors."""

import keras
import numpy as np
import pytest
from conftest import assert_round_trip, compiled_forward, naive_codes

import pixelcnn

K, TOP_K = 6, 5
TOP_GRID = (3, 2)
GRID = (6, 6)  # the top grid's rows twice, its columns three times
HEIGHTS = np.array([0.0, 0.37, 1.0], "float32")


def top_prior(condition="none", residual_blocks=1, dilation_cycle=1, top_grid=TOP_GRID,
              positions=None, seed=0, dropout=0.0):
    keras.utils.set_random_seed(seed)
    prior = pixelcnn.build_pixelcnn(K, 8, residual_blocks, 1, kind="gated",
                                    dilation_cycle=dilation_cycle, condition=condition,
                                    positions=positions, top_embeddings=TOP_K, top_grid=top_grid,
                                    dropout=dropout)
    # random biases too, so that no layer's output is trivially zero; and top codes embedded
    # far apart, not within Keras's initial +-0.05, so that other top codes change draws
    rng = np.random.default_rng(seed)
    for weight in prior.weights:
        if "bias" in weight.path or weight.path == "top_stack/embedding/embeddings":
            weight.assign(rng.normal(size=weight.shape) * 0.5)
    return prior


def random_maps(shape, num_embeddings, seed):
    return np.random.default_rng(seed).integers(0, num_embeddings, size=shape).astype("int32")


def moved(outputs, base):
    """Where outputs (..., C) differ from base by more than rounding: (...)."""
    return np.abs(outputs - base).max(axis=-1) > 8 * np.finfo(outputs.dtype).eps


@pytest.fixture
def float64():
    """Through the stacks a far code's effect can fall below float32's resolution."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize("condition", pixelcnn.CONDITIONS)
def test_bottom_logits_never_depend_on_the_same_or_later_bottom_codes(condition, float64):
    """Map 1 + p has the bottom code at position p changed; all maps share one top map."""
    prior = top_prior(condition, dilation_cycle=2, residual_blocks=2)
    size = np.prod(GRID)
    codes = random_maps((1, *GRID), K, 1).repeat(size + 1, axis=0)
    rows, cols = np.unravel_index(np.arange(size), GRID)
    codes[1 + np.arange(size), rows, cols] = (codes[0, rows, cols] + 1) % K
    heights = np.full(size + 1, 0.5, "float32") if condition == "slice" else None
    top = random_maps((1, *TOP_GRID), TOP_K, 2).repeat(size + 1, axis=0)
    logits = prior(pixelcnn.prior_inputs(prior, codes, heights, top)).numpy()
    changes = moved(logits[1:], logits[:1]).reshape(size, size)  # (changed code, position)
    position = np.arange(size)
    assert not (changes & (position[None] <= position[:, None])).any()
    # and the context is read: the next code to the right, or at a row's end the code below
    width = GRID[1]
    neighbour = np.where(cols + 1 < width, position + 1, position + width)
    read = neighbour < size
    np.testing.assert_array_equal(changes[position[read], neighbour[read]], True)


def test_every_bottom_logit_depends_on_every_top_code():
    """The top map is drawn first: the first bottom code's logits read its last top code, below
    and right of it, as every other bottom code's do."""
    prior = top_prior()
    size = np.prod(TOP_GRID)
    top = random_maps((1, *TOP_GRID), TOP_K, 2).repeat(size + 1, axis=0)
    rows, cols = np.unravel_index(np.arange(size), TOP_GRID)
    top[1 + np.arange(size), rows, cols] = (top[0, rows, cols] + 1) % TOP_K
    codes = random_maps((1, *GRID), K, 1).repeat(size + 1, axis=0)
    logits = prior([codes, top]).numpy()
    assert moved(logits[1:], logits[:1]).all()  # (changed top code, row, col)


def test_the_top_condition_keeps_the_receptive_field():
    for condition in pixelcnn.CONDITIONS:
        keras.utils.set_random_seed(0)
        unconditioned = pixelcnn.build_pixelcnn(K, 8, 2, 1, kind="gated", dilation_cycle=2,
                                                condition=condition)
        conditioned = top_prior(condition, residual_blocks=2, dilation_cycle=2)
        for model in (None, "vertical_stack", "horizontal_stack"):
            reach = [pixelcnn.receptive_field(p if model is None else p.get_layer(model))
                     for p in (unconditioned, conditioned)]
            assert reach[0] == reach[1], (condition, model)


@pytest.mark.parametrize("condition, positions", [("none", False), ("slice", True)])
def test_compiled_forward_computes_what_predict_computes(condition, positions):
    """The naive loop's forward pass (conftest's naive_codes) given the top codes too."""
    prior = top_prior(condition, residual_blocks=2, dilation_cycle=2,
                      positions=GRID if positions else None)
    codes = random_maps((len(HEIGHTS), *GRID), K, 10)
    top = random_maps((len(HEIGHTS), *TOP_GRID), TOP_K, 11)
    inputs = pixelcnn.prior_inputs(prior, codes, HEIGHTS if condition == "slice" else None, top)
    np.testing.assert_array_equal(compiled_forward(prior)(inputs),
                                  prior.predict(inputs, verbose=0))


@pytest.mark.parametrize("condition, positions, dropout",
                         [("none", False, 0.0), ("slice", True, 0.5)])
def test_fast_sampler_draws_what_the_naive_loop_draws_given_the_top_codes(condition, positions,
                                                                          dropout):
    """Two blocks dilated by 1 and 2 read 7 rows above: a 9-row map makes the sampler drop rows
    it no longer needs. The top grid's rows are tripled, its columns doubled."""
    top_grid, grid = (3, 2), (9, 4)
    prior = top_prior(condition, residual_blocks=2, dilation_cycle=2, top_grid=top_grid,
                      positions=grid if positions else None, dropout=dropout)
    assert pixelcnn.receptive_field(prior.get_layer("vertical_stack")).rows_above < grid[0] - 1
    top = random_maps((len(HEIGHTS), *top_grid), TOP_K, 3)
    heights = HEIGHTS if condition == "slice" else None
    sampler = pixelcnn.code_sampler(prior, grid)
    fast = sampler(len(HEIGHTS), 1.0, 7, heights, top).numpy()
    naive = naive_codes(prior, len(HEIGHTS), grid, seed=7, heights=heights, top_codes=top).numpy()
    np.testing.assert_array_equal(fast, naive)
    # the top codes are read: other top codes, same seed, other draws
    other = sampler(len(HEIGHTS), 1.0, 7, heights, (top + 1) % TOP_K).numpy()
    assert (other != fast).any()


@pytest.fixture(scope="module")
def telling_prior():
    """A prior whose top codes tell their bottom codes' distributions far apart: the top codes
    embedded far apart, not within Keras's initial +-0.05, and logits three times as large as
    initialised; its other biases are zeros, as initialised, so that no saturated gate hides
    the top codes."""
    keras.utils.set_random_seed(0)
    prior = pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=1,
                                    top_embeddings=TOP_K, top_grid=(1, 2))
    top_embedding = prior.get_layer("top_stack").embedding.embeddings
    top_embedding.assign(np.random.default_rng(0).normal(size=top_embedding.shape))
    logits = prior.get_layer("horizontal_stack").get_layer("logits").kernel
    logits.assign(logits * 3)
    return prior


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_draws_follow_the_models_distribution_given_the_top_codes(telling_prior, temperature):
    """Half the maps are drawn given one top map, half given another. Each drawn code's one-hot
    minus its probabilities given the codes before it and its top map has mean zero: summed
    over each half's maps, each position's and code's sum must lie within 4 standard errors
    (the root of the summed p (1 - p)) of zero. A sampler that read the other half's top map,
    or misread a code's context, would be off by many more."""
    grid, maps = (2, 4), 2000
    tops = random_maps((2, 1, 2), TOP_K, 5)
    half = np.arange(maps) % 2
    top = tops[half]
    codes = pixelcnn.sample_codes(telling_prior, maps, grid, temperature, seed=1,
                                  top_codes=top).numpy()
    logits = telling_prior([codes, top]).numpy().astype("float64") / temperature
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (maps, h, w, K)
    for given in (half == 0, half == 1):
        error = np.abs((np.eye(K)[codes[given]] - p[given]).sum(axis=0))  # (h, w, K)
        standard_error = np.sqrt((p[given] * (1 - p[given])).sum(axis=0))
        assert (error <= 4 * standard_error).all(), (error / standard_error).max()


def test_save_load_round_trip(tmp_path):
    prior = top_prior("slice", residual_blocks=2, dilation_cycle=2)
    codes = random_maps((len(HEIGHTS), *GRID), K, 6)
    top = random_maps((len(HEIGHTS), *TOP_GRID), TOP_K, 7)
    loaded = assert_round_trip(prior, [codes, HEIGHTS, top], tmp_path)
    assert pixelcnn.top_grid(loaded) == TOP_GRID and pixelcnn.is_conditional(loaded)


def one_line_value_error(match, function, *args, **kwargs):
    """Asserts that function(*args, **kwargs) raises a one-line ValueError matching `match`."""
    with pytest.raises(ValueError, match=match) as error:
        function(*args, **kwargs)
    assert "\n" not in str(error.value)


def test_missing_unexpected_or_misshapen_top_codes_are_refused():
    prior = top_prior()
    codes = random_maps((2, *GRID), K, 8)
    top = random_maps((2, *TOP_GRID), TOP_K, 9)
    sample, inputs = pixelcnn.sample_codes, pixelcnn.prior_inputs
    # missing: the message says what to pass
    one_line_value_error(r"pass top_codes.*\(2, 3, 2\)", sample, prior, 2, GRID)
    one_line_value_error("pass top_codes", inputs, prior, codes, None)
    # given to a prior that takes none
    keras.utils.set_random_seed(0)
    unconditioned = pixelcnn.build_pixelcnn(K, 8, 1, 1, kind="gated", dilation_cycle=1)
    one_line_value_error("top_codes=None", sample, unconditioned, 2, GRID, top_codes=top)
    # another top grid, or not one map per bottom map
    for wrong in (top[:, :2], top[:1], top[..., None]):
        one_line_value_error(r"must have shape \(2, 3, 2\)", sample, prior, 2, GRID,
                             top_codes=wrong)
        one_line_value_error(r"must have shape \(2, 3, 2\)", inputs, prior, codes, None, wrong)
    # a bottom grid that is not a multiple of the top grid
    one_line_value_error("whole multiple", sample, prior, 2, (6, 5), top_codes=top)
    one_line_value_error("whole multiple", inputs, prior, codes[:, :5], None, top)


def test_build_refuses_a_half_given_top_condition_the_plain_prior_and_a_bad_grid():
    build = pixelcnn.build_pixelcnn
    for given in ({"top_embeddings": TOP_K}, {"top_grid": TOP_GRID}):
        one_line_value_error("both top_embeddings", build, K, 8, 1, 1, kind="gated",
                             dilation_cycle=1, **given)
    one_line_value_error("gated", build, K, 8, 1, 1, kind="plain", dilation_cycle=1,
                         top_embeddings=TOP_K, top_grid=TOP_GRID)
    one_line_value_error("whole multiple", top_prior, positions=(GRID[0] + 1, GRID[1]))
