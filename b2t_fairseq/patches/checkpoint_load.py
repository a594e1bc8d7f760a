"""Repair: a damaged or unsafe checkpoint is one line, and the authors' fork checkpoints load.

Every checkpoint fairseq loads is checked first (zip directory and CRCs: torch.load checks neither, so
flipped bytes would load silently): a damaged one, or one torch's weights-only loader refuses, is a
:class:`CheckpointError`. A checkpoint of the authors' fairseq-0.9 fork is converted on load
(authors.py). The loaded weights carry their :class:`context.Origin` (layer type, data, name) for
the guards that see them later (layer_type_guard.py, data_fit.py).
Relies on: ``fairseq.checkpoint_utils.load_checkpoint_to_cpu(path, arg_overrides=None, ...)``, which
calls ``checkpoint_utils.overwrite_args_by_name(cfg, overrides)`` and then
``checkpoint_utils._upgrade_state_dict(state)`` (both looked up as module attributes) and returns
the state with the weights under ``"model"``.
"""

import functools
import logging
import os
import pickle

from .. import authors, layer_types, run_guards
from ..checkpoint_io import find_damage
from ..errors import CheckpointError
from . import context
from .data_fit import cfg_get, checkpoint_data

logger = logging.getLogger(__name__)


def _readable(load):
    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        local = os.path.expanduser(path)
        damage = find_damage(local) if os.path.isfile(local) else None
        if damage:
            raise CheckpointError(path, damage)
        with context.loading(path=path) as ctx:
            overrides = kwargs.get("arg_overrides", args[0] if args else None) or {}
            if LAYER_TYPE_KEYS & set(overrides) and os.path.isfile(local):
                ctx.stored_type = _stored_layer_type(local)
            try:
                return load(path, *args, **kwargs)
            except pickle.UnpicklingError as e:
                if "Weights only load failed" not in str(e):
                    raise
                raise CheckpointError(path, "torch.load(weights_only=True) refuses an object in it: not a fairseq "
                                            "checkpoint, or one from an untrusted source", kind="unsafe") from e

    load_checkpoint_to_cpu.b2t_checkpoint_load = True
    return load_checkpoint_to_cpu


# the saved options that decide a layer type: fairseq writes --model-overrides into the saved args
# before the checkpoint reaches us, so the type the file records is read from the file itself
LAYER_TYPE_KEYS = {"ln_position", "residual_bottom_to_top", "encoder_normalize_before", "decoder_normalize_before",
                   "arch", "_name"}


def _stored_layer_type(local):
    import torch

    try:  # memory-mapped: the pickled header is read, the tensors are not
        state = torch.load(local, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # an old non-zip file, or one fairseq's own load will report properly
        return None
    t = layer_types.which(state) if isinstance(state, dict) else None
    return t.key if t is not None else None


def _remember_before_overrides(overwrite):
    """fairseq-validate overrides a checkpoint's data path with its own before we see the checkpoint."""
    @functools.wraps(overwrite)
    def overwrite_args_by_name(cfg, overrides):
        ctx, task = context.current(), cfg_get(cfg, "task")
        if ctx is not None and ctx.path is not None and task is not None and not ctx.before_overrides:
            ctx.before_overrides = {k: cfg_get(task, k) for k in ("data", "source_lang", "target_lang")}
        return overwrite(cfg, overrides)

    overwrite_args_by_name.b2t_checkpoint_load = True
    return overwrite_args_by_name


def _importing(upgrade):
    """fairseq's checkpoint upgrade, preceded by the conversion of the authors' fork checkpoints."""
    @functools.wraps(upgrade)
    def _upgrade_state_dict(state):
        ctx = context.current()
        path = ctx.path if ctx is not None else None
        where = f"checkpoint {path}" if path else "the checkpoint"
        if authors.is_fork_checkpoint(state):
            state = authors.convert_state(state, where=where)
            logger.info("%s: converted from the authors' fairseq-0.9 fork (%s)", where, state["args"].b2t_imported_from)
        state = upgrade(state)
        if isinstance(state.get("model"), dict):
            original = ctx.before_overrides if ctx is not None else {}
            stored = ctx.stored_type if ctx is not None else None
            origin = context.Origin(where, stored or authors.layer_type_of_state(state), checkpoint_data(state, original),
                                    task=run_guards.task_of_checkpoint(state))
            state["model"] = context.attach(state["model"], origin)
            context.record(origin)
        return state

    _upgrade_state_dict.b2t_checkpoint_load = True
    return _upgrade_state_dict


def install():
    from fairseq import checkpoint_utils

    for name, wrap in (("load_checkpoint_to_cpu", _readable), ("overwrite_args_by_name", _remember_before_overrides),
                       ("_upgrade_state_dict", _importing)):
        fn = getattr(checkpoint_utils, name)
        if not getattr(fn, "b2t_checkpoint_load", False):
            setattr(checkpoint_utils, name, wrap(fn))
