"""``b2t-wmt-evaluate``: translate newstest2010-2016 with one checkpoint and score it, the paper's way.

For every year: beam 4, length penalty 0.6 on newstest2014 and 1.0 on the other years, decoding in fp32
(as the authors; ``--fp16`` on a GPU if asked for, recorded as ``generation.precision``), BPE removed,
Moses-detokenized as ``detokenizer.perl -l de`` (which also undoes the escapes &amp; &#124; &lt; &gt; &apos;
&quot; &#91; &#93; that tokenizer.perl put in Google's data), then
- SacreBLEU (13a tokenization, case-sensitive) against the raw references kept by the prepare step
  (DATA/refs/newstestYYYY.de; no network), per year and averaged over 2010-2016, with its signature;
- tokenized BLEU as fairseq's scripts/compound_split_bleu.sh computes it: the BPE-free output (Google-tokenized,
  escapes included) and Google's newstestYYYY.tok.de (DATA/refs/newstestYYYY.tok.de), both with every
  ``X-Y`` (non-space on both sides) rewritten ``X ##AT##-##AT## Y``, scored as whitespace tokens: corpus BLEU-4,
  case-sensitive, no smoothing, standard brevity penalty (= multi-bleu.perl = sacreBLEU tokenize='none').
One JSON file per run; ``b2t-results-table`` puts them beside the paper's numbers.

Every result records where it came from (``provenance``: the checkpoint's path, content fingerprint,
epoch and update, and for an average the checkpoints it averaged, with theirs) and what decides it
(``key``: that fingerprint, the data's, and the generation settings). ``--skip-if-current`` keeps an
existing ``--out`` whose key is the one this run would have; anything else is evaluated again.
All inputs and output places are checked before the first sentence is translated.
"""

import argparse
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

from ..checkpoints import fingerprint, position, read_checkpoint
from ..commands import run_command
from ..commands.cli import PLUGIN_DIR
from ..errors import ToolError
from ..util import check_writable, json_digest, parse_generate_output
from . import RECORDED_GENERATE_FLAGS, TEST_YEAR, YEARS, recorded_overrides

PROG = "b2t-wmt-evaluate"
TOK_LABEL = ("tokenized BLEU: Google's tokenizer.perl tokens (escaped), ##AT## compound splitting "
             "(fairseq compound_split_bleu.sh, multi-bleu style)")
SACRE_LABEL = "SacreBLEU, 13a, case-sensitive, detokenized"
MAX_BEAM = 10_000
MAX_TOKENS = 2**31 - 1  # fairseq's batching indexes tokens with int32/int64 arrays; more is a typo


def lenpen_for(year, lenpen_test=0.6, lenpen_other=1.0):
    return lenpen_test if year == TEST_YEAR else lenpen_other


def precision(args):
    """'fp16' only when asked for with --fp16: the authors decode in fp32 (and average into fp32)."""
    return "fp16" if args.fp16 and not args.cpu else "fp32"


def generation_argv(data, checkpoint, subset, lenpen, args, out):
    """fairseq-generate's arguments for one subset."""
    argv = [str(data), "--user-dir", PLUGIN_DIR, "--path", str(checkpoint), "--gen-subset", subset,
            "--beam", str(args.beam), "--lenpen", str(lenpen), "--remove-bpe", "--max-tokens", str(args.max_tokens),
            "--results-path", str(out), "--source-lang", "en", "--target-lang", "de", "--seed", "1",
            # fairseq-fixed (upstream main) drops the last batch when its size is not a multiple of
            # --required-batch-size-multiple (default 8): up to 7 test sentences would go untranslated
            "--required-batch-size-multiple", "1"]
    argv += ["--cpu"] if args.cpu else (["--fp16"] if precision(args) == "fp16" else [])
    return argv + shlex.split(args.generate_args or "")


def generate(data, checkpoint, subset, lenpen, args, workdir):
    """fairseq generation of one subset in this process; returns the tokenized hypotheses in input order."""
    from fairseq import options
    from fairseq_cli.generate import main as generate_main

    out = Path(workdir) / subset
    argv = generation_argv(data, checkpoint, subset, lenpen, args, out)
    parser = options.get_generation_parser()
    gen_args = options.parse_args_and_arch(parser, argv)
    generate_main(gen_args)
    hyps = parse_generate_output((out / f"generate-{subset}.txt").read_text(encoding="utf-8"), "H")
    return [hyps[i] for i in sorted(hyps)]


def read_refs(data, year):
    refs = Path(data) / "refs"
    def lines(path):  # as prepare wrote them: a last line without a newline counts; bytes that are not UTF-8
        text = path.read_bytes().decode("utf-8", "replace")  # (kept there as Google's are) read as U+FFFD
        return text[:-1].split("\n") if text.endswith("\n") else (text.split("\n") if text else [])

    try:
        raw = lines(refs / f"newstest{year}.de")
        tok = lines(refs / f"newstest{year}.tok.de")
    except FileNotFoundError as e:
        raise ToolError(f"reference {e.filename} is missing; run b2t-wmt-prepare (it keeps the references in "
                       "DATA/refs) or pass the right --data") from None
    return raw, tok


def score_year(hyps_tok, refs_raw, refs_tok):
    """(sacreBLEU score object, tokenized compound-split BLEU score object)."""
    from sacrebleu.metrics import BLEU

    from .text import compound_split, moses_detokenize

    detok = [moses_detokenize(h, "de") for h in hyps_tok]
    sacre = BLEU(tokenize="13a")
    s = sacre.corpus_score(detok, [refs_raw])
    t = BLEU(tokenize="none", force=True).corpus_score([compound_split(h) for h in hyps_tok],
                                                     [[compound_split(r) for r in refs_tok]])
    return s, t, sacre.get_signature(), detok


def check_options(args):
    """Refuse impossible numbers before anything is loaded."""
    if args.beam < 1:
        raise ToolError(f"--beam {args.beam} is not a beam size; pass --beam 1 or more (the paper: 4)")
    if args.beam > MAX_BEAM:
        raise ToolError(f"--beam {args.beam} is more hypotheses than decoding can hold; pass at most {MAX_BEAM} "
                        "(the paper: 4)")
    if args.max_tokens < 1:
        raise ToolError(f"--max-tokens {args.max_tokens} is not a positive number of tokens; pass e.g. --max-tokens 8192 (the default)")
    if args.max_tokens > MAX_TOKENS:
        raise ToolError(f"--max-tokens {args.max_tokens} is larger than any batch fairseq can index; pass at most "
                        f"{MAX_TOKENS} (default 8192)")
    for flag, v in (("--lenpen-test", args.lenpen_test), ("--lenpen-other", args.lenpen_other)):
        if not math.isfinite(v):
            raise ToolError(f"{flag} {v} is not a finite number; pass a length penalty (the paper: 0.6 on "
                           f"newstest{TEST_YEAR}, 1.0 on the other years)")
    if args.name is not None and not args.name.strip():
        raise ToolError("--name is empty; give the run a name for the table, or leave --name out")
    try:
        extra = shlex.split(args.generate_args or "")
    except ValueError as e:
        raise ToolError(f"--generate-args {args.generate_args!r} cannot be split into flags ({e}); quote it as one "
                       "string, e.g. --generate-args '--max-len-b 50'") from None
    # the result records beam, length penalties, checkpoint, years, precision: an override in --generate-args
    # would decode with other values than those recorded, so it is refused and the proper flag named
    for flag in recorded_overrides(extra):
        raise ToolError(f"--generate-args sets {flag}, which {PROG} sets and records itself; use "
                        f"{RECORDED_GENERATE_FLAGS[flag]} instead of putting it in --generate-args")


def check_generate_args(args, data):
    """fairseq's generation parser accepts the whole command line (an unknown or malformed flag in
    --generate-args is one line here, not fairseq's usage text after the checkpoint is loaded)."""
    if not args.generate_args:
        return
    import contextlib
    import io

    from fairseq import options

    argv = generation_argv(data, "checkpoint.pt", "test", 1.0, args, "out")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            options.parse_args_and_arch(options.get_generation_parser(), argv)
    except SystemExit:
        lines = [x for x in err.getvalue().strip().splitlines() if "error:" in x] or ["(no message)"]
        raise ToolError(f"--generate-args {args.generate_args!r}: fairseq-generate refuses it "
                        f"({lines[-1].split('error:', 1)[1].strip()}); fix the flags (fairseq-generate --help)") from None


def read_subsets(data):
    """{year: subset} from DATA/subsets.json, with one-line errors for a missing or damaged file."""
    if not data.exists():
        raise ToolError(f"--data {data} does not exist; pass the --dest folder of b2t-wmt-prepare")
    if not data.is_dir():
        raise ToolError(f"--data {data} is a file, not a folder; pass the --dest folder of b2t-wmt-prepare")
    f = data / "subsets.json"
    if not f.is_file():
        raise ToolError(f"{f} is missing; --data must be a folder written by b2t-wmt-prepare")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolError(f"{f} is not valid JSON ({e}); run b2t-wmt-prepare again to rewrite it") from None
    if not isinstance(raw, dict) or not all(isinstance(v, str) and str(k).isdigit() for k, v in raw.items()):
        raise ToolError(f"{f} is not a year -> subset map such as {{\"2014\": \"test\"}}; run b2t-wmt-prepare "
                       "again to rewrite it")
    return {int(y): v for y, v in raw.items()}


def check_inputs(data, years, subsets):
    """Every year's binarized subset and both references exist, before any translating."""
    for year in years:
        if year not in subsets:
            raise ToolError(f"newstest{year} is not in {data / 'subsets.json'}; choose --years from {sorted(subsets)}")
        sub = subsets[year]
        for lang in ("en", "de"):
            for ext in ("bin", "idx"):
                f = data / f"{sub}.en-de.{lang}.{ext}"
                if not f.is_file() or f.stat().st_size == 0:
                    raise ToolError(f"{f} is missing or empty; --data is incomplete: run b2t-wmt-prepare again")
        refs_raw, refs_tok = read_refs(data, year)
        if len(refs_raw) != len(refs_tok):
            raise ToolError(f"newstest{year}: {len(refs_raw)} raw references but {len(refs_tok)} tokenized ones in "
                           f"{data / 'refs'}; run b2t-wmt-prepare again")


def data_fingerprint(data, years, subsets):
    """SHA-256 of the sizes and times of what decoding and scoring read (dictionaries, subsets, references)."""
    files = [data / "dict.en.txt", data / "dict.de.txt", data / "subsets.json"]
    for y in years:
        files += [data / f"{subsets[y]}.en-de.{lang}.{ext}" for lang in ("en", "de") for ext in ("bin", "idx")]
        files += [data / "refs" / f"newstest{y}.de", data / "refs" / f"newstest{y}.tok.de"]
    stats = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] if f.exists() else [f.name, None] for f in files]
    return json_digest(stats, 32)


def checkpoint_provenance(ckpt):
    """What the result is built from: the checkpoint (fingerprint, epoch, update) and, for an average, its inputs."""
    from ..commands import average_checkpoints as avg

    if ckpt.is_dir():
        raise ToolError(f"--checkpoint {ckpt} is a folder; pass a checkpoint file, e.g. the average "
                       f"{ckpt / 'checkpoint_avg_epoch_last10.pt'} that scripts/evaluate.sh writes")
    if not ckpt.is_file():
        raise ToolError(f"checkpoint {ckpt} does not exist; train first or pass --checkpoint")
    state = read_checkpoint(str(ckpt), "train again or pass another --checkpoint", flag="--checkpoint", mmap=True)
    epoch, updates = position(state, str(ckpt))
    averaged = state.get(avg.PROVENANCE_KEY) if isinstance(state.get(avg.PROVENANCE_KEY), dict) else None
    return {"checkpoint": str(ckpt.resolve()), "fingerprint": fingerprint(str(ckpt)), "epoch": epoch,
            "num_updates": updates, "averaged_from": averaged.get("sources") if averaged else None,
            "selection": averaged.get("selection") if averaged else None}


def check_apart(args, data, ckpt):
    """The outputs overwrite no input: --out is not the checkpoint nor a file of --data; --keep-outputs (which
    writes newstestYYYY.de there) is not --data or inside it (DATA/refs holds the references by those names)."""
    out, d = Path(args.out).resolve(), data.resolve()
    if out == ckpt.resolve():
        raise ToolError(f"--out {args.out} is the --checkpoint; writing the result there would destroy it: "
                        "choose another --out")
    if d in out.parents:
        raise ToolError(f"--out {args.out} is inside --data {data}; the result must not overwrite the data: "
                        "choose an --out outside it")
    if args.keep_outputs:
        keep = Path(args.keep_outputs).resolve()
        if keep == d or d in keep.parents:
            raise ToolError(f"--keep-outputs {args.keep_outputs} is inside --data {data}, whose refs/ holds the "
                            "references under the names the translations get; choose a folder outside --data")


def settings(args, years):
    """The generation settings that shape the numbers (part of the result's key)."""
    return {"years": list(years), "beam": args.beam, "lenpen_test": args.lenpen_test,
            "lenpen_other": args.lenpen_other, "precision": precision(args), "max_tokens": args.max_tokens,
            "generate_args": args.generate_args or ""}


def recorded_key(out):
    try:
        old = json.loads(Path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return old.get("key") if isinstance(old, dict) else None


def evaluate(args):
    check_options(args)
    data, ckpt = Path(args.data), Path(args.checkpoint)
    provenance = checkpoint_provenance(ckpt)
    subsets = read_subsets(data)
    years = sorted(set(args.years)) if args.years else list(YEARS)  # a year given twice is scored once
    check_inputs(data, years, subsets)
    check_generate_args(args, data)
    check_apart(args, data, ckpt)
    check_writable(args.out, "--out")
    if args.keep_outputs:
        check_writable(Path(args.keep_outputs) / f"newstest{years[0]}.de", "--keep-outputs")
    key = {"checkpoint_fingerprint": provenance["fingerprint"], "data": data_fingerprint(data, years, subsets),
           "settings": settings(args, years)}
    if args.skip_if_current and Path(args.out).is_file():
        if recorded_key(args.out) == key:
            print(f"{args.out} is up to date (same checkpoint content, data and settings); not evaluated again")
            return None
        print(f"{args.out} was built from another checkpoint, data or settings; evaluating again", flush=True)
    result = {"name": args.name or ckpt.parent.name, "checkpoint": str(ckpt), "data": str(data),
              "generate_args": args.generate_args or "",
              "generation": {"beam": args.beam, "lenpen": {str(y): lenpen_for(y, args.lenpen_test, args.lenpen_other)
                                                           for y in years}, "remove_bpe": "subword_nmt (@@ )",
                             "detokenizer": "detokenizer.perl -l de (sacremoses port, parity-tested)",
                             "precision": precision(args)},
              "labels": {"sacrebleu": SACRE_LABEL, "tok_bleu": TOK_LABEL}, "provenance": provenance, "key": key,
              "years": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for year in years:
            lp = lenpen_for(year, args.lenpen_test, args.lenpen_other)
            hyps = generate(data, ckpt, subsets[year], lp, args, tmp)
            refs_raw, refs_tok = read_refs(data, year)
            if len(hyps) != len(refs_raw) or len(refs_raw) != len(refs_tok):
                raise ToolError(f"newstest{year}: {len(hyps)} translations for {len(refs_raw)} references; the "
                               "binarized data and DATA/refs disagree: run b2t-wmt-prepare again")
            sacre, tok, signature, detok = score_year(hyps, refs_raw, refs_tok)
            result["years"][str(year)] = {"subset": subsets[year], "lenpen": lp, "sentences": len(hyps),
                                          "sacrebleu": round(sacre.score, 2), "tok_bleu": round(tok.score, 2)}
            result["sacrebleu_signature"] = str(signature)
            print(f"newstest{year} ({subsets[year]}, lenpen {lp}): SacreBLEU {sacre.score:.2f}  "
                  f"tokenized+compound BLEU {tok.score:.2f}", flush=True)
            if args.keep_outputs:
                out = Path(args.keep_outputs)
                write_text(out / f"newstest{year}.tok.de", "".join(h + "\n" for h in hyps), "--keep-outputs")
                write_text(out / f"newstest{year}.de", "".join(h + "\n" for h in detok), "--keep-outputs")
    if set(YEARS) <= {int(y) for y in result["years"]}:
        result["average_2010_2016"] = {k: round(sum(result["years"][str(y)][k] for y in YEARS) / len(YEARS), 2)
                                       for k in ("sacrebleu", "tok_bleu")}
        print(f"average 2010-2016: SacreBLEU {result['average_2010_2016']['sacrebleu']:.2f}  "
              f"tokenized+compound BLEU {result['average_2010_2016']['tok_bleu']:.2f}")
    print(f"SacreBLEU signature: {result.get('sacrebleu_signature')}")
    write_text(args.out, json.dumps(result, indent=1) + "\n", "--out")
    return result


def write_text(path, text, flag):
    """atomic_write with one-line errors (a full disk after hours of decoding names the fix)."""
    from ..util import atomic_write

    try:
        atomic_write(path, text)
    except OSError as e:
        raise ToolError(f"cannot write {flag} {path} ({e.strerror or e}); free some space or choose another "
                       f"{flag}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the folder b2t-wmt-prepare wrote (with refs/ and subsets.json)")
    p.add_argument("--checkpoint", required=True, help="e.g. the output of b2t-average-checkpoints")
    p.add_argument("--out", required=True, help="result JSON file")
    p.add_argument("--name", help="run name in the table (default: the checkpoint's folder name)")
    p.add_argument("--years", type=int, nargs="+", choices=YEARS)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--lenpen-test", type=float, default=0.6, help=f"length penalty on newstest{TEST_YEAR}")
    p.add_argument("--lenpen-other", type=float, default=1.0, help="length penalty on the other years")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--fp16", action="store_true",
                   help="decode in fp16 on a GPU (default: fp32, as the authors; the JSON records which)")
    p.add_argument("--generate-args", help="more fairseq generation flags, one string (e.g. '--max-len-b 50')")
    p.add_argument("--keep-outputs", help="also write the translations (tokenized and detokenized) here")
    p.add_argument("--skip-if-current", action="store_true",
                   help="keep an existing --out built from the same checkpoint content, data and settings")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.cpu:
        import torch

        args.cpu = not torch.cuda.is_available()
    return run_command(PROG, evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
