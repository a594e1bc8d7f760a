"""``b2t-demo``: the paper's comparison in miniature on Tatoeba English-German (see cli.py).

data.py    the corpus: find or download, split, sentencepiece, binarize (cached, keyed)
runs.py    one run: b2t-train in a subprocess, its log, translation and scoring
report.py  results.json/md, plots, grad norms, index.md
cli.py     the command line and the pool of runs
children.py  the child processes: their own process groups, dying with the demo
"""
