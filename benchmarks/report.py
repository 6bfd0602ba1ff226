"""Render pytest-benchmark ``--benchmark-json`` files as markdown tables, and benchmarks/README.md.

    python benchmarks/report.py                                   # write benchmarks/README.md
    python benchmarks/report.py --check                           # fail if benchmarks/README.md is stale
    python benchmarks/report.py results.json [more.json ...] [--out table.md] [--groups REGEX]

With no JSON argument the script renders ``benchmarks/README.md`` from the hand-written template
``benchmarks/notes.md`` and the result files in ``benchmarks/results/`` (``--notes``, ``--results``
and ``--out`` change these paths).  The template is copied line by line, except for directives,
each alone on its line:

* ``<!-- table: FILE.json -->`` or ``<!-- table: FILE.json groups: REGEX -->``: the table of that
  result file (only the groups whose name matches ``REGEX``), under a line naming its machine;
* ``<!-- quality: FILE.json -->``: the tables of a ``benchmarks/quality.py`` result (``quality_table``);
* ``<!-- machines -->``: one row per pytest-benchmark result file: its date, commit and machine;
* ``<!-- rest -->``: the tables of every group of every result file that no table directive has
  shown (appended at the end when the template has no such directive), so each committed result
  appears somewhere.

With JSON arguments it prints (or writes to ``--out``) their tables, as the device check does.

Per group (``extra_info["group"]``) every implementation is compared with the group's baseline
(``extra_info["baseline"]``, measured in the same run): ``time / baseline`` (below 1 is faster)
and ``speed-up`` (baseline / time); where both record ``extra_info["peak_bytes"]``, also
``peak memory / baseline``; an ``extra_info["interleaved_ratio"]`` and an ``extra_info["state_ratio"]``
(an optimizer's persistent state over the baseline's) go in the notes.  Where
``extra_info["bytes"]`` is given and the group has a ``clone`` entry, bandwidth is reported as a
fraction of the clone's bytes/s.  The header names the
machine, the accelerator and the torch version recorded in the JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIRECTIVE = re.compile(
    r"^<!--\s*(table|quality|machines|rest)\s*(?::\s*(\S+?\.json))?\s*(?:groups:\s*(.*?))?\s*-->\s*$"
)
GENERATED = (
    "<!-- Rendered by `python benchmarks/report.py` from benchmarks/notes.md and benchmarks/results/*.json:"
    " edit those, not this file. -->"
)


def _machine(data: dict) -> str:
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    parts = [cpu, f"{info.get('threads', '?')} threads"]
    if info.get("gpu"):
        parts.append(info["gpu"])
    parts.append(f"torch {info.get('torch', '?')}")
    parts.append(f"Python {info.get('python_version', '?')}")
    if "retain_freed_memory" in info:
        parts.append("freed memory retained" if info["retain_freed_memory"] else "glibc's malloc defaults")
    return ", ".join(parts)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _extras(entry: dict, bandwidth: float | None) -> str:
    info = entry["extra_info"]
    notes = []
    if bandwidth is not None:
        notes.append(f"{bandwidth:.0%} of clone bandwidth")
    for key in ("saved_bytes", "peak_extra_bytes", "peak_bytes"):
        if key in info:
            notes.append(f"{key.replace('_', ' ')} {info[key] / 2**20:.1f} MiB")
    if "interleaved_ratio" in info:
        notes.append(f"{info['interleaved_ratio']:.2f}x timed interleaved with the baseline")
    if "state_ratio" in info:
        notes.append(f"optimizer state {info['state_ratio']:.2f}x the baseline's")
    return "; ".join(notes)


def _groups(benchmarks: list[dict], only: str | None = None) -> dict[str, list[dict]]:
    """Benchmarks by ``extra_info["group"]``, in first-seen order; ``only`` keeps the groups whose
    name matches that regular expression."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for entry in benchmarks:
        info = entry.get("extra_info", {})
        if "group" in info and "impl" in info and (only is None or re.search(only, info["group"])):
            groups[info["group"]].append(entry)
    return groups


def table(benchmarks: list[dict], only: str | None = None, skip: set[str] | frozenset = frozenset()) -> list[str]:
    """Markdown rows, one per benchmark, grouped, with ratios to each group's baseline; ``only``
    keeps the groups whose name matches that regular expression, ``skip`` drops the groups named."""
    groups = _groups(benchmarks, only)
    rows = [
        "| benchmark | implementation | mean time | time / baseline | speed-up | peak memory / baseline | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, entries in groups.items():
        if group in skip:
            continue
        baseline = next((e for e in entries if e["extra_info"].get("baseline")), None)
        clone = next((e for e in entries if e["extra_info"]["impl"] == "clone"), None)
        for entry in sorted(entries, key=lambda e: (not e["extra_info"].get("baseline"), e["stats"]["mean"])):
            info, mean = entry["extra_info"], entry["stats"]["mean"]
            ratio = speedup = memory = "n/a"
            if baseline is not None:
                ratio = f"{mean / baseline['stats']['mean']:.2f}x"
                speedup = f"{baseline['stats']['mean'] / mean:.2f}x"
                if info.get("peak_bytes") and baseline["extra_info"].get("peak_bytes"):
                    memory = f"{info['peak_bytes'] / baseline['extra_info']['peak_bytes']:.2f}x"
            bandwidth = None
            if clone is not None and "bytes" in info and info["impl"] != "clone":
                clone_rate = clone["extra_info"]["bytes"] / clone["stats"]["mean"]
                bandwidth = info["bytes"] / mean / clone_rate
            impl = f"**{info['impl']}** (baseline)" if info.get("baseline") else info["impl"]
            rows.append(
                f"| {group} | {impl} | {_fmt_time(mean)} | {ratio} | {speedup} | {memory} "
                f"| {_extras(entry, bandwidth)} |"
            )
    return rows


def _heading(data: dict, name: str) -> str:
    return f"Measured on {_machine(data)} ({data.get('datetime', '?')[:10]}), `{name}`:"


def render(paths: list[Path], only: str | None = None) -> str:
    """The tables of ``paths``, each under a line naming its machine (the per-file output)."""
    lines = []
    for path in paths:
        data = json.loads(path.read_text())
        lines.append(_heading(data, path.name))
        lines.append("")
        lines.extend(table(data["benchmarks"], only))
        lines.append("")
    return "\n".join(lines)


def quality_tables(result: dict) -> list[str]:
    """The tables of a ``quality.py`` result, by ``quality_table.py`` beside this file."""
    spec = importlib.util.spec_from_file_location("quality_table", HERE / "quality_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tables(result)


def _machines(results: dict[str, dict]) -> list[str]:
    rows = ["| result file | date | commit | machine |", "|---|---|---|---|"]
    for name, data in results.items():
        commit = data.get("commit_info", {})
        commit_id = commit.get("id", "")[:10] + (" (dirty)" if commit.get("dirty") else "") if commit.get("id") else "?"
        rows.append(f"| `{name}` | {data.get('datetime', '?')[:10]} | {commit_id} | {_machine(data)} |")
    return rows


def render_readme(results_dir: Path, notes: Path) -> str:
    """benchmarks/README.md: the template ``notes`` with its directives replaced (module docstring)."""
    every = {p.name: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    results = {name: data for name, data in every.items() if "benchmarks" in data}  # pytest-benchmark files
    shown: dict[str, set[str]] = defaultdict(set)
    body: list[str | None] = []  # None marks where the rest goes
    for number, line in enumerate(notes.read_text().splitlines(), 1):
        match = DIRECTIVE.match(line.strip())
        if match is None:
            body.append(line)
            continue
        kind, name, groups = match.groups()
        if kind == "machines":
            body.extend(_machines(results))
        elif kind == "rest":
            body.append(None)
        elif kind == "quality":
            if name not in every or "tasks" not in every[name]:
                raise ValueError(f"{notes}:{number}: no quality.py result {name!r} in {results_dir}")
            body.extend(quality_tables(every[name]))
        else:
            if name not in results:
                raise ValueError(f"{notes}:{number}: no result file {name!r} in {results_dir}")
            data = results[name]
            selected = _groups(data["benchmarks"], groups or None)
            if not selected:
                raise ValueError(f"{notes}:{number}: no group of {name} matches {groups!r}")
            shown[name].update(selected)
            body.extend([_heading(data, name), "", *table(data["benchmarks"], groups or None)])
    rest: list[str] = []
    for name, data in results.items():
        if set(_groups(data["benchmarks"])) - shown[name]:
            rest.extend([_heading(data, name), "", *table(data["benchmarks"], skip=shown[name]), ""])
    if None not in body:
        body.extend(["", "## Other results", "", None] if rest else [])
    out = [GENERATED, ""]
    for line in body:
        out.extend(rest[:-1] if line is None else [line])
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "json",
        nargs="*",
        type=Path,
        help="pytest-benchmark --benchmark-json output (none: render benchmarks/README.md)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="write the markdown here (default: stdout for JSON arguments, else benchmarks/README.md)",
    )
    parser.add_argument("--groups", help="only the groups matching this regular expression (JSON arguments)")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="result files of the README")
    parser.add_argument("--notes", type=Path, default=HERE / "notes.md", help="the README's template")
    parser.add_argument("--check", action="store_true", help="only check that the README is up to date")
    args = parser.parse_args(argv)
    if args.json:
        text = render(args.json, args.groups)
        if args.out:
            args.out.write_text(text)
        else:
            print(text)
        return 0
    out = args.out or HERE / "README.md"
    text = render_readme(args.results, args.notes)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run python benchmarks/report.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
