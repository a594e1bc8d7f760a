"""The plugin's model options, declared once: the translation model adds them to argparse from this
dataclass, the language model's Hydra config extends it. Field names are what checkpoints save.

``ln_position`` keeps its name (every checkpoint since 0.1 records it); its flag is ``--layer-type``
with ``--ln-position`` as the older spelling. ``None`` means "the named architecture's type".
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .layers import ADMIN_OUTPUT_CHANGE_SCALES, DEEPNORM_REFERENCES
from .norms import DYT_ALPHA_INIT, NORMALIZERS
from .placements import MIXLN_POST_FRACTION

ADMIN_OMEGA_MODES = ("trainable", "fixed")

# options whose values are ChoiceEnums in a Hydra config and plain strings on the command line
CHOICE_FIELDS = ("deepnorm_reference", "admin_omega", "admin_output_change_scale",
                 "on_divergence", "normalizer")


@dataclass
class LayerOptions(FairseqDataclass):
    # a plain string, checked against the records by layer_types.resolve: the records own the list
    ln_position: Optional[str] = field(default=None, metadata={
        "help": "the layer type (--layer-type is the same flag): one of the records of layer_types.py; "
                "default: the named architecture's", "argparse_alias": "--layer-type"})
    residual_bottom_to_top: bool = field(default=False, metadata={
        "help": "the authors' spelling of --layer-type b2t"})
    b2t_rescale_init: Optional[bool] = field(default=None, metadata={
        "help": "multiply layer projection weights by N**-0.5 (default: on for b2t, off otherwise; "
                "--no-b2t-rescale-init: the 2022 B2T code)"})
    deepnorm_reference: Optional[ChoiceEnum(DEEPNORM_REFERENCES)] = field(default=None, metadata={
        "help": "DeepNorm's init: paper (default: the DeepNet paper, encoder beta = 0.87 (N^4 M)^(-1/16), "
                "Xavier-normal re-init) or torchscale (microsoft/torchscale: encoder beta = 1.15 (N^4 M)^(-1/16), "
                "fairseq's init divided by 1/beta)"})
    admin_omega: Optional[ChoiceEnum(ADMIN_OMEGA_MODES)] = field(default=None, metadata={
        "help": "Admin's shortcut weights: trainable vectors (default, as admin-torch's published runs) "
                "or fixed buffers"})
    admin_output_change_scale: Optional[ChoiceEnum(ADMIN_OUTPUT_CHANGE_SCALES)] = field(default=None, metadata={
        "help": "Admin's omega without profiling (admin-torch): O(logn) (default), O(1), or O(n) (omega = 1, "
                "plain Post-LN)"})
    # ResiDual's options, under the names of its reference code (microsoft/ResiDual's model.* keys)
    enc_alpha: Optional[float] = field(default=None, metadata={
        "help": "ResiDual: weight of the encoder's Post-LN stream where it joins the dual stream (default 1)"})
    dec_alpha: Optional[float] = field(default=None, metadata={
        "help": "ResiDual: the same for the decoder (and the LM) (default 1)"})
    enc_res_input_norm_scale: Optional[float] = field(default=None, metadata={
        "help": "ResiDual: scale of every term of the encoder's dual stream (default 1; LN_dual is scale-invariant "
                "up to its eps, the source's OPUS config uses 0.05)"})
    dec_res_input_norm_scale: Optional[float] = field(default=None, metadata={
        "help": "ResiDual: the same for the decoder (and the LM) (default 1)"})
    mixln_post_fraction: Optional[float] = field(default=None, metadata={
        "help": f"Mix-LN: the fraction of each stack's lowest layers that are Post-LN, floor(fraction x layers) "
                f"(default {MIXLN_POST_FRACTION}, the paper's; the layers above are Pre-LN)"})
    normalizer: Optional[ChoiceEnum(NORMALIZERS)] = field(default=None, metadata={
        "help": "the normalizer in every norm place of the layer type: layernorm (default: fairseq's LayerNorm), "
                "rmsnorm (x / sqrt(mean(x^2) + eps) * weight) or dyt (tanh(alpha x) * weight + bias); "
                "each layer type lists those it is defined with"})
    dyt_alpha_init: Optional[float] = field(default=None, metadata={
        "help": f"with --normalizer dyt: the initial value of every DyT's scalar alpha (default {DYT_ALPHA_INIT}, "
                f"the DyT code's)"})
    word_dropout_src: float = field(default=0.0, metadata={
        "help": "zero each source token embedding with probability P while training (translation)"})
    word_dropout_tgt: float = field(default=0.0, metadata={
        "help": "the same for target tokens (the first decoder position is never dropped; translation)"})
    b2t_fast: bool = field(default=False, metadata={
        "help": "fast path (fast.py): attention through scaled_dot_product_attention; b2t-train also selects "
                "--optimizer b2t_adam (fairseq's Adam, multi-tensor); translation"})
    b2t_bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast around the forward, fp32 weights and optimizer (fairseq's --bf16 implies "
                "--tpu); translation"})
    b2t_imported_from: Optional[str] = field(default=None, metadata={"help": "set by b2t-import-checkpoint"})
    log_layer_norms: bool = field(default=False, metadata={
        "help": "every --log-interval updates, log each layer's gradient norm, input gradient norm and largest "
                "activation, and stop a diverging run naming the layer (patches/layer_monitor.py)"})
    on_divergence: Optional[ChoiceEnum(["stop", "warn"])] = field(default=None, metadata={
        "help": "with --log-layer-norms: stop (default) or warn when training diverges"})
    divergence_patience: Optional[int] = field(default=None, metadata={
        "help": "with --log-layer-norms: updates after warm-up the smoothed training loss may stay not below the "
                "unigram level before the run counts as diverged (default 100; 0: never judged, no save held back)"})


def add_args(parser):
    """The options as argparse flags (defaults None: "decide from the layer type")."""
    from fairseq.dataclass.utils import gen_parser_from_dataclass

    gen_parser_from_dataclass(parser, LayerOptions(), delete_default=True)
    finish_args(parser)


def finish_args(parser):
    """What a dataclass cannot say to argparse: the layer types the records define (the records own
    the list), and ``--no-b2t-rescale-init`` beside ``--b2t-rescale-init``."""
    from . import layer_types

    flag = parser._option_string_actions["--ln-position"]
    flag.choices = layer_types.KEYS
    flag.help = "layer type: " + ", ".join(f"{t.key} ({t.label})" for t in layer_types.LAYER_TYPES) + \
        "; default: the named architecture's"
    parser.set_defaults(b2t_rescale_init=None)
    parser.add_argument("--no-b2t-rescale-init", dest="b2t_rescale_init", action="store_false",
                        help="keep fairseq's initialization (the 2022 B2T code)")
