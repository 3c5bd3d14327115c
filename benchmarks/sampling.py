"""Times the naive sampler (one `predict` on the whole map per code, as in the seed) against
`pixelcnn.sample_codes` on the same trained prior, and checks that both draw the same codes.

    python driver.py --demo                 # trains and saves checkpoints/pixelcnn.keras
    python benchmarks/sampling.py           # then this; ends with one line "speedup: N.Nx"
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
import tensorflow as tf  # noqa: E402

import driver  # noqa: E402
import pixelcnn  # noqa: E402
import vqvae  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/pixelcnn.keras"),
                        help="trained prior (default: %(default)s, from python driver.py --demo)")
    parser.add_argument("--batch", type=int, default=16, help="maps sampled at once (default: 16)")
    parser.add_argument("--grid", type=int, default=driver.DEMO_DEFAULTS["image_size"]
                        // vqvae.DOWNSAMPLING, help="code map height and width (default: demo's)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    return parser.parse_args()


def timed(sample, *args):
    start = time.perf_counter()
    codes = sample(*args).numpy()
    return codes, time.perf_counter() - start


def main():
    args = parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"sampling.py: error: no prior at {args.checkpoint}; run python driver.py --demo "
                 "first or pass --checkpoint")
    prior = keras.models.load_model(args.checkpoint, safe_mode=True)
    grid = (args.grid, args.grid)
    sampler = pixelcnn.code_sampler(prior, grid)
    # the first call compiles the sampler's graph: timed apart from sampling itself
    _, first_call_seconds = timed(sampler, args.batch, 1.0, args.seed + 1)
    fast, fast_seconds = timed(sampler, args.batch, 1.0, args.seed)
    naive, naive_seconds = timed(pixelcnn.sample_codes_naive, prior, args.batch, grid, 1.0,
                                 args.seed)
    same = float((fast == naive).mean())
    print(f"machine: {os.cpu_count()} CPU cores, {platform.machine()}, "
          f"GPUs: {len(tf.config.list_physical_devices('GPU'))}, tensorflow {tf.__version__}")
    print(f"prior: {args.checkpoint} ({prior.name}, {prior.count_params():,} parameters), "
          f"{args.batch} maps of {args.grid}x{args.grid}")
    print(f"{'sampler':<28} {'seconds':>9} {'codes/s':>10}")
    codes = args.batch * args.grid * args.grid
    for name, seconds in (("naive", naive_seconds), ("fast", fast_seconds),
                          ("fast, first call (compiles)", first_call_seconds)):
        print(f"{name:<28} {seconds:9.1f} {codes / seconds:10.0f}")
    print(f"identical codes: {same:.4f} of {codes}")
    print(f"speedup: {naive_seconds / fast_seconds:.1f}x")


if __name__ == "__main__":
    main()
