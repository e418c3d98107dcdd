"""Shared pytest setup: deterministic, fast hypothesis runs (same examples every run)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    derandomize=True,  # the same examples on every run: CI is deterministic
    deadline=None,  # the first call into torch can be slow; timing is not under test
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "100")),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("default")

# Two threads: the CI machine has two cores; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))
