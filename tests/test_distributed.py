"""Two processes through `jax.distributed`: the same values and derivatives as an
exact single-process reference, outputs sharded across the processes, and nothing of
a vector's size moving between devices.

tests/distributed_launch.sh starts two processes of tests/distributed_script.py on
this machine (a coordinator on localhost, 2 CPU devices each, Gloo collectives), the
launch that docs/scaling.md shows. Each process writes its shards of every output;
this module puts them together and compares them with NumPy/SciPy references.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from distributed_script import (
    CANNOT_START,
    DEVICES_PER_PROCESS,
    batch_reference,
    field_reference,
    inputs,
)
from helpers import once_per_session

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("distributed_launch.sh")
PROCESSES = 2
DEVICES = PROCESSES * DEVICES_PER_PROCESS
TIMEOUT_S = 300  # compilation takes ~10 s; a lost peer hangs until the timeout
PROGRAMS = ("batch", "GMRES", "CG")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    found = json.loads(
        once_per_session(tmp_path_factory, "distributed.json", lambda: run(out))
    )
    if "skip" in found:
        pytest.skip(found["skip"])
    if "failure" in found:
        pytest.fail(found["failure"])
    return found


def run(out: Path) -> str:
    """Launches the processes and summarises what they wrote, as JSON."""
    if sys.platform == "win32" or shutil.which("bash") is None:
        return json.dumps({"skip": "starting the processes needs bash on POSIX"})
    try:
        launch = start(out)
    except OSError as error:
        return json.dumps({"skip": f"cannot start a second process: {error}"})
    try:
        output, _ = launch.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = f"no result in {TIMEOUT_S} s: killed"
    finally:
        # Both processes and the shell that started them: none outlives the test.
        try:
            os.killpg(launch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launch.wait()
    if launch.returncode == CANNOT_START:
        return json.dumps({"skip": output.strip().splitlines()[-1]})
    if launch.returncode != 0:
        return json.dumps({"failure": f"exit status {launch.returncode}: {output}"})
    return json.dumps(summarise(out))


def start(out: Path) -> subprocess.Popen:
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        JAX_PLATFORMS="cpu",
        # The package under test, not whichever copy the interpreter has installed.
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    # The script sets its own device count; conftest's other flags (the batched-LU
    # deadlock workaround) stay.
    flags = os.environ.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    return subprocess.Popen(
        ["bash", str(LAUNCHER), str(free_port()), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, to kill as one
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def summarise(out: Path) -> dict:
    """For every program and output: its largest difference to the reference
    (relative to the reference's largest entry), whether every process says it kept
    the input's sharding, and the rows each process holds; every collective."""
    reports = [json.loads((out / f"process-{i}.json").read_text()) for i in (0, 1)]
    shards = [np.load(out / f"process-{i}.npz") for i in (0, 1)]
    references = {
        "batch": batch_reference(*inputs()["batch"]),
        "GMRES": field_reference(*inputs()["GMRES"]),
    }
    references["CG"] = references["GMRES"]
    found = {}
    for name in PROGRAMS:
        outputs = {}
        for key, reference in references[name].items():
            rows, value = assemble(shards, f"{name}/{key}/", reference.shape)
            error = np.max(np.abs(value - reference)) / np.max(np.abs(reference))
            outputs[key] = {
                "error": float(error),
                "sharded": [r["programs"][name]["sharded"][key] for r in reports],
                "rows": rows,
            }
        collectives = [r["programs"][name]["collectives"] for r in reports]
        found[name] = {"outputs": outputs, "collectives": collectives}
    return found


def assemble(shards, prefix: str, shape) -> tuple[list[list[list[int]]], np.ndarray]:
    """The global array from every process's shards (NaN where none was written),
    and for each process the row ranges `[start, stop]` of its shards."""
    value, rows = np.full(shape, np.nan), []
    for held in shards:
        rows.append([])
        for key in sorted(k for k in held.files if k.startswith(prefix)):
            start, stop = map(int, key.removeprefix(prefix).split(":"))
            value[start:stop] = held[key]
            rows[-1].append([start, stop])
    return rows, value


@pytest.mark.parametrize("name", PROGRAMS)
def test_same_values_and_derivatives_as_one_process(summary, name):
    errors = {k: v["error"] for k, v in summary[name]["outputs"].items()}
    assert max(errors.values()) <= 1e-12, errors


@pytest.mark.parametrize("name", PROGRAMS)
def test_outputs_stay_sharded_across_the_processes(summary, name):
    for key, output in summary[name]["outputs"].items():
        assert all(output["sharded"]), (key, output["sharded"])
        # One block of rows per device: each process holds its own devices' blocks.
        length = sum(stop - start for held in output["rows"] for start, stop in held)
        block = length // DEVICES
        for held in output["rows"]:
            assert len(held) == DEVICES_PER_PROCESS, (key, output["rows"])
            assert all(stop - start == block for start, stop in held), key
        starts = sorted(start for held in output["rows"] for start, _ in held)
        assert starts == list(range(0, length, block)), (key, output["rows"])


@pytest.mark.parametrize("name", PROGRAMS)
def test_nothing_vector_sized_moves_between_devices(summary, name):
    # All-reduces of dot products (and of the 6 Gram–Schmidt coefficients of
    # GMRES(restart=5)) and halo exchanges (collective-permutes of a few rows) are
    # expected; anything as large as one device's block of an input is a gather.
    block = inputs()[name][0].size // DEVICES
    for collectives in summary[name]["collectives"]:
        assert collectives, "no collective: is anything sharded?"
        too_large = [c for c in collectives if c[1] >= block]
        assert not too_large, too_large
