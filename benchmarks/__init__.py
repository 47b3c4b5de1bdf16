"""Timing scripts, run as `python benchmarks/<script>.py`; the tests import their measurements, the package never does."""
