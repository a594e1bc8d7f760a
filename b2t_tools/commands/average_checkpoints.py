"""``b2t-average-checkpoints``: average the parameters of several fairseq checkpoints.

The pip package of fairseq ships no ``scripts/average_checkpoints.py``; this is the project's own.
Pick the inputs explicitly (``--inputs a.pt b.pt``) or from a folder: the last N epoch checkpoints
(``checkpointE.pt``, ``--num-epoch-checkpoints N``) or the last N update checkpoints
(``checkpoint_E_U.pt``, ``--num-update-checkpoints N``), optionally at or below ``--checkpoint-upper-bound``.
Floating-point parameters are summed in float64, divided by N and stored in float32 (fp16 training
saves fp16 weights; the authors' averaging script, fairseq's, writes fp32 too); everything else
(config, training state) comes from the newest input by update number (then epoch), whatever the
order of ``--inputs``, as fairseq's script does. Checkpoints whose
model configurations differ (B2T vs Post-LN, other sizes: see MODEL_KEYS) are refused, since their
parameter names are the same, and so are checkpoints of different training runs (the run identity the
plugin stores in every checkpoint's extra_state, see b2t_fairseq/patches/run_identity.py; checkpoints
saved without one are averaged as before).
Checkpoints are read with ``checkpoints.read_checkpoint`` (torch's safe weights-only loader, after a
check of the zip archive and its CRCs); each input's weights and fingerprint come from one open file,
so a checkpoint a running training replaces meanwhile is recorded as the content that was averaged.

Provenance: the average records what it was built from under the top-level key ``b2t_average``
(fairseq ignores it): the selection rule (folder, epoch/update, N, upper bound) and, for every input,
its file name, epoch, update number and content fingerprint (see :func:`fingerprint`).
``--reuse-if-current`` keeps an existing ``--output`` only when it records exactly the inputs the
selection gives now, with the same fingerprints; otherwise it is rebuilt (``scripts/evaluate.sh``
uses it, so a progress-check average is never reused once training has saved newer checkpoints).
"""

import argparse
import collections
import os
import sys

import torch

from ..checkpoints import (  # noqa: F401
    EPOCH_RE,
    UPDATE_RE,
    check_checkpoint_file,
    fingerprint,
    identity,
    last_checkpoints,
    position,
    read_checkpoint,
    read_checkpoint_once,
    run_id,
    write_checkpoint,
)
from ..errors import ToolError, is_one_line
from ..util import check_writable
from . import run_command

FIX = "delete it and average other checkpoints"


def load(path, mmap=False):
    return read_checkpoint(path, FIX, mmap=mmap)


# --- provenance -------------------------------------------------------------------------------

PROVENANCE_KEY = "b2t_average"
PROVENANCE_VERSION = 1


def gone_message(path):
    return (f"checkpoint {path} was removed while the inputs were being read (likely a training run rotating its "
            "checkpoints: --keep-last-epochs / --keep-interval-updates); re-run b2t-average-checkpoints, or "
            "average checkpoints the run keeps")


def source_record(path, state, fp=None):
    epoch, updates = position(state, path)
    return {"name": os.path.basename(path), "path": os.path.abspath(path), "epoch": epoch, "num_updates": updates,
            "fingerprint": fp or fingerprint(path)}


def _age(state, path):
    """How far a checkpoint's run got, comparable across inputs: (update number, epoch), unknown lowest."""
    epoch, updates = position(state, path)
    return (updates if isinstance(updates, int) else -1, epoch if isinstance(epoch, int) else -1)


def read_provenance(path):
    """The provenance recorded in an averaged checkpoint, or None (not an average, or unreadable)."""
    try:
        state = load(path, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged or unsafe file (either package's one-line error)
        if not is_one_line(e):
            raise
        return None
    prov = state.get(PROVENANCE_KEY)
    return prov if isinstance(prov, dict) and prov.get("version") == PROVENANCE_VERSION else None


def stale_reason(output, paths):
    """Why the average at output is not the average of paths as they are now; None when it is."""
    prov = read_provenance(output)
    if prov is None:
        return "it records no inputs (written by an older version, or not an average)"
    now = identity([{"name": os.path.basename(p), "fingerprint": fingerprint(p)} for p in paths])
    then = identity(prov.get("sources", []))
    if [n for n, _ in now] != [n for n, _ in then]:
        return (f"it was averaged from {', '.join(n for n, _ in then) or 'nothing'}, the selection is now "
                f"{', '.join(n for n, _ in now)}")
    changed = [n for (n, a), (_, b) in zip(now, then) if a != b]
    if changed:
        return f"{', '.join(changed)} changed since (other content, same name)"
    return None


# the arguments that shape the function a checkpoint computes (its layer type is compared separately)
MODEL_KEYS = ("encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim",
              "decoder_ffn_embed_dim", "encoder_attention_heads", "decoder_attention_heads", "activation_fn",
              "share_all_embeddings", "share_decoder_input_output_embed", "no_scale_embedding", "layernorm_embedding",
              "encoder_learned_pos", "decoder_learned_pos", "no_token_positional_embeddings", "no_cross_attention",
              "cross_self_attention", "decoder_output_dim", "adaptive_softmax_cutoff", "tie_adaptive_weights")


def model_config(state):
    """{key: value} of the model-shaping arguments of a loaded checkpoint (from 'args' or 'cfg'), with its
    layer type under 'layer type'; {} when the checkpoint records none."""
    from b2t_fairseq.authors import layer_type_of_state

    cfg = state.get("args")
    if not isinstance(cfg, argparse.Namespace):
        cfg = state.get("cfg") or {}
        cfg = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
    if cfg is None:
        return {}
    get = (lambda k: getattr(cfg, k, None)) if isinstance(cfg, argparse.Namespace) else (lambda k: cfg.get(k))
    out = {k: get(k) for k in MODEL_KEYS if get(k) is not None}
    out["layer type"] = layer_type_of_state(state)
    return out


def check_same_model(first, path, config, paths):
    """Refuse a checkpoint whose model configuration differs from the first one's."""
    for key in sorted(set(first) & set(config)):
        if first[key] != config[key]:
            raise ToolError(f"{path} is another model than {paths[0]} ({key}: {config[key]!r} vs {first[key]!r}); "
                           "average checkpoints of one training run only")


def average(paths, selection=None):
    """The newest checkpoint's state with its 'model' replaced by the average over paths, and the
    provenance (selection rule, every input's name, position and fingerprint) under PROVENANCE_KEY."""
    seen = set()
    for path in paths:
        if os.path.realpath(path) in seen:
            raise ToolError(f"checkpoint {path} is given twice; list each input once (a repeated one would "
                           "count double in the average)")
        seen.add(os.path.realpath(path))
    sums, newest, keys, first_config, sources = collections.OrderedDict(), None, None, None, []
    first_run = None
    for path in paths:
        state, fp = read_checkpoint_once(path, FIX, gone=gone_message(path))
        sources.append(source_record(path, state, fp))
        params = state["model"]
        config = model_config(state)
        rid = run_id(state)
        if keys is None:
            keys, newest, newest_path, first_config = list(params), state, path, config
        else:
            check_same_model(first_config, path, config, paths)
            if _age(state, path) > _age(newest, newest_path):  # the training state comes from the newest input
                newest, newest_path = state, path
        if rid is not None and first_run is not None and rid != first_run[1]:
            raise ToolError(f"{path} is from another training run than {first_run[0]} (run {rid} vs {first_run[1]}: "
                           "a run started afresh in the same folder?); average checkpoints of one training run only")
        if rid is not None and first_run is None:
            first_run = (path, rid)
        if set(params) != set(keys):
            diff = sorted(set(params) ^ set(keys))[:3]
            raise ToolError(f"{path} has other parameters than {paths[0]} (e.g. {', '.join(diff)}); average "
                           "checkpoints of one training run only")
        for k, p in params.items():
            if not torch.is_floating_point(p):
                sums.setdefault(k, p)
                continue
            if k in sums and sums[k].shape != p.shape:
                raise ToolError(f"{path}: parameter {k} has shape {tuple(p.shape)}, expected "
                               f"{tuple(sums[k].shape)}; average checkpoints of one training run only")
            sums[k] = sums[k] + p.double() if k in sums else p.double().clone()
    n = len(paths)
    out = collections.OrderedDict()
    for k in keys:
        p = newest["model"][k]
        # fp32 whatever the inputs were (fp16 training saves fp16 weights), as the authors' script writes
        out[k] = (sums[k] / n).to(torch.float32) if torch.is_floating_point(p) else p
    newest["model"] = out
    newest[PROVENANCE_KEY] = {"version": PROVENANCE_VERSION, "method": "mean in float64, stored as float32",
                              "selection": selection, "sources": sources}
    return newest


def save(state, output):
    write_checkpoint(state, output, "--output")  # atomic; Ctrl-C or a full disk leaves the old --output


def parse_args(argv):
    p = argparse.ArgumentParser(prog="b2t-average-checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", nargs="+", required=True,
                   help="checkpoint files, or one folder with --num-epoch/update-checkpoints")
    p.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--num-epoch-checkpoints", type=int, help="average the last N epoch checkpoints of the folder")
    g.add_argument("--num-update-checkpoints", type=int, help="average the last N update checkpoints")
    p.add_argument("--checkpoint-upper-bound", type=int,
                   help="only checkpoints at or below this epoch (or update) number")
    p.add_argument("--reuse-if-current", action="store_true",
                   help="keep an existing --output that was averaged from exactly these inputs (same names and "
                        "content fingerprints); rebuild it otherwise")
    return p.parse_args(argv)


def selection_of(args):
    """The selection rule as recorded in the provenance (None for explicit --inputs)."""
    n = args.num_epoch_checkpoints if args.num_epoch_checkpoints is not None else args.num_update_checkpoints
    if n is None:
        return None
    return {"folder": os.path.abspath(args.inputs[0]), "kind": "update" if args.num_update_checkpoints is not None
            else "epoch", "n": n, "upper_bound": args.checkpoint_upper_bound}


def select_inputs(args):
    by_update = args.num_update_checkpoints is not None
    n = args.num_update_checkpoints if by_update else args.num_epoch_checkpoints
    if n is None:
        if args.checkpoint_upper_bound is not None:
            raise ToolError("--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints; "
                           "add one of them (with a folder as --inputs)")
        for path in args.inputs:
            check_checkpoint_file(path)
        return args.inputs
    kind = "update" if by_update else "epoch"
    if n < 1:
        raise ToolError(f"--num-{kind}-checkpoints {n} is not a number of checkpoints; pass 1 or more (the paper averages "
                       "the last 10 epochs)")
    if args.checkpoint_upper_bound is not None and args.checkpoint_upper_bound < 1:
        raise ToolError(f"--checkpoint-upper-bound {args.checkpoint_upper_bound} is not a positive {kind} number; pass the "
                       f"last {kind} to include")
    if len(args.inputs) != 1:
        raise ToolError(f"--num-{kind}-checkpoints needs one folder as --inputs, got {len(args.inputs)} paths; pass the "
                       f"run's --save-dir alone, or list checkpoint files without --num-{kind}-checkpoints")
    return last_checkpoints(args.inputs[0], n, by_update=by_update, upper_bound=args.checkpoint_upper_bound)


def check_output(output, paths):
    """Refuse an --output that would overwrite an input or cannot be written (before any loading)."""
    real = os.path.realpath(output)
    if any(os.path.realpath(p) == real for p in paths):
        raise ToolError(f"--output {output} is one of the inputs; write the average to another file")
    check_writable(output, "--output")


def run(argv):
    args = parse_args(argv)
    paths = select_inputs(args)
    check_output(args.output, paths)
    try:
        if args.reuse_if_current and os.path.exists(args.output):
            why = stale_reason(args.output, paths)
            if why is None:
                print(f"{args.output} is up to date (averaged from {', '.join(map(os.path.basename, paths))}); "
                      "reused")
                return
            print(f"{args.output} is out of date: {why}; averaging again")
        state = average(paths, selection_of(args))
    except FileNotFoundError:  # an input rotated away between selection and reading
        gone = next((p for p in paths if not os.path.exists(p)), None)
        if gone is None:
            raise
        raise ToolError(gone_message(gone)) from None
    save(state, args.output)
    print(f"averaged {len(paths)} checkpoint(s) into {args.output}:")
    for path in paths:
        print(f"  {path}")


def main(argv=None):
    return run_command("b2t-average-checkpoints", run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
