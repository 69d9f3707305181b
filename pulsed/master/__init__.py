"""The master process: the child table (table.py), the loop that carries
out its decisions (loop.py), the operator's commands (commands.py), dead
workers' lease releases (releases.py), the status report (report.py) and
systemd (systemd.py)."""

from pulsed.master.loop import Master

__all__ = ["Master"]
