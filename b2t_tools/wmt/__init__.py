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
