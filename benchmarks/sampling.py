"""Times the naive sampler (one `predict` on the whole map per code, as in the seed) against
`pixelcnn.sample_codes` on the same prior, and checks that both draw the same codes.

    python driver.py --demo                 # trains resources/demo/checkpoints/pixelcnn.keras
    python benchmarks/sampling.py           # then this; ends with one line "speedup: N.Nx"
    python benchmarks/sampling.py --random-prior 512 64 8 4 --grid 32 --naive-codes 64
                                            # an untrained dilated gated prior at 256x256's grid
    python benchmarks/sampling.py --markdown    # also into its section of docs/performance.md
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import pixelcnn  # noqa: E402
import runs  # noqa: E402
from training import SETTINGS, MarkdownReport, add_markdown_option, matmul_gflops  # noqa: E402

DEMO = SETTINGS["demo"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path,
                        default=Path("resources/demo/checkpoints/pixelcnn.keras"),
                        help="trained prior (default: %(default)s, from python driver.py --demo)")
    parser.add_argument("--random-prior", type=int, nargs=4,
                        metavar=("K", "FILTERS", "BLOCKS", "CYCLE"),
                        help="time a gated prior with random weights instead of --checkpoint: K "
                             "codes, FILTERS channels, BLOCKS gated blocks dilated by "
                             "2 ** (block %% CYCLE), driver.py's default output layers, "
                             "--condition and --pcnn-positions "
                             "(default: off)")
    parser.add_argument("--attention", action="store_true",
                        help="the --random-prior ends in a causal self-attention "
                             "(driver.py's --pcnn-attention)")
    parser.add_argument("--batch", type=int, default=16, help="maps sampled at once (default: 16)")
    parser.add_argument("--grid", type=int, default=DEMO.data.image_size // DEMO.vqvae.downsample,
                        help="code map height and width (default: demo's)")
    parser.add_argument("--naive-codes", type=runs.positive_int,
                        help="time the naive sampler on only the first this many codes of each "
                             "map and extrapolate to the whole map: it costs the same per code "
                             "(default: all codes)")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed, and the random prior's (default: 0)")
    add_markdown_option(parser)
    return parser.parse_args()


def random_prior(num_embeddings, filters, blocks, cycle, grid, seed, attention):
    """(prior, description): a gated prior with random weights, driver.py's default output
    layers, condition and positions, on grid x grid code maps."""
    keras.utils.set_random_seed(seed)
    config = runs.PriorConfig(pcnn_type="gated", pcnn_filters=filters, pcnn_res_blocks=blocks,
                              pcnn_dilation_cycle=cycle, pcnn_attention=attention)
    prior = config.build(num_embeddings, (grid, grid))
    return prior, (f"random weights, K={num_embeddings}, {filters} filters, {blocks} blocks, "
                   f"dilation cycle {cycle}, condition {config.condition}, positions "
                   f"{config.pcnn_positions}, attention {'on' if attention else 'off'}")


def load_prior(args):
    """(prior, description): the --random-prior or the --checkpoint."""
    if args.random_prior:
        return random_prior(*args.random_prior, args.grid, args.seed, args.attention)
    if not args.checkpoint.exists():
        sys.exit(f"sampling.py: error: no prior at {args.checkpoint}; run python driver.py --demo "
                 "first, or pass --checkpoint or --random-prior")
    return keras.models.load_model(args.checkpoint, safe_mode=True), str(args.checkpoint)


def timed(sample, *args):
    start = time.perf_counter()
    codes = sample(*args).numpy()
    return codes, time.perf_counter() - start


def main():
    args = parse_args()
    with MarkdownReport(args.markdown) as report:
        compare_samplers(args, report.matmul_gflops())


def compare_samplers(args, gflops_before):
    """Times both samplers on the same prior and prints their table and the speedup."""
    prior, description = load_prior(args)
    grid = (args.grid, args.grid)
    codes_per_map = args.grid * args.grid
    naive_codes = min(args.naive_codes or codes_per_map, codes_per_map)
    # a slice-conditional prior draws its maps at heights spread over [0, 1]
    heights = (np.linspace(0.0, 1.0, args.batch, dtype="float32")
               if pixelcnn.is_conditional(prior) else None)
    sampler = pixelcnn.code_sampler(prior, grid)
    # the first call compiles the sampler's graph, the first predict traces the prior: both
    # timed apart from sampling itself
    _, first_call_seconds = timed(sampler, args.batch, 1.0, args.seed + 1, heights)
    fast, fast_seconds = timed(sampler, args.batch, 1.0, args.seed, heights)
    prior.predict(pixelcnn.prior_inputs(prior, np.zeros((args.batch, *grid), "int32"), heights),
                  verbose=0)
    naive, naive_seconds = timed(pixelcnn.sample_codes_naive, prior, args.batch, grid, 1.0,
                                 args.seed, naive_codes, heights)
    naive_seconds *= codes_per_map / naive_codes
    # (B, h, w) -> (B, h*w): the raster order in which the naive sampler drew its codes
    drawn = (fast.reshape(args.batch, -1) == naive.reshape(args.batch, -1))[:, :naive_codes]
    print(f"machine: {os.cpu_count()} CPU cores, {platform.machine()}, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, tensorflow {tf.__version__}, "
          f"matmul {gflops_before:.0f} GFLOP/s before the timings and {matmul_gflops():.0f} after")
    print(f"prior: {description} ({prior.name}, {prior.count_params():,} parameters, "
          f"{pixelcnn.receptive_field(prior)}), {args.batch} maps of {args.grid}x{args.grid}")
    naive_name = ("naive" if naive_codes == codes_per_map
                  else f"naive (first {naive_codes} codes, extrapolated)")
    print(f"{'sampler':<40} {'seconds':>9} {'codes/s':>10}")
    codes = args.batch * codes_per_map
    for name, seconds in ((naive_name, naive_seconds), ("fast", fast_seconds),
                          ("fast, first call (compiles)", first_call_seconds)):
        print(f"{name:<40} {seconds:9.1f} {codes / seconds:10.0f}")
    print(f"identical codes: {drawn.mean():.4f} of the {drawn.size} the naive sampler drew")
    print(f"speedup: {naive_seconds / fast_seconds:.1f}x")


if __name__ == "__main__":
    main()
