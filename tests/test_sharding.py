"""Sharded inputs: same values and derivatives as on one device, sharded outputs, and
no gathering of the whole state inside the solve.

JAX fixes its device count when it starts, so the sharded runs happen in a subprocess
(tests/sharding_script.py) with four CPU devices; this module checks what it reports.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import once_per_session

jax.config.update("jax_enable_x64", True)

SCRIPT = Path(__file__).with_name("sharding_script.py")
RAISE_SCRIPT = Path(__file__).with_name("sharding_raise_script.py")
ROOT = Path(__file__).resolve().parents[1]
FIELD_SIZE = 4096  # N in the script
DEVICES = 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return json.loads(once_per_session(tmp_path_factory, "sharding.json", run_script))


def run_script(script: Path = SCRIPT, timeout: int = 600) -> str:
    # The package under test, not whichever copy the interpreter has installed.
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(
        os.environ,
        # conftest's flags too (the batched-LU deadlock workaround), then 4 devices
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
        "--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=path,
    )
    run = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout.strip().splitlines()[-1]


# (group, case, elements of the smallest sharded state: one shard of it is too much)
CASES = [
    ("batch", "nan", 8 * 3),
    ("batch", "warn", 8 * 3),
    ("batch", "raise", 8 * 3),
    ("field", "GMRES-nan", FIELD_SIZE),
    ("field", "CG-nan", FIELD_SIZE),
    ("field", "CG-warn", FIELD_SIZE),
]


@pytest.mark.parametrize("group, case, state_size", CASES)
def test_outputs_stay_sharded_and_nothing_state_sized_moves(
    report, group, case, state_size
):
    result = report[group][case]
    assert all(result["sharded"]), result["sharded"]
    # Dot products (all-reduce of a scalar, or of the 21 Gram–Schmidt coefficients of
    # GMRES) and halo exchanges (collective-permute of one element) are expected;
    # anything as large as one device's share of the state is a gather.
    too_large = [c for c in result["collectives"] if c[1] >= state_size // DEVICES]
    assert not too_large, too_large


@pytest.mark.parametrize(
    "group, case, state_size",
    [("batch", "nan", 8 * 3), ("field", "CG-nan", FIELD_SIZE)],
)
def test_solve_log_on_sharded_inputs_records_without_gathering(
    report, group, case, state_size
):
    # Its callbacks receive a few numbers per solve; the results are unchanged.
    result = report[group][case]["logged"]
    assert result["entries"] >= 1 and result["statuses"] == ["converged"]
    assert result["vs_unlogged"] == 0.0
    assert all(result["sharded"])
    too_large = [c for c in result["collectives"] if c[1] >= state_size // DEVICES]
    assert not too_large, too_large


@pytest.mark.parametrize(
    "case", ["operator-jacrev", "operator-jacfwd", "matrix-jacrev", "matrix-jacfwd"]
)
def test_solve_log_on_an_explicit_mesh(report, case):
    # The log's residual once went through the operator's closure-converted product,
    # which rejects vectors whose type carries an explicit sharding, and its batch
    # count sliced the sharded batch axis: both raised.
    result = report["explicit"][case]
    assert result["vs_one_device"] <= 1e-12
    logged = result["logged"]
    assert logged["statuses"] == ["converged"] and logged["batches"] == [8 * 3]
    assert logged["residual"] <= 1e-12
    assert logged["vs_unlogged"] == 0.0
    assert all(logged["sharded"])


@pytest.mark.parametrize(
    "group, case, reference_tolerance",
    [
        ("batch", "nan", 1e-12),  # dense NumPy Jacobians
        # Banded SciPy solve; the Krylov solvers stop at their default tolerance.
        ("field", "GMRES-nan", 1e-7),
        ("field", "CG-nan", 1e-7),
    ],
)
def test_same_values_and_derivatives_as_one_device(
    report, group, case, reference_tolerance
):
    result = report[group][case]
    assert result["vs_one_device"] <= 1e-12
    assert result["vs_reference"] <= reference_tolerance


def test_raise_policy_raises_on_every_device_instead_of_hanging():
    # One failing problem on one device used to leave the others waiting at the next
    # all-reduce until XLA aborted the process (SIGABRT after 40 s, no exception).
    report = json.loads(run_script(RAISE_SCRIPT, timeout=300))
    # On good data, x + 1 is 2 but for one element, which is 1: Σ ∂√x/∂x and Σ √x / 2.
    expected = {"batch": 23 * 0.5 / 2**0.5 + 0.5, "field": 63 * 0.5 * 2**0.5 + 0.5}
    for case, good in expected.items():
        result = report[case]
        assert result["raised"] == "JaxRuntimeError"
        assert result["last_line"].startswith(
            "OnFailureError: implicitdiff: Auto did not solve the VJP"
            if case == "batch"
            else "OnFailureError: implicitdiff: CG did not solve the VJP"
        )
        assert result["last_line"].endswith('(on_failure="raise")')
        # The process goes on: the same program runs on good data.
        assert abs(result["good"] - good) < 1e-9 * good
    # implicitdiff.host re-raises its function's error the same way.
    host = report["host"]
    assert host["raised"] == "JaxRuntimeError"
    assert host["last_line"] == (
        "HostFunctionError: implicitdiff.host: `checked_sqrt` raised ValueError: zero"
    )
    assert abs(host["good"] - (23 * 2**0.5 + 1)) < 1e-9 * host["good"]
