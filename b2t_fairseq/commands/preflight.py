"""Checks b2t-train, b2t-generate and b2t-validate make before fairseq starts (cheap: flags, file
headers, no model): a finished run, and bad values fairseq would take for a traceback or worse.

``finished_run(argv)``: fairseq-train re-run on a run that reached --max-update trains ONE MORE update
(its loop checks the limit only after a step) and overwrites checkpoint_last.pt with it. That is a
fairseq bug for our users: a finished run must stay finished. b2t-train reads the checkpoint it would
resume from (its pickled header only, memory-mapped: no weights are read) and, if the run is finished,
says so in one line and exits 0 without starting fairseq.
"""

import os

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
