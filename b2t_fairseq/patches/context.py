"""The one loading context the checkpoint patches share, and the origin a loaded state dict carries.

fairseq loads a checkpoint in several steps that do not pass our information along:
``load_model_ensemble_and_task`` or ``Trainer.load_checkpoint`` (which know the task) call
``load_checkpoint_to_cpu`` (which knows the path), which calls ``overwrite_args_by_name`` and
``_upgrade_state_dict`` (which see the checkpoint's config), and later ``model.load_state_dict``
gets the weights alone. The wrappers push a :class:`Loading` for the duration of their call (a
context variable: per thread and task, restored on exit), and the upgrade step attaches what the
checkpoint says of itself (:class:`Origin`: layer type, data, name) to its weights dict, so the
state-dict guard reads it from the very dict it is given.
"""

import collections
import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Origin:
    """What a checkpoint says of itself, as the guards need it."""
    where: str                 # "checkpoint PATH", for messages
    layer_type: Optional[str]  # layer_types key, None if unknown
    data: Any = None           # data_fit.checkpoint_data(state)
    task: Optional[str] = None  # the fairseq task it was trained with (run_guards.task_of_checkpoint)


@dataclass
class Loading:
    """One checkpoint load in progress (nested loads each push their own)."""
    task: Any = None           # the task whose data the checkpoint must fit, if known
    path: Optional[str] = None  # the checkpoint file being read
    before_overrides: dict = field(default_factory=dict)  # its task's data/langs before fairseq's overrides
    seen: list = field(default_factory=list)  # Origin of every checkpoint read within this load
    stored_type: Optional[str] = None  # the layer type the file records, when overrides would hide it
    checks: list = field(default_factory=list)  # called with each Origin read within this load (run_guards)
    parent: Optional["Loading"] = None


_current = contextvars.ContextVar("b2t_fairseq_loading", default=None)


def current():
    """The innermost load in progress, or None."""
    return _current.get()


@contextlib.contextmanager
def loading(task=None, path=None):
    """Push a load; it inherits the task of the load around it."""
    parent = _current.get()
    ctx = Loading(task=task if task is not None else (parent.task if parent else None), path=path, parent=parent)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def record(origin):
    """Note a checkpoint just read in every load around it (the ensemble check reads them), and run the
    checks those loads registered (before fairseq builds a model for it)."""
    ctx = _current.get()
    while ctx is not None:
        ctx.seen.append(origin)
        for check in ctx.checks:
            check(origin)
        ctx = ctx.parent


class Weights(collections.OrderedDict):
    """A checkpoint's model state dict with its :class:`Origin` attached (``b2t_origin``).

    It pickles, copies and saves as a plain OrderedDict, so nothing of ours ends up in a file.
    """

    b2t_origin = None

    def __reduce__(self):
        state = {k: v for k, v in vars(self).items() if k != "b2t_origin"}
        return collections.OrderedDict, (), state or None, None, iter(self.items())


def attach(weights, origin):
    """``weights`` (a dict) as :class:`Weights` carrying ``origin`` (tensors shared, not copied)."""
    out = Weights(weights)
    meta = getattr(weights, "_metadata", None)
    if meta is not None:  # torch's per-module versions, read by Module.load_state_dict
        out._metadata = meta
    out.b2t_origin = origin
    return out


def origin_of(weights):
    return getattr(weights, "b2t_origin", None)
