"""Where the fast sampler spends its time, op by op, from TensorFlow's profiler.

    python benchmarks/sampler_ops.py        # driver.py's default prior and grid: about a minute
    python benchmarks/sampler_ops.py --markdown   # the same, into docs/performance.md

The prior has driver.py's default size, condition and positions and random weights (as
`sampling.py --random-prior` builds it); the sampler draws --maps code maps once to compile, then
once profiled. The table gives each kind of op's time and calls per code drawn (one step of the
raster loop, all maps at once). Two threads run ops side by side, so the shares are of the
threads' time, not of the wall clock (see prior_ops.py).
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import pixelcnn  # noqa: E402
import runs  # noqa: E402
from prior_ops import op_times, print_op_table, recorded_space  # noqa: E402
from sampling import random_prior  # noqa: E402
from training import MarkdownReport, add_markdown_option  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", type=int, default=runs.DEFAULT_SAMPLES,
                        help="code maps drawn at once (default: driver.py's --num-samples, "
                             "%(default)s)")
    parser.add_argument("--top", type=int, default=15, help="op kinds shown (default: 15)")
    add_markdown_option(parser)
    options = parser.parse_args()
    with MarkdownReport(options.markdown) as report:
        profile_sampler(options, report)


def profile_sampler(options, report):
    """Prints the op table of one call of the sampler on the default prior."""
    given, vq, config = runs.DataConfig(), runs.VQVAEConfig(), runs.PriorConfig()
    grid = given.image_size // vq.downsample
    prior, description = random_prior(vq.K, config.pcnn_filters, config.pcnn_res_blocks,
                                      config.pcnn_dilation_cycle, grid, seed=given.seed)
    sampler = pixelcnn.code_sampler(prior, (grid, grid))
    heights = np.linspace(0.0, 1.0, options.maps, dtype="float32")
    print(f"matmul {report.matmul_gflops():.0f} GFLOP/s at the start")
    sampler(options.maps, 1.0, given.seed + 1, heights)  # compiles
    with tempfile.TemporaryDirectory() as logdir:
        space, seconds = recorded_space(
            lambda: sampler(options.maps, 1.0, given.seed, heights).numpy(), logdir)
    codes = grid * grid
    print(f"prior: {description}, {options.maps} maps of {grid}x{grid}: {seconds:.1f} s "
          f"while profiled, {seconds / codes * 1000:.2f} ms per code")
    print_op_table(*op_times(space), codes, "code", options.top)


if __name__ == "__main__":
    main()
