"""Repair: a B2T, DeepNorm or Admin checkpoint is refused by a model of another layer type, and a
checkpoint that does not fit the model is one line naming the difference.

The parameter names of all five layer types are the same, so such weights would load silently and
run as the wrong model. (A Post-LN checkpoint may still initialize another layer type, e.g. to
fine-tune it as B2T.) The checkpoint's layer type comes with its weights (context.Origin, attached
by checkpoint_load.py); weights from anywhere else are not judged.
Relies on: ``fairseq.models.fairseq_model.BaseFairseqModel.load_state_dict(self, state_dict, strict=True,
model_cfg=None, args=None)`` getting the dict ``load_checkpoint_to_cpu`` returned under "model", and
torch's "Error(s) in loading state_dict" RuntimeError text.
"""

import functools
import re

from .. import layer_types
from ..errors import B2TError
from . import context


def check_layer_type(model, origin):
    if origin is None or origin.layer_type not in layer_types.OWN_LAYERS:
        return
    ckpt_type, model_type = origin.layer_type, layer_types.of_model(model)
    if model_type in (None, ckpt_type):
        return
    fix = ("pass --arch transformer_b2t (or the authors' --arch transformer_wmt_en_de "
           "--residual-bottom-to-top with b2t-train), and convert a checkpoint of the authors' fork "
           "once with b2t-import-checkpoint IN.pt OUT.pt") if ckpt_type == "b2t" else \
        f"pass --arch transformer_{ckpt_type} (or --ln-position {ckpt_type})"
    raise B2TError(f"{origin.where} holds a {layer_types.BY_KEY[ckpt_type].label} model but the model built "
                   f"from the command line is {layer_types.BY_KEY[model_type].label}, so it would run as the "
                   f"wrong model; {fix}")


def _guard(load_state_dict):
    @functools.wraps(load_state_dict)
    def guarded_load_state_dict(self, state_dict, *args, **kwargs):
        origin = context.origin_of(state_dict)
        check_layer_type(self, origin)
        try:
            return load_state_dict(self, state_dict, *args, **kwargs)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            where = origin.where if origin else "the checkpoint"
            raise B2TError(f"{where} does not fit the model built from the command line "
                           f"({state_dict_mismatch(self, state_dict, str(e))}); pass the model flags of the run "
                           "that wrote it (--arch, --encoder-layers, --decoder-layers, the embedding sizes), or "
                           "start afresh in another --save-dir") from e

    guarded_load_state_dict.b2t_layer_guard = True
    return guarded_load_state_dict


def _layer_counts(keys):
    counts = {}
    for k in keys:
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.", k)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def _sizes(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def state_dict_mismatch(model, state_dict, msg):
    """A short account of why a state dict does not load into a model."""
    have, want = _layer_counts(state_dict), _layer_counts(model.state_dict())
    if have != want:
        fmt = lambda c: " and ".join(f"{c.get(p, 0)} {p} layers" for p in ("encoder", "decoder"))  # noqa: E731
        return f"it has {fmt(have)}, the model {fmt(want)}"
    m = re.search(r"size mismatch for (\S+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from checkpoint, "
                  r"the shape in current model is (torch.Size\(\[[^\]]*\]\))", msg)
    if m:
        return f"{m.group(1)} is {list(_sizes(m.group(2)))} in it, {list(_sizes(m.group(3)))} in the model"
    missing = re.findall(r'"([^"]+)"', msg.split("Missing key(s) in state_dict:", 1)[-1].split("Unexpected", 1)[0]) \
        if "Missing key(s)" in msg else []
    unexpected = re.findall(r'"([^"]+)"', msg.split("Unexpected key(s) in state_dict:", 1)[-1].split("size mismatch", 1)[0]) \
        if "Unexpected key(s)" in msg else []
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights of the model missing from it, such as {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights the model lacks, such as {unexpected[0]}")
    return ", ".join(parts) or " ".join(msg.split())[:200]


def install():
    from fairseq.models.fairseq_model import BaseFairseqModel

    if not getattr(BaseFairseqModel.load_state_dict, "b2t_layer_guard", False):
        BaseFairseqModel.load_state_dict = _guard(BaseFairseqModel.load_state_dict)
