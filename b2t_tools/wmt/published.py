"""Published WMT En-De numbers for DeepNorm and Admin, each with its source and setting.

None of these settings is the B2T paper's (WMT'16 Google data, SacreBLEU over newstest2010-2016):
show them beside our runs only with their labels, never as a like-for-like baseline.

Rule for this module: a number goes into ``PUBLISHED`` only when it could be read in its source
during this work. ``PAPER_TABLES_NOT_CONFIRMED`` names the paper tables that hold relevant numbers
which could NOT be read here (the papers' PDFs were not reachable); their numbers are left out on
purpose rather than typed from memory. Fill them in from the PDFs, with the table number.
"""

# Each entry: label -> dict(source, setting, metric, bleu). bleu maps a depth ("6L-6L") to a BLEU
# score on the single test set named in ``setting``.
PUBLISHED = {
    "Admin (admin-torch), O(logn), trainable omega": {
        "source": "microsoft/admin-torch, example/README.md, tables 'Pre-trained Weights' and "
                  "'Discussion on admin-torch settings' (a repository README, not a paper table)",
        "setting": "WMT'14 En-De (fairseq / Transformer-Clinic preprocessing, joined dictionary), "
                   "transformer_wmt_en_de sizes, newstest2014, average of 10 epoch checkpoints, beam 4, "
                   "lenpen 0.6; admin-torch's example/train_wmt_en-de.sh",
        "metric": "BLEU printed by fairseq-generate --remove-bpe (tokenized, no compound splitting)",
        "bleu": {"6L-6L": 27.84, "18L-18L": 28.91},
    },
    "Admin (admin-torch), O(logn), fixed omega": {
        "source": "microsoft/admin-torch, example/README.md, table 'Discussion on admin-torch settings'",
        "setting": "as above",
        "metric": "as above",
        "bleu": {"6L-6L": 27.83, "18L-18L": 28.78},
    },
    "Admin (admin-torch), O(1), trainable omega": {
        "source": "microsoft/admin-torch, example/README.md, table 'Discussion on admin-torch settings'",
        "setting": "as above",
        "metric": "as above",
        "bleu": {"6L-6L": 27.79, "18L-18L": 28.89},
    },
    "Admin (admin-torch), O(1), fixed omega": {
        "source": "microsoft/admin-torch, example/README.md, table 'Discussion on admin-torch settings'",
        "setting": "as above",
        "metric": "as above",
        "bleu": {"6L-6L": 27.71, "18L-18L": 28.66},
    },
}

# What our flags reproduce: --ln-position admin with the defaults is the first entry's setting
# (O(logn), trainable); --admin-omega fixed and --admin-output-change-scale O(1) select the others.
FLAGS = {
    "Admin (admin-torch), O(logn), trainable omega": "--ln-position admin",
    "Admin (admin-torch), O(logn), fixed omega": "--ln-position admin --admin-omega fixed",
    "Admin (admin-torch), O(1), trainable omega": "--ln-position admin --admin-output-change-scale 'O(1)'",
    "Admin (admin-torch), O(1), fixed omega":
        "--ln-position admin --admin-omega fixed --admin-output-change-scale 'O(1)'",
}

PAPER_TABLES_NOT_CONFIRMED = (
    "Liu et al. 2020 (EMNLP), 'Understanding the Difficulty of Training Transformers', the WMT'14 En-De "
    "table: Post-LN, Pre-LN and Admin (profiled omega, the two-stage variant this plugin does not build) "
    "at 6L-6L and 18L-18L.",
    "Wang et al. 2022, 'DeepNet: Scaling Transformers to 1,000 Layers', the WMT-17 En-De table: "
    "vanilla Post-LN, Pre-LN, Admin, DeepNet and others at 6L-6L, 18L-18L, 50L-50L, 100L-100L.",
    "Takase et al. 2023 (Findings of ACL), the B2T paper: whether its WMT En-De tables include DeepNet "
    "or Admin rows in its own setting (SacreBLEU, newstest2010-2016) was not confirmed.",
    "microsoft/admin-torch example/README.md: 100L-100L 29.65 (huge batch, 40 epochs only) was read "
    "but is left out: a different batch setting and an unfinished schedule.",
)
