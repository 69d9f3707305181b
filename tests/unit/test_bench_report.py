"""bench/report.py: a run missing a metric (a drain over before a second job
finished has no rate "after the first") is left out of that metric's ratio
instead of crashing the whole report (a flake of test_harness_w6_smoke)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_a_missing_metric_is_left_out_of_its_ratio():
    sys.path.insert(0, str(BENCH))
    try:
        import report
    finally:
        sys.path.remove(str(BENCH))
    workload = next(iter(report.METRICS))
    keys = [k for k, _, _ in report.METRICS[workload]]
    full = {k: 10.0 for k in keys}
    partial = {k: 5.0 for k in keys[1:]}  # the first metric missing
    runs = [{"config": "a", "metrics": partial}, {"config": "b", "metrics": full},
            {"config": "a", "metrics": full}, {"config": "b", "metrics": full}]
    summary = report.summarize(workload, ["a", "b"], runs)
    ratios = summary["ratios"]["b"]
    assert ratios[keys[0]]["median"] == 1.0  # from the one pair that has it
    if len(keys) > 1 and keys[1] in ratios:
        assert ratios[keys[1]]["median"] == 0.75  # 0.5 and 1.0
