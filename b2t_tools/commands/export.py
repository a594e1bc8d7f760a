"""``b2t-export IN.pt OUT.pt``: a plugin Post-LN or Pre-LN checkpoint as a stock fairseq one.

A Post-LN or Pre-LN model trained with the plugin (``transformer_b2t`` / ``transformer_lm_b2t`` and
their named architectures, ``--ln-position post|pre``) uses fairseq's own layers and parameter names.
The export rewrites only its configuration: the model becomes fairseq's ``transformer`` (translation)
or ``transformer_lm`` (language model) with the same sizes and ``*_normalize_before`` set from the
layer type, the plugin-only arguments are removed, and ``common.user_dir`` is cleared, so that stock
fairseq (``fairseq-generate``, ``fairseq-eval-lm``, ``from_pretrained``) loads it without
``--user-dir`` and computes the same outputs. Every weight is kept bit for bit.

B2T, DeepNorm and Admin layers do not exist in stock fairseq: those checkpoints are refused in one
line (run them with the plugin: ``--user-dir b2t_fairseq`` or ``from_pretrained(..., user_dir=...)``).
"""

import argparse
import copy
import os
import sys

from ..checkpoints import read_checkpoint, write_checkpoint
from ..errors import ToolError
from ..util import check_writable
from . import run_command

PROG = "b2t-export"
EXPORTABLE = ("post", "pre")


def _dests(add_args):
    parser = argparse.ArgumentParser(add_help=False)
    add_args(parser)
    return {a.dest for a in parser._actions}


def plugin_only_translation_args():
    """The arguments transformer_b2t adds to fairseq's transformer (from the two parsers, so a new flag
    is never left behind)."""
    from fairseq.models.transformer import TransformerModel

    from b2t_fairseq.transformer_b2t import TransformerB2TModel

    return (_dests(TransformerB2TModel.add_args) - _dests(TransformerModel.add_args)) | {"b2t_imported_from"}


def stock_lm_fields():
    """The fields of fairseq's transformer_lm config: an exported LM config keeps only these (fairseq
    merges a checkpoint's model config into this dataclass and refuses unknown keys)."""
    from dataclasses import fields

    from fairseq.models.transformer_lm import TransformerLanguageModelConfig

    return {f.name for f in fields(TransformerLanguageModelConfig)} | {"_name"}


def _kind(name):
    """'mt' or 'lm' for a plugin model or architecture name, else None."""
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    from b2t_fairseq.transformer_b2t import TransformerB2TModel
    from b2t_fairseq.transformer_lm_b2t import TransformerLMB2TModel

    cls = ARCH_MODEL_REGISTRY.get(name) or MODEL_REGISTRY.get(name)
    if isinstance(cls, type) and issubclass(cls, TransformerB2TModel):
        return "mt"
    if isinstance(cls, type) and issubclass(cls, TransformerLMB2TModel):
        return "lm"
    return None


def _get(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def layer_type(model_cfg, kind):
    """The layer type the plugin builds from this saved model config (what training built)."""
    from b2t_fairseq.transformer_b2t import resolve_layer_type

    args = argparse.Namespace(**(dict(model_cfg) if isinstance(model_cfg, dict) else vars(model_cfg)))
    args = copy.deepcopy(args)
    if kind == "lm" and getattr(args, "ln_position", None) is None:
        args.ln_position = "b2t"  # transformer_lm_b2t's own default (TransformerLMB2TConfig)
    return resolve_layer_type(args)


def plain(obj):
    """``obj`` with argparse.Namespace as dict and numpy scalars as Python numbers: torch >= 2.6 loads with
    ``weights_only=True`` by default and refuses both, and stock fairseq does not allow them (the plugin's
    patches/torch_load.py does)."""
    import numpy as np

    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def export_state(state, src):
    """The stock fairseq checkpoint dict for a plugin Post-LN/Pre-LN checkpoint dict (ToolError otherwise)."""
    from b2t_fairseq.layer_types import BY_KEY

    cfg = state.get("cfg")
    model_cfg = _get(cfg, "model") if cfg is not None else None
    if model_cfg is None:
        raise ToolError(f"{src} has no fairseq 0.10+ model config (cfg.model); export a checkpoint saved by "
                        "b2t-train or fairseq-train --user-dir b2t_fairseq (an authors' fork checkpoint: "
                        "b2t-import-checkpoint first)")
    name = _get(model_cfg, "_name") or _get(model_cfg, "arch")
    kind = _kind(name)
    if kind is None:
        raise ToolError(f"{src} is not a b2t_fairseq model (arch {name}); a stock fairseq checkpoint needs no "
                        "export: use it as it is")
    ln = layer_type(model_cfg, kind)
    if ln not in EXPORTABLE:
        raise ToolError(f"{src} is a {BY_KEY[ln].label} model (ln_position {ln}), whose layers stock fairseq "
                        "does not have; only Post-LN and Pre-LN models export: run this one with the plugin "
                        "(--user-dir b2t_fairseq, or from_pretrained(..., user_dir=...))")
    pre = ln == "pre"
    if kind == "mt":
        drop = plugin_only_translation_args()
        items = {k: v for k, v in (model_cfg.items() if isinstance(model_cfg, dict) else vars(model_cfg).items())
                 if k not in drop}
        items.update(_name="transformer", arch="transformer", encoder_normalize_before=pre,
                     decoder_normalize_before=pre)
    else:
        keep = stock_lm_fields()
        items = {k: v for k, v in (model_cfg.items() if isinstance(model_cfg, dict) else vars(model_cfg).items())
                 if k in keep}
        # the model's name, not a named architecture: fairseq's named LM architectures force Pre-LN
        items.update(_name="transformer_lm", decoder_normalize_before=pre)
    new = {k: v for k, v in state.items() if k not in ("cfg", "args")}
    new["args"] = None  # a pre-0.10 style copy of the flags: stock fairseq reads cfg when it has one
    # plain dicts throughout: a legacy model's config as a dict is what a hydra-era checkpoint holds
    new["cfg"] = plain({**(dict(cfg) if isinstance(cfg, dict) else vars(cfg)), "model": items})
    if new["cfg"].get("common", {}).get("user_dir"):
        new["cfg"]["common"]["user_dir"] = None  # stock fairseq would import the plugin from it
    for key in ("extra_state", "optimizer_history"):
        if key in new:
            new[key] = plain(new[key])
    return new, kind, ln


def check_weights_only(state, src):
    """The exported state must load with torch's weights-only loader without the plugin's allowances."""
    import io
    import pickle

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        with torch.serialization.safe_globals([]):
            torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = str(e).split("Unsupported global: ")[-1].split(" was not")[0][:200]
        raise ToolError(f"{src} holds an object stock fairseq cannot load ({found}); please report it, with the "
                        "command that trained the checkpoint") from None


def check_output(src, dst):
    """OUT.pt may not be IN.pt (the plugin checkpoint would be lost) and must be writable: checked before reading."""
    same = os.path.isfile(src) and os.path.isfile(dst) and os.path.samefile(src, dst)
    if same or os.path.realpath(src) == os.path.realpath(dst):
        raise ToolError(f"OUT.pt {dst} is IN.pt: the export would overwrite the plugin checkpoint; write the "
                        "stock checkpoint to another file")
    check_writable(dst, "OUT.pt")


def export_file(src, dst):
    check_output(src, dst)
    state = read_checkpoint(src, "pass a checkpoint saved by b2t-train or fairseq-train --user-dir b2t_fairseq",
                            flag="IN.pt")
    new, kind, ln = export_state(state, src)
    check_weights_only(new, src)
    write_checkpoint(new, dst, "OUT.pt")  # atomic: Ctrl-C or a full disk leaves OUT.pt as it was
    return new, kind, ln


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("input", metavar="IN.pt", help="a Post-LN or Pre-LN checkpoint of transformer_b2t or "
                                                 "transformer_lm_b2t")
    p.add_argument("output", metavar="OUT.pt", help="where to write the stock transformer / transformer_lm checkpoint")
    return p.parse_args(argv)


def run(argv):
    args = parse_args(argv)
    new, kind, ln = export_file(args.input, args.output)
    m = new["cfg"]["model"]
    depth = (f"{_get(m, 'encoder_layers')}+{_get(m, 'decoder_layers')} layers" if kind == "mt"
             else f"{_get(m, 'decoder_layers')} layers")
    arch = "transformer" if kind == "mt" else "transformer_lm"
    print(f"{args.input} -> {args.output}: arch {arch}, {'Pre-LN' if ln == 'pre' else 'Post-LN'}, {depth}; "
          "loads in stock fairseq without --user-dir")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
