"""The application's checkpoints and results load with ``torch.load(weights_only=True)``: a real
run's files round-trip, and a planted pickle that would run code is refused without running it."""

import json
import pickle

import pytest
import torch
from test_finetune import TINY  # its run options; the MC-dropout and Laplace ones do not touch vi / sgld

from bayeskern.app.cli import main
from bayeskern.app.errors import UsageError
from bayeskern.app.report import load_method_result
from bayeskern.app.training import load_safely

pytestmark = pytest.mark.slow  # runs the CLI end to end


def _run(tmp_path, *extra, name="run"):
    return main([*TINY, "--out", str(tmp_path), "--name", name, *extra])


@pytest.fixture
def load_calls(monkeypatch):
    """Every ``torch.load`` call as (path, weights_only)."""
    calls, real_load = [], torch.load

    def spy(f, *args, **kwargs):
        calls.append((str(f), kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def test_a_real_runs_files_round_trip_under_weights_only(tmp_path, load_calls):
    run_dir = tmp_path / "run"
    assert _run(tmp_path, "--method", "vi,sgld", "--stop-after-epoch", "1") == 3
    cut = torch.load(run_dir / "vi" / "checkpoint.pt", weights_only=True)
    assert cut["epoch"] == 0 and isinstance(cut["rng"], torch.Tensor)
    assert set(cut["state"]) == {"posterior", "optimizer", "scheduler"}

    load_calls.clear()
    assert _run(tmp_path, "--method", "vi,sgld", "--resume") == 0
    assert ("checkpoint.pt", True) in [(name.rsplit("/", 1)[-1], safe) for name, safe in load_calls]
    assert all(safe is True for _, safe in load_calls), load_calls
    first = json.loads((run_dir / "metrics.json").read_text())["methods"]

    for method in ("vi", "map", "sgld"):  # sgld fits the MAP first, under map/
        state = torch.load(run_dir / method / "checkpoint.pt", weights_only=True)["state"]
        assert state and state["optimizer"]["state"], method
    bank = torch.load(run_dir / "sgld" / "checkpoint.pt", weights_only=True)["state"]["bank"]
    assert bank  # the SGLD sample bank's state
    for method in ("vi", "sgld"):
        result, probs = load_method_result(run_dir / method)
        assert result.temperature > 0 and probs["test"].ndim == 2

    load_calls.clear()  # every method done: a further resume only reads the results back
    assert _run(tmp_path, "--method", "vi,sgld", "--resume") == 0
    assert sorted(name.rsplit("/", 2)[-2] for name, _ in load_calls) == ["sgld", "vi"]
    assert all(safe is True for _, safe in load_calls)
    assert json.loads((run_dir / "metrics.json").read_text())["methods"] == first


class _PlantsMarker:
    """Unpickling this opens (so creates) ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path, payload, writer):
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle, not torch's zip container
        with open(path, "wb") as f:
            pickle.dump(payload, f)


PAYLOADS = {
    "checkpoint.pt": lambda evil: {"epoch": 0, "rng": evil, "state": {}},
    "result.pt": lambda evil: {"result": evil, "probs": {}},
}


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
@pytest.mark.parametrize("filename", list(PAYLOADS))
def test_a_planted_pickle_is_refused_without_running(tmp_path, capsys, filename, writer):
    # the payload is live: a full unpickle does create its marker
    probe = tmp_path / "probe_marker"
    _plant(tmp_path / "probe.pt", PAYLOADS[filename](_PlantsMarker(probe)), writer)
    if writer == "torch.save":
        torch.load(tmp_path / "probe.pt", weights_only=False)
    else:
        with open(tmp_path / "probe.pt", "rb") as f:
            pickle.load(f)
    assert probe.exists()

    marker = tmp_path / "marker"
    planted = tmp_path / "run" / "vanilla" / filename
    _plant(planted, PAYLOADS[filename](_PlantsMarker(marker)), writer)
    capsys.readouterr()
    assert _run(tmp_path, "--method", "vanilla", "--resume") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"refusing to load {planted}" in err[0] and "could run code" in err[0]
    assert not marker.exists()


def test_load_functions_refuse_a_planted_pickle(tmp_path):
    marker = tmp_path / "marker"
    _plant(tmp_path / "vanilla" / "result.pt", PAYLOADS["result.pt"](_PlantsMarker(marker)), "torch.save")
    with pytest.raises(UsageError, match="Unsupported global"):
        load_method_result(tmp_path / "vanilla")
    with pytest.raises(UsageError, match="refusing to load"):
        load_safely(tmp_path / "vanilla" / "result.pt")
    assert not marker.exists()
    torch.save({"x": torch.ones(2), "n": 3, "names": ["a"], "nested": {"t": (1.5, None)}}, tmp_path / "ok.pt")
    assert load_safely(tmp_path / "ok.pt")["nested"] == {"t": (1.5, None)}
