"""Backend selection: automatic choice, overrides, and the fallback when no compiler is found."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bayeskern.ops as ops
from bayeskern.ops import backend


def test_reference_is_always_available():
    assert "reference" in ops.available_backends("cpu")


def test_float64_always_runs_the_reference():
    assert backend.backend_for("gaussian_sample", torch.zeros(2, dtype=torch.float64)) == "reference"


def test_use_backend_overrides_and_restores():
    auto = backend.backend_for("gaussian_sample", torch.zeros(2))
    with ops.use_backend("reference"):
        assert backend.backend_for("gaussian_sample", torch.zeros(2)) == "reference"
    assert backend.backend_for("gaussian_sample", torch.zeros(2)) == auto


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("BAYESKERN_BACKEND", "reference")
    assert backend.backend_for("gaussian_sample", torch.zeros(2)) == "reference"
    monkeypatch.setenv("BAYESKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.backend_for("gaussian_sample", torch.zeros(2))


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"), ops.use_backend("cuda"):
        pass


def test_cpu_default_is_cpp_when_built():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("extension not built here")
    assert backend.backend_for("gaussian_sample", torch.zeros(2)) == "cpp"


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


@pytest.mark.slow  # a subprocess or a long chain
def test_without_a_compiler_import_works_and_reference_serves(tmp_path):
    result = _run_python(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bayeskern as bk
            backends = bk.ops.available_backends("cpu")
            w = bk.ops.gaussian_sample(torch.zeros(8), torch.zeros(8), 1)
            bk.ops.weight_dropout(torch.ones(8), 0.5, 1)
        ext = [w for w in caught if "C++ extension could not be built" in str(w.message)]
        ref = bk.ops.reference_gaussian_sample(torch.zeros(8), torch.zeros(8), 1)
        print(backends, len(ext), bool(torch.equal(w, ref)))
        """,
        CXX="/bin/false",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        TRITON_INTERPRET="0",
        BAYESKERN_REQUIRE_BACKENDS="",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["['reference']", "1", "True"]


@pytest.mark.slow  # a subprocess or a long chain
def test_forcing_triton_on_cpu_without_interpreter_explains(tmp_path):
    result = _run_python(
        """
        import torch, bayeskern as bk
        try:
            with bk.ops.use_backend("triton"):
                bk.ops.gaussian_sample(torch.zeros(4), torch.zeros(4), 0)
        except RuntimeError as error:
            print(error)
        """,
        TRITON_INTERPRET="0",
    )
    assert "TRITON_INTERPRET=1" in result.stdout, result.stderr
