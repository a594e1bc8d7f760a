"""Behaviour change (our commands, or B2T_FAIRSEQ_STRICT=1): a checkpoint must fit the data it is used with.

fairseq builds the model from the data directory's dictionaries and runs it in the direction of the
command line (-s/-t, else the data's file names): an en->de checkpoint decodes a de->en data-bin
with a joined dictionary without a word. Checkpoints now record their data (extra_state["b2t_data"]:
languages, dictionary sizes and digests); older ones are judged by their cfg and embedding sizes.
Training, decoding or validating with another language direction or dictionary is refused.
Not a repair: fairseq allows it on purpose (its own tests load an ensemble of checkpoints trained on
other data), so it is off unless enabled (patches/__init__.py).
Relies on: ``fairseq.trainer.Trainer.load_checkpoint`` and ``Trainer.state_dict`` (whose result has an
``"extra_state"`` dict), ``fairseq.checkpoint_utils.load_model_ensemble_and_task(filenames,
arg_overrides=None, task=None, ...)`` returning ``(models, cfg, task)``, and the weights reaching
``BaseFairseqModel.load_state_dict`` with their ``context.Origin`` (checkpoint_load.py).
"""

import functools
import hashlib
import logging
import os

from ..errors import B2TError
from . import context

logger = logging.getLogger(__name__)


def cfg_get(cfg, key):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _dict_md5(d):
    return hashlib.md5("\n".join(d.symbols).encode("utf-8")).hexdigest()


def task_data(task):
    """The languages and dictionaries of a task's data (what a checkpoint records of its training data)."""
    out = {}
    cfg = getattr(task, "cfg", None)
    for side, attr in (("source", "source_dictionary"), ("target", "target_dictionary")):
        try:
            d = getattr(task, attr)
        except (AttributeError, NotImplementedError):
            d = None
        lang = getattr(cfg, f"{side}_lang", None) if cfg is not None else None
        if d is not None or lang is not None:
            out[side] = {"lang": lang, "types": len(d) if d is not None else None,
                         "md5": _dict_md5(d) if d is not None else None}
    return out


def model_data(model, task=None):
    """task_data for a model about to be loaded: its dictionaries, the task's languages if known."""
    out = task_data(task) if task is not None else {}
    for side, part in (("source", "encoder"), ("target", "decoder")):
        d = getattr(getattr(model, part, None), "dictionary", None)
        if d is not None:
            out.setdefault(side, {"lang": None})
            out[side].update(types=len(d), md5=_dict_md5(d))
    return out


def checkpoint_data(state, original=None):
    """What a checkpoint says of the data it was trained on: {side: {lang, types, md5}} (entries may be None).

    ``original``: its task's data/source_lang/target_lang before fairseq's overrides (context.Loading).
    """
    recorded = (state.get("extra_state") or {}).get("b2t_data")
    if recorded:
        return recorded
    task_cfg = cfg_get(state.get("cfg"), "task") or state.get("args")
    original = original or {}
    langs = [original.get("source_lang", cfg_get(task_cfg, "source_lang")),
             original.get("target_lang", cfg_get(task_cfg, "target_lang"))]
    data = original.get("data", cfg_get(task_cfg, "data"))
    if None in langs and isinstance(data, str):
        try:  # the run inferred its pair from its data folder's file names: look again if it is still there
            from fairseq.data.data_utils import infer_language_pair

            first = data.split(os.pathsep)[0]
            if os.path.isdir(first):
                langs = list(infer_language_pair(first))
        except Exception:  # noqa: BLE001 - best effort
            pass
    model = state.get("model") or {}
    out = {}
    for side, lang, key in (("source", langs[0], "encoder.embed_tokens.weight"),
                            ("target", langs[1], "decoder.embed_tokens.weight")):
        w = model.get(key)
        out[side] = {"lang": lang, "types": int(w.shape[0]) if hasattr(w, "shape") else None, "md5": None}
    return out


def _pair(data):
    return tuple((data.get(side) or {}).get("lang") for side in ("source", "target"))


def check_fits(ckpt, where, data):
    """Raise a B2TError if a checkpoint trained on `ckpt` (checkpoint_data) would run on `data` (task_data)."""
    (cs, ct), (ds, dt) = _pair(ckpt), _pair(data)
    if None not in (cs, ct, ds, dt) and (cs, ct) != (ds, dt):
        how = ("reversed: " if (cs, ct) == (dt, ds) else "") + f"{ds}->{dt}"
        raise B2TError(f"{where} translates {cs}->{ct}, but the data is read {how} (from -s/-t or the data "
                       f"directory's file names); pass -s {cs} -t {ct} with data binarized for that pair "
                       "(fairseq finds a de-en folder's files for -s en -t de too)")
    for side in ("source", "target"):
        c, d = ckpt.get(side) or {}, data.get(side) or {}
        lang = d.get("lang") or c.get("lang")
        name = f"dict.{lang}.txt" if lang else f"{side} dictionary"
        fix = ("binarize the data with fairseq-preprocess --srcdict and --tgtdict given the dict files of the "
               "data the checkpoint was trained on")
        if c.get("types") is not None and d.get("types") is not None and c["types"] != d["types"]:
            raise B2TError(f"{where} was trained with a {c['types']}-type {side} dictionary, but the data "
                           f"directory's {name} has {d['types']} types, so token ids would not match; {fix}")
        if c.get("md5") and d.get("md5") and c["md5"] != d["md5"]:
            raise B2TError(f"{where} was trained with another {side} dictionary than the data directory's "
                           f"{name} (same size, other words or order), so token ids would not match; {fix}")


# --- the wrappers ------------------------------------------------------------------------------

def _fitting(load_state_dict):
    @functools.wraps(load_state_dict)
    def load_state_dict_that_fits(self, state_dict, *args, **kwargs):
        origin, ctx = context.origin_of(state_dict), context.current()
        if origin is not None and origin.data is not None:
            check_fits(origin.data, origin.where, model_data(self, ctx.task if ctx is not None else None))
        return load_state_dict(self, state_dict, *args, **kwargs)

    load_state_dict_that_fits.b2t_data_fit = True
    return load_state_dict_that_fits


def _with_task(load):
    @functools.wraps(load)
    def load_checkpoint(self, *args, **kwargs):
        with context.loading(task=self.task):
            return load(self, *args, **kwargs)

    load_checkpoint.b2t_data_fit = True
    return load_checkpoint


def _recording(state_dict):
    @functools.wraps(state_dict)
    def with_data(self):
        state = state_dict(self)
        if self.task is not None and isinstance(state.get("extra_state"), dict):
            try:
                state["extra_state"]["b2t_data"] = task_data(self.task)
            except Exception as e:  # noqa: BLE001 - a task without dictionaries: record nothing
                logger.debug("no b2t_data recorded: %s", e)
        return state

    with_data.b2t_data_fit = True
    return with_data


def _ensemble_fits(ensemble):
    @functools.wraps(ensemble)
    def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, *args, **kwargs):
        with context.loading(task=task) as ctx:
            out = ensemble(filenames, arg_overrides, task, *args, **kwargs)
        if task is None:  # fairseq-validate: the task was built from the checkpoint and the data folder
            for origin in ctx.seen:
                check_fits(origin.data, origin.where, task_data(out[2]))
        return out

    load_model_ensemble_and_task.b2t_data_fit = True
    return load_model_ensemble_and_task


def install():
    from fairseq import checkpoint_utils
    from fairseq.models.fairseq_model import BaseFairseqModel
    from fairseq.trainer import Trainer

    for owner, name, wrap in ((BaseFairseqModel, "load_state_dict", _fitting), (Trainer, "load_checkpoint", _with_task),
                              (Trainer, "state_dict", _recording),
                              (checkpoint_utils, "load_model_ensemble_and_task", _ensemble_fits)):
        fn = getattr(owner, name)
        if not getattr(fn, "b2t_data_fit", False):
            setattr(owner, name, wrap(fn))
