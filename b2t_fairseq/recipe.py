"""The paper's training recipe: the single source of every hyperparameter the project uses.

Read by the named architectures (``transformer_b2t.py``), the WMT launcher (``scripts/train.sh``),
the demo, the benchmark and the GPU script; the Hydra configs in ``configs/`` are generated from
it (``python -m b2t_tools.wmt.configs --write configs/``) and ``tests/test_wmt_configs.py`` checks that
the committed files are exactly that output. Source: the authors' 2023 command (their README's 18-layer WMT command).
"""

DEEP = 18  # from this depth on, the paper's deep regularization applies


def regularization(layers):
    """Dropout and word dropout by depth: 0.3 at 6 layers; 0.5 plus word dropout 0.1 at 18."""
    deep = layers >= DEEP
    return {"dropout": 0.5 if deep else 0.3,
            "word_dropout_src": 0.1 if deep else 0.0,
            "word_dropout_tgt": 0.1 if deep else 0.0}


# optimizer, schedule and criterion, as fairseq flags (everything but the depth-dependent part)
OPTIMIZATION = [
    ("--share-all-embeddings", None),
    ("--optimizer", "adam"), ("--adam-betas", "(0.9, 0.98)"), ("--clip-norm", "0.1"),
    ("--lr", "0.001"), ("--lr-scheduler", "inverse_sqrt"), ("--warmup-updates", "4000"),
    ("--warmup-init-lr", "1e-07"), ("--weight-decay", "0.0"),
    ("--criterion", "label_smoothed_cross_entropy"), ("--label-smoothing", "0.1"),
]

MAX_TOKENS = 3584
TOKENS_PER_UPDATE = MAX_TOKENS * 8 * 16  # 458,752: the authors' 8-GPU batch, kept fixed on other setups


def max_update(layers):
    return 25000 if layers >= 100 else 50000


def wmt_flags(layers):
    """The authors' 2023 WMT command for this depth, as (flag, value) pairs (value None: a switch)."""
    reg = regularization(layers)
    hp = list(OPTIMIZATION) + [("--max-update", str(max_update(layers))), ("--keep-last-epochs", "10"),
                               ("--seed", "1"), ("--dropout", str(reg["dropout"]))]
    if reg["word_dropout_src"]:
        hp += [("--word-dropout-src", str(reg["word_dropout_src"])),
               ("--word-dropout-tgt", str(reg["word_dropout_tgt"]))]
    return hp


def flags_to_argv(pairs):
    return [x for f, v in pairs for x in ((f,) if v is None else (f, v))]


def optimizer_argv(lr=None, warmup=None):
    """OPTIMIZATION as argv, with the demo's or benchmark's own learning rate and warmup if given."""
    out = dict((f, v) for f, v in OPTIMIZATION)
    if lr is not None:
        out["--lr"] = str(lr)
    if warmup is not None:
        out["--warmup-updates"] = str(warmup)
    return flags_to_argv(out.items())


# the CPU-sized models of the tests, the demo and `_tiny` architectures
TINY = {"embed_dim": 64, "ffn_embed_dim": 128, "attention_heads": 4, "layers": 2, "dropout": 0.1}



# --- decoder-only language models (transformer_lm_b2t.py, b2t_tools/lm) -------------------------
# The paper reports no language-model runs, so the LM recipe is fairseq's own WikiText-103 recipe
# (fairseq examples/language_model/README.md, "Train a language model"): transformer_lm
# (6 x 512, ffn 2048, 8 heads), shared input/output embeddings, Adam, inverse_sqrt.

LM_DEEP = 16  # the deep setting: the depth of fairseq's transformer_lm_wiki103 (Baevski & Auli 2019)
LM_DEPTHS = (6, LM_DEEP)

LM_OPTIMIZATION = [
    ("--share-decoder-input-output-embed", None), ("--dropout", "0.1"),
    ("--optimizer", "adam"), ("--adam-betas", "(0.9, 0.98)"), ("--weight-decay", "0.01"), ("--clip-norm", "0.0"),
    ("--lr", "0.0005"), ("--lr-scheduler", "inverse_sqrt"), ("--warmup-updates", "4000"),
    ("--warmup-init-lr", "1e-07"),
]
LM_TOKENS_PER_SAMPLE = 512
LM_MAX_TOKENS = 2048
LM_TOKENS_PER_UPDATE = LM_MAX_TOKENS * 2 * 16  # fairseq's README: 2 GPUs x --update-freq 16
LM_MAX_UPDATE = 50000
# evaluation, fairseq's README: each scored token sees 400 tokens of context within 512-token windows
LM_EVAL = [("--batch-size", "2"), ("--tokens-per-sample", str(LM_TOKENS_PER_SAMPLE)), ("--context-window", "400")]
# published perplexity for the 6-layer recipe: fairseq examples/language_model/README.md (test, fairseq-eval-lm
# with LM_EVAL); no published number for 16 layers at this width, nor for any B2T language model.
# Published when transformer_lm was Pre-LN (fairseq commit 0790c0cf: base_lm_architecture forces
# decoder_normalize_before = True, as the installed fairseq 0.12 still does): a Pre-LN number.
LM_PUBLISHED = {6: {"layer_type": "Pre-LN", "test_ppl": 30.46,
                    "source": "fairseq examples/language_model/README.md",
                    "note": "Pre-LN: transformer_lm when it was published (fairseq commit 0790c0cf)"}}


def lm_flags(layers):
    """The WikiText-103 training flags for this depth (the layer type comes from --arch)."""
    return list(LM_OPTIMIZATION) + [
        ("--task", "language_modeling"), ("--tokens-per-sample", str(LM_TOKENS_PER_SAMPLE)),
        ("--sample-break-mode", "none"), ("--max-tokens", str(LM_MAX_TOKENS)),
        ("--max-update", str(LM_MAX_UPDATE)), ("--decoder-layers", str(layers)), ("--seed", "1")]


# the CPU-sized language models of the tests and the demo (`transformer_lm_*_tiny`)
LM_TINY = {"decoder_embed_dim": 64, "decoder_ffn_embed_dim": 128, "decoder_attention_heads": 4,
           "decoder_layers": 2, "dropout": 0.1}
