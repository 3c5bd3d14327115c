"""The realism test's controls on the bundled demo slices, and what the test costs.

    python benchmarks/realism.py              # prints the table of controls (a few minutes)
    python benchmarks/realism.py --markdown   # the same, into docs/performance.md

For each image size: real test slices against clearly bad images (tiles shuffled, heavy blur,
the seed's tadpoles, images decoded from code maps drawn from the unigram code frequencies of a
briefly trained VQ-VAE) and against real slices of other cases (the training split) and the two
halves of the training split. Then the time of the whole realism evaluation (features, anatomy,
the cross-validated test) for 256 against 256 images at 256x256, beside the machine's matmul
speed.
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import evaluation  # noqa: E402
import vqvae  # noqa: E402
from training import MarkdownReport, add_markdown_option, matmul_gflops  # noqa: E402

SEED = 0
UNIGRAM_K, UNIGRAM_D, UNIGRAM_EPOCHS = 32, 8, 8
TIMED_IMAGES = 256


def demo_split(split, size):
    splits = data.load_splits(data.DEMO_DATA, size, 0.5, 64, demo=True)
    return splits.pixels(split)[..., 0] / np.float32(data.PIXEL_MAX)


def unigram_decoded(train, count, rng):
    keras.utils.set_random_seed(SEED)
    model = vqvae.VQVAE(UNIGRAM_K, UNIGRAM_D, pixel_range=(-0.5, 0.5),
                        data_variance=float(train.var()))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    model.fit(train[..., None] - 0.5, epochs=UNIGRAM_EPOCHS, batch_size=16, verbose=0)
    codes = model.encode_to_indices(train[..., None] - 0.5).numpy()
    maps = evaluation.unigram_code_maps(evaluation.code_counts(codes, UNIGRAM_K), count,
                                        codes.shape[1:], seed=int(rng.integers(1 << 30)))
    return np.clip(model.decode_indices(maps).numpy()[..., 0] + 0.5, 0, 1)


def control_rows(size):
    rng = np.random.default_rng(SEED)
    test, train = demo_split("test", size), demo_split("train", size)
    reference = evaluation.realism_summary(test)
    order = rng.permutation(len(train))
    half = len(train) // 2
    pairs = {
        "same: test vs training slices": (reference, train),
        "same: two halves of the training split": (
            evaluation.realism_summary(train[order[:half]]), train[order[half:]]),
        "different: tiles shuffled": (reference, evaluation.shuffled_tiles(test, rng)),
        "different: heavy blur": (reference, evaluation.blurred(test)),
        "different: tadpoles": (reference, evaluation.tadpoles(len(test), size, rng)),
        "different: unigram codes decoded": (reference, unigram_decoded(train, len(test), rng)),
    }
    for name, (first, images) in pairs.items():
        result = evaluation.realism(first, evaluation.realism_summary(images), SEED)
        worst = max(result["anatomy"], key=result["anatomy"].get)
        yield (f"| {name} | {size} | {min(first['count'], len(images))} | "
               f"{result['c2st_accuracy']:.3f} ± {result['c2st_stderr']:.3f} | "
               f"{result['anatomy'][worst]:.2f} ({worst}) |")


def timed_evaluation():
    train = demo_split("train", data.EXPECTED_SIZE)[:TIMED_IMAGES]
    fake = evaluation.blurred(demo_split("train", data.EXPECTED_SIZE)[-TIMED_IMAGES:])
    start = time.perf_counter()
    evaluation.realism(evaluation.realism_summary(train), evaluation.realism_summary(fake), SEED)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256],
                        help="image sizes (default: 64 256)")
    add_markdown_option(parser)
    args = parser.parse_args()
    with MarkdownReport(args.markdown) as report:
        report_controls(args.sizes, report.matmul_gflops())


def report_controls(sizes, gflops):
    """Prints the controls' table at each size, then the cost of one realism evaluation."""
    print(f"machine: {os.cpu_count()} CPU cores, matmul {gflops:.0f} GFLOP/s, "
          f"tensorflow {tf.__version__}")
    print("| pair | size | n per set | accuracy ± s.e. | largest anatomy distance (sd) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for size in sizes:
        for row in control_rows(size):
            print(row, flush=True)
    print(f"realism evaluation, {TIMED_IMAGES} vs {TIMED_IMAGES} images at "
          f"{data.EXPECTED_SIZE}x{data.EXPECTED_SIZE}: {timed_evaluation():.1f} s "
          f"(matmul {matmul_gflops():.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
