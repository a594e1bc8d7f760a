"""WMT'16 English-German recipes: prepare the data, launch training, evaluate, tabulate.

prepare.py        download, verify, extract, tokenize, clean, BPE, binarize (stage-resumable)
train.py          the paper's hyperparameters and the launch command for 1..N GPUs, nodes or CPU procs
evaluate.py       generate every newstest year, score with sacreBLEU and tokenized BLEU, one JSON per run
results_table.py  all runs as a markdown table beside the paper's numbers
"""

YEARS = (2010, 2011, 2012, 2013, 2014, 2015, 2016)
VALID_YEAR = 2013
TEST_YEAR = 2014
BPE_MERGES = 32000

# fairseq-generate flags that b2t-wmt-evaluate sets and records itself: in --generate-args they would decode
# with other values than the result records (fairseq's parser takes no abbreviations, so names are exact).
# flag -> how to ask for it instead
RECORDED_GENERATE_FLAGS = {
    "--path": "--checkpoint", "--beam": "--beam", "--lenpen": "--lenpen-test / --lenpen-other",
    "--gen-subset": "--years", "--max-tokens": "--max-tokens", "--cpu": "--cpu", "--fp16": "--fp16",
    "--memory-efficient-fp16": "--fp16", "--bf16": "--fp16 (bf16 is not offered)",
    "--memory-efficient-bf16": "--fp16 (bf16 is not offered)", "--amp": "--fp16",
    "--source-lang": "nothing (the recipe is en-de)", "-s": "nothing (the recipe is en-de)",
    "--target-lang": "nothing (the recipe is en-de)", "-t": "nothing (the recipe is en-de)",
    "--remove-bpe": "nothing (BPE is always removed)", "--post-process": "nothing (BPE is always removed)",
    "--results-path": "--keep-outputs", "--user-dir": "nothing (the plugin is loaded)",
    "--nbest": "nothing (one translation a sentence is scored)", "--score-reference": "nothing",
    "--required-batch-size-multiple": "nothing (1, so that no sentence is left out)",
}


def recorded_overrides(tokens):
    """The RECORDED_GENERATE_FLAGS among split --generate-args tokens (also as --flag=value and -sVALUE)."""
    out = []
    for tok in tokens:
        name = tok.split("=", 1)[0]
        if not name.startswith("--") and name[:2] in ("-s", "-t"):
            name = name[:2]
        if name in RECORDED_GENERATE_FLAGS and name not in out:
            out.append(name)
    return out
