"""benchmarks/report.py: per-file tables and the rendered benchmarks/README.md."""

import importlib.util
import json
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
_SPEC = importlib.util.spec_from_file_location("bench_report", _BENCH / "report.py")
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def _entry(group: str, impl: str, mean: float, baseline: bool = False, **info) -> dict:
    return {"extra_info": {"group": group, "impl": impl, "baseline": baseline, **info}, "stats": {"mean": mean}}


FAKE = {
    "machine_info": {
        "cpu": {"brand_raw": "Test CPU"},
        "threads": 3,
        "torch": "9.9",
        "python_version": "3.x",
        "retain_freed_memory": True,
    },
    "commit_info": {"id": "0123456789abcdef", "dirty": False},
    "datetime": "2030-01-02T03:04:05",
    "benchmarks": [
        _entry("step small", "plain", 0.010, baseline=True, peak_bytes=2**20),
        _entry("step small", "fast", 0.005, peak_bytes=2**21, interleaved_ratio=0.52),
        _entry("step big", "plain", 2.0, baseline=True),
        _entry("step big", "fast", 0.5),
    ],
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "fake.json").write_text(json.dumps(FAKE))
    return folder


def test_table_rows_carry_ratios_to_the_group_baseline():
    rows = report.table(FAKE["benchmarks"])
    assert rows[0].startswith("| benchmark | implementation | mean time |")
    assert "| step small | **plain** (baseline) | 10.00 ms | 1.00x | 1.00x | 1.00x | peak bytes 1.0 MiB |" in rows
    assert (
        "| step small | fast | 5.00 ms | 0.50x | 2.00x | 2.00x | peak bytes 2.0 MiB; "
        "0.52x timed interleaved with the baseline |"
    ) in rows
    assert "| step big | fast | 500.00 ms | 0.25x | 4.00x | n/a |  |" in rows


def test_json_arguments_print_the_tables(results, capsys):
    assert report.main([str(results / "fake.json"), "--groups", "big"]) == 0
    out = capsys.readouterr().out
    assert (
        "Measured on Test CPU, 3 threads, torch 9.9, Python 3.x, freed memory retained (2030-01-02), `fake.json`:"
        in out
    )
    assert "| step big | fast |" in out and "step small" not in out


def test_readme_renders_template_directives_and_every_other_group(results, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text(
        "# Bench\n\nProse kept as written.\n\n<!-- machines -->\n\n## Small\n\n"
        "<!-- table: fake.json groups: small -->\n\n## Rest\n\n<!-- rest -->\n"
    )
    out = tmp_path / "README.md"
    assert report.main(["--results", str(results), "--notes", str(notes), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!-- Rendered by `python benchmarks/report.py`")
    assert "Prose kept as written." in text
    assert "| `fake.json` | 2030-01-02 | 0123456789 | Test CPU, 3 threads, torch 9.9" in text
    small, rest = text.split("## Rest")
    assert "| step small | fast | 5.00 ms |" in small and "step big" not in small
    assert "| step big | fast | 500.00 ms |" in rest and "step small" not in rest
    assert "<!--" not in text.split("\n", 1)[1]  # every directive replaced
    assert report.main(["--results", str(results), "--notes", str(notes), "--out", str(out), "--check"]) == 0
    out.write_text(text + "hand edit\n")
    assert report.main(["--results", str(results), "--notes", str(notes), "--out", str(out), "--check"]) == 1


def test_readme_without_rest_directive_appends_the_unshown_groups(results, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("<!-- table: fake.json groups: big -->\n")
    text = report.render_readme(results, notes)
    assert text.index("| step big |") < text.index("## Other results") < text.index("| step small |")


def test_readme_directive_naming_a_missing_file_fails(results, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("<!-- table: missing.json -->\n")
    with pytest.raises(ValueError, match=r"missing\.json"):
        report.render_readme(results, notes)


def test_committed_benchmarks_readme_is_rendered_from_notes_and_results():
    expected = report.render_readme(_BENCH / "results", _BENCH / "notes.md")
    assert (_BENCH / "README.md").read_text() == expected, "run python benchmarks/report.py"


def test_quality_directive_renders_a_quality_result_and_nothing_else(results, tmp_path):
    quality = json.loads((_BENCH / "results" / "cpu-quality.json").read_text())
    (results / "q.json").write_text(json.dumps(quality))
    notes = tmp_path / "notes.md"
    notes.write_text("## Quality\n\n<!-- quality: q.json -->\n\n<!-- machines -->\n")
    text = report.render_readme(results, notes)
    assert text.count("| plain_ts |") == 2 and text.count("| laplace |") == 2  # both tasks
    assert "`q.json`" not in text  # a quality result is no pytest-benchmark file: not in the machines table
    notes.write_text("<!-- quality: fake.json -->\n")
    with pytest.raises(ValueError, match=r"no quality\.py result 'fake\.json'"):
        report.render_readme(results, notes)
