"""The five layer types, one record each: every table in the project (flag choices, architecture names,
labels, plot colours, which layer classes to build, how to tell a built model's type) derives from
``LAYER_TYPES``. Adding a sixth type means one record here and its layer classes in ``layers.py``.
"""

from dataclasses import dataclass
from typing import Optional

from . import layers


@dataclass(frozen=True)
class LayerType:
    key: str                 # the --ln-position value, and what checkpoints record
    short: str               # the tools' name (b2t-demo --archs, b2t-grad-norms --arch, b2t-bench variants)
    label: str               # tables, plots and messages
    encoder_layer: Optional[type]  # our layer class; None: fairseq's own layer
    decoder_layer: Optional[type]
    normalize_before: bool   # fairseq's own switch for its layers (Pre-LN)
    init: str                # what the initialization does, in one line
    colour: str              # Okabe-Ito palette: told apart with every common colour-vision deficiency
    in_paper: bool           # one of the three layer types the paper compares
    lm_layer: Optional[type] = None  # the decoder-only (transformer_lm) layer; None: fairseq's own

    @property
    def family(self):
        """The named architectures' prefix: FAMILY (6 layers), FAMILY_18l, FAMILY_tiny."""
        return "transformer_" + self.short

    @property
    def lm_family(self):
        """The decoder-only architectures' prefix (transformer_lm_b2t.py): FAMILY, FAMILY_16l, _gpt, _tiny."""
        return "transformer_lm_" + self.short


LAYER_TYPES = (
    LayerType("post", "post_ln", "Post-LN", None, None, False, "fairseq's", "#D55E00", True),
    LayerType("pre", "pre_ln", "Pre-LN", None, None, True, "fairseq's", "#0072B2", True),
    LayerType("b2t", "b2t", "B2T", layers.B2TEncoderLayer, layers.B2TDecoderLayer, False,
              "projections x N^-1/2 (the authors' 2023 code; --no-b2t-rescale-init: the 2022 code)", "#009E73", True,
              lm_layer=layers.B2TDecoderLayer),
    LayerType("deepnorm", "deepnorm", "DeepNorm", layers.DeepNormEncoderLayer, layers.DeepNormDecoderLayer, False,
              "Xavier-normal, gain beta on fc1/fc2/v_proj/out_proj", "#CC79A7", False,
              lm_layer=layers.DeepNormLMLayer),
    LayerType("admin", "admin", "Admin", layers.AdminEncoderLayer, layers.AdminDecoderLayer, False,
              "fairseq's; omega from the depth", "#E69F00", False,
              lm_layer=layers.AdminDecoderLayer),
)

BY_KEY = {t.key: t for t in LAYER_TYPES}
BY_SHORT = {t.short: t for t in LAYER_TYPES}
KEYS = tuple(BY_KEY)
SHORTS = tuple(BY_SHORT)
PAPER_SHORTS = tuple(t.short for t in LAYER_TYPES if t.in_paper)
# the types whose checkpoints look like a stock transformer's but must not run as one
OWN_LAYERS = tuple(t.key for t in LAYER_TYPES if t.encoder_layer is not None)


def of_model(model):
    """The layer type key of a built model ('post', 'pre', 'b2t', ...), or None if mixed or unknown."""
    ours = {}
    for t in LAYER_TYPES:
        for cls in (t.encoder_layer, t.decoder_layer, t.lm_layer):
            if cls is not None:
                ours[cls] = t.key
    found = set()
    for m in model.modules():
        if type(m) in ours:
            found.add(ours[type(m)])
        elif hasattr(m, "normalize_before") and hasattr(m, "final_layer_norm"):
            found.add("pre" if m.normalize_before else "post")
    return found.pop() if len(found) == 1 else None
