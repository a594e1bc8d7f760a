"""Repair: a loaded encoder runs its layers' own ``forward`` in eval mode (upstream fairseq 0.12.2 only).

fairseq 0.12.2 switches a Post-LN encoder to torch's fused "BetterTransformer" path
(``torch._transformer_encoder_layer_fwd`` on nested tensors) once its weights were loaded from a
checkpoint and the model is in eval mode. That path reimplements a stock Post-LN layer and never calls
the layer's ``forward``: B2T and Admin layers crash, DeepNorm silently runs as Post-LN, and stock
Post-LN crashes on padded batches (fairseq issues #4858, #4899). Later fairseq (fairseq-fixed) removed
the path; there this patch finds nothing to change and does nothing.
Relies on: 0.12.2's ``TransformerEncoderLayerBase._load_from_state_dict`` setting ``self.load_to_BT``,
the flag that both the layer's and the encoder's ``forward`` require before taking the path.
"""

import functools


def has_fast_path(layer_cls):
    """Whether this fairseq's encoder layer class has 0.12.2's fast-path switch (its own state-dict loader
    that sets ``load_to_BT``)."""
    own = layer_cls.__dict__.get("_load_from_state_dict")
    own = getattr(own, "__wrapped__", own)
    return own is not None and "load_to_BT" in getattr(own, "__code__", None).co_names


def repair(layer_cls):
    """Keep ``load_to_BT`` False after a state dict is loaded into ``layer_cls`` (or a subclass)."""
    loads = layer_cls._load_from_state_dict
    if getattr(loads, "b2t_no_fast_path", False):
        return

    @functools.wraps(loads)
    def _load_from_state_dict(self, *args, **kwargs):
        loads(self, *args, **kwargs)
        self.load_to_BT = False  # the fused path bypasses forward (our layer types, padded batches)

    _load_from_state_dict.b2t_no_fast_path = True
    layer_cls._load_from_state_dict = _load_from_state_dict


def install():
    from fairseq.modules import transformer_layer

    base = transformer_layer.TransformerEncoderLayerBase
    if has_fast_path(base):
        repair(base)
