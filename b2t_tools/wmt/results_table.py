"""``b2t-results-table RESULTS...``: every run's JSON (from b2t-wmt-evaluate) as markdown beside the paper.

RESULTS are JSON files or folders holding them. The first table is SacreBLEU (the paper's metric) with
the paper's 18L-18L rows (Takase et al. 2023, and the authors' README for the 2023 code); the second is tokenized BLEU
with compound splitting, which the paper does not report (labelled, for comparison with older papers).
A third table gives each run's provenance: the checkpoint, the checkpoints it averaged and their updates.

A result is checked against the checkpoints it records where they are on this machine: if its checkpoint's
content changed, or the run it averaged has saved newer checkpoints since (a progress check evaluated
mid-training), the table is refused (``--allow-stale`` shows such rows marked "(stale)" instead).
A result from before provenance was recorded counts as stale. Results whose checkpoints are not here
(copied from another machine) are shown as recorded, marked "not checked".
A fourth table, kept apart, lists the WMT En-De numbers published for DeepNorm and Admin
(``published.py``), each with its source, setting, metric and the flags that select its variant here:
other data, test sets and metrics than the paper's, so never a like-for-like row of the tables above.
"""

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

from ..commands import run_command
from ..errors import ToolError
from ..util import atomic_write, check_writable
from . import YEARS, recorded_overrides
from .published import FLAGS as PUBLISHED_FLAGS
from .published import PAPER_TABLES_NOT_CONFIRMED, PUBLISHED

PROG = "b2t-results-table"
# SacreBLEU, newstest2010..2016 and their average, 18L-18L (the paper and the authors' README)
PAPER = (
    ("paper: Pre-LN 18L", (24.07, 21.98, 22.40, 26.28, 27.36, 29.74, 34.16, 26.57)),
    ("paper: B2T 18L (2022 code)", (24.62, 22.51, 22.86, 26.74, 28.48, 30.99, 34.93, 27.30)),
    ("paper: B2T 18L (2023 code)", (25.27, 22.67, 23.49, 27.25, 28.25, 30.60, 35.09, 27.52)),
    ("paper: Post-LN 18L", None),
)


def load_results(paths):
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise ToolError(f"{p} holds no result JSON; run scripts/evaluate.sh (or b2t-wmt-evaluate) first, "
                               "or pass the folder it wrote to")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise ToolError(f"{p} does not exist; pass result JSON files or folders")
    runs, seen = [], set()
    for f in files:
        if f.resolve() in seen:  # a file named twice (or its folder and itself) is one run, shown once
            continue
        seen.add(f.resolve())
        if f.is_dir():
            raise ToolError(f"{f} is a folder, not a result JSON; move it out of the results folder")
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ToolError(f"{f} is not valid JSON ({e}); delete it or re-run the evaluation") from None
        except OSError as e:
            raise ToolError(f"cannot read {f} ({e.strerror or e}); fix its permissions or pass another file") from None
        problem = shape_problem(r)
        if problem:
            raise ToolError(f"{f} is not a b2t-wmt-evaluate result ({problem}); re-run scripts/evaluate.sh for it, or "
                           "move the file out of the results folder")
        r["_file"] = str(f)
        runs.append(r)
    return runs


def _number(x):
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def shape_problem(r):
    """What is wrong with the shape of a loaded result, or None."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    if not isinstance(r.get("name"), str) or not r["name"].strip():
        return "no run name"
    years = r.get("years")
    if not isinstance(years, dict):
        return "no 'years' object"
    for y, v in years.items():
        if not (isinstance(v, dict) and _number(v.get("sacrebleu")) and _number(v.get("tok_bleu"))):
            return f"year {y} has no numeric sacrebleu and tok_bleu"
    avg = r.get("average_2010_2016", {})
    if not (isinstance(avg, dict) and _number(avg.get("sacrebleu")) and _number(avg.get("tok_bleu"))):
        return "average_2010_2016 is not numeric"
    prov = r.get("provenance")
    if prov is not None and not (isinstance(prov, dict) and isinstance(prov.get("checkpoint"), str)):
        return "a damaged 'provenance'"
    return None


# --- provenance ---------------------------------------------------------------------------------

def status(run):
    """("current" | "not checked" | "stale", why) for a loaded result, checked against the files here."""
    from .. import checkpoints as avg

    try:
        over = recorded_overrides(shlex.split(str(run.get("generate_args") or "")))
    except ValueError:
        over = ["(unreadable --generate-args)"]
    if over:  # an older b2t-wmt-evaluate let --generate-args override what the result records
        return "stale", (f"its --generate-args set {', '.join(over)}, so it decoded with other settings than it "
                         "records")
    prov = run.get("provenance")
    if prov is None:
        return "stale", "it records no checkpoint provenance (written by an older b2t-wmt-evaluate)"
    ckpt = prov["checkpoint"]
    if not os.path.isfile(ckpt):
        return "not checked", f"its checkpoint {ckpt} is not on this machine"
    if avg.fingerprint(ckpt) != prov.get("fingerprint"):
        return "stale", f"its checkpoint {ckpt} changed since it was evaluated"
    sel = prov.get("selection")
    if isinstance(sel, dict) and os.path.isdir(str(sel.get("folder"))):
        try:
            now = avg.last_checkpoints(sel["folder"], int(sel["n"]), by_update=sel.get("kind") == "update",
                                       upper_bound=sel.get("upper_bound"), at_most=True)
        except (ToolError, KeyError, TypeError, ValueError):
            now = []
        then = dict(avg.identity(prov.get("averaged_from") or []))
        newer = [os.path.basename(p) for p in now if os.path.basename(p) not in then]
        if newer:
            return "stale", (f"its average is of {', '.join(then)}, but {sel['folder']} now has {', '.join(newer)} "
                             f"among its last {sel['n']} {sel.get('kind')} checkpoints")
        changed = [os.path.basename(p) for p in now if avg.fingerprint(p) != then[os.path.basename(p)]]
        if changed:
            return "stale", f"{', '.join(changed)} in {sel['folder']} changed since it was averaged"
    return "current", ""


def _updates(sources):
    ups = [s.get("num_updates") for s in sources if isinstance(s, dict) and s.get("num_updates") is not None]
    if not ups:
        return "-"
    return str(min(ups)) if min(ups) == max(ups) else f"{min(ups)}-{max(ups)}"


def provenance_rows(runs):
    out = ["### Provenance", "", "| run | checkpoint | averaged from | updates | fingerprint | status |",
           "|---|---|---|---|---|---|"]
    for r in runs:
        prov = r.get("provenance") or {}
        sources = prov.get("averaged_from") or []
        if sources:
            names = [s.get("name", "?") for s in sources if isinstance(s, dict)]
            frm = f"{len(names)}: " + (", ".join(names) if len(names) <= 3 else f"{names[-1]} ... {names[0]}")
            ups = _updates(sources)
        else:
            frm = "-"
            ups = "-" if prov.get("num_updates") is None else str(prov["num_updates"])
        ckpt = os.path.basename(prov.get("checkpoint", r.get("checkpoint", "?")))
        state, why = r["_status"]
        out.append(f"| {r['name']} | {ckpt} | {frm} | {ups} | {str(prov.get('fingerprint', '-'))[:15]} | "
                   f"{state}{': ' + why if why and state != 'current' else ''} |")
    return out


def check_current(runs, allow_stale):
    for r in runs:
        r["_status"] = status(r)
        state, why = r["_status"]
        if state == "stale":
            if not allow_stale:
                raise ToolError(f"{r['_file']} is stale: {why}; re-run scripts/evaluate.sh for run '{r['name']}' "
                               "(it rebuilds the average), or pass --allow-stale to show it marked")
            r["name"] += " (stale)"


def _cell(x):
    return "-" if x is None else f"{x:.2f}"


def _row(name, values):
    return "| " + " | ".join([name] + [_cell(v) for v in values]) + " |"


def run_values(run, key):
    vals = [run["years"].get(str(y), {}).get(key) for y in YEARS]
    avg = run.get("average_2010_2016", {}).get(key)
    return vals + [avg]


def render(runs, paper=True):
    head = "| run | " + " | ".join(str(y) for y in YEARS) + " | avg |\n|" + "---|" * (len(YEARS) + 2)
    out = ["### SacreBLEU (13a, case-sensitive, detokenized), newstest2010-2016", "", head]
    if paper:
        for name, vals in PAPER:
            out.append(_row(name, vals) if vals else f"| {name} | " + " | ".join(["diverged"] * (len(YEARS) + 1)) + " |")
    out += [_row(r["name"], run_values(r, "sacrebleu")) for r in runs]
    sigs = sorted({r.get("sacrebleu_signature") for r in runs if r.get("sacrebleu_signature")})
    if sigs:
        out += ["", "SacreBLEU signature: " + "; ".join(f"`{s}`" for s in sigs)]
    out += ["", "### Tokenized BLEU with compound splitting (##AT##), not reported in the paper", "", head]
    out += [_row(r["name"], run_values(r, "tok_bleu")) for r in runs]
    if runs and all("_status" in r for r in runs):
        out += [""] + provenance_rows(runs)
    return "\n".join(out) + "\n"


def render_published():
    """The published DeepNorm/Admin numbers as their own table, with every row's source and setting."""
    depths = []
    for entry in PUBLISHED.values():
        depths += [d for d in entry["bleu"] if d not in depths]
    out = ["### Published DeepNorm and Admin numbers, WMT En-De (other settings: not comparable with the tables "
           "above)", "",
           "| published run | " + " | ".join(depths) + " | source, setting, metric | flags here |",
           "|" + "---|" * (len(depths) + 3)]
    notes, explicit = [], None
    for i, (label, entry) in enumerate(PUBLISHED.items(), 1):
        if entry["setting"] == "as above" and explicit:
            where = f"setting and metric as [{explicit}]"
        else:
            explicit, where = i, f"setting: {entry['setting']}; metric: {entry['metric']}"
        notes.append(f"[{i}] Source: {entry['source']}; {where}.")
        flags = PUBLISHED_FLAGS.get(label)
        out.append("| " + " | ".join([label] + [_cell(entry["bleu"].get(d)) for d in depths] +
                                     [f"[{i}]", f"`{flags}`" if flags else "-"]) + " |")
    out += [""] + [n + "  " for n in notes[:-1]] + notes[-1:]
    if PAPER_TABLES_NOT_CONFIRMED:
        out += ["", "Not included (could not be read from the source during this work):"]
        out += [f"- {t}" for t in PAPER_TABLES_NOT_CONFIRMED]
    return "\n".join(out) + "\n"


def check_out_apart(out, inputs):
    """--out must not overwrite a result, nor become one: a .json in a results folder is read as a result."""
    o = Path(out).resolve()
    for p in map(Path, inputs):
        r = p.resolve()
        if o == r:
            raise ToolError(f"--out {out} is one of the results read; writing the table there would destroy it: "
                            "choose another --out (e.g. table.md)")
        if p.is_dir() and o.parent == r and o.suffix == ".json":
            raise ToolError(f"--out {out} is a .json file in the results folder {p}; the next table would read it "
                            "as a result: choose another name (e.g. table.md) or folder")


def run(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files or folders")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's rows")
    p.add_argument("--allow-stale", action="store_true",
                   help="show results whose checkpoints changed since (marked '(stale)') instead of refusing")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the table of published DeepNorm/Admin numbers (other settings)")
    args = p.parse_args(argv)
    if args.out:
        check_writable(args.out, "--out")
    if args.out:
        check_out_apart(args.out, args.results)
    runs = load_results(args.results)
    check_current(runs, args.allow_stale)
    text = render(runs, paper=not args.no_paper)
    if not args.no_published:
        text += "\n" + render_published()
    if args.out:
        try:
            atomic_write(args.out, text)
        except OSError as e:
            raise ToolError(f"cannot write --out {args.out} ({e.strerror or e}); choose another --out") from None
    print(text, end="")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
