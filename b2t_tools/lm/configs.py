"""The language-model Hydra configs ``configs/lm_<type>_<depth>l.yaml``, generated from the LM recipe.

One YAML per layer type and depth (``recipe.LM_DEPTHS``): the command ``b2t-lm-train DATA --arch ARCH
--layers N --gpus 2 --dry-run`` prints (fairseq's WikiText-103 setup: 2 GPUs x 2048 tokens x 16), written as
fairseq's Hydra sections. ``python -m b2t_tools.wmt.configs --write/--check configs/`` writes and checks
these together with the translation configs; ``tests/test_lm_configs.py`` checks the committed files.
"""

from pathlib import Path

from b2t_fairseq import layer_types, recipe

from ..errors import ToolError
from . import prepare, train

GPUS = 2
DATA = prepare.parse_args([]).dest  # b2t-lm-prepare's default output
SECTIONS = ("common", "checkpoint", "task", "dataset", "distributed_training", "criterion", "optimization",
            "optimizer", "lr_scheduler", "model")
# fairseq flag -> (Hydra section, key, how the value is written). Every flag of the LM recipe must be here.
FLAG_KEYS = {
    "--arch": ("model", "_name", "plain"),
    "--share-decoder-input-output-embed": ("model", "share_decoder_input_output_embed", "switch"),
    "--dropout": ("model", "dropout", "plain"),
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
    "--task": ("task", "_name", "plain"),
    "--tokens-per-sample": ("task", "tokens_per_sample", "plain"),
    "--sample-break-mode": ("task", "sample_break_mode", "plain"),
    "--max-tokens": ("dataset", "max_tokens", "plain"),
    "--seed": ("common", "seed", "plain"),
    "--fp16": ("common", "fp16", "switch"),
    "--distributed-world-size": ("distributed_training", "distributed_world_size", "plain"),
}
NOT_FLAGS = {"--save-dir"}  # written from the file name instead
KEY_ORDER = {
    "common": ("fp16", "log_format", "log_interval", "seed"),
    "task": ("_name", "data"),
    "optimization": ("max_update", "lr", "update_freq", "clip_norm"),
    "optimizer": ("_name", "adam_betas", "weight_decay"),
    "model": ("_name", "share_decoder_input_output_embed", "dropout", "decoder_layers"),
}


def settings():
    """(architecture, layers) of every config: the five layer types at the recipe's two depths."""
    return [(t.lm_family, n) for t in layer_types.LAYER_TYPES for n in recipe.LM_DEPTHS]


def _type(arch):
    return next(t for t in layer_types.LAYER_TYPES if t.lm_family == arch)


def file_name(arch, layers):
    return f"lm_{_type(arch).short}_{layers}l.yaml"


def argv_flags(argv):
    """b2t-lm-train's command (after DATA) as (flag, value or None) pairs, in order."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append((flag, argv[i + 1]))
            i += 2
        else:
            out.append((flag, None))
            i += 1
    return out


def _value(value, kind):
    if kind == "switch":
        return "true"
    if kind == "quoted":
        return f'"{value}"'
    if kind == "list":
        return f"[{value}]"
    return str(value)


def sections(arch, layers):
    """{section: {key: YAML value text}} for one config."""
    argv = train.command(DATA, arch, layers, "SAVE", gpus=GPUS)[2:]  # after the program and DATA
    out = {s: {} for s in SECTIONS}
    out["common"].update(log_format="json", log_interval="100")
    out["checkpoint"]["save_dir"] = "checkpoints/lm/" + Path(file_name(arch, layers)).stem
    out["task"]["data"] = DATA
    out["criterion"]["_name"] = "cross_entropy"  # fairseq-train's default criterion, which the recipe uses
    for flag, value in argv_flags(argv):
        if flag in NOT_FLAGS:
            continue
        if flag not in FLAG_KEYS:
            raise ToolError(f"the LM recipe's flag {flag} has no Hydra key; add it to FLAG_KEYS in {__name__}")
        section, key, kind = FLAG_KEYS[flag]
        out[section][key] = _value(value, kind)
    for section, order in KEY_ORDER.items():
        body = out[section]
        out[section] = {k: body[k] for k in order if k in body} | {k: v for k, v in body.items() if k not in order}
    return out


def header(arch, layers):
    label = _type(arch).label
    stem = Path(file_name(arch, layers)).stem
    per_update = recipe.LM_TOKENS_PER_UPDATE
    return [f"# {label} language model, {layers} layers, on WikiText-103: fairseq's examples/language_model recipe "
            f"for {GPUS} GPUs",
            f"# ({recipe.LM_MAX_TOKENS} x {GPUS} x {per_update // (GPUS * recipe.LM_MAX_TOKENS)} = {per_update:,} "
            f"tokens an update). Kept in step with `b2t-lm-train DATA --arch {arch} --layers {layers} "
            f"--gpus {GPUS} --dry-run`",
            "# by tests/test_lm_configs.py.",
            f"#   b2t-hydra-train --config-dir configs --config-name {stem} task.data=DATA",
            "# On other GPU counts change distributed_training.distributed_world_size and "
            "optimization.update_freq together.",
            "# Generated by `python -m b2t_tools.wmt.configs --write configs/` from b2t_fairseq/recipe.py: "
            "edit the recipe, not this file."]


def render(arch, layers):
    lines = header(arch, layers)
    for section, body in sections(arch, layers).items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def generated():
    """{file name: text} of every LM config."""
    return {file_name(a, n): render(a, n) for a, n in settings()}
