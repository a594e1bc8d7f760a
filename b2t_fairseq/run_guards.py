"""The run guards every training and decoding entry point passes through, in one place.

A run is identified by its layer type (layer_types.which), its task (translation or language
model) and its data (the dictionaries it was trained with: patches/data_fit.py). A checkpoint
resumed without a --reset-* flag must be of the same run: another layer type, task or data is
refused in one line (fine-tuning from another run is asked for with the reset flags). A run at
--max-update (or past --max-epoch) is finished: fairseq would train one more update and overwrite
it, so it says so in one line and exits 0. One writer per --save-dir: an flock on SAVE_DIR/LOCK_NAME,
taken by the process that writes checkpoints (rank 0) and dropped by the kernel when it ends.

The same functions serve b2t_tools' early checks (before fairseq builds a model) and the patch
that runs them for every training entry point (patches/run_guards.py: fairseq-train, fairseq-hydra-
train, b2t-train, b2t-hydra-train, b2t-stability's cells). Nothing here imports fairseq at import time.
"""

import json
import os
import socket
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

from . import layer_types
from .errors import B2TError

LOCK_NAME = ".b2t-train.lock"
LOCKS_ENV = "B2T_FAIRSEQ_LOCKS"  # {folder: pid} of the locks an ancestor process holds (its workers write there)
RESET_FLAGS = ("reset_optimizer", "reset_lr_scheduler", "reset_meters", "reset_dataloader")
FINE_TUNE_FIX = ("fine-tune from it on purpose with --reset-optimizer --reset-lr-scheduler --reset-dataloader "
                 "--reset-meters")


def _get(obj, key):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    try:
        return getattr(obj, key, None)
    except Exception:  # noqa: BLE001 - an omegaconf node without the key
        return None


# --- which run is this ---------------------------------------------------------------------------

@dataclass
class Run:
    """What identifies a training run (None: not known, not judged)."""
    layer_type: Optional[str] = None  # layer_types key
    task: Optional[str] = None        # fairseq task name
    data: Any = None                  # data_fit.task_data form: {side: {lang, types, md5}}


TASK_KINDS = {"translation": "translation", "language_modeling": "language model"}


def task_kind(name):
    """'translation' or 'language model' for a fairseq task name (its class, subclasses too), else None."""
    if name is None:
        return None
    name = str(name)
    try:
        from fairseq.tasks import TASK_REGISTRY
        from fairseq.tasks.language_modeling import LanguageModelingTask
        from fairseq.tasks.translation import TranslationTask
    except ImportError:  # pragma: no cover - fairseq is always there in practice
        return TASK_KINDS.get(name)
    cls = TASK_REGISTRY.get(name)
    if cls is None:
        return TASK_KINDS.get(name)
    for base, kind in ((LanguageModelingTask, "language model"), (TranslationTask, "translation")):
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    return None


def task_of_checkpoint(state):
    """The task name a checkpoint dict was trained with (its cfg.task._name or args.task), or None."""
    cfg = state.get("cfg")
    name = _get(_get(cfg, "task"), "_name") if cfg is not None else None
    return name if name is not None else _get(state.get("args"), "task")


def run_of_checkpoint(state, original=None):
    """The Run a checkpoint dict records."""
    from .patches.data_fit import checkpoint_data

    t = layer_types.which(state)
    return Run(t.key if t is not None else None, task_of_checkpoint(state), checkpoint_data(state, original))


def _label(key):
    return layer_types.BY_KEY[key].label if key in layer_types.BY_KEY else key


def check_task(have, want, where, doing="trains"):
    """Refuse a checkpoint of one task kind (``have``, a task name) used by a command of another (``want``)."""
    hk, wk = task_kind(have), task_kind(want)
    if hk is None or wk is None or hk == wk:
        return
    # a translation checkpoint is scored by b2t-generate or b2t-validate (eval-lm has no --task translation)
    other = "b2t-eval-lm or --task language_modeling" if hk == "language model" else \
        "b2t-generate or b2t-validate (--task translation)"
    raise B2TError(f"{where} holds a {hk} (task {have}) but this command {doing} a {wk} (task {want}), so its "
                   f"weights would run as another kind of model; pass a {wk} checkpoint, or use {other} for it")


def check_same_run(state, want, where):
    """Raise a B2TError unless the checkpoint dict ``state`` is of the run ``want`` describes."""
    from .patches import data_fit

    have = run_of_checkpoint(state)
    check_task(have.task, want.task, where)
    if have.layer_type is not None and want.layer_type is not None and have.layer_type != want.layer_type:
        raise B2TError(f"{where} holds a {_label(have.layer_type)} run but this command trains "
                       f"{_label(want.layer_type)}, so resuming would train on as a mixed model; pass the flags of "
                       f"the run that wrote it, start afresh in another --save-dir, or {FINE_TUNE_FIX}")
    if want.data:
        data_fit.check_fits(have.data, where, want.data)


def saved_setting(state, section, key):
    """A value the checkpoint's run was started with: its cfg section (a dict, or the legacy models'
    Namespace) or its old-style args; None if not recorded."""
    cfg = state.get("cfg")
    part = cfg.get(section) if isinstance(cfg, dict) else None
    for source in (part, state.get("args")):
        value = source.get(key) if isinstance(source, dict) else getattr(source, key, None)
        if value is not None:
            return value
    return None


def check_same_setup(state, where, lr_scheduler, layer_type=None, admin_omega=None, reset_lr_scheduler=False,
                     reset_optimizer=False):
    """Raise a B2TError if resuming ``state`` with another --lr-scheduler, or an Admin run with another
    --admin-omega (the command trains ``layer_type``; an omega not given is the default one). fairseq would
    load the saved schedule's state into the new one (KeyError: 'best') and the saved Adam state into
    parameters of another shape (trainable omegas against fixed buffers): a traceback after the model is built."""
    have = saved_setting(state, "lr_scheduler", "_name") or saved_setting(state, "lr_scheduler", "lr_scheduler")
    if have and lr_scheduler and have != lr_scheduler and not reset_lr_scheduler:
        raise B2TError(f"{where} was trained with --lr-scheduler {have}, and this command asks for --lr-scheduler "
                       f"{lr_scheduler}; pass --lr-scheduler {have} to resume it, or add --reset-lr-scheduler to "
                       f"start the {lr_scheduler} schedule from this checkpoint")
    if layer_type != "admin" or run_of_checkpoint(state).layer_type != "admin":
        return
    default = layer_types.OPTION_DEFAULTS["admin_omega"]
    have = saved_setting(state, "model", "admin_omega") or default
    want = str(admin_omega or default)
    if have != want and not reset_optimizer:
        raise B2TError(f"{where} was trained with --admin-omega {have}, and this command asks for --admin-omega "
                       f"{want} (other parameters: the saved optimizer state does not fit); pass "
                       f"--admin-omega {have} to resume it, or start afresh in another --save-dir")


# --- where a run resumes from, and whether it is finished --------------------------------------

def resume_target(ckpt, suffix=""):
    """(path, resets) of the checkpoint fairseq-train resumes from (checkpoint_utils.load_checkpoint's rule),
    for its CheckpointConfig or parsed args. ``resets``: it is loaded as a start for fine-tuning (a
    --reset-* flag, or --finetune-from-model on a first launch), not resumed as the same run."""
    resets = any(_get(ckpt, f) for f in RESET_FLAGS)
    suffix = suffix or ""
    restore = _get(ckpt, "restore_file") or "checkpoint_last.pt"
    if restore != "checkpoint_last.pt":
        return restore.replace(".pt", suffix + ".pt"), resets
    path = os.path.join(_get(ckpt, "save_dir") or "checkpoints", f"checkpoint_last{suffix}.pt")
    if not os.path.exists(path):
        if _get(ckpt, "continue_once") is not None:
            return _get(ckpt, "continue_once"), resets
        if _get(ckpt, "finetune_from_model") is not None:
            return _get(ckpt, "finetune_from_model"), True
    return path, resets


def read_header(path):
    """A checkpoint's dict with its tensors memory-mapped (the pickled header is read, not the weights),
    or None when it cannot be read so (an old non-zip file, damage: fairseq's own load reports those)."""
    import torch

    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - left to fairseq's load, which says what is wrong in one line
        return None
    return state if isinstance(state, dict) else None


def position(state):
    """(epoch, updates, iterations into the epoch) a checkpoint dict was saved at; None where not said."""
    updates = None
    history = state.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        updates = history[-1].get("num_updates")
    extra = state.get("extra_state") if isinstance(state.get("extra_state"), dict) else {}
    itr = extra.get("train_iterator") if isinstance(extra.get("train_iterator"), dict) else {}
    return itr.get("epoch", extra.get("epoch")), updates, itr.get("iterations_in_epoch", 0)


def finished(state, path, max_update, max_epoch):
    """The one-line note if a run resumed from this checkpoint dict has nothing left to train, else None."""
    max_update, max_epoch = max_update or 0, max_epoch or 0
    if state is None or (max_update <= 0 and max_epoch <= 0):
        return None
    try:
        epoch, updates, in_epoch = (int(x) for x in position(state))
    except (TypeError, ValueError):
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


# --- one writer per folder ------------------------------------------------------------------------

_held = {}  # realpath of a locked folder -> its open lock file (this process's, or inherited on fork)


def _ancestors():
    pids, pid = [], os.getppid()
    for _ in range(64):  # the chain of parents, as far as /proc tells it
        if pid <= 1:
            break
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _inherited(key):
    """Whether an ancestor process holds the lock of this folder (fairseq's spawned workers of a run)."""
    try:
        owners = json.loads(os.environ.get(LOCKS_ENV) or "{}")
    except ValueError:
        return False
    return isinstance(owners, dict) and owners.get(key) in _ancestors()


def _set_env(key, pid):
    try:
        owners = json.loads(os.environ.get(LOCKS_ENV) or "{}")
    except ValueError:
        owners = {}
    if pid is None:
        owners.pop(key, None)
    else:
        owners[key] = pid
    if owners:
        os.environ[LOCKS_ENV] = json.dumps(owners)
    else:
        os.environ.pop(LOCKS_ENV, None)


def lock_dir(folder, flag="--save-dir", who="run"):
    """Hold the one-writer lock of ``folder`` (created if missing) until :func:`release_locks` or the
    process ends, or raise a B2TError naming the process that holds it. Idempotent in a process, its
    forks and the workers it spawns. Returns True when this call took it."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held or _inherited(key):
        return False
    path = os.path.join(folder, LOCK_NAME)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise B2TError(f"{flag} {folder}: cannot open its lock file {path} ({e.strerror}); pass a folder that "
                       "can be written") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = " ".join(f.read().split()) or "another process"
        f.close()
        raise B2TError(f"{flag} {folder} is being written by another {who} ({holder}); wait for it to finish or "
                       f"stop it, or pass another {flag}") from None
    _held[key] = f
    _set_env(key, os.getpid())
    return True


def claim(folder, prog=None):
    """Write who holds ``folder``'s lock into it (a refused second writer names it)."""
    f = _held.get(os.path.realpath(folder))
    if f is None:
        return
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}{f' ({prog})' if prog else ''}\n")
    f.flush()


def held():
    """The folders whose locks this process holds (a snapshot for :func:`release_locks`)."""
    return set(_held)


def release_locks(keep=()):
    """Close the lock files this process holds, but those of ``keep`` (folders from :func:`held`).
    Closing, never LOCK_UN: a forked child closing its copy must not release its parent's lock."""
    for key in [k for k in _held if k not in keep]:
        _held.pop(key).close()
        _set_env(key, None)
