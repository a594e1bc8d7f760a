"""Repair: every checkpoint names the training run that saved it (``extra_state["b2t_run"]``).

A run started afresh in a folder that still holds an older run's epoch checkpoints (after moving a
broken ``checkpoint_last.pt`` away, say) writes files that look like the old run's next epochs, so
``b2t-average-checkpoints`` would mix two runs. The id is a random hex string made when a run starts
from scratch and kept when it resumes (read back from the loaded checkpoint); fine-tuning from a
model (every reset flag set, as ``--finetune-from-model`` loads) starts a new run. fairseq ignores
unknown ``extra_state`` keys, so the checkpoints load anywhere as before.
Relies on: ``fairseq.trainer.Trainer.state_dict(self)`` returning a dict with an ``extra_state``
dict, and ``Trainer.load_checkpoint(self, filename, reset_optimizer, reset_lr_scheduler,
optimizer_overrides, reset_meters)`` returning the loaded checkpoint's ``extra_state`` (or None).
"""

import functools
import uuid

KEY = "b2t_run"


def run_of(trainer):
    """The trainer's run id, made on first use (a run from scratch)."""
    rid = getattr(trainer, "_b2t_run", None)
    if rid is None:
        rid = trainer._b2t_run = uuid.uuid4().hex
    return rid


def wrap(cls):
    """Patch cls.state_dict / cls.load_checkpoint (fairseq's Trainer, or a stand-in with the same shape)."""
    state_dict, load_checkpoint = cls.state_dict, cls.load_checkpoint
    if getattr(state_dict, "b2t_run_identity", False):
        return

    @functools.wraps(state_dict)
    def patched_state_dict(self):
        state = state_dict(self)
        if isinstance(state, dict) and isinstance(state.get("extra_state"), dict):
            state["extra_state"][KEY] = run_of(self)
        return state

    @functools.wraps(load_checkpoint)
    def patched_load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                                optimizer_overrides=None, reset_meters=False):
        extra = load_checkpoint(self, filename, reset_optimizer=reset_optimizer,
                                reset_lr_scheduler=reset_lr_scheduler, optimizer_overrides=optimizer_overrides,
                                reset_meters=reset_meters)
        finetune = reset_optimizer and reset_lr_scheduler and reset_meters
        rid = extra.get(KEY) if isinstance(extra, dict) else None
        if isinstance(rid, str) and rid and not finetune:
            self._b2t_run = rid  # a resumed run keeps its identity
        return extra

    patched_state_dict.b2t_run_identity = True
    cls.state_dict, cls.load_checkpoint = patched_state_dict, patched_load_checkpoint


def install():
    from fairseq.trainer import Trainer

    wrap(Trainer)
