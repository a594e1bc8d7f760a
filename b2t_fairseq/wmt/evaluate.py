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
"""

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from ..commands import run_command
from ..commands.cli import PLUGIN_DIR
from ..errors import B2TError
from ..util import parse_generate_output, write_json
from . import TEST_YEAR, YEARS

PROG = "b2t-wmt-evaluate"
TOK_LABEL = ("tokenized BLEU: Google's tokenizer.perl tokens (escaped), ##AT## compound splitting "
             "(fairseq compound_split_bleu.sh, multi-bleu style)")
SACRE_LABEL = "SacreBLEU, 13a, case-sensitive, detokenized"


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
    try:
        raw = (refs / f"newstest{year}.de").read_text(encoding="utf-8").split("\n")[:-1]
        tok = (refs / f"newstest{year}.tok.de").read_text(encoding="utf-8").split("\n")[:-1]
    except FileNotFoundError as e:
        raise B2TError(f"reference {e.filename} is missing; run b2t-wmt-prepare (it keeps the references in "
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


def evaluate(args):
    data, ckpt = Path(args.data), Path(args.checkpoint)
    if not ckpt.is_file():
        raise B2TError(f"checkpoint {ckpt} does not exist; train first or pass --checkpoint")
    subsets_file = data / "subsets.json"
    if not subsets_file.exists():
        raise B2TError(f"{subsets_file} is missing; --data must be a folder written by b2t-wmt-prepare")
    subsets = {int(y): s for y, s in json.loads(subsets_file.read_text()).items()}
    years = args.years or list(YEARS)
    result = {"name": args.name or ckpt.parent.name, "checkpoint": str(ckpt), "data": str(data),
              "generate_args": args.generate_args or "",
              "generation": {"beam": args.beam, "lenpen": {str(y): lenpen_for(y, args.lenpen_test, args.lenpen_other)
                                                           for y in years}, "remove_bpe": "subword_nmt (@@ )",
                             "detokenizer": "detokenizer.perl -l de (sacremoses port, parity-tested)",
                             "precision": precision(args)},
              "labels": {"sacrebleu": SACRE_LABEL, "tok_bleu": TOK_LABEL}, "years": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for year in years:
            if year not in subsets:
                raise B2TError(f"newstest{year} is not in {subsets_file}; choose --years from {sorted(subsets)}")
            lp = lenpen_for(year, args.lenpen_test, args.lenpen_other)
            hyps = generate(data, ckpt, subsets[year], lp, args, tmp)
            refs_raw, refs_tok = read_refs(data, year)
            if len(hyps) != len(refs_raw) or len(refs_raw) != len(refs_tok):
                raise B2TError(f"newstest{year}: {len(hyps)} translations for {len(refs_raw)} references; the "
                               "binarized data and DATA/refs disagree: run b2t-wmt-prepare again")
            sacre, tok, signature, detok = score_year(hyps, refs_raw, refs_tok)
            result["years"][str(year)] = {"subset": subsets[year], "lenpen": lp, "sentences": len(hyps),
                                          "sacrebleu": round(sacre.score, 2), "tok_bleu": round(tok.score, 2)}
            result["sacrebleu_signature"] = str(signature)
            print(f"newstest{year} ({subsets[year]}, lenpen {lp}): SacreBLEU {sacre.score:.2f}  "
                  f"tokenized+compound BLEU {tok.score:.2f}", flush=True)
            if args.keep_outputs:
                out = Path(args.keep_outputs)
                out.mkdir(parents=True, exist_ok=True)
                (out / f"newstest{year}.tok.de").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
                (out / f"newstest{year}.de").write_text("".join(h + "\n" for h in detok), encoding="utf-8")
    if set(YEARS) <= {int(y) for y in result["years"]}:
        result["average_2010_2016"] = {k: round(sum(result["years"][str(y)][k] for y in YEARS) / len(YEARS), 2)
                                       for k in ("sacrebleu", "tok_bleu")}
        print(f"average 2010-2016: SacreBLEU {result['average_2010_2016']['sacrebleu']:.2f}  "
              f"tokenized+compound BLEU {result['average_2010_2016']['tok_bleu']:.2f}")
    print(f"SacreBLEU signature: {result.get('sacrebleu_signature')}")
    write_json(args.out, result)
    return result


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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.cpu:
        import torch

        args.cpu = not torch.cuda.is_available()
    return run_command(PROG, evaluate, args)


if __name__ == "__main__":
    sys.exit(main())
