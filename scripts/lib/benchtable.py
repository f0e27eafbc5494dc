"""One row of scripts/bench-all's table: each benchmark script reports its
ratios here as well as in its own output. Rows go to the file named by
COFFRE_BENCH_TABLE (JSON lines) when it is set, nowhere otherwise."""
import json, os, statistics


def row(group, what, ours, baseline, unit, ratio, spread=None, target=""):
    """ours and baseline are medians in `unit`; ratio is how ours compares
    (above 1 is better, whatever the unit); spread is (lowest, highest)
    ratio over the runs; target is what the issue asks, as text."""
    path = os.environ.get("COFFRE_BENCH_TABLE")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"group": group, "what": what, "ours": ours, "baseline": baseline,
                            "unit": unit, "ratio": ratio, "spread": spread, "target": target}) + "\n")


def median_spread(pairs):
    """pairs: per-run ratios. Returns (median, (lowest, highest))."""
    return statistics.median(pairs), (min(pairs), max(pairs))
