"""nanoGPT's CPU recipe on tiny Shakespeare, scored on nanoGPT's own validation split.

nanoGPT (shakespeare_char) trains on the first 90% of the characters and reports the loss on the
last 10%; its README gives val 1.88 for: 4 layers, 4 heads, 128 dim, block 64, batch 12, 2000
iters, lr 1e-3 (warmup 100, cosine to 1e-4), beta2 0.99, dropout 0. We train the dense MHA path
(`tiny-gqa` with n_kv_heads = n_heads; SwiGLU width 352 ~ the parameters of a 4x GELU MLP) on the
first 90% only, then score the final model on every 64-character window of the last 10%.

    python bench/shakespeare_char.py --text ../shared/data/tinyshakespeare.txt --out /tmp/shakespeare
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.train.loading import load_run_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_nanogpt import windows_loss  # noqa: E402  (the scoring both nanoGPT comparisons share)

RECIPE = [
    "--preset", "tiny-gqa", "--model.n-kv-heads", "4", "--model.inter-dim", "352", "--model.max-seq-len", "64",
    "--data.tokenizer", "char", "--data.seq-len", "64", "--data.val-fraction", "0.02",
    "--train.batch-size", "12", "--max-steps", "2000", "--train.lr", "1e-3", "--train.warmup-steps", "100",
    "--train.min-lr-ratio", "0.1", "--train.beta2", "0.99", "--train.eval-every", "500",
    "--train.no-tensorboard", "--no-progress", "--train.sample-tokens", "200",
]


def heldout_loss(run_dir: Path, text: str, block: int = 64, batch: int = 256) -> float:
    """Mean next-character loss over all non-overlapping `block`-long windows of `text`."""
    model, _ = nanoseek.load_checkpoint(run_dir)
    tok = load_run_tokenizer(run_dir)
    ids = torch.tensor(tok.encode(text))
    return windows_loss(lambda x, y: F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()), ids, block, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = args.text.read_text()
    cut = int(0.9 * len(text))
    args.out.mkdir(parents=True, exist_ok=True)
    train_file = args.out / "train90.txt"
    train_file.write_text(text[:cut])
    run_dir = args.out / "run"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nanoseek", "train", "--data", str(train_file), "--out", str(run_dir), *RECIPE],
                   check=True)
    minutes = (time.perf_counter() - start) / 60
    loss = heldout_loss(run_dir, text[cut:])
    print(f"nanoGPT split (last 10%): val loss {loss:.4f} (ppl {math.exp(loss):.2f}); train time {minutes:.1f} min")


if __name__ == "__main__":
    main()
