"""nanoseek side by side with nanoGPT on nanoGPT's documented CPU recipe (tiny Shakespeare, characters).

    python bench/vs_nanogpt.py --nanogpt /tmp/nanoGPT --text ../shared/data/tinyshakespeare.txt
    python bench/vs_nanogpt.py --nanogpt /tmp/nanoGPT --mode timing --timing-iters 200 --repeats 3
    python bench/vs_nanogpt.py --nanogpt /tmp/nanoGPT --mode loss --recipes same-shape best

`--nanogpt` is a checkout of github.com/karpathy/nanoGPT obtained separately (it is run, never copied
into this repository). Its own `data/shakespeare_char/prepare.py` writes its data (first 90% of the
characters train, last 10% val); nanoseek trains on the same first 90% only.

nanoGPT runs exactly its README's CPU command:
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
(plus --dtype=float32, which is what it computes in on CPU anyway, --out_dir, and
--always_save_checkpoint=True so that the final model is the one saved).

Method.
- Every process runs with one thread (OMP_NUM_THREADS=1 and torch.set_num_threads(1)): on these shared
  2-core machines multi-threaded torch is erratic (DESIGN.md, "Facts worth knowing").
- `timing`: for each nanoseek recipe, `repeats` pairs of runs of `timing_iters` iterations: nanoGPT and
  the recipe back to back, the order alternating (ABBA), so both runs of a pair see nearly the same
  machine load. A step's time is the wall time from the start of one iteration to the start of the next
  (nanoGPT's own `time ...ms` figure measures the same span: forward, backward, optimizer step, the next
  batch, logging); the figure per run is the median over iterations 10.. (warm-up excluded). The
  ratio of a pair is nanoseek's median over nanoGPT's; the reported ratio is the median over pairs. The
  ratio of the 10th percentiles (the steps least disturbed by other processes) is reported next to it.
- `loss`: one full-length run of each. Every final model is scored by the same function on the same text:
  every non-overlapping 64-character window of the last 10% (111,540 characters, 1,742 windows), mean
  next-character cross-entropy over all positions. nanoGPT's final checkpoint (`ckpt.pt`, written at its
  last evaluation) is loaded with the checkout's own model.py. nanoGPT's printed `val loss` (a mean over
  20 random validation batches) is reported too.
- The wall-clock budget of a recipe is steps x its median step time from `timing` mode (a figure that
  other processes on the machine disturb far less than a total wall time).
Results print as a table and as one JSON object (also written to OUT/results.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

BENCH_DIR = Path(__file__).resolve().parent
WARMUP_ITERS = 10
BLOCK = 64

NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32"]

# nanoseek's side of nanoGPT's recipe, as flags of `nanoseek train` (data and length are added per run).
# "same-shape" is bench/shakespeare_char.py's recipe: nanoseek's own dense block (RMSNorm, RoPE, SwiGLU
# of width 352 ~ a 4x GELU MLP's parameters, untied head) at nanoGPT's sizes and optimizer settings.
# The others change one thing each.
_SAME = ["--preset", "tiny-gqa", "--model.n-kv-heads", "4", "--model.inter-dim", "352", "--model.max-seq-len", "64",
         "--data.seq-len", "64", "--train.batch-size", "12", "--train.lr", "1e-3", "--train.warmup-steps", "100",
         "--train.min-lr-ratio", "0.1", "--train.beta2", "0.99", "--train.eval-every", "500",
         "--train.no-tensorboard", "--train.sample-tokens", "0"]
RECIPES: dict[str, list[str]] = {
    "same-shape": _SAME,
    "bf16": _SAME + ["--train.precision", "bf16"],
    "muon": _SAME + ["--train.optimizer", "muon"],
    "compile": _SAME + ["--train.compile"],
    "bf16-compile": _SAME + ["--train.precision", "bf16", "--train.compile"],
    "muon-bf16": _SAME + ["--train.optimizer", "muon", "--train.precision", "bf16"],
    "muon-bf16-compile": _SAME + ["--train.optimizer", "muon", "--train.precision", "bf16", "--train.compile"],
    "mla": ["--preset", "tiny-dense", "--model.inter-dim", "352", "--model.max-seq-len", "64"] + _SAME[8:],
}
# The winner within nanoGPT's wall-clock budget in bench/RESULTS.md (2026-12-01): Muon for the hidden
# matrices (the lowest loss per step), bf16 autocast (AMX matmuls) and torch.compile (the cheapest step);
# MLA scores worse at equal steps. Without a C++ compiler for inductor, "muon-bf16" is the eager runner-up.
RECIPES["best"] = RECIPES["muon-bf16-compile"]


@dataclass
class Args:
    nanogpt: Path
    """A nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT), never committed here."""
    text: Path = Path("../shared/data/tinyshakespeare.txt")
    """tinyshakespeare input.txt (md5 6fb458f1...)."""
    out: Path = Path("/tmp/vs_nanogpt")
    mode: Literal["timing", "loss", "both"] = "both"
    recipes: tuple[str, ...] = ("same-shape",)
    """nanoseek recipes to run: any key of RECIPES (same-shape, bf16, muon, compile, bf16-compile, muon-bf16,
    muon-bf16-compile, mla, best)."""
    timing_iters: int = 200
    repeats: int = 3
    iters: int = 2000
    """Full-length runs (`loss` mode): nanoGPT's max_iters, and nanoseek's steps unless --steps is given."""
    steps: tuple[int, ...] = ()
    """Per-recipe step counts for `loss` mode (same order as --recipes); default --iters for each."""


# ---- the nanoGPT side ----------------------------------------------------------------------------

def prepare_nanogpt_data(checkout: Path, text: Path) -> Path:
    data_dir = checkout / "data" / "shakespeare_char"
    if not (checkout / "train.py").is_file() or not data_dir.is_dir():
        raise ValueError(f"--nanogpt {checkout}: not a nanoGPT checkout (no train.py / data/shakespeare_char); "
                         "git clone https://github.com/karpathy/nanoGPT")
    if not (data_dir / "train.bin").is_file():
        shutil.copyfile(text, data_dir / "input.txt")  # prepare.py downloads it only when absent
        subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, stdout=subprocess.DEVNULL)
    return data_dir


def _one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_nanogpt(checkout: Path, iters: int, out_dir: Path) -> dict:
    """One nanoGPT training run; returns its per-iteration times (s), printed val losses, wall time."""
    # always_save_checkpoint: the final model is what gets scored (nanoGPT's default saves only when val
    # improves); eval_interval stays nanoGPT's 250 unless the run is too short to reach it.
    extra = ["--always_save_checkpoint=True"] + ([] if iters % 250 == 0 else [f"--eval_interval={iters}"])
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, *extra, f"--max_iters={iters}", f"--out_dir={out_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=_one_thread_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
    times = [float(ms) / 1e3 for ms in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)]
    vals = {int(s): float(v) for s, v in re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout, re.M)}
    return {"step_times": times, "printed_val": vals, "wall_s": wall}


def nanogpt_heldout_loss(checkout: Path, ckpt: Path, val_bin: Path) -> float:
    """Score nanoGPT's checkpoint on every BLOCK-long window of val.bin, in a subprocess that imports the
    checkout's own model.py (so nothing of it lives in this repository)."""
    code = f"""
import sys, json, numpy as np, torch
sys.path.insert(0, {str(checkout)!r})
from model import GPT, GPTConfig
sys.path.insert(0, {str(BENCH_DIR)!r})
from vs_nanogpt import windows_loss
torch.set_num_threads(1)
ck = torch.load({str(ckpt)!r}, map_location="cpu")
model = GPT(GPTConfig(**ck["model_args"]))
model.load_state_dict({{k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}})
model.eval()
ids = torch.from_numpy(np.fromfile({str(val_bin)!r}, dtype=np.uint16).astype(np.int64))
print(json.dumps({{"loss": windows_loss(lambda x, y: model(x, y)[1], ids), "iter": ck["iter_num"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=_one_thread_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scoring nanoGPT's checkpoint failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the nanoseek side ---------------------------------------------------------------------------

def windows_loss(mean_loss, ids, block: int = BLOCK, batch: int = 128) -> float:
    """Mean next-token loss over every non-overlapping `block`-long window of `ids` ([N] int64).

    `mean_loss(x, y)` takes x, y: [b, block] and returns the mean cross-entropy over its b * block targets.
    """
    import torch

    n = (len(ids) - 1) // block
    x = ids[: n * block].view(n, block)
    y = ids[1: n * block + 1].view(n, block)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            total += float(mean_loss(xb, yb)) * yb.numel()
    return total / (n * block)


def nanoseek_worker(spec: dict) -> None:
    """Runs in a child process: train one nanoseek recipe, write step times and the held-out loss."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from nanoseek.cli import parse_train
    from nanoseek.data import load_tokenizer
    from nanoseek.train.loading import load_model
    from nanoseek.train.trainer import Trainer

    argv = spec["argv"]
    cfg = parse_train(argv).run_config()
    cfg = dataclasses.replace(cfg, out=spec["run_dir"], device="cpu")
    trainer = Trainer(cfg, spec["run_dir"], show_progress=False)
    starts: list[float] = []
    step = trainer.train_step

    def timed_step():
        starts.append(time.perf_counter())
        return step()

    trainer.train_step = timed_step
    result = trainer.train()
    times = [b - a for a, b in zip(starts, starts[1:])]
    record = {"step_times": times, "final_val_split_loss": result.val_loss, "status": result.status,
              "skips": result.n_skips, "params": trainer.model.num_params()}
    if spec.get("score_text"):
        model, _ = load_model(spec["run_dir"], which="latest")
        model.eval()
        tok = load_tokenizer(spec["data"])  # the prepared shards' tokenizer
        ids = torch.tensor(tok.encode(Path(spec["score_text"]).read_text()))
        record["heldout_loss"] = windows_loss(
            lambda x, y: F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()), ids)
    Path(spec["result"]).write_text(json.dumps(record))


def run_nanoseek(flags: list[str], data: str, steps: int, run_dir: Path, score_text: Path | None) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    result_file = run_dir.with_suffix(".json")
    spec = {"argv": [*flags, "--data", data, "--max-steps", str(steps)], "run_dir": str(run_dir),
            "result": str(result_file), "data": data, "score_text": str(score_text) if score_text else None}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_nanoseek_worker", json.dumps(spec)],
                          env=_one_thread_env(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nanoseek run failed ({' '.join(spec['argv'])}):\n{proc.stderr[-2000:]}")
    return {**json.loads(result_file.read_text()), "wall_s": wall}


def prepare_nanoseek_data(text: Path, out: Path) -> tuple[str, Path, Path]:
    """Shards of the first 90% (char tokenizer) and the last 10% as a text file to score on."""
    raw = text.read_text()
    cut = int(0.9 * len(raw))  # nanoGPT's prepare.py: data[:int(n*0.9)] / data[int(n*0.9):]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train90.txt").write_text(raw[:cut])
    (out / "val10.txt").write_text(raw[cut:])
    shards = out / "nanoseek_data"
    if not (shards / "meta.json").is_file():
        from nanoseek.config import DataConfig
        from nanoseek.data import prepare_data

        prepare_data(DataConfig(source=str(out / "train90.txt"), tokenizer="char", seq_len=BLOCK, val_fraction=0.02),
                     shards, progress=False)
    return str(shards), out / "train90.txt", out / "val10.txt"


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP_ITERS:] if len(times) > 2 * WARMUP_ITERS else times)


def percentile(times: list[float], q: float) -> float:
    body = sorted(times[WARMUP_ITERS:] if len(times) > 2 * WARMUP_ITERS else times)
    return body[min(len(body) - 1, int(q * len(body)))]


def timing(args: Args, data: str) -> dict:
    """Pairs of runs, nanoGPT and one recipe back to back (order alternating ABBA), `repeats` per recipe."""
    per_run: dict[str, list[float]] = {name: [] for name in ["nanoGPT", *args.recipes]}
    ratios: dict[str, list[float]] = {name: [] for name in args.recipes}
    fast_ratios: dict[str, list[float]] = {name: [] for name in args.recipes}
    for rep in range(args.repeats):
        for i, name in enumerate(args.recipes):
            order = ("nanoGPT", name) if (rep + i) % 2 == 0 else (name, "nanoGPT")
            median, fast = {}, {}
            for who in order:
                if who == "nanoGPT":
                    rec = run_nanogpt(args.nanogpt, args.timing_iters, args.out / "nanogpt_timing")
                else:
                    rec = run_nanoseek(RECIPES[who], data, args.timing_iters, args.out / f"timing_{who}", None)
                median[who], fast[who] = median_after_warmup(rec["step_times"]), percentile(rec["step_times"], 0.1)
                per_run[who].append(median[who])
            ratios[name].append(median[name] / median["nanoGPT"])
            fast_ratios[name].append(fast[name] / fast["nanoGPT"])
            print(f"round {rep}: nanoGPT {median['nanoGPT'] * 1e3:.2f} ms, {name} {median[name] * 1e3:.2f} ms: "
                  f"ratio {ratios[name][-1]:.3f} (p10 ratio {fast_ratios[name][-1]:.3f})", flush=True)
    return {"median_step_ms_per_run": {n: [t * 1e3 for t in v] for n, v in per_run.items()},
            "median_step_ms": {n: statistics.median(v) * 1e3 for n, v in per_run.items()},
            "ratio_vs_nanogpt": {n: statistics.median(v) for n, v in ratios.items()},
            "p10_ratio_vs_nanogpt": {n: statistics.median(v) for n, v in fast_ratios.items()},
            "ratios_per_pair": ratios}


def loss(args: Args, data: str, val_text: Path) -> dict:
    results = {}
    rec = run_nanogpt(args.nanogpt, args.iters, args.out / "nanogpt_full")
    scored = nanogpt_heldout_loss(args.nanogpt, args.out / "nanogpt_full" / "ckpt.pt",
                                  args.nanogpt / "data" / "shakespeare_char" / "val.bin")
    results["nanoGPT"] = {"steps": args.iters, "heldout_loss": scored["loss"], "ckpt_iter": scored["iter"],
                          "printed_val": rec["printed_val"], "median_step_ms": median_after_warmup(rec["step_times"]) * 1e3,
                          "wall_s": rec["wall_s"]}
    print(f"nanoGPT: held-out {scored['loss']:.4f} (printed val {rec['printed_val'].get(args.iters)})", flush=True)
    steps = args.steps or tuple(args.iters for _ in args.recipes)
    if len(steps) != len(args.recipes):
        raise ValueError(f"--steps has {len(steps)} values for {len(args.recipes)} recipes; give one per recipe")
    for name, n in zip(args.recipes, steps):
        key = name if name not in results else f"{name}@{n}"  # one recipe may run at several lengths
        rec = run_nanoseek(RECIPES[name], data, n, args.out / f"full_{key}", val_text)
        results[key] = {"steps": n, "heldout_loss": rec["heldout_loss"], "own_val_split_loss": rec["final_val_split_loss"],
                         "median_step_ms": median_after_warmup(rec["step_times"]) * 1e3, "wall_s": rec["wall_s"],
                         "params": rec["params"], "skips": rec["skips"]}
        print(f"{key}: {n} steps, held-out {rec['heldout_loss']:.4f}", flush=True)
    return results


def main(args: Args) -> None:
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes {unknown[0]!r}: unknown; choose from {', '.join(RECIPES)}")
    args = dataclasses.replace(args, nanogpt=args.nanogpt.resolve(), out=args.out.resolve())
    prepare_nanogpt_data(args.nanogpt, args.text)
    data, _, val_text = prepare_nanoseek_data(args.text, args.out)
    import torch

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start",
              "threads": 1, "args": {k: str(v) for k, v in dataclasses.asdict(args).items()},
              "recipes": {name: RECIPES[name] for name in args.recipes}}
    if args.mode in ("timing", "both"):
        report["timing"] = timing(args, data)
        for name, ratio in report["timing"]["ratio_vs_nanogpt"].items():
            print(f"{name}: step time {ratio:.3f}x nanoGPT's (median of {args.repeats} interleaved pairs; "
                  f"p10 ratio {report['timing']['p10_ratio_vs_nanogpt'][name]:.3f})")
    if args.mode in ("loss", "both"):
        report["loss"] = loss(args, data, val_text)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_nanoseek_worker":
        nanoseek_worker(json.loads(sys.argv[2]))
    else:
        main(tyro.cli(Args))
