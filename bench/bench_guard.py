"""Cost of the always-on stability monitoring on the `tiny` model (target: <= 3% of step time).

Two trainers on the same data: "guarded" (the defaults: guard on, health statistics sampled every
`stats_every` steps, in-memory snapshots every `snapshot_every` steps) and "bare" (guard off, no
sampled statistics, no snapshots). Their steps are timed interleaved (A, B, A, B, ...) with 1
thread; we report medians and the ratio.

    python bench/bench_guard.py --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.data import prepare_data
from nanoseek.train.trainer import Trainer


def make_trainer(prepared: Path, out: Path, guarded: bool, steps: int) -> Trainer:
    guard = GuardConfig() if guarded else GuardConfig(enabled=False, stats_every=10**9)
    cfg = RunConfig(model=ModelConfig.from_preset("tiny"), data=DataConfig(source=str(prepared)),
                    train=TrainConfig(max_steps=steps, tensorboard=False), guard=guard, device="cpu", out=str(out))
    trainer = Trainer(cfg, out, show_progress=False)
    trainer.model.train()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = prepare_data(DataConfig(), tmp / "data", progress=False).out_dir
        trainers = {"guarded": make_trainer(prepared, tmp / "a", True, args.steps),
                    "bare": make_trainer(prepared, tmp / "b", False, args.steps)}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for i in range(args.warmup + args.steps):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step()
                trainer.rollback.after_good_step(trainer.step, trainer.opt_step)  # what train() does after an ok step
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    mean = {name: statistics.fmean(t) for name, t in times.items()}
    print(f"tiny, batch 16 x 128, 1 thread, {args.steps} interleaved steps each")
    for name in trainers:
        print(f"{name:>8}: median {med[name] * 1e3:.1f} ms, mean {mean[name] * 1e3:.1f} ms")
    print(f"overhead: median {100 * (med['guarded'] / med['bare'] - 1):+.1f}%, "
          f"mean {100 * (mean['guarded'] / mean['bare'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
