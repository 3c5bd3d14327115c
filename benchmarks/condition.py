"""What slice conditioning costs: the gated prior with `--condition slice` against the same prior
with `--condition none`, training and sampling, timed alternately in one process.

    python benchmarks/condition.py                      # the demo's 16x16 grid, batch 16
    python benchmarks/condition.py --grid 32 --batch 32 # the 256x256 defaults' grid
    python benchmarks/condition.py --markdown           # also into docs/performance.md

Both priors have driver.py's default size (K, filters, blocks, dilation cycle, output layers)
and train on the same random code maps through driver.py's input pipeline; each measurement is
the median of --repeats, the two priors taking turns so that a change in the machine's speed
hits both.
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

import data  # noqa: E402
import pixelcnn  # noqa: E402
from runs import PriorConfig, VQVAEConfig  # noqa: E402
from training import MarkdownReport, add_markdown_option, matmul_gflops  # noqa: E402

MAPS = 384  # one epoch: the demo's training split


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=16, help="code map size (default: 16)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="turns per prior (default: 3)")
    add_markdown_option(parser)
    return parser.parse_args()


def build_prior(condition, grid):
    keras.utils.set_random_seed(0)
    config = PriorConfig(pcnn_type="gated", condition=condition)
    prior = config.build(VQVAEConfig().K, (grid, grid))
    prior.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return prior


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main():
    args = parse_args()
    with MarkdownReport(args.markdown) as report:
        compare_priors(args, report.matmul_gflops())


def compare_priors(args, gflops):
    """Times both priors' training and sampling in turns and prints their table."""
    rng = np.random.default_rng(0)
    num_embeddings = VQVAEConfig().K
    codes = rng.integers(0, num_embeddings, size=(MAPS, args.grid, args.grid)).astype("int32")
    heights = rng.uniform(size=MAPS).astype("float32")
    drawn_at = np.linspace(0.0, 1.0, args.batch, dtype="float32")
    runs = {}
    for condition in pixelcnn.CONDITIONS:
        prior = build_prior(condition, args.grid)
        dataset = data.code_dataset(codes, None if condition == "none" else heights, args.batch)
        sampler = pixelcnn.code_sampler(prior, (args.grid, args.grid))
        at = None if condition == "none" else drawn_at

        def train(prior=prior, dataset=dataset):
            prior.fit(dataset, epochs=1, verbose=0)

        def sample(sampler=sampler, at=at):
            sampler(args.batch, 1.0, 0, at).numpy()

        train(), sample()  # traced and compiled outside the timings
        runs[condition] = {"train": (train, []), "sample": (sample, []),
                           "parameters": prior.count_params()}
    for _ in range(args.repeats):
        for run in runs.values():
            for work, seconds in (run["train"], run["sample"]):
                seconds.append(timed(work))
    print(f"matmul {gflops:.0f} GFLOP/s before and {matmul_gflops():.0f} after; "
          f"{args.grid}x{args.grid} maps, batch {args.batch}, median of {args.repeats}")
    print(f"{'measurement':<40} {'none':>8} {'slice':>8} {'slice/none':>11}")
    for name, label in (("train", f"train one epoch of {MAPS} maps, s"),
                        ("sample", f"sample {args.batch} maps, s")):
        none, conditioned = (np.median(runs[c][name][1]) for c in pixelcnn.CONDITIONS)
        print(f"{label:<40} {none:8.2f} {conditioned:8.2f} {conditioned / none:11.3f}")
    none, conditioned = (runs[c]["parameters"] for c in pixelcnn.CONDITIONS)
    print(f"{'parameters':<40} {none:8,} {conditioned:8,} {conditioned / none:11.3f}")


if __name__ == "__main__":
    main()
