"""One short training run for the stability benchmarks, summarised as a JSON-able dict.

Shared by `bench/instability_lab.py` (recipes that fail by themselves) and `bench/stability_sweep.py`
(Wortsman et al. 2023's LR-sensitivity protocol). A run is described by plain dicts of overrides for
ModelConfig / TrainConfig / GuardConfig, so a results file names exactly what was run; `ResultStore`
appends one JSON line per finished run, so a killed sweep resumes where it stopped and loses nothing.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.data import load_prepared, prepare_data
from nanoseek.train.plateau import unigram_entropy as shard_unigram_entropy

# The benchmarks' base shape: the `tiny` preset narrowed so that a 300-step run takes about a minute on one
# CPU thread (seq 64, batch 8), with MLA, MoE (1 shared + 4 routed, top-2) and one MTP module kept.
BASE_MODEL = dict(dim=64, n_layers=3, n_heads=4, inter_dim=192, kv_lora_rank=32, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=64)
SEQ_LEN, BATCH = 64, 8


def prepare(out: Path, vocab_size: int = 512) -> Path:
    """The benchmarks' data: builtin:pydocs with a small BPE (a small head keeps CPU runs short)."""
    prepared = out / f"pydocs-bpe{vocab_size}"
    if not (prepared / "meta.json").exists():
        prepare_data(DataConfig(seq_len=SEQ_LEN, vocab_size=vocab_size), prepared, progress=False)
    return prepared


def unigram_entropy(prepared: Path) -> float:
    """Entropy (nats) of the training tokens' unigram distribution: the loss of a model that ignores context."""
    data = load_prepared(prepared)
    return shard_unigram_entropy(data.train_shards, data.vocab_size, max_tokens=None)  # every training token


def run(prepared: Path, workdir: Path, *, lr: float, steps: int, seed: int = 0, model: dict | None = None,
        train: dict | None = None, guard: dict | None = None) -> dict:
    """Train once; return initial/final val loss, the per-step trace and the guard's events."""
    from nanoseek.train.trainer import Trainer  # after the caller set the thread count

    shutil.rmtree(workdir, ignore_errors=True)
    cfg = RunConfig(
        model=ModelConfig.from_preset("tiny", max_seq_len=SEQ_LEN, **{**BASE_MODEL, **(model or {})}),
        data=DataConfig(source=str(prepared), seq_len=SEQ_LEN),
        train=TrainConfig(**{**dict(max_steps=steps, batch_size=BATCH, lr=lr, warmup_steps=max(steps // 10, 1),
                                    eval_every=steps, eval_batches=8, save_every=10 * steps, tensorboard=False,
                                    sample_tokens=0, log_every=steps), **(train or {})}),
        guard=GuardConfig(**{**dict(save_bad_batches=False, stats_every=5), **(guard or {})}),
        seed=seed, device="cpu", out=str(workdir),
    )
    start = time.perf_counter()
    trainer = Trainer(cfg, workdir, show_progress=False)
    initial = trainer.evaluate()["ce"]
    result = trainer.train()
    trace, events = [], []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            trace.append({k: v for k, v in record.items() if k not in ("kind", "tokens_per_sec", "mfu", "peak_mem_gb")})
        elif record.get("kind") == "event":
            events.append({k: record.get(k) for k in ("step", "event", "cause", "value")})
    shutil.rmtree(workdir, ignore_errors=True)
    final = result.val_loss if result.val_loss is not None else math.nan
    return {"initial": initial, "final": final if math.isfinite(final) else None, "status": result.status,
            "skips": result.n_skips, "rollbacks": result.n_rollbacks, "seconds": time.perf_counter() - start,
            "trace": trace, "events": events}


class ResultStore:
    """Finished runs, one JSON line each, keyed by a string; re-running skips what is already there."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, key: str, row: dict) -> None:
        row = {"key": key, **row}
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # one line per run: a kill loses at most the run in flight
            f.write(json.dumps(row) + "\n")
