"""Learning-rate sensitivity (Wortsman et al. 2023, arXiv 2309.14322) of stability recipes, side by side.

Protocol: for each variant, train the lab's MLA+MoE+MTP model (bench/lab_runs.py: the `tiny` preset at width
64, seq 64, batch 8, AdamW (0.9, 0.95), 10% warm-up then cosine to 10%, 600 steps) at 7 LRs from 1e-3 to 1,
half a decade apart, x seeds. At this budget the best LR is 1e-2; Wortsman's lower end (3e-4) would measure
how far a short run gets at a tiny LR rather than stability, and 1.0 is where the old recipe ends at the
unigram plateau. (At 200 steps the loss-vs-LR curve is still sharply peaked by the budget alone: the healthy
LRs by themselves gave a sensitivity of 0.26, so that budget could not tell recipes apart.) Score = final
validation CE on 8 fixed held-out batches. LR sensitivity = mean over the LRs of [min(score, initial loss) -
best score of that variant] (a non-finite run counts at the initial loss).
A run also *fails* if it ends non-finite or at the unigram plateau (within 0.1 nats of the training data's
unigram entropy); both counts are reported, as is the number of steps the guard skipped.

    python bench/stability_sweep.py --out /tmp/sweep                    # every variant, 2 seeds
    python bench/stability_sweep.py --out /tmp/sweep --variants old default --plot docs/lr_sensitivity.png
    python bench/stability_sweep.py --out /tmp/sweep --smoke             # 2 LRs x 1 seed x 2 variants x 20 steps
Runs are appended to OUT/sweep.jsonl as they finish; a re-run (after a kill, or with more variants) skips
what is there, and the table is printed from the file (`--report`: print it, run nothing).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_runs import ResultStore, prepare, run, unigram_entropy  # noqa: E402

LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
_OLD_MODEL = {"qk_clip_threshold": 0.0}
_OLD_TRAIN = {"zclip": 0.0}
VARIANTS = {  # name: overrides of (model, train, guard); "old" spells out the recipe before this sweep
    "old": dict(model=_OLD_MODEL, train=_OLD_TRAIN, guard={"enabled": False}),
    "old + qk-clip 30": dict(model={"qk_clip_threshold": 30.0}, train=_OLD_TRAIN, guard={"enabled": False}),
    "old + zclip 2.5": dict(model=_OLD_MODEL, train={"zclip": 2.5}, guard={"enabled": False}),
    "old + z-losses": dict(model={**_OLD_MODEL, "logit_z_loss_coef": 1e-4, "router_z_loss_coef": 1e-3},
                           train=_OLD_TRAIN, guard={"enabled": False}),
    "old + guard": dict(model=_OLD_MODEL, train=_OLD_TRAIN, guard={}),
    "default": dict(model={}, train={}, guard={}),  # the shipped defaults: guard (plateau on) + ZClip 2.5
}


def sensitivity(scores: dict[float, list[float]], initial: float) -> tuple[dict[float, float], float]:
    """Per-LR mean score (non-finite or worse-than-initial capped at the initial loss) and Wortsman's LR sensitivity."""
    capped = {lr: sum(min(s, initial) if s is not None and math.isfinite(s) else initial for s in v) / len(v)
              for lr, v in scores.items()}
    best = min(capped.values())
    return capped, sum(v - best for v in capped.values()) / len(capped)


def table(store: ResultStore, variants: list[str], lrs: list[float], seeds: range, unigram: float) -> list[str]:
    lines = ["| variant | " + " | ".join(f"{lr:g}" for lr in lrs) + " | LR sensitivity | non-finite | plateau "
             "| guard skips (all runs) |", "|---|" + "---|" * (len(lrs) + 4)]
    for name in variants:
        rows = [store.rows.get(f"{name} lr={lr} seed={s}") for lr in lrs for s in seeds]
        if any(r is None for r in rows):
            continue
        initial = max(r["initial"] for r in rows)
        scores = {lr: [store.rows[f"{name} lr={lr} seed={s}"]["final"] for s in seeds] for lr in lrs}
        per_lr, sens = sensitivity(scores, initial)
        nonfinite = sum(r["final"] is None for r in rows)
        plateau = sum(r["final"] is not None and r["final"] >= unigram - 0.1 for r in rows)
        skips = sum(r["skips"] for r in rows)
        lines.append(f"| {name} | " + " | ".join(f"{per_lr[lr]:.3f}" for lr in lrs) +
                     f" | {sens:.3f} | {nonfinite} | {plateau} | {skips} |")
    return lines


def plot(store: ResultStore, variants: list[str], lrs: list[float], seeds: range, unigram: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in variants:
        keys = [[f"{name} lr={lr} seed={s}" for s in seeds] for lr in lrs]
        if not all(k in store for ks in keys for k in ks):
            continue
        initial = max(store.rows[k]["initial"] for ks in keys for k in ks)
        ys = [sum(min(store.rows[k]["final"] or initial, initial) for k in ks) / len(ks) for ks in keys]
        ax.plot(lrs, ys, marker="o", label=name)
    ax.axhline(unigram, color="grey", linestyle="--", linewidth=1, label="unigram entropy (plateau)")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"final validation loss (mean of {len(seeds)} seeds)")
    ax.set_title("LR sensitivity: final loss vs LR (lower and flatter is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and sweep.jsonl")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", nargs="*", type=float, default=LRS)
    parser.add_argument("--plot", type=Path, help="write the final-loss-vs-LR figure here (PNG)")
    parser.add_argument("--report", action="store_true", help="print the table (and plot) from OUT; run nothing")
    parser.add_argument("--smoke", action="store_true", help="2 LRs x 1 seed x 2 variants x 20 steps (CI-sized)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    lrs, variants, steps = args.lrs, args.variants, args.steps
    if args.smoke:
        lrs, seeds, variants, steps = [1e-3, 1e-1], range(1), ["old", "default"], 20
    prepared = prepare(args.out)
    unigram = unigram_entropy(prepared)
    store = ResultStore(args.out / ("smoke.jsonl" if args.smoke else "sweep.jsonl"))
    for seed in [] if args.report else seeds:  # seed-major, so a sweep cut short still has whole rows of seed 0
        for name in variants:
            for lr in lrs:
                key = f"{name} lr={lr} seed={seed}"
                if key in store:
                    continue
                row = run(prepared, args.out / "work", lr=lr, steps=steps, seed=seed, **VARIANTS[name])
                row.pop("trace")
                store.add(key, row)
                print(f"{key}: initial {row['initial']:.3f} final {row['final']} skips {row['skips']} "
                      f"rollbacks {row['rollbacks']} ({row['seconds']:.0f} s)", flush=True)
    print(f"\n{len(seeds)} seed(s), {steps} steps; unigram entropy {unigram:.3f}\n")
    print("\n".join(table(store, variants, lrs, seeds, unigram)))
    if args.plot:
        plot(store, variants, lrs, seeds, unigram, args.plot)
        print(f"\nfigure: {args.plot}")


if __name__ == "__main__":
    main()
