"""`nanoseek diagnose RUN_DIR [--step N]`: replay a bad batch a run saved, with the NaN locator of
nanoseek/train/locate.py, and name the first module that went non-finite."""

import json
from pathlib import Path

from safetensors.torch import load_file

from nanoseek.config import RunConfig
from nanoseek.train.faults import FaultInjector
from nanoseek.train.loading import model_from_state
from nanoseek.train.locate import Finding, load_batch, replay


def diagnose_run(run_dir: str | Path, step: int | None = None) -> tuple[Path, Finding, dict]:
    """Replay a saved bad batch of a run (the latest, or the one at `step`)."""
    run_dir = Path(run_dir)
    root = run_dir / "bad_batches"
    pattern = "step-*" if step is None else f"step-{step:08d}"
    candidates = sorted(p for p in root.glob(pattern) if (p / "model.safetensors").exists())
    if not candidates:
        what = f"at step {step}" if step is not None else "with a saved model state"
        raise ValueError(f"no bad batch {what} under {root}; runs save one when a NaN/Inf is detected "
                         "(list them with: ls RUN_DIR/bad_batches)")
    bad = candidates[-1]
    cfg = RunConfig.load_toml(run_dir / "config.toml")
    meta = json.loads((bad / "meta.json").read_text())
    model = model_from_state(cfg.model, load_file(str(bad / "model.safetensors")), strict=not cfg.model.tie_embeddings)
    injector = (FaultInjector(meta["injected"], model, meta.get("rank", 0), meta.get("world_size", 1))
                if meta.get("injected") else None)
    batch = load_batch(bad)
    return bad, replay(model, batch["x"][0], batch["y"][0], injector, meta["step"],
                       grad_findings=meta.get("nonfinite_grads")), meta
