"""The Hydra configs in ``configs/``, generated from the recipe (``recipe.py``, via ``wmt/train.py``).

One YAML per layer type and depth (6 and 18 layers per stack): the command that
``scripts/train.sh FAMILY LAYERS --gpus 8 --dry-run`` prints, written as fairseq's Hydra sections.
The committed files are the output of this module; ``tests/test_wmt_configs.py`` checks that they still are.
``--write``/``--check`` also cover the language-model configs ``lm_*.yaml`` (``b2t_tools/lm/configs.py``).

    python -m b2t_tools.wmt.configs --write configs/    # regenerate all of them
    python -m b2t_tools.wmt.configs --check configs/    # exit 2 if a file differs or is missing
"""

import argparse
import sys
from pathlib import Path

from b2t_fairseq import layer_types, recipe

from ..commands import run_command
from ..errors import ToolError
from ..lm import configs as lm_configs
from ..util import atomic_write
from . import train

PROG = "b2t_tools.wmt.configs"
DEPTHS = (6, 18)
GPUS = 8
SECTIONS = ("common", "checkpoint", "task", "dataset", "distributed_training", "criterion", "optimization",
            "optimizer", "lr_scheduler", "model")
# fairseq flag -> (Hydra section, key, how the value is written). Every flag of the recipe must be here.
FLAG_KEYS = {
    "--arch": ("model", "_name", "plain"),
    "--share-all-embeddings": ("model", "share_all_embeddings", "switch"),
    "--dropout": ("model", "dropout", "plain"),
    "--word-dropout-src": ("model", "word_dropout_src", "plain"),
    "--word-dropout-tgt": ("model", "word_dropout_tgt", "plain"),
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
    "--seed": ("common", "seed", "plain"),
    "--max-tokens": ("dataset", "max_tokens", "plain"),
}
# the order of keys inside a section (keys not listed come after, in the recipe's order)
KEY_ORDER = {
    "common": ("fp16", "log_format", "log_interval", "seed"),
    "checkpoint": ("save_dir", "keep_last_epochs"),
    "optimization": ("max_update", "lr", "update_freq", "clip_norm"),
    "optimizer": ("_name", "adam_betas", "weight_decay"),
    "model": ("_name", "share_all_embeddings", "dropout", "word_dropout_src", "word_dropout_tgt"),
}


def settings():
    """(family, layers) of every config: the five layer types at 6 and 18 layers."""
    return [(family, n) for family in train.ARCH_FAMILIES for n in DEPTHS]


def file_name(family, layers):
    return f"{family}_{layers}l.yaml"


def _value(value, kind):
    if kind == "switch":
        return "true"
    if kind == "quoted":
        return f'"{value}"'
    if kind == "list":
        return f"[{value}]"
    return str(value)


def sections(family, layers):
    """{section: {key: YAML value text}} for one config."""
    args = train.parse_args([family, str(layers), "--gpus", str(GPUS), "--max-tokens", str(recipe.MAX_TOKENS)])
    out = {s: {} for s in SECTIONS}
    out["common"].update(fp16="true", log_format="json", log_interval="100")
    out["checkpoint"]["save_dir"] = "checkpoints/wmt16_en_de/" + Path(file_name(family, layers)).stem
    out["task"].update(_name="translation", data=train.DEFAULT_DATA)
    out["distributed_training"]["distributed_world_size"] = str(GPUS)
    for flag, value in train.fairseq_flags(args, GPUS):
        if flag not in FLAG_KEYS:
            raise ToolError(f"the recipe's flag {flag} has no Hydra key; add it to FLAG_KEYS in {__name__}")
        section, key, kind = FLAG_KEYS[flag]
        out[section][key] = _value(value, kind)
    for section, order in KEY_ORDER.items():
        body = out[section]
        out[section] = {k: body[k] for k in order if k in body} | {k: v for k, v in body.items() if k not in order}
    return out


def header(family, layers):
    kind = next(t for t in layer_types.LAYER_TYPES if t.family == family)
    label = kind.label
    stem = Path(file_name(family, layers)).stem
    lines = [f"# {label} {layers}L-{layers}L on WMT'16 En-De, the authors' hyperparameters for 8 GPUs "
             "(3584 x 8 x 16 = 458,752",
             f"# tokens an update). Kept in step with `scripts/train.sh {family} {layers} --gpus 8 --dry-run` "
             "by tests/test_wmt_configs.py.",
             f"#   b2t-hydra-train --config-dir configs --config-name {stem} task.data=DATA",
             "# On other GPU counts change distributed_training.distributed_world_size and "
             "optimization.update_freq together.",
             "# model._name is the architecture: fairseq runs that architecture's defaults over this section.",
             f"# Generated by `python -m {PROG} --write configs/` from b2t_fairseq/recipe.py: edit the recipe, "
             "not this file."]
    if not kind.in_paper:  # the B2T paper did not train this layer type: say whose recipe
        lines.insert(2, f"# {label} is not in the B2T paper: this is the paper's B2T recipe, unchanged, so that "
                        "the five layer types differ in --ln-position only.")
    return lines


def render(family, layers):
    lines = header(family, layers)
    for section, body in sections(family, layers).items():
        lines.append(f"{section}:")
        lines += [f"  {k}: {v}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def generated():
    """{file name: text} of every config."""
    return {file_name(f, n): render(f, n) for f, n in settings()}


def every_config():
    """{file name: text} of every config in configs/: translation and language model."""
    return generated() | lm_configs.generated()


def differences(folder):
    """File names in folder that are missing or differ from the generated text, and stray YAMLs."""
    folder = Path(folder)
    want = every_config()
    bad = [name for name, text in want.items()
           if not (folder / name).is_file() or (folder / name).read_text() != text]
    stray = sorted(p.name for p in folder.glob("*.yaml") if p.name not in want)
    return bad, stray


def run(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="DIR", help="write every config into DIR")
    g.add_argument("--check", metavar="DIR", help="compare DIR with the generated configs")
    args = p.parse_args(argv)
    if args.write:
        Path(args.write).mkdir(parents=True, exist_ok=True)
        for name, text in every_config().items():
            atomic_write(Path(args.write) / name, text)
        print(f"wrote {len(every_config())} configs to {args.write}")
        return 0
    if not Path(args.check).is_dir():
        raise ToolError(f"{args.check} is not a folder; pass the configs/ folder of the repository")
    bad, stray = differences(args.check)
    if bad or stray:
        what = ([f"missing or different: {', '.join(bad)}"] if bad else []) + \
            ([f"not generated by the recipe: {', '.join(stray)}"] if stray else [])
        raise ToolError(f"{args.check} does not match the recipe ({'; '.join(what)}); run python -m {PROG} "
                       f"--write {args.check} (and delete files the recipe does not make)")
    print(f"{args.check}: all {len(every_config())} configs match the recipe")
    return 0


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
