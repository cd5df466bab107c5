"""Fault scenarios: crash and restart every part of Postflow mid-burst and prove nothing is lost.

`python -m tests.faults` runs them full size and writes `bench/results/faults.json`;
`tests/faults/test_faults.py` runs a quick variant of each in `make test`.
"""
