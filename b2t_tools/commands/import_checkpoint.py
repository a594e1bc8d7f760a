"""``b2t-import-checkpoint IN.pt OUT.pt``: a checkpoint of the authors' fairseq-0.9 fork as a transformer_b2t one.

The authors' code (github.com/takase/b2t_connection, a fork of fairseq 0.9.0) saves checkpoints of the
stock ``transformer`` model (``args.arch = transformer_wmt_en_de``) with fork-only arguments: the
B2T switch ``residual_bottom_to_top``, the perturbations ``sampling_method``, ``enc_replace_rate``,
``dec_replace_rate``, ``decay_val``, and a few options of earlier projects (``no_layer_norm``,
``one_emb``, length-encoding positions). Its decoder keeps the positions under
``decoder.embed_positions_original``. Stock fairseq 0.12 would build that checkpoint as a plain
Post-LN model (after a key error), which is the wrong model with the right weights.

The conversion:
- ``arch`` becomes a transformer_b2t architecture; the layer type (``ln_position``) comes from
  ``residual_bottom_to_top`` / ``*_normalize_before``; depth and sizes are kept from the args;
- ``sampling_method worddrop`` becomes ``--word-dropout-src/--word-dropout-tgt`` (the enc/dec
  replace rates); other perturbations act only while training and are recorded, not converted;
- the initialization is recorded (``b2t_rescale_init``: the fork rescales since 2023-05-18; a
  checkpoint cannot say which code trained it, see ``--init``) and the origin in ``b2t_imported_from``;
- fork-only arguments and buffers are dropped, ``decoder.embed_positions_original.*`` is renamed to
  fairseq's ``decoder.embed_positions.*``; every weight is kept bit for bit (dtype included).

The same conversion runs automatically whenever fairseq loads such a file (b2t-generate,
b2t-wmt-evaluate, ``from_pretrained``, ``--restore-file``; installed with the plugin's other repairs).
Options the plugin cannot represent (``--no-layer-norm``, one-embedding, length-encoding positions,
layer-wise attention; for their language models: --residual-max-updates, --no-inner-layer-norm,
--decay-inner-residual) raise a one-line error instead. Their transformer_lm checkpoints import as
transformer_lm_b2t ones (B2T, Post-LN or Pre-LN, as their args say).
"""

import argparse
import os
import sys

from b2t_fairseq.authors import convert_state, is_fork_checkpoint

from ..checkpoints import read_checkpoint, write_checkpoint
from ..errors import ToolError
from ..util import check_writable
from . import run_command

PROG = "b2t-import-checkpoint"


def check_output(src, dst):
    """Refuse OUT.pt that is IN.pt (the authors' original would be overwritten) or cannot be written,
    before the input is read."""
    same = os.path.samefile(src, dst) if os.path.isfile(src) and os.path.isfile(dst) else False
    if same or os.path.realpath(src) == os.path.realpath(dst):  # samefile: a link (symbolic or hard) too
        raise ToolError(f"OUT.pt {dst} is IN.pt: the import would overwrite the authors' original; write the "
                        "converted checkpoint to another file")
    check_writable(dst, "OUT.pt")


def import_file(src, dst, init=None):
    check_output(src, dst)
    state = read_checkpoint(src, "pass the authors' checkpoint file (e.g. b2t_layer18_ave10.pt), downloaded again",
                            flag="IN.pt")
    if not isinstance(state.get("args"), argparse.Namespace):
        raise ToolError(f"{src} has no fairseq-0.9 'args' (it is a fairseq 0.10+ checkpoint); it needs no import: "
                       "use it as it is")
    if not is_fork_checkpoint(state):
        raise ToolError(f"{src} is already a transformer_b2t checkpoint (arch {state['args'].arch}); use it as it is")
    new = convert_state(state, where=src, init=init)
    write_checkpoint(new, dst, "OUT.pt")  # atomic; Ctrl-C or a full disk leaves OUT.pt as it was
    return new


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("input", metavar="IN.pt", help="a checkpoint saved by the authors' fairseq-0.9 fork")
    p.add_argument("output", metavar="OUT.pt", help="where to write the transformer_b2t checkpoint")
    p.add_argument("--init", choices=("2022", "2023"), default="2023",
                   help="which code of the fork trained it, recorded as b2t_rescale_init (2023: rescaled "
                        "initialization, the default; 2022: none, e.g. the released b2t_layer18_ave10.pt). "
                        "It changes no weight")
    return p.parse_args(argv)


def run(argv):
    args = parse_args(argv)
    new = import_file(args.input, args.output, init=args.init)
    a = new["args"]
    depth = f"{a.encoder_layers}+{a.decoder_layers}" if hasattr(a, "encoder_layers") else f"{a.decoder_layers} decoder-only"
    print(f"{args.input} -> {args.output}: arch {a.arch}, ln_position {a.ln_position}, "
          f"{depth} layers, word dropout {a.word_dropout_src}/{a.word_dropout_tgt}, "
          f"b2t_rescale_init {a.b2t_rescale_init}")
    print(f"  {a.b2t_imported_from}")


def main(argv=None):
    return run_command(PROG, run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
