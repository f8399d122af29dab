#!/usr/bin/env python3
"""Summarize iovmm_ptbench KUnit runs (raw UML console logs) for scripts/linux-ptbench.

usage: summarize.py --out FILE --version V --cfg CFG RUN.log [RUN.log ...]

Checks every run: the iovmm_ptbench suite reported `ok`, no test reported `not ok` or SKIP, and every
case printed one IOVMM_PTBENCH line. Per case the result is the median over runs of each run's median
per-call ns. Writes one JSON object per line to --out (the cases of `scripts/bench dma-map`) and prints a
table of every measured case. Exits 1 with a message naming the log on any problem.
"""

import argparse
import json
import re
import statistics
import sys

# The cases scripts/bench dma-map compares, in its order; the others are printed only.
JSON_CASES = [
    "map_4k", "unmap_4k", "map_2m", "unmap_2m", "map_1g", "unmap_1g", "map_256x4k", "unmap_256x4k", "map_256x2m",
    "unmap_256x2m", "map_256x1g", "unmap_256x1g", "translate_hit", "translate_walk", "churn_4k",
    "map_guest_64g",
]
EXTRA_CASES = ["unmap_guest_64g"]
NOTES = {
    "map_4k": "1 page, consecutive IOVAs",
    "map_256x4k": "1 MiB, 1 MiB but not 2 MiB aligned",
    "map_256x2m": "512 MiB, 1 GiB aligned",
    "map_256x1g": "256 GiB, 512 GiB aligned",
    "translate_hit": "same IOVA, 4 KiB leaf",
    "translate_walk": "random IOVAs, 1 GiB of 4 KiB leaves",
    "churn_4k": "map+unmap pair, random IOVAs",
    "map_guest_64g": "64 GiB, 1 GiB aligned",
}

BENCH_RE = re.compile(
    r"IOVMM_PTBENCH case=(\S+) median_ns=([\d.]+) min_ns=([\d.]+) p10_ns=([\d.]+) "
    r"p90_ns=([\d.]+) samples=(\d+) batch=(\d+)")
LEAVES_RE = re.compile(r"IOVMM_PTBENCH_LEAVES case=(\S+) leaves=(\d+) leaf_size=(\d+)")
CONFIG_RE = re.compile(r"IOVMM_PTBENCH_CONFIG (.*)$")
SUITE_RE = re.compile(r"^(?:\[[^\]]*\]\s*)?(not ok|ok) \d+ iovmm_ptbench\b")
NOT_OK_RE = re.compile(r"(?:^|\s)not ok \d+ (\S+)")
SKIP_RE = re.compile(r"(?:^|\s)ok \d+ (\S+) # SKIP(.*)$")


class Failure(Exception):
    """A run that did not produce a complete, passing set of results."""


def parse_run(path):
    """Return ({case: row}, {case: leaves}, config line) of one raw console log."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise Failure(f"cannot read {path}: {e}") from e
    rows, leaves, config, suite = {}, {}, None, None
    for line in lines:
        m = BENCH_RE.search(line)
        if m:
            name = m.group(1)
            if name in rows:
                raise Failure(f"{path}: case {name} reported twice")
            rows[name] = {
                "median": float(m.group(2)), "min": float(m.group(3)), "p10": float(m.group(4)),
                "p90": float(m.group(5)), "samples": int(m.group(6)), "batch": int(m.group(7)),
            }
            continue
        m = LEAVES_RE.search(line)
        if m:
            leaves[m.group(1)] = (int(m.group(2)), int(m.group(3)))
            continue
        m = CONFIG_RE.search(line)
        if m:
            config = m.group(1).strip()
            continue
        m = NOT_OK_RE.search(line)
        if m:
            raise Failure(f"{path}: KUnit test '{m.group(1)}' failed: {line.strip()}")
        m = SKIP_RE.search(line)
        if m:
            raise Failure(f"{path}: KUnit test '{m.group(1)}' was skipped:{m.group(2)}")
        m = SUITE_RE.search(line)
        if m:
            suite = m.group(1)
    if suite != "ok":
        raise Failure(f"{path}: the iovmm_ptbench suite did not report 'ok' "
                      f"(got {suite!r}); the kernel may have crashed or timed out")
    missing = [c for c in JSON_CASES + EXTRA_CASES if c not in rows]
    if missing:
        raise Failure(f"{path}: no result for case(s) {', '.join(missing)}")
    return rows, leaves, config


def fmt_ns(v):
    return f"{v:.1f}"


def fmt_size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--version", required=True, help="linux-source package version")
    ap.add_argument("--cfg", required=True, help="table configuration (amd or vtd)")
    ap.add_argument("logs", nargs="+")
    a = ap.parse_args()

    try:
        runs = [parse_run(p) for p in a.logs]
    except Failure as e:
        print(f"linux-ptbench: error: {e}", file=sys.stderr)
        return 1

    result = {}
    for case in JSON_CASES + EXTRA_CASES:
        per_run = [r[0][case] for r in runs]
        result[case] = {
            "median": statistics.median(x["median"] for x in per_run),
            "min": min(x["min"] for x in per_run),
            "p90": statistics.median(x["p90"] for x in per_run),
            "spread": (min(x["median"] for x in per_run), max(x["median"] for x in per_run)),
            "samples": per_run[0]["samples"],
            "batch": per_run[0]["batch"],
        }
    leaves = runs[0][1]

    try:
        with open(a.out, "w", encoding="utf-8") as f:
            for case in JSON_CASES:
                r = result[case]
                obj = {
                    "case": case,
                    "linux_ns_per_op": round(r["median"], 2),
                    "linux_min_ns_per_op": round(r["min"], 2),
                    "linux_p90_ns_per_op": round(r["p90"], 2),
                    "linux_runs": len(runs),
                    "linux_samples": r["samples"],
                    "linux_batch": r["batch"],
                    "linux_source": f"linux-source-7.2 {a.version}",
                    "linux_cfg": a.cfg,
                }
                if case in leaves:
                    obj["linux_leaves_written"] = leaves[case][0]
                f.write(json.dumps(obj) + "\n")
    except OSError as e:
        print(f"linux-ptbench: error: cannot write {a.out}: {e}", file=sys.stderr)
        return 1

    print(f"\nLinux iommupt (linux-source-7.2 {a.version}, x86_64 format, {a.cfg} driver config, "
          f"UML KUnit), ns per call; median of {len(runs)} run(s)")
    if runs[0][2]:
        print(f"kernel reported: {runs[0][2]}")
    hdr = f"{'case':<16} {'ns/op':>9} {'min':>9} {'p90':>9} {'run medians':>17} {'batch':>6}  notes"
    print(hdr)
    print("-" * len(hdr))
    for case in JSON_CASES + EXTRA_CASES:
        r = result[case]
        spread = f"{fmt_ns(r['spread'][0])}..{fmt_ns(r['spread'][1])}"
        note = NOTES.get(case, "")
        if case in leaves:
            n, size = leaves[case]
            note = (note + "; " if note else "") + f"{n} leaves of {fmt_size(size)}"
        if case in EXTRA_CASES:
            note = (note + "; " if note else "") + "(table only)"
        print(f"{case:<16} {fmt_ns(r['median']):>9} {fmt_ns(r['min']):>9} {fmt_ns(r['p90']):>9} "
              f"{spread:>17} {r['batch']:>6}  {note}")
    print(f"\nwrote {len(JSON_CASES)} JSON lines to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
