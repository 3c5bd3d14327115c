"""Where one VQ-VAE training step spends its time: forward + backward of every layer, the whole
`fit` step, and the input pipeline, for our VQ-VAE and the seed's.

    python benchmarks/layer_times.py                  # 256x256 defaults: about 3 minutes
    python benchmarks/layer_times.py --markdown       # as markdown, into docs/performance.md

Each layer is timed alone on the activations it sees in the model (each model's default batch
at 256x256: ours 16, the seed's 32): the gradient of its output with respect to its input and
its weights, as in training. The layers' sum falls short of the whole step by what lies between
them: the loss, the optimizer's update and Keras's bookkeeping.
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
import training  # noqa: E402

# Each timing repeats its call for at least this long after one traced warm-up call.
MIN_SECONDS = 1.0


def seconds_per_call(function, *args):
    function(*args)  # traces
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < MIN_SECONDS:
        tf.nest.map_structure(lambda t: t.numpy(), function(*args))
        calls += 1
    return elapsed / calls


def layer_seconds(layer, inputs):
    """Forward + backward of one layer on its model activations (and of the losses it adds)."""
    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
        return tape.gradient([outputs, *layer.losses], [inputs, layer.trainable_weights],
                             unconnected_gradients="zero")
    return seconds_per_call(step, inputs)


def functional_layers(model):
    """(name, layer, input activations) of a functional model's layers on its sample input."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from functional_layers(layer)
            continue
        yield layer.name, layer, keras.Model(model.inputs, layer.input)


def profile_model(model_name, settings, images):
    """Per-layer seconds per batch and the whole training step's, for one model."""
    model = training.compiled_vqvae(model_name, settings, float(np.var(images)))
    training.reconstructor(model)(images[:1])  # builds the weights
    rows = []
    if model_name == "seed":
        network = model.vqvae
        for name, layer, feeds in functional_layers(network):
            rows.append((name, layer_seconds(layer, feeds(images))))
    else:
        z_e = model.encoder(images)
        for name, layer, feeds in functional_layers(model.encoder):
            rows.append((f"encoder/{name}", layer_seconds(layer, feeds(images))))
        rows.append(("quantizer", layer_seconds(model.quantizer, z_e)))
        z_q = model.quantizer(z_e)
        for name, layer, feeds in functional_layers(model.decoder):
            rows.append((f"decoder/{name}", layer_seconds(layer, feeds(z_q))))
    batches = tf.data.Dataset.from_tensors(images).repeat()
    model.fit(batches, steps_per_epoch=1, verbose=0)  # traces the training step
    stop = training.StopAfter(MIN_SECONDS * 5)
    model.fit(batches, steps_per_epoch=training.UNLIMITED, callbacks=[stop], verbose=0)
    return rows, stop.elapsed / stop.steps


def pipeline_seconds(given):
    """Seconds per batch of driver.py's training input pipeline on the demo slices, alone."""
    splits = data.load_splits(data.DEMO_DATA, given.image_size, given.shift, given.batch_size,
                              demo=True)
    for _ in splits.shuffled_train(given.seed):  # fills the uint8 cache
        pass
    batches, start = 0, time.perf_counter()
    for _ in splits.shuffled_train(given.seed):
        batches += 1
    return (time.perf_counter() - start) / batches


def table(rows, step, markdown):
    header = ("layer", "ms / batch", "share of step")
    cells = [header] + [(name, f"{1e3 * s:.1f}", f"{s / step:.0%}") for name, s in rows]
    total = sum(s for _, s in rows)
    cells += [("sum of layers", f"{1e3 * total:.1f}", f"{total / step:.0%}"),
              ("whole fit step", f"{1e3 * step:.1f}", "100%")]
    if markdown:
        return [f"| {' | '.join(row)} |" for row in [cells[0], ("---", "---:", "---:"),
                                                     *cells[1:]]]
    width = max(len(row[0]) for row in cells)
    return [f"{a.ljust(width)}  {b:>10}  {c:>13}" for a, b, c in cells]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=training.MODELS, default=training.MODELS)
    training.add_markdown_option(parser)
    options = parser.parse_args()
    with training.MarkdownReport(options.markdown) as report:
        report_layers(options, report.matmul_gflops())


def report_layers(options, gflops):
    """Prints each model's layer table, then the input pipeline's time."""
    keras.utils.set_random_seed(training.SEED)
    print(f"matmul {gflops:.0f} GFLOP/s at the start")
    for model_name in options.models:
        settings = training.model_settings("defaults", model_name)
        given, vq = settings.data, settings.vqvae
        shape = (given.batch_size, given.image_size, given.image_size, 1)
        images = np.random.default_rng(training.SEED).uniform(-0.5, 0.5, shape).astype("float32")
        rows, step = profile_model(model_name, settings, tf.constant(images))
        print(f"\n{model_name}: K={vq.K} D={vq.D} downsample {vq.downsample}, batch "
              f"{given.batch_size} at {given.image_size}x{given.image_size}: "
              f"{given.batch_size / step:.1f} images/s")
        print("\n".join(table(rows, step, options.markdown)))
    given = training.model_settings("defaults", "ours").data
    pipeline = pipeline_seconds(given)
    print(f"\ninput pipeline alone (driver.py's, demo slices at {given.image_size}): "
          f"{1e3 * pipeline:.1f} ms / batch of {given.batch_size}")
    print(f"matmul {training.matmul_gflops():.0f} GFLOP/s at the end")


if __name__ == "__main__":
    main()
