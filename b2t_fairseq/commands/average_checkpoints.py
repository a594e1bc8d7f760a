"""``b2t-average-checkpoints``: average the parameters of several fairseq checkpoints.

The pip package of fairseq ships no ``scripts/average_checkpoints.py``; this is the project's own.
Pick the inputs explicitly (``--inputs a.pt b.pt``) or from a folder: the last N epoch checkpoints
(``checkpointE.pt``, ``--num-epoch-checkpoints N``) or the last N update checkpoints
(``checkpoint_E_U.pt``, ``--num-update-checkpoints N``), optionally at or below ``--checkpoint-upper-bound``.
Floating-point parameters are summed in float64, divided by N and stored in float32 (fp16 training
saves fp16 weights; the authors' averaging script, fairseq's, writes fp32 too); everything else
(config, training state) comes from the newest input, as fairseq's script does. Checkpoints whose
model configurations differ (B2T vs Post-LN, other sizes: see MODEL_KEYS) are refused, since their
parameter names are the same.
Checkpoints are read with torch's safe (weights_only) loader: importing b2t_fairseq allows the few
globals that fairseq checkpoints pickle.
"""

import argparse
import collections
import os
import re
import sys

import torch

from ..errors import B2TError
from ..repairs import find_damage
from ..util import atomic_open
from . import run_command

EPOCH_RE = re.compile(r"^checkpoint(\d+)\.pt$")
UPDATE_RE = re.compile(r"^checkpoint_\d+_(\d+)\.pt$")


def last_checkpoints(folder, n, by_update=False, upper_bound=None):
    """Paths of the newest n epoch (or update) checkpoints in folder, newest first."""
    if not os.path.isdir(folder):
        raise B2TError(f"checkpoint folder {folder} does not exist; pass the --save-dir of a training run")
    pattern = UPDATE_RE if by_update else EPOCH_RE
    found = []
    for name in os.listdir(folder):
        m = pattern.match(name)
        if m and (upper_bound is None or int(m.group(1)) <= upper_bound):
            found.append((int(m.group(1)), os.path.join(folder, name)))
    found.sort(reverse=True)
    kind = "update" if by_update else "epoch"
    if len(found) < n:
        raise B2TError(f"{folder} has {len(found)} {kind} checkpoint(s), {n} needed; lower "
                       f"--num-{kind}-checkpoints or train longer (or save more: --keep-last-epochs, "
                       "--save-interval-updates)")
    return [path for _, path in found[:n]]


def load(path):
    if not os.path.isfile(path):
        raise B2TError(f"checkpoint {path} does not exist; check the path")
    damage = find_damage(path)  # torch.load does not check CRCs: flipped bytes would load silently
    if damage:
        raise B2TError(f"cannot read checkpoint {path} ({damage}); it is truncated or corrupt: delete it and "
                       "average other checkpoints")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, wrong magic, unpickling errors ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise B2TError(f"cannot read checkpoint {path} ({type(e).__name__}: {first[:200]}); it is truncated or "
                       "corrupt: delete it and average other checkpoints") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise B2TError(f"{path} is not a fairseq checkpoint (no 'model' state dict); pass checkpoints written "
                       "by b2t-train / fairseq-train")
    return state


# the arguments that shape the function a checkpoint computes (its layer type is compared separately)
MODEL_KEYS = ("encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim",
              "decoder_ffn_embed_dim", "encoder_attention_heads", "decoder_attention_heads", "activation_fn",
              "share_all_embeddings", "share_decoder_input_output_embed", "no_scale_embedding", "layernorm_embedding",
              "encoder_learned_pos", "decoder_learned_pos", "no_token_positional_embeddings", "no_cross_attention",
              "cross_self_attention", "decoder_output_dim", "adaptive_softmax_cutoff", "tie_adaptive_weights")


def model_config(state):
    """{key: value} of the model-shaping arguments of a loaded checkpoint (from 'args' or 'cfg'), with its
    layer type under 'layer type'; {} when the checkpoint records none."""
    from ..authors import layer_type_of_state

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
            raise B2TError(f"{path} is another model than {paths[0]} ({key}: {config[key]!r} vs {first[key]!r}); "
                           "average checkpoints of one training run only")


def average(paths):
    """The newest checkpoint's state with its 'model' replaced by the average over paths."""
    sums, newest, keys, first_config = collections.OrderedDict(), None, None, None
    for path in paths:
        state = load(path)
        params = state["model"]
        config = model_config(state)
        if keys is None:
            keys, newest, first_config = list(params), state, config
        else:
            check_same_model(first_config, path, config, paths)
        if set(params) != set(keys):
            diff = sorted(set(params) ^ set(keys))[:3]
            raise B2TError(f"{path} has other parameters than {paths[0]} (e.g. {', '.join(diff)}); average "
                           "checkpoints of one training run only")
        for k, p in params.items():
            if not torch.is_floating_point(p):
                sums.setdefault(k, p)
                continue
            if k in sums and sums[k].shape != p.shape:
                raise B2TError(f"{path}: parameter {k} has shape {tuple(p.shape)}, expected "
                               f"{tuple(sums[k].shape)}; average checkpoints of one training run only")
            sums[k] = sums[k] + p.double() if k in sums else p.double().clone()
    n = len(paths)
    out = collections.OrderedDict()
    for k in keys:
        p = newest["model"][k]
        # fp32 whatever the inputs were (fp16 training saves fp16 weights), as the authors' script writes
        out[k] = (sums[k] / n).to(torch.float32) if torch.is_floating_point(p) else p
    newest["model"] = out
    return newest


def save(state, output):
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with atomic_open(output, "wb") as f:
        torch.save(state, f)


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
    return p.parse_args(argv)


def select_inputs(args):
    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if n is None:
        if args.checkpoint_upper_bound is not None:
            raise B2TError("--checkpoint-upper-bound needs --num-epoch-checkpoints or --num-update-checkpoints")
        return args.inputs
    if n < 1:
        raise B2TError("--num-epoch/update-checkpoints must be >= 1")
    if len(args.inputs) != 1:
        raise B2TError("with --num-epoch/update-checkpoints give one folder as --inputs")
    return last_checkpoints(args.inputs[0], n, by_update=args.num_update_checkpoints is not None,
                            upper_bound=args.checkpoint_upper_bound)


def run(argv):
    args = parse_args(argv)
    paths = select_inputs(args)
    state = average(paths)
    save(state, args.output)
    print(f"averaged {len(paths)} checkpoint(s) into {args.output}:")
    for path in paths:
        print(f"  {path}")


def main(argv=None):
    return run_command("b2t-average-checkpoints", run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
