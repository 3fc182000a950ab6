"""Score a healed real model: the heal curve, the held-out table row, the chat answer and the transformers export.

    nanoseek convert --from SMOL --to mla-moe --out W/moe --kv-lora-rank 147 --rope-dims 64 --experts 7 --shared 1 --top-k 2
    nanoseek heal --ckpt W/moe --out W/healed --steps 195 --train.batch-size 4 --train.precision bf16 \\
        --train.eval-every 25
    python bench/heal_real.py --run W/healed --export W/healed-hf

Reads the heal run's metrics.jsonl for the curve (the validation KL every eval, with the tokens healed so far),
then compares the healed model with its teacher on the held-out tokens `nanoseek heal` reported on (the
conversion's val split): KL, both perplexities, top-1 agreement; answers bench/convert_real.py's question
greedily with the chat template; and, with --export, writes the transformers DeepseekV3 export and scores it
there (its perplexity against nanoseek's, and the KL between the two forwards). One thread, CPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from convert_real import answer, export_check  # bench/ is the script's directory, hence on sys.path

from nanoseek.cli.convert import _split_ids
from nanoseek.config import RunConfig
from nanoseek.convert.heal import compare
from nanoseek.data import load_tokenizer
from nanoseek.interop.source import load_source_model
from nanoseek.train.loading import load_model
from nanoseek.train.metrics import METRICS_FILE


@dataclass
class Args:
    run: str
    """The healed run directory (written by `nanoseek heal`)."""
    teacher: str | None = None
    """The original model (default: the one heal.json names)."""
    eval_tokens: int = 4096
    """Held-out tokens: the first of the run's val split, as `nanoseek heal` reports."""
    export: str | None = None
    """Also export to this transformers folder and score the export there."""
    max_new_tokens: int = 24


def heal_curve(run: Path) -> list[dict]:
    """[{step, tokens, val_kl, val_ppl}] from the run's eval records (tokens = step x batch x accum x seq_len;
    val_ppl = exp of the student's own next-token loss on the validation batches)."""
    cfg = RunConfig.load_toml(run / "config.toml")
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    records = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    return [{"step": r["step"], "tokens": r["step"] * per_step, "val_kl": r["val_kl"],
             "val_ppl": math.exp(r["val_student_ce"])} for r in records if r.get("kind") == "eval"]


def main(args: Args) -> None:
    torch.set_num_threads(1)
    run = Path(args.run)
    record = json.loads((run / "heal.json").read_text())
    source = load_source_model(args.teacher or record["teacher"], "--teacher")
    student, _ = load_model(run)
    student.eval()
    held = torch.from_numpy(_split_ids(run / "data", "val", args.eval_tokens))
    results = {"curve": heal_curve(run), "before": record["before"]}
    for point in results["curve"]:
        print(f"step {point['step']:4d}  {point['tokens']:7d} tokens  val KL {point['val_kl']:.4f}  "
              f"val perplexity {point['val_ppl']:.2f}")
    after = compare(source.model, student, held)
    results["after"] = after.as_dict()
    print(f"before: KL {record['before']['kl']:.4f}, perplexity {record['before']['ppl_student']:.2f}")
    print(f"after:  {after.line()}")
    tokenizer = load_tokenizer(source.tokenizer_dir)
    results["answer"] = answer(student, tokenizer, Path(source.tokenizer_dir), args.max_new_tokens)
    print(f"answer: {results['answer']!r}")
    if args.export:
        results["export"] = export_check(student, source, held, Path(args.export))
        print(json.dumps(results["export"]))
    (run / "heal_real.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
