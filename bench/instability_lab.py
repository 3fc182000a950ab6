"""Instabilities that happen by themselves, at CPU scale, and what the guard makes of them.

Each recipe is a setting that fails with no fault injected: too high a learning rate for AdamW or Muon, no
warm-up and no clipping, half precision without headroom. For each one the lab trains
  - `unguarded`: the old recipe (no QK-clip, no ZClip, guard off), which is expected to fail;
  - `guarded`:   the same setting with the default recipe and the guard on (rollback + LR backoff);
plus clean reference runs (the old recipe at LRs that train well) whose best final loss is the bar: a run
*fails* if its final validation loss is non-finite, sits at the unigram plateau (within 0.1 nats of the
training data's unigram entropy, or above it), or is more than 5% above the best clean loss.

The mechanism is read off the unguarded run's sampled health statistics (every 5 steps): for each statistic
(max attention logit, max output logit, max router logit, router z, expert-load imbalance, grad norm, loss)
the first step where it leaves the clean runs' envelope (above 3x the largest value any clean run showed)
is recorded; the earliest one is the statistic that showed the instability first.

    python bench/instability_lab.py --out /tmp/lab            # 12 runs of 600 steps
    python bench/instability_lab.py --out /tmp/lab --recipes adamw-lr1
Results go to OUT/lab.jsonl (one line per run; a re-run skips what is there) and a table to stdout;
`--report` prints the table from that file without running anything.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab_runs import ResultStore, prepare, run, unigram_entropy  # noqa: E402

STEPS = 600  # long enough that the best LR's curve has flattened (200 steps measured the budget, not stability)
# The old recipe, spelled out, so the unguarded runs stay what they were when the defaults change.
OLD = dict(model={"qk_clip_threshold": 0.0}, train={"zclip": 0.0}, guard={"enabled": False})
CLEAN_LRS = (3e-3, 1e-2)  # the best LRs of the old recipe at this budget (bench/stability_sweep.py)
RECIPES = {
    "adamw-lr1": dict(lr=1.0, about="AdamW at LR 1.0, clip 1.0"),
    "adamw-lr0.3-noclip": dict(lr=0.3, train={"grad_clip": 0.0, "warmup_steps": 0},
                               about="AdamW at LR 0.3, no clipping, no warm-up"),
    "adamw-lr3e-2": dict(lr=3e-2, about="AdamW at LR 3e-2 (3x the best LR), clip 1.0"),
    "muon-lr2": dict(lr=1e-2, train={"optimizer": "muon", "muon_lr": 2.0}, about="Muon at LR 2.0 (AdamW part 1e-2)"),
    "fp16-lr1": dict(lr=1.0, train={"precision": "fp16"}, about="fp16 autocast at LR 1.0"),
}
STATS = ("attn_logit_max", "logit_max", "router_logit_max", "router_z", "expert_load_imbalance", "grad_norm", "ce")
ENVELOPE = 3.0


def stat(record: dict, name: str) -> float | None:
    """A statistic of one step record, the max over layers for per-layer ones (None: not sampled then)."""
    if name in ("grad_norm", "ce", "logit_max"):
        values = [record[name]] if name in record else []
    else:
        values = [v for k, v in record.items() if k.startswith(name + "/")]
    values = [float(v) for v in values]  # metrics.jsonl writes a non-finite value as a string ("nan", "inf")
    if not values:
        return None
    return math.inf if not all(math.isfinite(v) for v in values) else max(values)


def first_excursions(trace: list[dict], envelope: dict[str, float],
                     clean_ce: dict[int, float]) -> dict[str, int | None]:
    """For each statistic, the first step where it exceeded ENVELOPE x the clean runs' maximum (or went NaN);
    for the loss, the first step 10% above the worst clean run's loss at the same step."""
    out = {}
    for name in STATS:
        def outside(r: dict) -> bool:
            v = stat(r, name)
            if v is None or r["step"] not in clean_ce:
                return False
            limit = 1.1 * clean_ce[r["step"]] if name == "ce" else ENVELOPE * envelope[name]
            return not math.isfinite(v) or v > limit
        out[name] = next((r["step"] for r in trace if outside(r)), None)
    return out


def verdict(final: float | None, best_clean: float, unigram: float, status: str = "finished") -> str:
    if status == "aborted":
        return "aborted (rollbacks exhausted)"
    if final is None:
        return "non-finite"
    if final >= unigram - 0.1:
        return "plateau"
    return "ok" if final <= 1.05 * best_clean else f"+{100 * (final / best_clean - 1):.0f}%"


def final(row: dict) -> str:
    """A run's final loss for the table: '-' for an aborted run, NaN for a non-finite one."""
    return "-" if row["status"] == "aborted" else "NaN" if row["final"] is None else f"{row['final']:.3f}"


def merge(base: dict, extra: dict) -> dict:
    return {k: {**base.get(k, {}), **extra.get(k, {})} for k in ("model", "train", "guard")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the data and lab.jsonl")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per run")
    parser.add_argument("--unguarded-only", action="store_true", help="only the clean and the failing runs")
    parser.add_argument("--guarded-only", action="store_true", help="only the clean and the guarded runs")
    parser.add_argument("--report", action="store_true", help="print the table from OUT/lab.jsonl; run nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prepared = prepare(args.out)
    unigram = unigram_entropy(prepared)
    store = ResultStore(args.out / "lab.jsonl")

    def once(key: str, **kw) -> dict:
        if key not in store and args.report:
            raise SystemExit(f"{args.out / 'lab.jsonl'} has no run {key!r}; run without --report to make it")
        if key not in store:
            store.add(key, run(prepared, args.out / "work", seed=args.seed, **kw))
            print(f"{key}: final {store.rows[key]['final']}", flush=True)
        return store.rows[key]

    clean = [once(f"clean lr={lr}", lr=lr, steps=args.steps, **OLD) for lr in CLEAN_LRS]
    best_clean = min(r["final"] for r in clean)
    envelope = {name: max((v for r in clean for rec in r["trace"] if (v := stat(rec, name)) is not None), default=0.0)
                for name in STATS}
    clean_ce: dict[int, float] = {}  # step -> the worst clean run's CE at that step
    for rec in (rec for r in clean for rec in r["trace"]):
        clean_ce[rec["step"]] = max(clean_ce.get(rec["step"], 0.0), rec["ce"])
    print(f"\nunigram entropy {unigram:.3f}; best clean loss {best_clean:.3f} (lr {CLEAN_LRS}, {args.steps} steps)\n")
    print("| recipe | unguarded final | verdict | first statistic out of the clean envelope (step) | "
          "guarded final | verdict | guard: skips / rollbacks (cause) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.recipes:
        recipe = RECIPES[name]
        kw = dict(lr=recipe["lr"], steps=recipe.get("steps", args.steps))
        if not args.guarded_only:
            bad = once(f"{name} unguarded", **kw, **merge(OLD, recipe))
        if args.unguarded_only:
            continue
        good = once(f"{name} guarded", **kw, **merge({}, recipe))
        if args.guarded_only:
            continue
        firsts = {k: v for k, v in sorted(first_excursions(bad["trace"], envelope, clean_ce).items(),
                                          key=lambda kv: (kv[1] is None, kv[1])) if v is not None}
        shown = ", ".join(f"{k} ({v})" for k, v in list(firsts.items())[:3]) or "none"
        causes = [e["cause"].split(" (")[0] for e in good["events"] if e["event"] in ("rollback", "abort")]
        judged = [verdict(r["final"], best_clean, unigram, r["status"]) for r in (bad, good)]
        print(f"| {name}: {recipe['about']} | {final(bad)} | {judged[0]} | {shown} | {final(good)} | {judged[1]} | "
              f"{good['skips']} / {good['rollbacks']} ({'; '.join(causes) or '-'}) |")


if __name__ == "__main__":
    main()
