"""Shared test setup."""

import torch


def pytest_configure(config):
    # One thread: on a shared 2-core machine, OpenMP threads spin-waiting against other processes make
    # tiny-model steps 10-100x slower (DESIGN.md, "Facts worth knowing"). Tests compare numbers, not speed.
    torch.set_num_threads(1)
