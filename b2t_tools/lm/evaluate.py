"""``b2t-lm-evaluate DATA CHECKPOINT...``: perplexity with fairseq-eval-lm's conventions, and a table.

Each checkpoint is scored by ``b2t-eval-lm`` with the recipe's evaluation flags (recipe.LM_EVAL: 512-token
windows, every scored token seeing 400 tokens of context, as in fairseq's examples/language_model). The
rows (layer type, depth, subset, loss, perplexity) go to ``--out`` (JSON, one entry per checkpoint, kept
across runs) and a Markdown table is printed beside the published number where one exists.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from b2t_fairseq import recipe

from ..commands import run_command
from ..errors import ToolError
from ..util import file_digest, json_digest, write_json

PROG = "b2t-lm-evaluate"
RESULT = re.compile(r"Loss(?: \(base 2\))?: ([0-9.]+), Perplexity: ([0-9.]+|inf)")


def describe(checkpoint):
    """(layer type label, decoder layers) of a checkpoint, from its saved config."""
    import torch

    from b2t_fairseq import layer_types
    from b2t_fairseq.authors import layer_type_of_state

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state.get("cfg")
    model = (cfg.get("model") if cfg is not None else None) or state.get("args")
    layers = model.get("decoder_layers") if hasattr(model, "get") else getattr(model, "decoder_layers", None)
    key = layer_type_of_state(state)
    return (layer_types.BY_KEY[key].label if key in layer_types.BY_KEY else "?"), layers


def evaluate(data, checkpoint, subset="test", flags=None, cpu=False):
    cmd = [os.path.join(os.path.dirname(sys.executable), "b2t-eval-lm"), str(data), "--path", str(checkpoint),
           "--gen-subset", subset, *recipe.flags_to_argv(flags or recipe.LM_EVAL)]
    if cpu:
        cmd.append("--cpu")
    p = subprocess.run(cmd, capture_output=True, text=True)
    found = RESULT.findall(p.stdout + p.stderr)
    if p.returncode != 0 or not found:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ToolError(f"b2t-eval-lm failed on {checkpoint} ({tail}); fix that and re-run")
    loss, ppl = found[-1]
    return {"loss": float(loss), "ppl": float(ppl)}


def table(rows):
    out = ["| layer type | layers | subset | perplexity | source |", "|---|---:|---|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["layers"] or 0, r["label"])):
        out.append(f"| {r['label']} | {r['layers']} | {r['subset']} | {r['ppl']:.2f} | measured ({r['checkpoint']}) |")
    for layers, pub in sorted(recipe.LM_PUBLISHED.items()):
        out.append(f"| {pub['layer_type']} | {layers} | test | {pub['test_ppl']:.2f} | published: {pub['source']} |")
    out.append(f"No published perplexity at {recipe.LM_DEEP} layers of this width, nor for any B2T, DeepNorm or "
               "Admin language model.")
    return "\n".join(out)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="binarized WikiText-103 (b2t-lm-prepare --dest)")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--subset", default="test", choices=("valid", "test"))
    p.add_argument("--context-window", type=int, help="override the recipe's 400")
    p.add_argument("--tokens-per-sample", type=int, help="override the recipe's 512")
    p.add_argument("--batch-size", type=int, help="override the recipe's 2")
    p.add_argument("--out", default="results/lm/perplexity.json")
    p.add_argument("--cpu", action="store_true")
    return p.parse_args(argv)


def run(argv):
    args = parse_args(argv)
    flags = dict(recipe.LM_EVAL)
    for name in ("context_window", "tokens_per_sample", "batch_size"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "context_window" else 1):
                raise ToolError(f"--{name.replace('_', '-')} {value}: must be at least "
                                f"{0 if name == 'context_window' else 1}")
            flags["--" + name.replace("_", "-")] = str(value)
    if int(flags["--context-window"]) >= int(flags["--tokens-per-sample"]):
        raise ToolError(f"--context-window {flags['--context-window']} must be below --tokens-per-sample "
                        f"{flags['--tokens-per-sample']} (fairseq-eval-lm scores the tokens after the context)")
    for c in args.checkpoints:
        if not os.path.isfile(c):
            raise ToolError(f"{c} does not exist; pass checkpoint files (e.g. SAVE_DIR/checkpoint_best.pt)")
    out = Path(args.out)
    rows = json.loads(out.read_text()) if out.is_file() else {}
    for c in args.checkpoints:
        label, layers = describe(c)
        subset_bin = Path(args.data) / f"{args.subset}.bin"
        data_id = [str(Path(args.data).resolve()), subset_bin.stat().st_size if subset_bin.exists() else None]
        key = json_digest([file_digest(c), data_id, args.subset, flags])  # a new checkpoint or data: a new row
        if key not in rows:
            rows[key] = dict(evaluate(args.data, c, args.subset, list(flags.items()), args.cpu), label=label,
                             layers=layers, subset=args.subset, checkpoint=str(c), flags=flags)
            write_json(out, rows)  # each result is kept as soon as it exists
    print(table(list(rows.values())))


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
