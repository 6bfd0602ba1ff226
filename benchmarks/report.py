"""Turn a pytest-benchmark ``--benchmark-json`` file into the README's markdown performance table.

    python benchmarks/report.py results.json [more.json ...] [--out table.md]

Per group (``extra_info["group"]``) every implementation is compared with the group's baseline
(``extra_info["baseline"]``, measured in the same run): ``time / baseline`` (below 1 is faster)
and ``speed-up`` (baseline / time); where both record ``extra_info["peak_bytes"]``, also
``peak memory / baseline``; an ``extra_info["interleaved_ratio"]`` goes in the notes.  Where
``extra_info["bytes"]`` is given and the group has a ``clone`` entry, bandwidth is reported as a
fraction of the clone's bytes/s.  The header names the
machine, the accelerator and the torch version recorded in the JSON.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


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
    return "; ".join(notes)


def table(benchmarks: list[dict], only: str | None = None) -> list[str]:
    """Markdown rows, one per benchmark, grouped, with ratios to each group's baseline; ``only``
    keeps the groups whose name matches that regular expression."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for entry in benchmarks:
        info = entry.get("extra_info", {})
        if "group" in info and "impl" in info and (only is None or re.search(only, info["group"])):
            groups[info["group"]].append(entry)
    rows = [
        "| benchmark | implementation | mean time | time / baseline | speed-up | peak memory / baseline | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, entries in groups.items():
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
            rows.append(f"| {group} | {impl} | {_fmt_time(mean)} | {ratio} | {speedup} | {memory} | {_extras(entry, bandwidth)} |")
    return rows


def render(paths: list[Path], only: str | None = None) -> str:
    lines = []
    for path in paths:
        data = json.loads(path.read_text())
        lines.append(f"Measured on {_machine(data)} ({data.get('datetime', '?')[:10]}), `{path.name}`:")
        lines.append("")
        lines.extend(table(data["benchmarks"], only))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", type=Path, help="write the markdown here instead of stdout")
    parser.add_argument("--groups", help="only the groups matching this regular expression")
    args = parser.parse_args(argv)
    text = render(args.json, args.groups)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
