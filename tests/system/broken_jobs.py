"""A handler module that cannot be imported: a broken deploy."""

raise ImportError("this module is broken on purpose (tests/system/broken_jobs.py)")
