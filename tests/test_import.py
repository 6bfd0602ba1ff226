"""``import bayeskern`` loads torch and the package only; the heavy optional dependencies
(``bayeskern[app]``, and what later features use) load when the parts that need them are used."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts a Python process

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "sklearn", "scipy", "timm", "torchvision", "transformers", "peft")


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout (not a stale installed copy)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _ok(code: str) -> str:
    result = _python(code)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_bayeskern_loads_no_heavy_module():
    out = _ok(f"""
        import sys
        import bayeskern
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert out.strip().splitlines()[-1] == "[]"


def test_lazy_submodules_stay_reachable():
    out = _ok("""
        import sys
        import bayeskern as bk
        assert "matplotlib" not in sys.modules
        assert {"distributed", "metrics", "ops", "plots"} <= set(bk.__all__)
        assert {"distributed", "metrics", "ops", "plots"} <= set(dir(bk))
        assert callable(bk.metrics.ece) and callable(bk.ops.gaussian_kl) and callable(bk.distributed.is_rank_zero)
        assert "matplotlib" not in sys.modules
        plots = bk.plots
        assert callable(plots.reliability_diagram)
        assert "matplotlib" in sys.modules
        import bayeskern.plots
        assert bayeskern.plots is plots
        print("ok")
    """)
    assert out.strip().splitlines()[-1] == "ok"


def test_star_import_and_unknown_attribute():
    out = _ok("""
        import bayeskern
        namespace = {}
        exec("from bayeskern import *", namespace)
        assert namespace["plots"] is bayeskern.plots
        try:
            bayeskern.no_such_thing
        except AttributeError as error:
            assert "no_such_thing" in str(error)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
    """)
    assert out.strip().splitlines()[-1] == "ok"


def test_cli_module_imports_no_app_dependency():
    out = _ok(f"""
        import sys
        import bayeskern.app.cli
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert out.strip().splitlines()[-1] == "[]"


# sys.modules[name] = None makes ``import name`` fail as if the package were not installed.
@pytest.mark.parametrize(
    "module, call",
    [
        ("scipy", "bk.metrics.fit_temperature(torch.randn(8, 3), torch.arange(8) % 3)"),
        ("sklearn", "bk.metrics.ood_auroc(torch.rand(8), torch.rand(8))"),
        ("matplotlib", "bk.plots"),
    ],
)
def test_missing_optional_dependency_names_the_extra(module, call):
    result = _python(f"""
        import sys
        sys.modules[{module!r}] = None
        import torch
        import bayeskern as bk
        assert bk.metrics.ece(torch.full((4, 2), 0.5), torch.tensor([0, 1, 0, 1])) >= 0  # no scipy/sklearn needed
        try:
            {call}
        except ImportError as error:
            print(error)
        else:
            raise AssertionError("no ImportError")
    """)
    assert result.returncode == 0, result.stderr
    assert "bayeskern[app]" in result.stdout


@pytest.mark.parametrize(
    "module, package", [("timm", "timm"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")]
)
def test_cli_without_an_app_dependency_exits_2_with_one_line(tmp_path, module, package):
    result = _python(f"""
        import sys
        sys.modules[{module!r}] = None
        from bayeskern.app.cli import main
        sys.exit(main(["--model", "convnet", "--epochs", "1", "--quiet", "--out", {str(tmp_path)!r}]))
    """)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert package in err[0] and "pip install 'bayeskern[app]'" in err[0]
    assert not any(tmp_path.iterdir())  # nothing was started


def test_cli_reports_an_app_dependency_that_fails_during_the_run(tmp_path, monkeypatch, capsys):
    """A dependency found by the start-up check but failing to import later is reported the same way."""
    import bayeskern.app.cli as cli

    def broken_run(config, parallel):
        raise ImportError("this bayeskern.metrics function needs scipy", name="scipy.optimize")

    monkeypatch.setattr(cli, "run", broken_run)
    assert cli.main(["--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scipy" in err[0] and "bayeskern[app]" in err[0]

    def unrelated(config, parallel):
        raise ImportError("something else", name="not_an_app_dependency")

    monkeypatch.setattr(cli, "run", unrelated)
    with pytest.raises(ImportError, match="something else"):
        cli.main(["--quiet", "--out", str(tmp_path)])


def test_cli_text_model_without_transformers_exits_2_naming_the_hf_extra(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(40)))
    result = _python(f"""
        import sys
        sys.modules["transformers"] = None
        from bayeskern.app.cli import main
        args = ["--model", "hf:{tmp_path}", "--dataset", "csv:{data}", "--quiet"]
        sys.exit(main([*args, "--out", {str(tmp_path / "out")!r}]))
    """)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert "transformers" in err[0] and "pip install 'bayeskern[hf]'" in err[0]
