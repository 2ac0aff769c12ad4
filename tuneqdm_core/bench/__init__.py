"""Benchmarks of the TuneQDM core: `python -m tuneqdm_core.bench <command>` (see __main__.py)."""
