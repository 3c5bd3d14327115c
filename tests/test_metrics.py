"""Each evaluation metric on cases with known answers (the realism test: test_realism.py)."""

import numpy as np
import tensorflow as tf

import evaluation
from conftest import fixed_logits_prior, smooth_blobs

SIZE = 32


def test_identical_images_give_ssim_one_and_finite_psnr():
    images = tf.constant(smooth_blobs(3, SIZE))
    np.testing.assert_allclose(evaluation.ssim(images, images).numpy(), 1.0, atol=1e-6)
    psnr = evaluation.psnr(images, images).numpy()
    assert np.isfinite(psnr).all() and (psnr >= 99).all()


def test_psnr_of_a_known_error():
    images = tf.zeros((1, 16, 16, 1))
    np.testing.assert_allclose(evaluation.psnr(images, images + 0.1).numpy(), 20.0, rtol=1e-5)


def test_uniform_code_usage_gives_perplexity_k():
    counts = evaluation.code_counts(np.tile(np.arange(16), 5), 16)
    metrics = evaluation.codebook_metrics(counts)
    np.testing.assert_allclose(metrics["codebook_perplexity"], 16.0, rtol=1e-9)
    assert metrics["codes_used"] == 1.0


def test_half_the_codes_used():
    metrics = evaluation.codebook_metrics(evaluation.code_counts(np.arange(4), 8))
    np.testing.assert_allclose(metrics["codebook_perplexity"], 4.0)
    assert metrics["codes_used"] == 0.5


def test_entropy_bits():
    assert evaluation.entropy_bits(np.array([5, 5, 0, 0])) == 1.0
    assert evaluation.entropy_bits(np.array([7, 0])) == 0.0


def test_brain_code_positions_are_the_patches_with_brain():
    images = np.zeros((1, 8, 8), "float32")
    images[0, 1, 6] = 0.8  # one bright pixel in the patch (0, 1) of a 2x2 grid of 4x4 patches
    images[0, 5, 1] = 0.05  # below the brain threshold: background
    positions = evaluation.brain_code_positions(images, (2, 2))
    np.testing.assert_array_equal(positions, [[[False, True], [False, False]]])
    codes = np.array([[[0, 1], [0, 0]]])  # background code 0 everywhere but the brain patch
    assert evaluation.codebook_metrics(evaluation.code_counts(codes, 4))["codebook_perplexity"] > 1
    assert evaluation.brain_codebook_perplexity(codes, images, 4) == 1.0  # one code in the brain


def test_prior_nll_with_fixed_logits():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    prior = fixed_logits_prior(logits)
    codes = np.array([[[0, 1], [2, 3]]] * 3, "int32")  # -log2 p: 1, 2, 3, 3 bits
    np.testing.assert_allclose(evaluation.prior_nll_bits(prior, codes, batch_size=2), 9 / 4,
                               rtol=1e-5)


def test_nearest_neighbour_ssim_finds_the_copy():
    pixels = np.round(smooth_blobs(40, SIZE, seed=1) * 255).astype(np.uint8)
    samples = pixels[[2, 31]] / np.float32(255)
    np.testing.assert_allclose(evaluation.nearest_neighbour_ssim(samples, pixels), 1.0, atol=1e-5)
    # without the copies, the nearest image is another one
    others = np.delete(pixels, [2, 31], axis=0)
    assert (evaluation.nearest_neighbour_ssim(samples, others) < 0.999).all()


def test_pairwise_ssim():
    images = smooth_blobs(1, SIZE)
    copies = np.repeat(images, 4, axis=0)
    np.testing.assert_allclose(evaluation.pairwise_ssim(copies, seed=0), 1.0, atol=1e-5)
    assert evaluation.pairwise_ssim(smooth_blobs(4, SIZE, seed=2), seed=0) < 0.99
