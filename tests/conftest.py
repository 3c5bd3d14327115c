"""Shared fixtures and helpers: tiny PNG folders in the OASIS layout, written into a temporary
directory; driver.py run as a user runs it, or in the test's process; the runs that tests only
read, started in the background; small models and images that several test files use."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The smallest models and runs; with --demo they run at the demo's image size and downsampling.
TINY_MODELS = ["--epochs", "1", "--pcnn-epochs", "1", "--K", "16", "--D", "4", "--batch_size", "8",
               "--pcnn-filters", "16", "--pcnn-res-blocks", "2", "--num-samples", "10"]
# Unconditional (the tiny splits name every slice slice_0, one height), one code level.
TINY_RUN = ["--image-size", "32", "--downsample", "4", "--levels", "1", *TINY_MODELS,
            "--condition", "none"]

# The scaled pixel range at the default --shift of 0.5.
PIXEL_RANGE = (-0.5, 0.5)
SPLIT_SIZES = {"train": 16, "validate": 4, "test": 10}
TINY_SIZE = 32
# The multi-worker cluster's workers, and the mirrored run's CPU devices: the same replicas.
WORKERS = 2
RUN_TIMEOUT = 600  # seconds: a run that hangs fails its tests instead of blocking CI


def brain_like_image(rng, size):
    """A bright ellipse with a dark 'ventricle' on black: enough structure to train on."""
    rows, cols = np.mgrid[:size, :size] / size - 0.5
    radius_y, radius_x = rng.uniform(0.3, 0.45), rng.uniform(0.25, 0.4)
    brain = (rows / radius_y) ** 2 + (cols / radius_x) ** 2 < 1
    ventricle = (rows / 0.12) ** 2 + (cols / 0.06) ** 2 < 1
    return (brain * rng.uniform(150, 250) * ~ventricle).astype(np.uint8)


def write_split_folders(root, sizes=SPLIT_SIZES, image_size=TINY_SIZE, seed=0,
                        slices_per_case=1):
    """Tiny splits in the OASIS layout, named case_<case>_slice_<n>.nii.png with n counting
    0 .. slices_per_case - 1 in each case."""
    rng = np.random.default_rng(seed)
    for split, count in sizes.items():
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        for image_number in range(count):
            case, index = divmod(image_number, slices_per_case)
            image = Image.fromarray(brain_like_image(rng, image_size))
            image.save(folder / f"case_{case:03d}_slice_{index}.nii.png")
    return root


@pytest.fixture
def tiny_data(tmp_path):
    return write_split_folders(tmp_path / "data")


def smooth_blobs(count, size, seed=0, width=0.03):
    """Gaussian blobs at random centres, in [0, 1]: (count, size, size, 1) float32. Smooth
    structure an autoencoder can learn and SSIM can score, unlike white noise."""
    rows, cols = np.mgrid[:size, :size] / size
    centres = np.random.default_rng(seed).uniform(0.3, 0.7, size=(count, 2))
    squared_distances = (rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2
    return np.exp(-squared_distances / width)[..., None].astype("float32")


def fixed_logits_prior(logits):
    """A 'prior' whose logits are the same at every position, whatever the codes."""
    import keras

    codes = keras.Input(shape=(None, None), dtype="int32")
    silent = keras.layers.Embedding(len(logits), 1, embeddings_initializer="zeros")(codes)
    out = keras.layers.Conv2D(len(logits), 1, kernel_initializer="zeros",
                              bias_initializer=keras.initializers.Constant(logits))(silent)
    return keras.Model(codes, out)


def assert_round_trip(model, inputs, tmp_path):
    """Saves the model as a .keras file and loads it in safe mode; the loaded model must compute
    what the model computes on inputs, bit for bit. Returns it for checks of its own."""
    import keras

    expected = keras.ops.convert_to_numpy(model(inputs))  # (which also builds the model)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(inputs)), expected)
    return loaded


def compiled_forward(prior):
    """The prior's forward pass on whole maps, as `predict` runs it, compiled once."""
    import tensorflow as tf

    forward = tf.function(lambda inputs: prior(inputs, training=False))
    return lambda inputs, verbose=0: forward(inputs).numpy()


def naive_codes(prior, *args, **kwargs):
    """pixelcnn.sample_codes_naive with its `predict` replaced by compiled_forward, which
    computes the same logits (test_compiled_forward_computes_what_predict_computes, in
    test_pixelcnn.py and test_code_condition.py): predict sets itself up again on each call, once
    per code, and that set-up is what would take these tests their time."""
    import pixelcnn

    prior.predict = compiled_forward(prior)
    return pixelcnn.sample_codes_naive(prior, *args, **kwargs)


def flattened(metrics, prefix=""):
    """Nested metrics as one level: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for name, value in metrics.items():
        flat.update(flattened(value, f"{prefix}{name}.") if isinstance(value, dict)
                    else {prefix + name: value})
    return flat


class PythonProcess:
    """python with args in a process of its own (driver.py as a user runs it, or a script);
    `result()` waits for it."""

    def __init__(self, *args, cwd=REPO):
        self.args = [sys.executable, *map(str, args)]
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        # one TensorFlow thread of each kind: BACKGROUND_PROCESSES of them share the core that
        # the tests in this process leave idle, and more threads would only contend for it
        env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
        self.process = subprocess.Popen(self.args, stdout=self.stdout, stderr=self.stderr,
                                        env=env, cwd=cwd)

    def result(self):
        """The finished process as subprocess.run returns it: arguments, return code, output."""
        try:
            returncode = self.process.wait(timeout=RUN_TIMEOUT)
        finally:
            self.stop()
        printed = []
        for output in (self.stdout, self.stderr):
            output.seek(0)
            printed.append(output.read())
            output.close()
        return subprocess.CompletedProcess(self.args, returncode, *printed)

    def live(self):
        """How many processes are still running: 1 or 0."""
        return int(self.process.poll() is None)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def driver_process(*args):
    return PythonProcess(REPO / "driver.py", *args)


class Scenario:
    """steps(processes) in a thread of its own: processes started, watched and stopped in turn
    (one killed at a given moment, then started again), for a test to read afterwards. steps
    adds what it starts to `processes` (each with live() and stop()); result() waits for the
    thread and returns what steps returned, or raises what it raised."""

    def __init__(self, steps):
        self.processes, self.outcome = [], {}
        self.thread = threading.Thread(target=self._run, args=(steps,), daemon=True)
        self.thread.start()

    def _run(self, steps):
        try:
            self.outcome["returned"] = steps(self.processes)
        except BaseException as error:  # re-raised in the test's thread by result()
            self.outcome["raised"] = error

    def result(self):
        self.thread.join()
        if "raised" in self.outcome:
            raise self.outcome["raised"]
        return self.outcome["returned"]

    def live(self):
        return sum(process.live() for process in self.processes)

    def stop(self):
        """Kills its processes, and any that steps starts next, until steps has ended."""
        while self.thread.is_alive():
            for process in self.processes:
                process.stop()
            self.thread.join(timeout=POLL_INTERVAL)


def run_in_process(*args):
    """driver.main(args) in this process, for a run that needs no process of its own: no
    TensorFlow start-up. Returns what it printed."""
    import driver

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        driver.main([str(arg) for arg in args])
    return printed.getvalue()


def one_line_error(capsys, argv):
    """Run driver.main(argv) in-process; return its stderr, asserting a single line and a
    failure."""
    import driver

    with pytest.raises(SystemExit) as stop:
        driver.main(argv)
    message = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert stop.value.code not in (0, None)
    assert message.strip().count("\n") == 0 and "Traceback" not in message, message
    return message


def start_tiny_run(root, *flags):
    """A tiny run on the tiny splits (the same images in every root: they are seeded)."""
    data = write_split_folders(root / "data")
    out, checkpoints = root / "out", root / "checkpoints"
    return {"data": data, "out": out, "checkpoints": checkpoints,
            "process": driver_process("--data", data, "--out", out, "--checkpoint-dir",
                                      checkpoints, *TINY_RUN, *flags)}


def start_mirrored_run(root):
    """The tiny run under MirroredStrategy on two logical CPU devices: the same two replicas,
    each with the same half of every global batch, as the two-worker cluster."""
    data = write_split_folders(root / "data")
    return {"root": root, "process": driver_process(
        "--strategy", "mirrored", "--cpu-replicas", WORKERS, "--data", data, "--out",
        root / "out", "--checkpoint-dir", root / "checkpoints", *TINY_RUN)}


def start_demo_run(root):
    """--demo at the demo's image size, downsampling and slice-conditional prior, on a few of
    the bundled slices, 1 epoch each, sampled at the lowest and the highest slice (--slice
    indices)."""
    import data

    demo = root / "data"
    for folder in data.SPLIT_FOLDERS.values():
        (demo / folder).mkdir(parents=True)
        # every 15th slice, which steps through the heights of a case; enough test slices for
        # the realism test
        stride = 5 if folder == data.SPLIT_FOLDERS["test"] else 15
        for image in sorted((data.DEMO_DATA / folder).glob("*.png"))[::stride]:
            shutil.copy(image, demo / folder)
    top_slice = max(map(data.slice_index, (demo / data.SPLIT_FOLDERS["train"]).iterdir()))
    out = root / "out"
    return {"data": demo, "out": out, "process": driver_process(
        "--demo", "--data", demo, "--out", out, *TINY_MODELS, "--slice", f"0,{top_slice}")}


# One step under MirroredStrategy on two logical CPU devices against one step on one device: the
# checks that test modules register (mirrored_step_check) run in one background process, which
# splits the CPU before TensorFlow starts and creates the one strategy that a process can have
# (a second reuses the first's collective op keys). Each check is the body of a function of
# `strategy` that imports what it needs and returns JSON-able results; it fails on its own.
MIRRORED_STEP_CHECKS = {}
MIRRORED_STEPS_PRELUDE = textwrap.dedent("""
    import json
    import traceback
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    outcomes = {}
""")
MIRRORED_STEPS_RUN = textwrap.dedent("""
    try:
        outcomes[{name!r}] = {{"returned": check(strategy)}}
    except Exception:
        outcomes[{name!r}] = {{"raised": traceback.format_exc()}}
""")


def mirrored_steps_script():
    """The registered checks as one script, which prints {name: outcome} as JSON."""
    parts = [MIRRORED_STEPS_PRELUDE]
    for name, body in MIRRORED_STEP_CHECKS.items():
        parts += ["def check(strategy):\n" + textwrap.indent(textwrap.dedent(body), "    "),
                  MIRRORED_STEPS_RUN.format(name=name)]
    return "\n".join(parts + ["print(json.dumps(outcomes))"])


def mirrored_step_check(name, body):
    """Registers the check `name` and returns a fixture, for a test module to assign to a
    module-level name, that gives what the check returned."""
    MIRRORED_STEP_CHECKS[name] = body

    @pytest.fixture
    def returned(mirrored_steps):
        assert mirrored_steps.returncode == 0, mirrored_steps.stderr[-3000:]
        outcome = json.loads(mirrored_steps.stdout.strip().splitlines()[-1])[name]
        assert "raised" not in outcome, outcome.get("raised")
        return outcome["returned"]

    return returned


# fixture name -> start(root): a dict of the run's folders and its "process" (with result(),
# live() and stop()); a test module adds the runs that only its tests read
BACKGROUND_RUNS = {"tiny_run": lambda root: start_tiny_run(root, "--verbose", "0"),
                   "tiny_rerun": start_tiny_run, "mirrored_run": start_mirrored_run,
                   "demo_run": start_demo_run,
                   "mirrored_steps": lambda root: {"process": PythonProcess(
                       "-c", mirrored_steps_script())}}


# Background processes at a time: the tests in this process, mostly single-threaded, leave about
# a core to them; more would slow those tests down without finishing the runs sooner.
BACKGROUND_PROCESSES = 2
POLL_INTERVAL = 0.2  # seconds: how often the background threads look at their processes


class BackgroundRuns:
    """The runs of BACKGROUND_RUNS that the collected tests read, started by a thread in
    processes of their own, in the order the tests first read them, as soon as fewer than
    BACKGROUND_PROCESSES run: they use the core that the tests in this process leave idle, and
    a test seldom waits for one."""

    def __init__(self, names, tmp_path_factory):
        self.waiting, self.started = list(names), {}
        self.tmp_path_factory = tmp_path_factory
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._start_in_turn, daemon=True)
        self.thread.start()

    def _start_in_turn(self):
        while self.waiting:
            with self.lock:
                live = sum(run["process"].live() for run in self.started.values())
                if self.waiting and live < BACKGROUND_PROCESSES:
                    self._start(self.waiting[0])
            time.sleep(POLL_INTERVAL)

    def _start(self, name):
        self.waiting.remove(name)
        self.started[name] = BACKGROUND_RUNS[name](self.tmp_path_factory.mktemp(name))

    def finished(self, name):
        """The run's folders, its "process" and the process's "result", once it has finished
        (started now if its turn has not come)."""
        with self.lock:
            if name in self.waiting:
                self._start(name)
        run = self.started[name]
        if "result" not in run:
            run["result"] = run["process"].result()
        return run

    def stop(self):
        with self.lock:
            self.waiting.clear()
        self.thread.join()
        for run in self.started.values():
            run["process"].stop()


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
    """The runs that the collected tests read, started in the background (BackgroundRuns)."""
    names = dict.fromkeys(name for item in request.session.items for name in item.fixturenames
                          if name in BACKGROUND_RUNS)
    runs = BackgroundRuns(names, tmp_path_factory)
    yield runs
    runs.stop()


def succeeded(run):
    assert run["result"].returncode == 0, run["result"].stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def tiny_run(background_runs):
    """The finished tiny run (data, out, checkpoints, result), shared by the tests that only read
    its outputs; a test that changes them works on a copy (`copied_run`). Quiet (--verbose 0),
    so that its console is also the one a quiet run prints."""
    return succeeded(background_runs.finished("tiny_run"))


@pytest.fixture(scope="session")
def tiny_rerun(background_runs):
    """The tiny run again, in another process and at the default --verbose."""
    return succeeded(background_runs.finished("tiny_rerun"))


@pytest.fixture(scope="session")
def mirrored_steps(background_runs):
    """The finished process of the registered mirrored-step checks (mirrored_step_check)."""
    return background_runs.finished("mirrored_steps")["result"]


@pytest.fixture(scope="session")
def mirrored_run(background_runs):
    """The finished mirrored run (root, result); its tests check its return code."""
    return background_runs.finished("mirrored_run")


@pytest.fixture(scope="session")
def demo_run(background_runs):
    """The finished demo run (data, out, result), shared by the tests that only read its
    outputs."""
    return succeeded(background_runs.finished("demo_run"))


@pytest.fixture
def copied_run(tiny_run, tmp_path):
    """The shared tiny run's folders, copied for a test to change."""
    copy = {"result": tiny_run["result"]}
    for name in ("data", "out", "checkpoints"):
        copy[name] = Path(shutil.copytree(tiny_run[name], tmp_path / name))
    return copy
