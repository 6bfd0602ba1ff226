"""Issue 18: the example scripts in ``examples/`` run in their offline ``--tiny`` mode, alone and (the
sequence-classification one) under ``torchrun`` with two gloo processes on CPU.

Each runs as a subprocess from a temporary folder (the checkout's root must not be the working directory:
its ``kernels/`` would shadow the package transformers imports), with one OpenMP thread per process.  The
printed table must be ``bayeskern.app.report.markdown_table``'s, with one row per method agreeing with
``metrics.json``; under DDP both ranks must end with the same posterior, and exit having torn down the
process group.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("sklearn")

from test_hf_methods import assert_same_state

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HEADER = "| method | error | ece | mce | nll | brier |"  # the first columns of markdown_table


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def table_rows(stdout: str) -> dict[str, dict[str, float]]:
    """The printed table's rows: method -> {column: value} (one table, printed once)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert sum(line.startswith(HEADER) for line in lines) == 1, stdout[-2000:]
    head = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = {h: float(c) for h, c in zip(head[1:], cells[1:]) if c != "n/a"}
    return rows


def check_report(stdout: str, output_dir: Path, methods: list[str], chance_error: float) -> dict:
    rows = table_rows(stdout)
    assert list(rows) == methods
    saved = json.loads((output_dir / "metrics.json").read_text())["methods"]
    for method, row in rows.items():
        for column in ("error", "ece", "nll", "brier"):
            assert row[column] == pytest.approx(saved[method]["test"][column], abs=5e-5)
        assert 0 <= row["ece"] <= 1 and row["nll"] > 0
    first = methods[0]
    assert rows[first]["error"] < chance_error  # the tiny model learned something
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "methods", "chance_error"),
    [
        ("sequence_classification.py", ["vanilla", "vi", "mc_dropout", "sgld", "laplace"], 0.5),
        ("multiple_choice_laplace.py", ["map", "laplace"], 0.75),
        ("image_classification.py", ["vanilla", "vi", "mc_dropout", "sgld", "laplace"], 0.9),
    ],
)
def test_example_tiny_mode_prints_the_cli_table(tmp_path, script, methods, chance_error):
    result = run([sys.executable, str(EXAMPLES / script), "--tiny", "--output-dir", str(tmp_path / "out")], tmp_path)
    check_report(result.stdout, tmp_path / "out", methods, chance_error)


DDP_DRIVER = """
import sys
import torch
import torch.distributed as dist

sys.path.insert(0, {examples!r})
import sequence_classification as example
from common import finish

out = example.main(["--tiny", "--steps", "8", "--output-dir", {output!r}])
trainers = out["trainers"]
state = {{
    "world_size": dist.get_world_size(),
    "vi": trainers["vi"].model.state_dict(),
    "mc_dropout": trainers["mc_dropout"].model.state_dict(),
    "sgld": trainers["sgld"].posterior.state_dict(),
    "laplace": trainers["laplace"].posterior.state_dict(),
    "test": {{name: r.test for name, r in out["results"].items()}},
}}
torch.save(state, f"{output}/rank{{dist.get_rank()}}.pt")
finish()
assert not dist.is_initialized()
"""


@pytest.mark.slow
def test_sequence_classification_under_torchrun_two_gloo_ranks(tmp_path):
    """Every method trains data-parallel: both ranks hold the same posterior (VI / MC-dropout state dicts,
    the SGLD bank, the Laplace curvature and prior precision) and report the same metrics; rank 0 alone
    prints the table and writes metrics.json; each process destroys its process group and exits 0."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    output = tmp_path / "out"
    output.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DDP_DRIVER.format(examples=str(EXAMPLES), output=str(output))))
    result = run([torchrun, "--standalone", "--nproc_per_node=2", str(driver)], tmp_path, timeout=400)
    rows = table_rows(result.stdout)
    assert list(rows) == ["vanilla", "vi", "mc_dropout", "sgld", "laplace"]
    assert "destroy_process_group" not in result.stderr
    rank0, rank1 = (torch.load(output / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert_same_state(rank0, rank1)
    assert len(rank0["sgld"]["samples"]) > 0 and rank0["laplace"]["num_data"] == 144
    saved = json.loads((output / "metrics.json").read_text())["methods"]
    assert saved.keys() == rank0["test"].keys()
    for name, scores in saved.items():
        assert scores["test"] == pytest.approx(rank0["test"][name])
