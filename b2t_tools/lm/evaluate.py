"""``b2t-lm-evaluate DATA CHECKPOINT...``: perplexity with fairseq-eval-lm's conventions, and a table.

Each checkpoint is scored by ``b2t-eval-lm`` with the recipe's evaluation flags (recipe.LM_EVAL: 512-token
windows, every scored token seeing 400 tokens of context, as in fairseq's examples/language_model). The
rows (layer type, depth, subset, loss, perplexity) go to ``--out`` (JSON, one entry per checkpoint, kept
across runs) and a Markdown table is printed beside the published number where one exists.

Each row records the data it was measured on (the folder, digests of its dictionary and of the subset's
files) and the checkpoint's fingerprint. Rows of other data, or of a checkpoint that changed since (a run
that trained on), are kept and shown marked "(stale)", as in b2t-results-table.
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
from ..checkpoints import read_checkpoint_once
from ..util import check_writable, file_digest, json_digest, write_json

PROG = "b2t-lm-evaluate"
RESULT = re.compile(r"Loss(?: \(base 2\))?: ([0-9.]+), Perplexity: ([0-9.]+|inf)")
FIELDS = {"label": str, "subset": str, "ppl": (int, float), "checkpoint": str}  # what the table needs of a row


def describe(checkpoint):
    """(layer type label, decoder layers, checkpoint fingerprint) of a checkpoint, from its saved config; the
    fingerprint comes from the same open file as the config (a run saving it meanwhile cannot mix two)."""
    from b2t_fairseq import layer_types
    from b2t_fairseq.authors import layer_type_of_state

    state, fp = read_checkpoint_once(str(checkpoint), "pass a checkpoint written by b2t-lm-train or fairseq-train",
                                     flag="checkpoint")
    cfg = state.get("cfg")
    model = (cfg.get("model") if cfg is not None else None) or state.get("args")
    layers = model.get("decoder_layers") if hasattr(model, "get") else getattr(model, "decoder_layers", None)
    key = layer_type_of_state(state)
    return (layer_types.BY_KEY[key].label if key in layer_types.BY_KEY else "?"), layers, fp


def data_id(data, subset):
    """What a perplexity was measured on: the folder, and the digests of its dictionary and of the subset's files
    (a copy of the same data elsewhere is the same data; a re-prepared or other corpus is not)."""
    d = Path(data)
    split = [d / f"{subset}.bin", d / f"{subset}.idx"]
    return {"path": str(d.resolve()), "dict": file_digest(d / "dict.txt", n=16),
            "split": json_digest([file_digest(f, n=16) for f in split])}


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


def status(row, data, seen=None):
    """("current" | "not checked" | "stale", why) of a recorded row for the table of DATA: measured on other data,
    or its checkpoint changed since (a run that trained on), is stale, as in the WMT table. seen: {subset: data_id}
    already computed."""
    from ..wmt.results_table import status as checkpoint_status

    if not isinstance(row.get("data"), dict) or not isinstance(row.get("provenance"), dict):
        return "stale", "recorded by an older b2t-lm-evaluate, with no data or checkpoint fingerprint"
    seen = {} if seen is None else seen
    if row["subset"] not in seen:
        here = all((Path(data) / f"{row['subset']}.{x}").is_file() for x in ("bin", "idx"))
        seen[row["subset"]] = data_id(data, row["subset"]) if here and (Path(data) / "dict.txt").is_file() else {}
    now = seen[row["subset"]]
    if [row["data"].get(k) for k in ("dict", "split")] != [now.get(k) for k in ("dict", "split")]:
        return "stale", f"measured on other data ({row['data'].get('path')})"
    state, why = checkpoint_status({"provenance": row["provenance"]})  # the WMT table's checkpoint check
    return state, why


def table(rows, data=None):
    """The rows (with their status against DATA where given) beside the published number."""
    out = ["| layer type | layers | subset | perplexity | source | status |", "|---|---:|---|---:|---|---|"]
    seen = {}
    marked = [(r, status(r, data, seen) if data is not None else ("current", "")) for r in rows]
    for r, (state, why) in sorted(marked, key=lambda x: (x[1][0] == "stale", x[0].get("layers") or 0, x[0]["label"])):
        other = {k: v for k, v in (r.get("flags") or {}).items() if dict(recipe.LM_EVAL).get(k) != v}
        how = "".join(f"; {k} {v}" for k, v in other.items())  # not the recipe's evaluation: said in the row
        label = r["label"] + (" (stale)" if state == "stale" else "")
        out.append(f"| {label} | {r.get('layers')} | {r['subset']} | {r['ppl']:.2f} | "
                   f"measured ({r['checkpoint']}{how}) | {state}{': ' + why if why else ''} |")
    for layers, pub in sorted(recipe.LM_PUBLISHED.items()):
        out.append(f"| {pub['layer_type']} | {layers} | test | {pub['test_ppl']:.2f} | published: {pub['source']} | "
                   f"{pub['note']} |")
    out.append(f"No published perplexity at {recipe.LM_DEEP} layers of this width, nor for any B2T, DeepNorm or "
               "Admin language model.")
    return "\n".join(out)


def read_rows(out):
    """The rows kept in --out, checked before any evaluation: a damaged file is refused and left as it is."""
    if out.is_dir():
        raise ToolError(f"--out {out} is a folder; pass the path of a .json file (default results/lm/perplexity.json)")
    if not out.exists():
        return {}
    try:
        rows = json.loads(out.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ToolError(f"--out {out} is not valid JSON ({e}); it is left as it is: move it away or pass another "
                        "--out") from None
    except OSError as e:
        raise ToolError(f"cannot read --out {out} ({e.strerror or e}); fix its permissions or pass another --out"
                        ) from None
    bad = "a JSON " + type(rows).__name__ if not isinstance(rows, dict) else next(
        (f"entry {k!r}" for k, r in rows.items() if not isinstance(r, dict) or not all(
            isinstance(r.get(f), t) and not isinstance(r.get(f), bool) for f, t in FIELDS.items())), None)
    if bad:
        raise ToolError(f"--out {out} is not a {PROG} result file ({bad} is not a result); it is left as it is: move "
                        "it away or pass another --out")
    return rows


def save(out, rows, unsaved, data):
    """Write --out (with any rows another run added meanwhile); when that fails, the results measured are printed
    (the table, and in the error line): not lost."""
    try:
        rows.update({k: v for k, v in read_rows(out).items() if k not in rows})
        write_json(out, rows)
    except (OSError, ToolError) as e:
        print(table(list(rows.values()), data))
        got = ", ".join(f"{r['checkpoint']} {r['subset']} perplexity {r['ppl']:.2f}" for r in unsaved)
        why = (e.strerror or e) if isinstance(e, OSError) else str(e).split(";")[0]
        raise ToolError(f"cannot write --out {out} ({why}); measured but not saved: {got} (also in the table "
                        "above): free some space or pass another --out and re-run") from None


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
    data = Path(args.data)
    for need in ("dict.txt", f"{args.subset}.bin", f"{args.subset}.idx"):
        if not (data / need).is_file():
            raise ToolError(f"{data} has no {need}; pass the --dest of b2t-lm-prepare (binarized WikiText-103)")
    out = Path(args.out)
    rows = read_rows(out)  # before any evaluation: a damaged --out costs no hours
    check_writable(str(out), "--out")
    here = data_id(data, args.subset)
    for c in args.checkpoints:
        label, layers, fp = describe(c)
        # a new checkpoint (or the same file trained on), other data or settings: a new row; the old rows stay
        key = json_digest([fp, here["dict"], here["split"], args.subset, flags])
        if key not in rows:
            row = dict(evaluate(data, c, args.subset, list(flags.items()), args.cpu), label=label, layers=layers,
                       subset=args.subset, checkpoint=str(c), flags=flags, data=here,
                       provenance={"checkpoint": str(Path(c).resolve()), "fingerprint": fp})
            rows[key] = row
            save(out, rows, [row], data)  # each result is kept as soon as it exists
    print(table(list(rows.values()), data))


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
