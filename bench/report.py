"""Summaries of repeated runs: median (min–max) per config and metric, the
ratio first-config/other per pair of runs (same repetition), and markdown."""

from __future__ import annotations

import statistics
from typing import Any

# workload -> [(metric, column header, decimals)]; the first `RATIO_COLS` are also compared
METRICS: dict[str, list[tuple[str, str, int]]] = {
    "drain": [("drain_jobs_per_s", "drain (jobs/s)", 0),
              ("drain_jobs_per_s_after_first", "drain after 1st (jobs/s)", 0),
              ("enqueue_single_jobs_per_s", "enqueue 1/txn (jobs/s)", 0),
              ("enqueue_batch_jobs_per_s", "enqueue bulk (jobs/s)", 0),
              ("drain_startup_s", "startup (s)", 2),
              ("drain_jobs_per_s_first_fifth", "first 1/5 (jobs/s)", 0),
              ("drain_jobs_per_s_last_fifth", "last 1/5 (jobs/s)", 0),
              ("worker_cpu_s", "worker CPU (s)", 1),
              ("machine_cpu_busy_pct", "machine busy (%)", 0)],
    "latency": [("latency_ms_p50", "p50 (ms)", 1), ("latency_ms_p95", "p95 (ms)", 1),
                ("latency_ms_p99", "p99 (ms)", 1), ("latency_ms_max", "max (ms)", 1),
                ("enqueue_call_ms_p50", "enqueue call p50 (ms)", 1)],
    "io": [("drain_jobs_per_s", "drain (jobs/s)", 0),
           ("drain_jobs_per_s_after_first", "drain after 1st (jobs/s)", 0),
           ("drain_pct_of_limit", "drain / limit (%)", 0),
           ("drain_startup_s", "startup (s)", 2),
           ("enqueue_batch_jobs_per_s", "enqueue bulk (jobs/s)", 0),
           ("worker_cpu_s", "worker CPU (s)", 1),
           ("machine_cpu_busy_pct", "machine busy (%)", 0)],
    "backlog": [("backlog_jobs_per_s_after_first", "claim+complete (jobs/s)", 0),
                ("backlog_startup_s", "first job after (s)", 2),
                ("fill_s", "fill (s)", 0)],
    "mixed": [("throughput_jobs_per_s", "throughput (jobs/s)", 0),
              ("rate_actual", "enqueued (jobs/s)", 0),
              ("latency_ms_all_p50", "p50 (ms)", 1), ("latency_ms_all_p95", "p95 (ms)", 1),
              ("latency_ms_all_p99", "p99 (ms)", 1), ("latency_ms_fast_p99", "1 ms jobs p99 (ms)", 1),
              ("latency_ms_slow_p99", "50 ms jobs p99 (ms)", 1),
              ("idle_cpu_pct_master", "idle CPU master (%)", 2),
              ("idle_cpu_pct_scheduler", "idle CPU scheduler (%)", 2),
              ("load_cpu_pct_master", "load CPU master (%)", 2),
              ("load_cpu_pct_scheduler", "load CPU scheduler (%)", 2),
              ("rss_mib_master", "RSS master (MiB)", 1),
              ("rss_mib_scheduler", "RSS scheduler (MiB)", 1),
              ("rss_mib_workers_max", "RSS worker max (MiB)", 1)],
    "http": [("single_p50_ms", "1 client p50 (ms)", 2), ("single_p99_ms", "1 client p99 (ms)", 2),
             ("c32_jobs_per_s", "32 clients (jobs/s)", 0), ("c32_p50_ms", "32 clients p50 (ms)", 1),
             ("c32_p99_ms", "32 clients p99 (ms)", 1), ("bulk_jobs_per_s", "bulk 1,000 (jobs/s)", 0),
             ("c32_404_per_s", "32 clients, 404 (req/s)", 0)],
}
RATIO_COLS = {"drain": 4, "latency": 3, "io": 2, "backlog": 1, "mixed": 0, "http": 0}


def agg(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def fmt(a: dict | None, digits: int) -> str:
    if not a:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(a['median'])} ({f.format(a['min'])}–{f.format(a['max'])})"


def ok_metrics(runs: list[dict], config: str) -> list[dict | None]:
    """The metrics of each repetition of `config`, None for a failed run."""
    return [r["metrics"] if r.get("metrics") and not r["metrics"].get("failed") else None
            for r in runs if r["config"] == config]


def summarize(workload: str, configs: list[str], runs: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"configs": {}, "ratios": {}}
    for config in configs:
        ms = [m for m in ok_metrics(runs, config) if m]
        out["configs"][config] = {"ok_runs": len(ms), "runs": len(ok_metrics(runs, config)),
                                  **{k: agg([m[k] for m in ms if m.get(k) is not None])
                                     for k, _, _ in METRICS[workload]}}
    base = ok_metrics(runs, configs[0])
    for config in configs[1:]:
        pairs = list(zip(base, ok_metrics(runs, config)))
        # A run may lack a metric (a drain over before a second job finished
        # has no "after the first" rate): a ratio needs it on both sides.
        out["ratios"][config] = {
            k: agg([a[k] / b[k] for a, b in pairs if a and b and a.get(k) is not None and b.get(k)])
            for k, _, _ in METRICS[workload][:RATIO_COLS[workload]]}
    return out


def markdown(workload: str, configs: list[str], summary: dict) -> str:
    cols = METRICS[workload]
    lines = ["| config | runs ok | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for c in configs:
        s = summary["configs"][c]
        cells = [fmt(s[k], d) for k, _, d in cols]
        lines.append(f"| {c} | {s['ok_runs']}/{s['runs']} | " + " | ".join(cells) + " |")
    if summary["ratios"]:
        rcols = cols[:RATIO_COLS[workload]]
        lines += ["", f"Ratio {configs[0]} / peer, per pair of runs (same repetition): "
                      "median (min–max)", "",
                  "| peer | " + " | ".join(h for _, h, _ in rcols) + " |",
                  "|---" * (len(rcols) + 1) + "|"]
        for c, r in summary["ratios"].items():
            lines.append(f"| {c} | " + " | ".join(fmt(r[k], 2) for k, _, _ in rcols) + " |")
    return "\n".join(lines) + "\n"


def ceiling_summary(runs: list[dict]) -> dict[str, Any]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(f"{r['variant']} c={r['clients']}", []).append(r)
    return {k: {"jobs_per_s": agg([r["jobs_per_s"] for r in rs]),
                "latency_ms_avg": agg([r["latency_ms_avg"] for r in rs]), "runs": len(rs)}
            for k, rs in groups.items()}


def ceiling_markdown(summary: dict) -> str:
    lines = ["| variant | runs | jobs/s | avg script latency (ms) |", "|---|---|---|---|"]
    for k, s in summary.items():
        lines.append(f"| {k} | {s['runs']} | {fmt(s['jobs_per_s'], 0)} | {fmt(s['latency_ms_avg'], 2)} |")
    return "\n".join(lines) + "\n"
