"""What the generated Hydra configs share (``wmt/configs.py`` for translation, ``lm/configs.py`` for LMs):
fairseq's sections, the one table from a fairseq flag to its Hydra key, and how a config is written.

Every flag a recipe passes must be in FLAG_KEYS: a new flag fails the generator until it is given a key.

What a config takes as an override, without Hydra's ``+`` (every key is in the file):
- the GPU count: ``distributed_training.distributed_world_size=N``; ``optimization.update_freq`` is the
  interpolation ``${b2t_update_freq:TOKENS,WORLD,MAX_TOKENS}`` (registered by :func:`register_resolvers`), so it
  follows N and ``dataset.max_tokens`` and keeps the recipe's tokens per update, or refuses in one line;
- the sizes: ``model.encoder_layers``, ``model.encoder_embed_dim``, ... (translation: the decoder's follow the
  encoder's by interpolation unless set too), ``model.decoder_layers``, ``model.decoder_embed_dim``, ... (LMs).
  They are the architecture's own, written out; they win over the defaults of another ``model._name``;
- where the run lives: ``hydra.run.dir`` is ``.`` as in fairseq's own config.yaml, so a relative
  ``checkpoint.save_dir`` is the same folder on every run and the same command resumes it; Hydra's record of
  the run goes to ``SAVE_DIR/.hydra``.
"""

from . import launch

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


RESOLVER = "b2t_update_freq"
# fairseq's own setting (fairseq/config/config.yaml): Hydra runs in the current folder, not outputs/DATE/TIME
HYDRA = ["hydra:", "  run:", "    dir: .", "  output_subdir: ${checkpoint.save_dir}/.hydra"]


def update_freq_value(tokens_per_update):
    """optimization.update_freq's value: the update_freq that keeps tokens_per_update on any GPU count."""
    return (f"['${{{RESOLVER}:{tokens_per_update},${{distributed_training.distributed_world_size}},"
            "${dataset.max_tokens}}']")


def _update_freq(tokens_per_update, world, max_tokens):
    return launch.update_freq(int(tokens_per_update), int(world), int(max_tokens),
                              max_tokens_flag="dataset.max_tokens=", world_flags="GPUs",
                              tokens_flag="the config's tokens per update in optimization.update_freq")


def register_resolvers():
    """Make ${b2t_update_freq:...} resolvable (b2t-hydra-train and the tests call it before Hydra composes)."""
    from omegaconf import OmegaConf

    if hasattr(OmegaConf, "register_new_resolver"):  # omegaconf >= 2.1
        if not OmegaConf.has_resolver(RESOLVER):
            OmegaConf.register_new_resolver(RESOLVER, _update_freq)
    elif OmegaConf.get_resolver(RESOLVER) is None:  # omegaconf 2.0 (fairseq 0.12.2's): arguments come as text
        OmegaConf.register_resolver(RESOLVER, _update_freq)


def sizes(values, follow=()):
    """{key: YAML text} for size keys: values {key: number}, follow {key: key it interpolates}."""
    return {k: str(v) for k, v in values.items()} | {k: f"${{model.{src}}}" for k, src in dict(follow).items()}


def render(header, body):
    lines = list(header)
    for section, keys in body.items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in keys.items()]
    return "\n".join(lines + HYDRA) + "\n"
