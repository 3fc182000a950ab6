"""Shared test setup."""

from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    # One thread: on a shared 2-core machine, OpenMP threads spin-waiting against other processes make
    # tiny-model steps 10-100x slower (DESIGN.md, "Facts worth knowing"). Tests compare numbers, not speed.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small text file: 400 lines over a ten-word vocabulary, enough for a few dozen tiny training steps."""
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "quiet", "north", "ember"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) + "." for i in range(400)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (minutes, or downloads)")


def pytest_collection_modifyitems(config, items):
    # `slow` tests (minutes of CPU, or a download) are skipped unless asked for, so the default run stays fast.
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
