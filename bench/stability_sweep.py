"""Learning-rate sensitivity of the `tiny` MLA+MoE model (Wortsman et al. 2023, arXiv 2309.14322).

For each variant (the default recipe, and the default plus one stability option) train at LRs
3e-4 .. 3e-1 (7 points, log-spaced) x seeds for a fixed number of steps, with the stability guard
OFF so that the model's own sensitivity is measured; one extra variant turns the guard on to show
what it saves. Score = final validation loss; a run that diverged (non-finite) counts at the initial
loss. LR sensitivity = mean over LRs of (score - best score of that variant); lower is better.

    python bench/stability_sweep.py             # the full table (tens of minutes on 2 CPU cores)
    python bench/stability_sweep.py --smoke     # 2 LRs x 1 seed x 2 variants, ~2 minutes (CI-sized)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.config import DataConfig, GuardConfig, ModelConfig, RunConfig, TrainConfig
from nanoseek.data import prepare_data
from nanoseek.train.trainer import Trainer

LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
VARIANTS = {
    "default": {},
    "qk-clip 30": {"qk_clip_threshold": 30.0},
    "router z-loss 1e-3": {"router_z_loss_coef": 1e-3},
    "logit z-loss 1e-4": {"logit_z_loss_coef": 1e-4},
    "swiglu clamp 50": {"swiglu_clamp": 50.0},
    "default + guard": {},  # same model, stability guard on
}


def run_one(prepared: Path, model_overrides: dict, lr: float, seed: int, steps: int, guard: bool,
            out: Path) -> tuple[float, float]:
    """Returns (initial val loss, final val loss) of one short run (nan if it diverged)."""
    model = ModelConfig.from_preset("tiny", max_seq_len=64, **model_overrides)
    cfg = RunConfig(
        model=model,
        data=DataConfig(source=str(prepared), seq_len=64),
        train=TrainConfig(max_steps=steps, batch_size=8, lr=lr, warmup_steps=max(steps // 10, 1),
                          eval_every=steps, eval_batches=4, save_every=10 * steps, tensorboard=False,
                          sample_tokens=0),
        guard=GuardConfig(enabled=guard, save_bad_batches=False),
        seed=seed, device="cpu", out=str(out),
    )
    trainer = Trainer(cfg, out, show_progress=False)
    initial = trainer.evaluate()["ce"]
    result = trainer.train()
    final = result.val_loss if result.val_loss is not None and math.isfinite(result.val_loss) else math.nan
    return initial, final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 LRs x 1 seed x 2 variants x 20 steps")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs, seeds, variants, steps = LRS, range(args.seeds), args.variants, args.steps
    if args.smoke:
        lrs, seeds, variants, steps = [1e-3, 1e-1], range(1), ["default", "default + guard"], 20
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepared = prepare_data(DataConfig(seq_len=64), tmp / "data", progress=False).out_dir
        rows = {}
        start = time.perf_counter()
        for name in variants:
            overrides = VARIANTS[name]
            scores = {}
            for lr in lrs:
                for seed in seeds:
                    initial, final = run_one(prepared, overrides, lr, seed, steps, name.endswith("+ guard"),
                                             tmp / f"{len(rows)}-{lr}-{seed}")
                    diverged = not math.isfinite(final) or final > initial
                    scores.setdefault(lr, []).append((initial if diverged else final, diverged))
                    print(f"{name:>20} lr {lr:<6g} seed {seed}: initial {initial:.3f} final {final:.3f}"
                          f"{' (diverged)' if diverged else ''}", flush=True)
            per_lr = {lr: sum(s for s, _ in v) / len(v) for lr, v in scores.items()}
            best = min(per_lr.values())
            rows[name] = (per_lr, sum(v - best for v in per_lr.values()) / len(per_lr),
                          sum(d for v in scores.values() for _, d in v))
    print(f"\n{len(seeds)} seed(s), {steps} steps, elapsed {(time.perf_counter() - start) / 60:.1f} min\n")
    print("| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | LR sensitivity | diverged |")
    print("|---|" + "---|" * (len(lrs) + 2))
    for name, (per_lr, sensitivity, diverged) in rows.items():
        print(f"| {name} | " + " | ".join(f"{per_lr[lr]:.3f}" for lr in lrs) + f" | {sensitivity:.3f} | {diverged} |")


if __name__ == "__main__":
    main()
