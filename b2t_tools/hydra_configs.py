"""What the generated Hydra configs share (``wmt/configs.py`` for translation, ``lm/configs.py`` for LMs):
fairseq's sections, the one table from a fairseq flag to its Hydra key, and how a config is written.

Every flag a recipe passes must be in FLAG_KEYS: a new flag fails the generator until it is given a key.
"""

SECTIONS = ("common", "checkpoint", "task", "dataset", "distributed_training", "criterion", "optimization",
            "optimizer", "lr_scheduler", "model")
# fairseq flag -> (Hydra section, key, how the value is written)
FLAG_KEYS = {
    "--arch": ("model", "_name", "plain"),
    "--share-all-embeddings": ("model", "share_all_embeddings", "switch"),
    "--share-decoder-input-output-embed": ("model", "share_decoder_input_output_embed", "switch"),
    "--dropout": ("model", "dropout", "plain"),
    "--word-dropout-src": ("model", "word_dropout_src", "plain"),
    "--word-dropout-tgt": ("model", "word_dropout_tgt", "plain"),
    "--decoder-layers": ("model", "decoder_layers", "plain"),
    "--optimizer": ("optimizer", "_name", "plain"),
    "--adam-betas": ("optimizer", "adam_betas", "quoted"),
    "--weight-decay": ("optimizer", "weight_decay", "plain"),
    "--clip-norm": ("optimization", "clip_norm", "plain"),
    "--lr": ("optimization", "lr", "list"),
    "--max-update": ("optimization", "max_update", "plain"),
    "--update-freq": ("optimization", "update_freq", "list"),
    "--lr-scheduler": ("lr_scheduler", "_name", "plain"),
    "--warmup-updates": ("lr_scheduler", "warmup_updates", "plain"),
    "--warmup-init-lr": ("lr_scheduler", "warmup_init_lr", "plain"),
    "--criterion": ("criterion", "_name", "plain"),
    "--label-smoothing": ("criterion", "label_smoothing", "plain"),
    "--keep-last-epochs": ("checkpoint", "keep_last_epochs", "plain"),
    "--task": ("task", "_name", "plain"),
    "--tokens-per-sample": ("task", "tokens_per_sample", "plain"),
    "--sample-break-mode": ("task", "sample_break_mode", "plain"),
    "--max-tokens": ("dataset", "max_tokens", "plain"),
    "--seed": ("common", "seed", "plain"),
    "--fp16": ("common", "fp16", "switch"),
    "--distributed-world-size": ("distributed_training", "distributed_world_size", "plain"),
}
# the order of keys inside a section (keys not listed come after, in the recipe's order)
KEY_ORDER = {
    "common": ("fp16", "log_format", "log_interval", "seed"),
    "checkpoint": ("save_dir", "keep_last_epochs"),
    "task": ("_name", "data"),
    "optimization": ("max_update", "lr", "update_freq", "clip_norm"),
    "optimizer": ("_name", "adam_betas", "weight_decay"),
    "model": ("_name", "share_all_embeddings", "share_decoder_input_output_embed", "dropout", "word_dropout_src",
              "word_dropout_tgt", "decoder_layers"),
}


def _value(value, kind):
    if kind == "switch":
        return "true"
    if kind == "quoted":
        return f'"{value}"'
    if kind == "list":
        return f"[{value}]"
    return str(value)


def sections(flags, preset, unknown):
    """{section: {key: YAML value text}}: preset ({section: {key: text}}) and then the (flag, value) pairs;
    unknown(flag) is raised for a flag without a Hydra key."""
    out = {s: dict(preset.get(s, {})) for s in SECTIONS}
    for flag, value in flags:
        if flag not in FLAG_KEYS:
            raise unknown(flag)
        section, key, kind = FLAG_KEYS[flag]
        out[section][key] = _value(value, kind)
    for section, order in KEY_ORDER.items():
        body = out[section]
        out[section] = {k: body[k] for k in order if k in body} | {k: v for k, v in body.items() if k not in order}
    return out


def render(header, body):
    lines = list(header)
    for section, keys in body.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"
