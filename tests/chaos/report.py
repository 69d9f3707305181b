"""Turn one run's results (the JSON lines the chaos tests append to
$PULSE_CHAOS_RESULTS) into the markdown table of docs/chaos.md.

    PULSE_CHAOS_RESULTS=/tmp/chaos.jsonl pytest tests/chaos -s
    python -m tests.chaos.report /tmp/chaos.jsonl
"""

from __future__ import annotations

import json
import sys
from typing import Any

HEADER = ("| Fault | Load during it | Jobs lost | Jobs stuck | Duplicate completions "
          "| Recovery | Also seen |\n|---|---|---|---|---|---|---|")


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _notes(row: dict[str, Any]) -> str:
    notes = []
    restarts = row.get("restarts")
    if isinstance(restarts, dict):
        crashed = sum(restarts.values())
        expected = row.get("expected_restarts", 0)
        notes.append(f"child restarts: {crashed}" + (f" ({expected} caused by the test itself)"
                                                      if expected else "")
                     + (" — workers crashed instead of reconnecting" if crashed > expected
                        else ""))
    if row.get("throughput_drop") is not None:
        rates = row.get("completed_per_s", {})
        notes.append(f"throughput {rates.get('before')} → {rates.get('pinned')} jobs/s "
                     f"({-row['throughput_drop']:+.0%}) → {rates.get('after')} after")
        notes.append(f"dead tuples +{row.get('dead_tuple_growth')}; one claim "
                     f"{row['before']['claim_ms']} → {row['pinned']['claim_ms']} → "
                     f"{row['after']['claim_ms']} ms")
    if row.get("refused_per_s") is not None:
        notes.append(f"refused connects {row['refused_per_s']}/s, warnings "
                     f"{row.get('warnings_per_s')}/s, status slowest {row.get('status_slowest_s')} s")
    if row.get("longest_gap_s") is not None:
        notes.append(f"longest gap without a completion {row['longest_gap_s']} s")
    if row.get("backends_killed") is not None:
        notes.append(f"{row['backends_killed']} backends killed")
    if row.get("recovery_mean_s") is not None:
        notes.append(f"{row.get('jobs_held_by_killed')} stranded jobs, mean recovery "
                     f"{row['recovery_mean_s']} s")
    if row.get("fenced_refusals") is not None:
        ran = sum(row["handler_runs_on_cut_host"].values())
        notes.append(f"the cut-off host's handlers ran to the end {ran}x (the duplicates); "
                     f"its {row['fenced_refusals']} late completions were fenced, "
                     f"{row['completions_by_fenced_host']} applied")
    if row.get("outcomes"):
        bad = [t for t, o in row["outcomes"].items()
               if isinstance(o, dict) and t.startswith("raise_")
               and any(a[0] == "worker_died" for a in o["attempts"])]
        if bad:
            notes.append("exceptions recorded as worker_died (worker crashed): " + ", ".join(bad))
    if row.get("note"):  # a test's own summary (the hostile-client rows)
        notes.append(row["note"])
    return "; ".join(notes)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for row in rows:
        lines.append(f"| {row['fault']} | {row['load']} | {row['lost']} | {row['stuck']} "
                     f"| {row['duplicates']} | {_seconds(row.get('recovery_s'))} | {_notes(row)} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = [json.loads(line) for path in argv[1:] for line in open(path) if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
