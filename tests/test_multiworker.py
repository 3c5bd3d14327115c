"""MultiWorkerMirroredStrategy with real processes: two workers on localhost, configured by
TF_CONFIG as on a cluster, run the same command; the chief writes the results. Also the whole
pipeline under MirroredStrategy on two logical CPU devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

import runs  # (which registers the models' layers)
from conftest import (BACKGROUND_RUNS, REPO, TINY_RUN, WORKERS, Scenario, flattened,
                      one_line_error, write_split_folders)

RUN_TIMEOUT = 300  # seconds: a hang in a collective op fails the test instead of blocking CI
POLL_INTERVAL = 0.05
# The fault test's VQ-VAE: 2 epochs of 4 steps, so that a worker can be killed inside the last.
FAULT_RUN = [*TINY_RUN, "--epochs", "2"]
FAULT_SPLITS = {"train": 32, "validate": 4, "test": 10}


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("localhost", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_worker(index, ports, args, log):
    config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]},
              "task": {"type": "worker", "index": index}}
    return subprocess.Popen(
        [sys.executable, str(REPO / "driver.py"), "--strategy", "multiworker", *map(str, args)],
        env=os.environ | {"TF_CONFIG": json.dumps(config), "PYTHONUNBUFFERED": "1"}, cwd=REPO,
        stdout=log, stderr=subprocess.STDOUT, text=True)


class Cluster:
    """Worker processes of one cluster, each logging to its own file; stop() kills them."""

    def __init__(self, folder, args):
        self.folder, self.args = folder, args
        self.ports = free_ports(WORKERS)
        self.processes = {}
        self.runs = {index: 0 for index in range(WORKERS)}

    def start(self, index):
        self.runs[index] += 1
        with open(self.log_path(index), "w") as log:  # the worker keeps its own descriptor
            self.processes[index] = start_worker(index, self.ports, self.args, log)

    def log_path(self, index):
        return self.folder / f"worker_{index}_run_{self.runs[index]}.log"

    def log(self, index):
        return self.log_path(index).read_text()

    def wait(self, index):
        return self.processes[index].wait(timeout=RUN_TIMEOUT)

    def result(self):
        """The workers' return codes, once all have finished."""
        return [self.wait(index) for index in range(WORKERS)]

    def live(self):
        return sum(process.poll() is None for process in self.processes.values())

    def stop(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def cluster_run_args(root, splits=None):
    """The checkpoint folder and the output flags of a cluster run on tiny data in root."""
    data = write_split_folders(root / "data", *([splits] if splits else []))
    return root / "checkpoints", ["--data", data, "--out", root / "out"]


def start_cluster_run(root):
    """The tiny run on a cluster of two workers, both started."""
    checkpoints, args = cluster_run_args(root)
    cluster = Cluster(root, [*args, "--checkpoint-dir", checkpoints, *TINY_RUN])
    for index in range(WORKERS):
        cluster.start(index)
    return {"out": root / "out", "checkpoints": checkpoints, "process": cluster}


def start_fault_run(root):
    """A cluster run on the fault splits: worker 1 killed inside the last VQ-VAE epoch, the
    survivor left to stop, then the same command on both, as a cluster manager would; what the
    test reads of each phase."""
    checkpoints, args = cluster_run_args(root, FAULT_SPLITS)
    cluster = Cluster(root, [*args, "--checkpoint-dir", checkpoints, *FAULT_RUN])

    def kill_then_restart(processes):
        processes.append(cluster)
        for index in range(WORKERS):
            cluster.start(index)
        deadline = time.monotonic() + RUN_TIMEOUT
        while "Epoch 2/2" not in cluster.log(1):
            assert time.monotonic() < deadline and cluster.processes[1].poll() is None
            time.sleep(POLL_INTERVAL)
        cluster.processes[1].send_signal(signal.SIGKILL)
        cluster.wait(1)
        seen = {"killed_log": cluster.log(1),
                "killed_history": read_history(checkpoints / ".worker_1")}
        seen |= {"survivor_code": cluster.wait(0), "survivor_log": cluster.log(0),
                 "first_epoch": read_history(checkpoints)}
        for index in range(WORKERS):
            cluster.start(index)
        return seen | {"codes": cluster.result(),
                       "logs": [cluster.log(index) for index in range(WORKERS)]}

    return {"out": root / "out", "checkpoints": checkpoints,
            "process": Scenario(kill_then_restart)}


BACKGROUND_RUNS.update(cluster_run=start_cluster_run, fault_run=start_fault_run)


@pytest.fixture(scope="module")
def cluster_run(background_runs):
    """The finished cluster run (out, checkpoints, the Cluster as "process", its return codes
    as "result")."""
    return background_runs.finished("cluster_run")


@pytest.fixture(scope="module")
def fault_run(background_runs):
    """The finished fault run (out, checkpoints, what each phase showed as "result")."""
    return background_runs.finished("fault_run")


def fingerprints(log):
    return [line for line in log.splitlines() if "weights: sha256" in line]


def load_weights(path):
    return keras.models.load_model(path, safe_mode=True).get_weights()


def metrics_of(out):
    return json.loads((out / "metrics.json").read_text())


def test_mirrored_on_two_cpu_devices_runs_the_whole_pipeline(mirrored_run, tiny_run):
    result, root = mirrored_run["result"], mirrored_run["root"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{WORKERS} replicas in sync" in result.stdout
    # the report of the same run on one device (its numbers differ: the replicas' sums round
    # differently, and one flipped code changes the rest of the run)
    metrics = flattened(metrics_of(root / "out"))
    assert set(metrics) == set(flattened(metrics_of(tiny_run["out"])))
    assert metrics["samples.n_samples"] == len(list((root / "out" / "samples").iterdir()))
    assert (root / "out" / "samples.png").stat().st_size > 0
    history, single = (json.loads((folder / "vqvae_history.json").read_text())
                       for folder in (root / "checkpoints", tiny_run["checkpoints"]))
    assert len(history) == 1 and set(history[0]) == set(single[0])


def test_two_workers_train_in_sync_like_two_replicas_in_one_process(cluster_run, mirrored_run):
    cluster, checkpoints = cluster_run["process"], cluster_run["checkpoints"]
    assert cluster_run["result"] == [0] * WORKERS, [cluster.log(index)[-3000:]
                                                    for index in range(WORKERS)]
    assert not (checkpoints / ".worker_1").exists()  # the other worker cleaned up
    chief, other = fingerprints(cluster.log(0)), fingerprints(cluster.log(1))
    assert len(chief) == 2 and chief == other, (chief, other)  # both models, bit for bit
    for name in ("vqvae.keras", "pixelcnn.keras"):
        one_process = load_weights(mirrored_run["root"] / "checkpoints" / name)
        cluster_weights = load_weights(checkpoints / name)
        assert len(one_process) == len(cluster_weights)
        for one, two in zip(one_process, cluster_weights):
            np.testing.assert_allclose(one, two, rtol=1e-5, atol=1e-6, err_msg=name)
    # the same models, seed and data: the chief reports what the one process reported
    assert flattened(metrics_of(cluster_run["out"])) == pytest.approx(
        flattened(metrics_of(mirrored_run["root"] / "out")), rel=1e-4, abs=1e-5)


def epochs_started(log):
    return {line.split()[1] for line in log.splitlines() if line.startswith("Epoch ")}


def test_killed_worker_restarted_resumes_without_retraining(fault_run):
    seen, checkpoints = fault_run["result"], fault_run["checkpoints"]
    assert epochs_started(seen["killed_log"]) == {"1/2", "2/2"}  # killed in epoch 2
    assert len(seen["killed_history"]) == 1
    # the survivor's collective ops fail: it stops with one line and a non-zero exit
    survivor = seen["survivor_log"]
    assert seen["survivor_code"] != 0
    assert "Traceback" not in survivor and "rerun the same command" in survivor, survivor[-3000:]
    first_epoch = seen["first_epoch"]
    assert len(first_epoch) == 1  # epoch 2 did not finish
    codes, logs = seen["codes"], seen["logs"]
    assert codes == [0] * WORKERS, [log[-3000:] for log in logs]
    for log in logs:  # (Keras prints no epoch line for the prior's single epoch)
        assert epochs_started(log) == {"2/2"}, log[-3000:]
    history = read_history(checkpoints)
    assert len(history) == 2 and history[:1] == first_epoch
    # both workers end with the same models, and those are what the chief saved and evaluated
    saved = [runs.weights_fingerprint(keras.models.load_model(checkpoints / name,
                                                              safe_mode=True))
             for name in ("vqvae.keras", "pixelcnn.keras")]
    assert [line.split()[-1] for line in fingerprints(logs[1])] == saved
    assert fingerprints(logs[0]) == fingerprints(logs[1])
    assert not (checkpoints / ".worker_1").exists()  # the restarted worker cleaned up
    out = fault_run["out"]
    assert metrics_of(out)["samples"]["n_samples"] == len(list((out / "samples").iterdir()))


def read_history(checkpoints):
    return json.loads((checkpoints / "vqvae_history.json").read_text())


@pytest.mark.parametrize("config, expected", [
    (None, "needs the TF_CONFIG environment variable"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"index": 3}}', "is not a cluster"),
    ("not json", "is not a cluster"),
])
def test_multiworker_without_a_valid_tf_config_is_one_line(capsys, monkeypatch, tmp_path,
                                                           config, expected):
    if config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", config)
    message = one_line_error(capsys, ["--strategy", "multiworker", "--out", str(tmp_path / "out"),
                                      "--checkpoint-dir", str(tmp_path / "checkpoints")])
    assert expected in message, message


def test_cpu_replicas_need_the_mirrored_strategy(capsys):
    message = one_line_error(capsys, ["--cpu-replicas", "2"])
    assert "--cpu-replicas" in message and "mirrored" in message, message
