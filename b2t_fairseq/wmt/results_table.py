"""``b2t-results-table RESULTS...``: every run's JSON (from b2t-wmt-evaluate) as markdown beside the paper.

RESULTS are JSON files or folders holding them. The first table is SacreBLEU (the paper's metric) with
the paper's 18L-18L rows (Takase et al. 2023, Table; reference section 3); the second is tokenized BLEU
with compound splitting, which the paper does not report (labelled, for comparison with older papers).
A third table, kept apart, lists the WMT En-De numbers published for DeepNorm and Admin
(``published.py``), each with its source, setting, metric and the flags that select its variant here:
other data, test sets and metrics than the paper's, so never a like-for-like row of the tables above.
"""

import argparse
import json
import sys
from pathlib import Path

from ..commands import run_command
from ..errors import B2TError
from ..util import atomic_write
from . import YEARS
from .published import FLAGS as PUBLISHED_FLAGS
from .published import PAPER_TABLES_NOT_CONFIRMED, PUBLISHED

PROG = "b2t-results-table"
# SacreBLEU, newstest2010..2016 and their average, 18L-18L (reference section 3)
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
            files += sorted(p.glob("*.json"))
        elif p.exists():
            files.append(p)
        else:
            raise B2TError(f"{p} does not exist; pass result JSON files or folders")
    runs = []
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise B2TError(f"{f} is not valid JSON ({e}); delete it or re-run the evaluation")
        if isinstance(r, dict) and "years" in r:
            runs.append(r)
    return runs


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


def run(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSON files or folders")
    p.add_argument("--out", help="also write the markdown here")
    p.add_argument("--no-paper", action="store_true", help="leave out the paper's rows")
    p.add_argument("--no-published", action="store_true",
                   help="leave out the table of published DeepNorm/Admin numbers (other settings)")
    args = p.parse_args(argv)
    text = render(load_results(args.results), paper=not args.no_paper)
    if not args.no_published:
        text += "\n" + render_published()
    if args.out:
        atomic_write(args.out, text)
    print(text, end="")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
