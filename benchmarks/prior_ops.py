"""Where one training step of the default prior spends its time, op by op, from TensorFlow's
profiler.

    python benchmarks/prior_ops.py             # the default grid (32x32) and batch: about a minute
    python benchmarks/prior_ops.py --markdown  # the same, into docs/performance.md

The prior (driver.py's defaults, unconditional, as benchmarks/training.py times it) trains on
random code maps in memory; after warm-up steps, the profiler records PROFILED_STEPS steps and
the table sums each kind of op's time over TensorFlow's compute threads, forward and gradient
apart. Two threads run ops side by side, so the shares are of the threads' time, not of the
wall clock.
"""

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

import training  # noqa: E402

WARM_UP_STEPS = 3
PROFILED_STEPS = 5
COMPUTE_THREADS = "tf_Compute"  # the profiler's name for the lines of TensorFlow's op threads
GRADIENT_SCOPE = "gradient_tape"
PICOSECONDS_PER_MS = 1e9


def recorded_space(run, logdir):
    """The profiler's record of run(), and its wall-clock seconds."""
    tf.profiler.experimental.start(str(logdir))
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    space.ParseFromString(next(Path(logdir).rglob("*.xplane.pb")).read_bytes())
    return space, seconds


def op_times(space):
    """Picoseconds and calls per op kind ("Conv2D", "grad Conv2DBackpropFilter", ..) on the
    compute threads. An op's event is named "<node path>:<op kind>" (the executor's own events
    have no node path); gradient nodes sit under gradient_tape."""
    totals, calls = collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = {key: metadata.name for key, metadata in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith(COMPUTE_THREADS):
                continue
            for event in line.events:
                path, separator, kind = names[event.metadata_id].rpartition(":")
                if separator and "/" in path:
                    gradient = "grad " if GRADIENT_SCOPE in path else ""
                    totals[gradient + kind] += event.duration_ps
                    calls[gradient + kind] += 1
    return totals, calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=15, help="op kinds shown (default: 15)")
    training.add_markdown_option(parser)
    options = parser.parse_args()
    with training.MarkdownReport(options.markdown) as report:
        profile_steps(options.top, report)


def profile_steps(top, report):
    """Prints the op table of PROFILED_STEPS training steps of the default prior."""
    settings = training.model_settings("defaults", "ours")
    model, batches = training.pixelcnn_job("ours", settings, np.random.default_rng(training.SEED))
    print(f"matmul {report.matmul_gflops():.0f} GFLOP/s at the start")
    model.fit(batches, steps_per_epoch=WARM_UP_STEPS, shuffle=False, verbose=0)
    with tempfile.TemporaryDirectory() as logdir:
        space, seconds = recorded_space(
            lambda: model.fit(batches, steps_per_epoch=PROFILED_STEPS, shuffle=False, verbose=0),
            logdir)
    given, prior = settings.data, settings.prior
    grid = given.image_size // settings.vqvae.downsample
    print(f"prior: {prior.pcnn_type}, {prior.pcnn_res_blocks} blocks of {prior.pcnn_filters} "
          f"filters, {grid}x{grid} maps, batch {given.batch_size}: "
          f"{PROFILED_STEPS * given.batch_size / seconds:.1f} maps/s while profiled")
    print_op_table(*op_times(space), PROFILED_STEPS, "step", top)


def print_op_table(totals, calls, repeats, unit, top):
    """The `top` op kinds' time and calls per `unit` (the record holds `repeats` of them), and
    their share of the compute threads' time."""
    threads = sum(totals.values())
    print(f"{'op':<45} {'ms / ' + unit:>10} {'calls / ' + unit:>13} {'share':>6}")
    for kind, picoseconds in totals.most_common(top):
        print(f"{kind:<45} {picoseconds / PICOSECONDS_PER_MS / repeats:>10.2f} "
              f"{calls[kind] / repeats:>13.2f} {picoseconds / threads:>6.1%}")
    print(f"{'all ops, summed over the compute threads':<45} "
          f"{threads / PICOSECONDS_PER_MS / repeats:>10.2f}")


if __name__ == "__main__":
    main()
