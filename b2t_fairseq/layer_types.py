"""The layer types, one record each. A record owns its rules: what it is built of (layer and stack
classes), which options it takes and which it refuses, its initialization, and its default from
``--b2t-rescale-init``. Every table in the project (flag choices, named architectures, labels, plot
colours, the tools' choices, the load guard) derives from ``LAYER_TYPES``; ``resolve`` settles the
flags of a run against its record, and ``which`` answers "which layer type is this" for a built
model, saved args and a checkpoint, the authors' included.

Adding a type: one ``LayerType(...)`` in ``LAYER_TYPES``, its layer (or stack) classes, and the
regenerated configs (``python -m b2t_tools.wmt.configs --write configs/``).
"""

import argparse
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from . import layers, norms, placements, residual
from .errors import B2TConfigError

# fairseq forward options that only fairseq's own layers read: a type with its own forward would
# ignore them, or (DeepNorm, which keeps fairseq's forward) change the equations it stands for
FAIRSEQ_FORWARD_OPTIONS = ("cross_self_attention", "scale_attn", "scale_heads", "scale_fc", "scale_resids")
NORMALIZERS = ("layernorm", "rmsnorm", "dyt")


@dataclass(frozen=True)
class LayerType:
    key: str                 # the --layer-type value, and what checkpoints record (as ln_position)
    short: str               # the tools' name (b2t-demo --archs, b2t-grad-norms --arch, b2t-bench variants)
    label: str               # tables, plots and messages
    colour: str              # Okabe-Ito palette: told apart with every common colour-vision deficiency
    in_paper: bool = False   # one of the three layer types the paper compares
    encoder_layer: Optional[type] = None  # our layer classes; None: fairseq's own
    decoder_layer: Optional[type] = None
    lm_layer: Optional[type] = None       # the decoder-only (transformer_lm) layer
    encoder_stack: Optional[type] = None  # our stack classes; None: stacks.py's standard ones
    decoder_stack: Optional[type] = None
    lm_stack: Optional[type] = None
    normalize_before: bool = False        # fairseq's switch: its Pre-LN layers and a norm after each stack
    norms: Tuple[str, ...] = NORMALIZERS  # the normalizers the type is defined with (--normalizer)
    takes: Tuple[str, ...] = ()           # the type's own options; other types refuse them when set
    rescale_init: bool = False            # the default of --b2t-rescale-init
    init: Optional[Callable] = None       # init(layers, args, side): side "encoder", "decoder" or "lm"
    check: Optional[Callable] = None      # check(args): rules beyond the common ones
    init_doc: str = "fairseq's"           # what the initialization does, in one line

    @property
    def family(self):
        """The translation architectures' prefix: FAMILY (6 layers), FAMILY_18l, FAMILY_tiny."""
        return "transformer_" + self.short

    @property
    def lm_family(self):
        """The decoder-only architectures' prefix: FAMILY, FAMILY_16l, FAMILY_gpt, FAMILY_tiny."""
        return "transformer_lm_" + self.short

    @property
    def own_layers(self):
        """True when the type's weights would run wrongly in a model of another type with the same
        parameter names (everything but fairseq's own Post-LN and Pre-LN)."""
        return any(c is not None for c in (self.encoder_layer, self.decoder_layer, self.lm_layer,
                                           self.encoder_stack, self.decoder_stack, self.lm_stack))


# --- the types' own rules and initializations ----------------------------------------------------

def _deepnorm_init(stack_layers, args, side):
    if side == "lm":
        beta = layers.deepnorm_lm_constants(len(stack_layers))["beta"]
    else:
        c = layers.deepnorm_constants(args.encoder_layers, args.decoder_layers, args.deepnorm_reference)
        beta = c[f"{side}_beta"]
    layers.deepnorm_init_(stack_layers, beta, args.deepnorm_reference)


def _deepnorm_check(args):
    if args.b2t_rescale_init:
        raise B2TConfigError("--b2t-rescale-init cannot be combined with --ln-position deepnorm: DeepNorm has its "
                             "own initialization (--deepnorm-reference); drop --b2t-rescale-init")


LAYER_TYPES = (
    LayerType("post", "post_ln", "Post-LN", "#D55E00", in_paper=True),
    LayerType("pre", "pre_ln", "Pre-LN", "#0072B2", in_paper=True, normalize_before=True),
    LayerType("b2t", "b2t", "B2T", "#009E73", in_paper=True,
              encoder_layer=layers.B2TEncoderLayer, decoder_layer=layers.B2TDecoderLayer,
              lm_layer=layers.B2TDecoderLayer, rescale_init=True,
              init_doc="projections x N^-1/2 (the authors' 2023 code; --no-b2t-rescale-init: the 2022 code)"),
    LayerType("deepnorm", "deepnorm", "DeepNorm", "#CC79A7",
              encoder_layer=layers.DeepNormEncoderLayer, decoder_layer=layers.DeepNormDecoderLayer,
              lm_layer=layers.DeepNormLMLayer, takes=("deepnorm_reference",), init=_deepnorm_init,
              check=_deepnorm_check, init_doc="Xavier-normal, gain beta on fc1/fc2/v_proj/out_proj"),
    LayerType("admin", "admin", "Admin", "#E69F00",
              encoder_layer=layers.AdminEncoderLayer, decoder_layer=layers.AdminDecoderLayer,
              lm_layer=layers.AdminDecoderLayer, takes=("admin_omega", "admin_output_change_scale"),
              init_doc="fairseq's; omega from the depth"),
    LayerType("residual", "residual", "ResiDual", "#56B4E9",
              encoder_layer=residual.ResiDualEncoderLayer, decoder_layer=residual.ResiDualDecoderLayer,
              lm_layer=residual.ResiDualDecoderLayer, encoder_stack=residual.ResiDualEncoder,
              decoder_stack=residual.ResiDualDecoder, lm_stack=residual.ResiDualLMDecoder,
              takes=tuple(residual.OPTIONS), check=residual.check, init_doc="fairseq's (as microsoft/ResiDual)"),
    # the placements (placements.py): each Pre-LN-like at the top, with fairseq's norm after each stack
    LayerType("peri", "peri_ln", "Peri-LN", "#F0E442", normalize_before=True,
              encoder_layer=placements.PeriLNEncoderLayer, decoder_layer=placements.PeriLNDecoderLayer,
              lm_layer=placements.PeriLNDecoderLayer, init_doc="fairseq's; output norms start at weight 1, bias 0"),
    LayerType("mixln", "mix_ln", "Mix-LN", "#000000", normalize_before=True,
              encoder_layer=placements.MixLNEncoderLayer, decoder_layer=placements.MixLNDecoderLayer,
              lm_layer=placements.MixLNDecoderLayer, takes=("mixln_post_fraction",),
              check=placements.check_placement_options,
              init_doc="fairseq's; the lowest floor(0.25 N) layers Post-LN, the rest Pre-LN"),
    LayerType("lns", "lns", "LayerNorm Scaling", "#999999", normalize_before=True,
              encoder_layer=placements.LNSEncoderLayer, decoder_layer=placements.LNSDecoderLayer,
              lm_layer=placements.LNSDecoderLayer, init_doc="fairseq's; layer l's norm outputs x 1/sqrt(l)"),
)

BY_KEY = {t.key: t for t in LAYER_TYPES}
BY_SHORT = {t.short: t for t in LAYER_TYPES}
KEYS = tuple(BY_KEY)
SHORTS = tuple(BY_SHORT)
PAPER_SHORTS = tuple(t.short for t in LAYER_TYPES if t.in_paper)
# the types whose checkpoints look like a stock transformer's but must not run as one
OWN_LAYERS = tuple(t.key for t in LAYER_TYPES if t.own_layers)

# the options one type owns, with the value that means "not used" (checkpoints of earlier versions
# saved every type's defaults, so a default is never a conflict), and the value each type starts from
OPTION_DEFAULTS = {"deepnorm_reference": "paper", "admin_omega": "trainable", "admin_output_change_scale": "O(logn)",
                   **residual.OPTIONS, "mixln_post_fraction": placements.MIXLN_POST_FRACTION}

# named architecture -> layer type, filled as the models register them (transformer_b2t.py,
# transformer_lm_b2t.py): a run's saved args name the architecture before any flag is settled
ARCH_TYPES = {}


# --- settling a run's flags ----------------------------------------------------------------------

def _flag(name):
    return "--" + name.replace("_", "-")


def resolve(args, default="post"):
    """Settle the layer type from the flags, refuse contradictions, set fairseq's own switches.

    ``default`` is the named architecture's layer type, which --residual-bottom-to-top may override
    (transformer_post_ln with it is B2T); a --layer-type given on the command line may not be.
    Idempotent, so a checkpoint's saved args go through it again unchanged. Returns the record.
    """
    given = getattr(args, "ln_position", None)
    given = None if given is None else str(given)
    key = given or default
    if key not in BY_KEY:
        raise B2TConfigError(f"unknown --layer-type '{key}': choose one of {', '.join(KEYS)}")
    if getattr(args, "residual_bottom_to_top", False):
        if given == "post":
            raise B2TConfigError("--residual-bottom-to-top (B2T) contradicts --ln-position post (Post-LN without "
                                 "the B2T connection); drop one of them")
        if key == "pre":
            raise B2TConfigError("--residual-bottom-to-top cannot be combined with Pre-LN (--ln-position pre): "
                                 "B2T is defined for Post-LN only; drop one of them")
        if key not in ("post", "b2t"):
            raise B2TConfigError(f"--residual-bottom-to-top cannot be combined with --ln-position {key}: "
                                 "they are different layer types; drop one of them")
        key = "b2t"
    t = BY_KEY[key]
    nb = bool(getattr(args, "encoder_normalize_before", None) or getattr(args, "decoder_normalize_before", None))
    if nb and not t.normalize_before:
        if key == "post":
            raise B2TConfigError("--encoder/decoder-normalize-before contradict --ln-position post: "
                                 "use --ln-position pre (or --arch transformer_pre_ln) for Pre-LN")
        raise B2TConfigError(f"{t.label} cannot be combined with --encoder-normalize-before/--decoder-normalize-before: "
                             f"{t.label} is a Post-LN method; drop those flags or use --ln-position pre")
    for name, unused in OPTION_DEFAULTS.items():
        value = getattr(args, name, None)
        if value is not None:
            value = type(unused)(value)  # ChoiceEnum values as plain strings, numbers as numbers
        if name in t.takes:
            setattr(args, name, unused if value is None else value)
        elif value is not None and value != unused:
            owner = next(o for o in LAYER_TYPES if name in o.takes)
            raise B2TConfigError(f"{_flag(name)} is an option of {owner.label} layers, not of {t.label}; drop it "
                                 f"or use --layer-type {owner.key}")
    normalizer = norms.check_normalizer_options(args)  # unknown names, --dyt-alpha-init without dyt
    if normalizer not in t.norms:
        raise B2TConfigError(f"--normalizer {normalizer} is not defined for {t.label} layers; use one of "
                             f"{', '.join(t.norms)}")
    if t.own_layers:
        for name in FAIRSEQ_FORWARD_OPTIONS:
            if getattr(args, name, False):
                raise B2TConfigError(f"{_flag(name)} is not supported with {key} layers; drop it "
                                     "or use --ln-position post")
    args.ln_position = key
    args.residual_bottom_to_top = key == "b2t"
    args.encoder_normalize_before = args.decoder_normalize_before = t.normalize_before
    if getattr(args, "b2t_rescale_init", None) is None:
        args.b2t_rescale_init = t.rescale_init
    for side in ("src", "tgt"):
        p = getattr(args, f"word_dropout_{side}", 0.0) or 0.0
        if not 0.0 <= p < 1.0:
            raise B2TConfigError(f"--word-dropout-{side} must be in [0, 1), got {p}")
        setattr(args, f"word_dropout_{side}", float(p))
    if t.check is not None:
        t.check(args)
    return t


def init_stack(t, stack_layers, args, side):
    """A built stack's initialization: fairseq's, then --b2t-rescale-init, then the type's own."""
    if args.b2t_rescale_init:
        layers.rescale_init_(stack_layers, len(stack_layers))
    if t.init is not None:
        t.init(stack_layers, args, side)


# --- which layer type is this ---------------------------------------------------------------------

def _getter(obj):
    if isinstance(obj, argparse.Namespace):
        return lambda k: getattr(obj, k, None)
    if hasattr(obj, "get"):
        return lambda k: obj.get(k, None)
    return lambda k: getattr(obj, k, None)


def _model_config(state):
    """The model's saved configuration in a checkpoint dict (its args, or its cfg's model), or None."""
    if isinstance(state.get("args"), argparse.Namespace):
        return state["args"]
    cfg = state.get("cfg")
    if cfg is not None:
        return cfg.get("model") if hasattr(cfg, "get") else getattr(cfg, "model", None)
    return None


def which(obj):
    """The record of a built model, of saved or parsed args (Namespace, dict, DictConfig), or of a
    checkpoint dict (with "args" or "cfg"; the authors' fairseq-0.9 checkpoints too). None when it
    cannot be told: a model that mixes types, a checkpoint without a configuration.
    """
    if hasattr(obj, "modules") and callable(obj.modules):
        return _which_model(obj)
    if isinstance(obj, dict) and ("args" in obj or "cfg" in obj or "model" in obj):
        obj = _model_config(obj)
        if obj is None:
            return None
    get = _getter(obj)
    ln = get("ln_position")
    if get("residual_bottom_to_top") or (ln is not None and str(ln) == "b2t"):
        return BY_KEY["b2t"]
    if ln is not None and str(ln) in BY_KEY:
        return BY_KEY[str(ln)]
    arch = get("arch") or get("_name")
    if arch in ARCH_TYPES:
        return BY_KEY[ARCH_TYPES[arch]]
    # fairseq's own models: a decoder-only model has no encoder switch (the authors' LMs among them)
    lm = get("encoder_normalize_before") is None and get("decoder_normalize_before") is not None
    before = get("decoder_normalize_before") if lm else get("encoder_normalize_before") or get("decoder_normalize_before")
    return BY_KEY["pre" if before else "post"]


def _which_model(model):
    recorded = getattr(model, "b2t_layer_type", None)
    if recorded in BY_KEY:
        return BY_KEY[recorded]
    ours = {}
    for t in LAYER_TYPES:
        for cls in (t.encoder_layer, t.decoder_layer, t.lm_layer):
            if cls is not None:
                ours.setdefault(cls, t.key)
    found = set()
    for m in model.modules():
        if type(m) in ours:
            found.add(ours[type(m)])
        elif hasattr(m, "normalize_before") and hasattr(m, "final_layer_norm"):
            found.add("pre" if m.normalize_before else "post")
    return BY_KEY[found.pop()] if len(found) == 1 else None


def of_model(model):
    """The layer type key of a built model ('post', 'pre', 'b2t', ...), or None if mixed or unknown."""
    t = which(model)
    return t.key if t is not None else None
