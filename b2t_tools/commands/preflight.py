"""Checks b2t-train, b2t-generate and b2t-validate make before fairseq starts (cheap: flags, file
headers, no model): a finished run, and bad values fairseq would take for a traceback or worse.

``finished_run(argv)``: fairseq-train re-run on a run that reached --max-update trains ONE MORE update
(its loop checks the limit only after a step) and overwrites checkpoint_last.pt with it. That is a
fairseq bug for our users: a finished run must stay finished. b2t-train reads the checkpoint it would
resume from (its pickled header only, memory-mapped: no weights are read) and, if the run is finished,
says so in one line and exits 0 without starting fairseq.
"""

import os

from ..errors import ToolError
from ..util import flag_value, has_flag

RESETS = ("--reset-optimizer", "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler",
          "--finetune-from-model", "--continue-once")


def resume_path(argv):
    """The checkpoint fairseq-train would resume from (it may not exist)."""
    save_dir = flag_value(argv, "--save-dir") or "checkpoints"
    restore = flag_value(argv, "--restore-file") or "checkpoint_last.pt"
    suffix = flag_value(argv, "--checkpoint-suffix") or ""
    if restore == "checkpoint_last.pt":
        return os.path.join(save_dir, f"checkpoint_last{suffix}.pt")
    return restore.replace(".pt", suffix + ".pt") if suffix else restore


def peek(path):
    """A checkpoint's dict with its tensors memory-mapped (cheap), or None if it cannot be read so."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - unreadable here: fairseq's own load reports it properly
        return None


def _int_flag(argv, flag):
    v = flag_value(argv, flag)
    try:
        return int(v) if v is not None else 0
    except ValueError:
        return None


def finished_run(argv):
    """The one-line note if b2t-train argv would resume a finished run, else None."""
    if any(has_flag(argv, f) for f in RESETS):
        return None
    max_update, max_epoch = _int_flag(argv, "--max-update"), _int_flag(argv, "--max-epoch")
    if max_update is None or max_epoch is None or (max_update <= 0 and max_epoch <= 0):
        return None
    path = resume_path(argv)
    if not os.path.isfile(path):
        return None
    state = peek(path)
    try:
        updates = int(state["optimizer_history"][-1]["num_updates"])
        itr = state["extra_state"]["train_iterator"]
        epoch, in_epoch = int(itr["epoch"]), int(itr.get("iterations_in_epoch", 0))
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    where = f"{path} (update {updates}, epoch {epoch if in_epoch else epoch - 1} done)" if not in_epoch \
        else f"{path} (update {updates}, in epoch {epoch})"
    if max_update > 0 and updates >= max_update:
        return (f"the run is finished: {where} has reached --max-update {max_update}; nothing to train "
                f"(fairseq would train one more update and overwrite it); raise --max-update to train on")
    if max_epoch > 0 and epoch > max_epoch:
        return (f"the run is finished: {where} has trained --max-epoch {max_epoch} epochs; nothing to train; "
                "raise --max-epoch to train on")
    return None


# --- flag values fairseq takes without complaint and then fails on (or trains wrongly with) ---------

# flag: (lowest allowed, integer?, what it is, fix)
AT_LEAST = {
    "--max-tokens": (1, True, "the most tokens in a batch on each device", "e.g. --max-tokens 4096"),
    "--max-tokens-valid": (1, True, "the most tokens in a validation batch", "e.g. --max-tokens-valid 4096"),
    "--batch-size": (1, True, "the most sentences in a batch", "e.g. --batch-size 64, or drop it and use --max-tokens"),
    "--batch-size-valid": (1, True, "the most sentences in a validation batch", "e.g. --batch-size-valid 64"),
    "--update-freq": (1, True, "batches accumulated per update", "1 accumulates none; the paper trains on 8 GPUs "
                      "with --update-freq 16"),
    "--encoder-layers": (1, True, "the encoder depth", "the paper uses 6 or 18"),
    "--decoder-layers": (1, True, "the decoder depth", "the paper uses 6 or 18"),
    "--encoder-embed-dim": (1, True, "the encoder width", "the paper uses 512"),
    "--decoder-embed-dim": (1, True, "the decoder width", "the paper uses 512"),
    "--encoder-ffn-embed-dim": (1, True, "the encoder FFN width", "the paper uses 2048"),
    "--decoder-ffn-embed-dim": (1, True, "the decoder FFN width", "the paper uses 2048"),
    "--encoder-attention-heads": (1, True, "the encoder's attention heads", "the paper uses 8"),
    "--decoder-attention-heads": (1, True, "the decoder's attention heads", "the paper uses 8"),
    "--beam": (1, True, "the beam size", "--beam 1 is greedy search; the paper decodes with --beam 4"),
    "--nbest": (1, True, "hypotheses printed per sentence", "e.g. --nbest 1"),
    "--max-update": (0, True, "the number of updates to train (0: no limit)", "e.g. --max-update 50000"),
    "--max-epoch": (0, True, "the number of epochs to train (0: no limit)", "e.g. --max-epoch 10"),
    "--seed": (0, True, "the random seed", "use a seed from 0 to 2**32-1"),
    "--num-workers": (0, True, "data loading processes", "0 loads data in the main process"),
    "--warmup-updates": (0, True, "the updates of learning rate warmup", "the paper uses 4000"),
    "--save-interval-updates": (0, True, "updates between checkpoints (0: only at epoch ends)", "e.g. 1000"),
    "--log-interval": (1, True, "updates between log lines", "e.g. --log-interval 100"),
    "--save-interval": (1, True, "epochs between checkpoints", "e.g. --save-interval 1"),
    "--validate-interval": (1, True, "epochs between validations", "e.g. --validate-interval 1, or "
                            "--disable-validation"),
    "--max-source-positions": (1, True, "the longest source sentence the model takes", "the default is 1024"),
    "--max-target-positions": (1, True, "the longest target sentence the model takes", "the default is 1024"),
    "--clip-norm": (0, False, "the gradient norm clipping threshold (0: no clipping)", "the paper uses 0.1 "
                    "for deep models"),
}
POSITIVE = {"--lr": ("the learning rate", "the paper uses --lr 0.001 (see recipe.py)")}
PROBABILITIES = ("--dropout", "--attention-dropout", "--activation-dropout", "--label-smoothing")


def _numbers(flag, text, integer):
    try:
        return [int(x) if integer else float(x) for x in text.split(",")]
    except ValueError:
        return None  # not a number: fairseq's argparse says so itself


def check_flags(argv, prog=""):
    """Raise a ToolError for a flag value out of range (0, negative, or absurd)."""
    if prog.endswith(("train", "validate")) and not (has_flag(argv, "--max-tokens") or has_flag(argv, "--batch-size")):
        raise ToolError("no batch size given; pass --max-tokens (tokens per batch and device, e.g. 4096) or --batch-size "
                       "(sentences per batch)")
    for flag, (low, integer, what, fix) in AT_LEAST.items():
        text = flag_value(argv, flag)
        values = None if text is None else _numbers(flag, text, integer)
        if values and min(values) < low:
            need = ("a whole number of at least 1" if low == 1 else "0 or more") if integer else f"{low} or more"
            raise ToolError(f"{flag} {text}: {what} must be {need}; {fix}")
    for flag, (what, fix) in POSITIVE.items():
        text = flag_value(argv, flag)
        values = None if text is None else _numbers(flag, text, False)
        if values and min(values) <= 0:
            raise ToolError(f"{flag} {text}: {what} must be above 0 (with {text} the model does not learn); {fix}")
    for flag in PROBABILITIES:
        text = flag_value(argv, flag)
        values = None if text is None else _numbers(flag, text, False)
        if values and not all(0 <= v < 1 for v in values):
            raise ToolError(f"{flag} {text}: must be a probability from 0 up to 1 (1 itself excluded); the paper "
                           "uses 0.1 or 0.3")
    warmup = _numbers("", flag_value(argv, "--warmup-updates") or "", True)
    if flag_value(argv, "--lr-scheduler") == "inverse_sqrt" and warmup == [0]:
        raise ToolError("--lr-scheduler inverse_sqrt with --warmup-updates 0 divides by zero; give it at least 1 "
                       "warmup update (the paper uses 4000), or use --lr-scheduler fixed")
    beam, nbest = (_numbers("", flag_value(argv, f) or "", True) for f in ("--beam", "--nbest"))
    if beam and nbest and nbest[0] > beam[0]:
        raise ToolError(f"--nbest {nbest[0]} is more than --beam {beam[0]}: a beam search keeps only --beam "
                       "hypotheses; raise --beam or lower --nbest")
    for side in ("encoder", "decoder"):
        dim, heads = (_numbers("", flag_value(argv, f"--{side}-{k}") or "", True) for k in ("embed-dim", "attention-heads"))
        if dim and heads and len(dim) == len(heads) == 1 and dim[0] % heads[0]:
            raise ToolError(f"--{side}-embed-dim {dim[0]} is not divisible by --{side}-attention-heads {heads[0]}; "
                           "choose a width that is a multiple of the heads (512 with 8 heads, 1024 with 16)")


def check_paths(argv, prog):
    """Raise a ToolError for an output place that cannot be written or an input of the wrong kind."""
    if prog.endswith("train") and not has_flag(argv, "--no-save"):
        save_dir = flag_value(argv, "--save-dir") or "checkpoints"
        _check_writable_dir(save_dir, "--save-dir", "pass a folder that can be written (it is created if missing)")
    log_file = flag_value(argv, "--log-file")
    if log_file and prog.endswith("train"):
        folder = os.path.dirname(os.path.abspath(log_file))
        if not os.path.isdir(folder):
            raise ToolError(f"--log-file {log_file}: folder {folder} does not exist; create it first, or log to a "
                           "file in an existing folder")
        if os.path.isdir(log_file):
            raise ToolError(f"--log-file {log_file} is a folder; pass a file name such as {log_file}/train.log")
        if not os.access(folder, os.W_OK):
            raise ToolError(f"--log-file {log_file}: folder {folder} cannot be written; log to a folder you can write")
    restore = flag_value(argv, "--restore-file")
    if prog.endswith("train") and restore and os.path.isdir(restore):
        raise ToolError(f"--restore-file {restore} is a folder; pass a checkpoint file in it, such as "
                       f"{os.path.join(restore, 'checkpoint_last.pt')}")
    path = flag_value(argv, "--path")
    if path and prog.endswith(("generate", "validate", "interactive", "eval-lm")):
        for p in path.split(os.pathsep):
            if os.path.isdir(p):
                raise ToolError(f"--path {p} is a folder; pass a checkpoint file in it, such as "
                               f"{os.path.join(p, 'checkpoint_best.pt')} (separate several with ':')")


def _check_writable_dir(path, flag, fix):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ToolError(f"{flag} {path} is a file, not a folder; {fix}")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):  # the nearest existing folder above it must be a folder we can write
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ToolError(f"{flag} {path} cannot be created: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ToolError(f"{flag} {path} cannot be written: {parent} is read-only for this user; {fix}")
