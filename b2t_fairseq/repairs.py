"""Every runtime repair of fairseq and torch, in one place, each guarded and applied at most once.

Applied when the plugin is imported (``--user-dir b2t_fairseq``, ``import b2t_fairseq`` or any
console command), so fairseq's spawned GPU workers get them too. No fairseq file is changed: each
repair wraps or replaces one name, and names the fairseq code it relies on; tests/test_repairs.py
fails if that code changes shape.

1. ``torch.load`` of fairseq checkpoints (torch >= 2.6 defaults to ``weights_only=True``, which refuses
   the pickled ``argparse.Namespace`` and numpy scalars): allow exactly those globals.
   Relies on: ``torch.serialization.add_safe_globals``.
2. Remainder batches (``fairseq.data.data_utils.batch_by_size``): fairseq after 0.12.2 silently drops
   the last batch whose size is not a multiple of ``--required-batch-size-multiple`` (fairseq-generate
   translated 16 of 21 test sentences); we keep it, as 0.12.2 and the authors' 0.9.0 did. Nothing to
   batch (every sentence longer than --max-tokens) is one line instead of an IndexError.
3. Checkpoints (``fairseq.checkpoint_utils.PathManager.copy``, ``load_checkpoint_to_cpu``,
   ``_upgrade_state_dict`` and ``BaseFairseqModel.load_state_dict``): fairseq copies a saved checkpoint
   onto ``checkpoint_last.pt``/``checkpoint_best.pt`` in place, so a kill mid-copy leaves a truncated
   file; the copies become atomic, and every checkpoint is checked (zip directory and CRCs) before it
   is loaded: a damaged one is a :class:`CheckpointError`. A checkpoint of the authors' fairseq-0.9
   fork is converted on load (authors.py), and a B2T checkpoint is refused by a model that is not B2T
   (it would silently run as Post-LN).
3b. A checkpoint must fit its data (``Trainer.load_checkpoint``/``state_dict``,
   ``checkpoint_utils.load_model_ensemble_and_task``): checkpoints record their languages and
   dictionaries (``extra_state["b2t_data"]``); training, decoding or validating with another language
   direction or dictionary is refused, and a model that does not fit a checkpoint (another depth) is
   one line naming the difference.
4. ``collective_timeout(seconds)`` (not applied at import; the torchrun launcher calls it for
   ``--heartbeat-timeout``): ``torch.distributed.init_process_group``/``new_group`` get that timeout,
   so a worker blocked in a gloo collective fails instead of waiting torch's default 30 minutes.
5. Exact resume after epoch 1 (``fairseq.trainer.Trainer.get_train_iterator``): an uninterrupted run
   makes its batches once, in epoch 1 (``FairseqTask.get_batch_iterator`` breaks length ties with a
   permutation seeded by seed + epoch, then caches the batches and only reshuffles their order each
   epoch), but a run resumed in epoch E > 1 made them afresh with seed + E: other sentences in each
   batch, and losses that drift from the uninterrupted run. A resumed run now makes the epoch-1
   batches, so it continues bit for bit. Runs whose batches fairseq rebuilds every epoch (sharded
   data, --update-epoch-batch-itr, rebuild_batches) were exact already and are left alone.
6. Binarized data and dictionaries are checked as fairseq opens them
   (``fairseq.data.data_utils.load_indexed_dataset``, ``Dictionary.add_from_file``): a truncated
   ``.bin`` or ``.idx``, an empty split or a malformed dictionary line is one line naming the file,
   not a ``ValueError``/``AttributeError`` from deep inside numpy.
"""


import argparse
import datetime
import functools
import hashlib
import logging
import os
import pickle
import re
import shutil
import zipfile
import zlib

import numpy as np
import torch

from . import layer_types
from .errors import B2TError, CheckpointError

logger = logging.getLogger(__name__)


# --- 1. torch.load of fairseq checkpoints -----------------------------------------------------

def _numpy_globals():
    found = [np.ndarray, np.dtype]
    for mod, name in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")):
        try:
            found.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    # dtype classes such as numpy.dtypes.Float64DType appear in pickled numpy scalars
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    return found


def allow_fairseq_checkpoints():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # torch < 2.4 has no weights_only default to fix
        add([argparse.Namespace] + _numpy_globals())


# --- 2. remainder batches ----------------------------------------------------------------------

def keep_remainder_batches():
    from fairseq.data import data_utils

    drops = data_utils.batch_by_size
    if getattr(drops, "b2t_keeps_remainder", False):
        return

    @functools.wraps(drops)
    def batch_by_size(indices, *args, **kwargs):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        if len(indices) == 0:  # fairseq: IndexError: list index out of range
            raise B2TError("no sentence left to batch: the split is empty, or every sentence is longer than "
                           "--max-tokens or the model's --max-source-positions/--max-target-positions (fairseq-train "
                           "skips those); raise --max-tokens to at least the longest sentence pair, or the positions")
        batches = drops(indices, *args, **kwargs)
        fixed_shapes = kwargs.get("fixed_shapes", args[5] if len(args) > 5 else None)
        covered = sum(len(b) for b in batches)
        if fixed_shapes is None and covered < len(indices):
            # batches are consecutive slices of indices: what is missing is the dropped tail
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size.b2t_keeps_remainder = True
    data_utils.batch_by_size = batch_by_size


# --- 3. checkpoints that survive a kill -------------------------------------------------------

def atomic_copy(src, dst):
    """Copy src to dst so that dst is, at every moment, either the old file or the complete new one."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        with open(src, "rb") as fsrc, open(tmp, "wb") as fdst:
            shutil.copyfileobj(fsrc, fdst, 1 << 20)
            fdst.flush()
            os.fsync(fdst.fileno())
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


# what torch.save writes first in its pre-1.6 (non-zip) format: a pickled magic number
_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")


def find_damage(path):
    """Why the file at path is not an intact torch checkpoint, or None if it looks intact.

    torch.save writes a zip archive with a CRC per record; torch.load checks neither the CRCs nor,
    for some truncations, the length, so a damaged file can load and give a silently broken model.
    Reading the archive once more costs about as long as the CRC of its size (~1 s a GB).
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if head == _LEGACY_MAGIC:
        return None  # an old non-zip checkpoint: nothing to check it with
    if not zipfile.is_zipfile(path):
        return f"truncated or not a checkpoint: {size} bytes without a zip directory"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError) as e:
        return f"damaged zip archive, {size} bytes: {e}"
    return f"corrupt: CRC mismatch in {bad}" if bad else None


_loading = []  # the checkpoint path being loaded (for messages from the upgrade hook)
_layer_type_of = {}  # id(state["model"]) -> layer type of the checkpoint it came from ('b2t', 'pre', 'post')
_data_of = {}  # id(state["model"]) -> (checkpoint_data(state), where)
_collectors = []  # lists collecting (checkpoint_data(state), where) of each checkpoint loaded meanwhile
_tasks = []  # the task whose data the checkpoint being loaded must fit (Trainer.load_checkpoint, generate)


def _readable(load):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        local = os.path.expanduser(path)
        damage = find_damage(local) if os.path.isfile(local) else None
        if damage:
            raise CheckpointError(path, damage)
        _loading.append(path)
        try:
            return load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" not in str(e):
                raise
            raise CheckpointError(path, "torch.load(weights_only=True) refuses an object in it: not a fairseq "
                                        "checkpoint, or one from an untrusted source", kind="unsafe") from e
        finally:
            _loading.pop()

    load_checkpoint_to_cpu.b2t_wrapped = True
    return load_checkpoint_to_cpu


def _importing(upgrade):
    """fairseq's checkpoint upgrade, preceded by the conversion of the authors' fork checkpoints."""
    def _upgrade_state_dict(state):
        from . import authors as imp

        where = f"checkpoint {_loading[-1]}" if _loading else "the checkpoint"
        if imp.is_fork_checkpoint(state):
            state = imp.convert_state(state, where=where)
            logger.info("%s: converted from the authors' fairseq-0.9 fork (%s)", where, state["args"].b2t_imported_from)
        state = upgrade(state)
        if isinstance(state.get("model"), dict):
            if len(_layer_type_of) > 8:  # ids of dicts long gone: keep the table small
                _layer_type_of.clear()
            _layer_type_of[id(state["model"])] = (imp.layer_type_of_state(state), where)
            if len(_data_of) > 8:  # ids of dicts long gone: keep the table small
                _data_of.clear()
            _data_of[id(state["model"])] = (checkpoint_data(state, _loading[-1] if _loading else None), where)
            for seen in _collectors:
                seen.append(_data_of[id(state["model"])])
        return state

    _upgrade_state_dict.b2t_wrapped = True
    return _upgrade_state_dict


def _b2t_guard(load_state_dict):
    """Refuse a B2T (or DeepNorm, Admin) checkpoint's weights for a model of another layer type: the
    parameter names are the same, so it would load silently and run as the wrong model. (A Post-LN
    checkpoint may still initialize another layer type, e.g. to fine-tune it as B2T.)"""
    def guarded_load_state_dict(self, state_dict, *args, **kwargs):
        ckpt_type, where = _layer_type_of.pop(id(state_dict), (None, None))
        data, _ = _data_of.pop(id(state_dict), (None, None))
        if data is not None:
            check_fits(data, where, model_data(self, _tasks[-1] if _tasks else None))
        if ckpt_type in layer_types.OWN_LAYERS:
            model_type = layer_types.of_model(self)
            if model_type not in (None, ckpt_type):
                fix = ("pass --arch transformer_b2t (or the authors' --arch transformer_wmt_en_de "
                       "--residual-bottom-to-top with b2t-train), and convert a checkpoint of the authors' fork "
                       "once with b2t-import-checkpoint IN.pt OUT.pt") if ckpt_type == "b2t" else \
                      f"pass --arch transformer_{ckpt_type} (or --ln-position {ckpt_type})"
                raise B2TError(f"{where} holds a {layer_types.BY_KEY[ckpt_type].label} model but the model built "
                               f"from the command line is {layer_types.BY_KEY[model_type].label}, so it would run as the wrong model; {fix}")
        try:
            return load_state_dict(self, state_dict, *args, **kwargs)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            raise B2TError(f"{where or 'the checkpoint'} does not fit the model built from the command line "
                           f"({_state_dict_mismatch(self, state_dict, str(e))}); pass the model flags of the run "
                           "that wrote it (--arch, --encoder-layers, --decoder-layers, the embedding sizes), or "
                           "start afresh in another --save-dir") from e

    guarded_load_state_dict.b2t_wrapped = True
    return guarded_load_state_dict


def safe_checkpoints():
    """Make fairseq's checkpoint copies atomic and its checkpoint load errors one line (idempotent)."""
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if not getattr(checkpoint_utils.PathManager, "b2t_atomic", False):
        class AtomicCopyPathManager(PathManager):
            b2t_atomic = True

            @staticmethod
            def copy(src_path, dst_path, overwrite=False):
                if not PathManager.supports_rename(dst_path):  # remote storage: keep fairseq's way
                    return PathManager.copy(src_path, dst_path, overwrite=overwrite)
                return atomic_copy(src_path, dst_path)

        checkpoint_utils.PathManager = AtomicCopyPathManager
    if not getattr(checkpoint_utils.load_checkpoint_to_cpu, "b2t_wrapped", False):
        checkpoint_utils.load_checkpoint_to_cpu = _readable(checkpoint_utils.load_checkpoint_to_cpu)
    if not getattr(checkpoint_utils._upgrade_state_dict, "b2t_wrapped", False):
        checkpoint_utils._upgrade_state_dict = _importing(checkpoint_utils._upgrade_state_dict)
    from fairseq.models.fairseq_model import BaseFairseqModel

    if not getattr(BaseFairseqModel.load_state_dict, "b2t_wrapped", False):
        BaseFairseqModel.load_state_dict = _b2t_guard(BaseFairseqModel.load_state_dict)
    _check_data_fit()

# --- 3b. a checkpoint fits the data it is used with ------------------------------------------------
# fairseq builds the model from the data directory's dictionaries and runs it in the direction of the
# command line (-s/-t, else the data's file names): an en->de checkpoint decodes a de->en data-bin
# with a joined dictionary without a word. Checkpoints now record their data (extra_state["b2t_data"]:
# languages, dictionary sizes and digests); older ones are judged by their cfg and embedding sizes.

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


def _cfg_get(cfg, key):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


_before_overrides = {}  # checkpoint path -> its task's data, source_lang, target_lang before fairseq's overrides


def _remember_before_overrides(overwrite):
    """fairseq-validate overrides a checkpoint's data path with its own before we see the checkpoint."""
    def overwrite_args_by_name(cfg, overrides):
        task = _cfg_get(cfg, "task")
        if _loading and task is not None:
            _before_overrides[_loading[-1]] = {k: _cfg_get(task, k) for k in ("data", "source_lang", "target_lang")}
        return overwrite(cfg, overrides)

    overwrite_args_by_name.b2t_wrapped = True
    return overwrite_args_by_name


def checkpoint_data(state, path=None):
    """What a checkpoint says of the data it was trained on: {side: {lang, types, md5}} (entries may be None)."""
    recorded = (state.get("extra_state") or {}).get("b2t_data")
    if recorded:
        return recorded
    task_cfg = _cfg_get(state.get("cfg"), "task") or state.get("args")
    original = _before_overrides.pop(path, None) or {}
    langs = [original.get("source_lang", _cfg_get(task_cfg, "source_lang")),
             original.get("target_lang", _cfg_get(task_cfg, "target_lang"))]
    data = original.get("data", _cfg_get(task_cfg, "data"))
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


def _layer_counts(keys):
    counts = {}
    for k in keys:
        m = re.match(r"(encoder|decoder)\.layers\.(\d+)\.", k)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)) + 1)
    return counts


def _state_dict_mismatch(model, state_dict, msg):
    """A short account of why a state dict does not load into a model."""
    have, want = _layer_counts(state_dict), _layer_counts(model.state_dict())
    if have != want:
        fmt = lambda c: " and ".join(f"{c.get(p, 0)} {p} layers" for p in ("encoder", "decoder"))  # noqa: E731
        return f"it has {fmt(have)}, the model {fmt(want)}"
    m = re.search(r"size mismatch for (\S+): copying a param with shape (torch.Size\(\[[^\]]*\]\)) from checkpoint, "
                  r"the shape in current model is (torch.Size\(\[[^\]]*\]\))", msg)
    if m:
        return f"{m.group(1)} is {list(_sizes(m.group(2)))} in it, {list(_sizes(m.group(3)))} in the model"
    missing = re.findall(r'"([^"]+)"', msg.split("Missing key(s) in state_dict:", 1)[-1].split("Unexpected", 1)[0]) \
        if "Missing key(s)" in msg else []
    unexpected = re.findall(r'"([^"]+)"', msg.split("Unexpected key(s) in state_dict:", 1)[-1].split("size mismatch", 1)[0]) \
        if "Unexpected key(s)" in msg else []
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights of the model missing from it, such as {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weights the model lacks, such as {unexpected[0]}")
    return ", ".join(parts) or " ".join(msg.split())[:200]


def _sizes(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _check_data_fit():
    """Install the checks (idempotent): Trainer.load_checkpoint and load_model_ensemble_and_task name the
    task the checkpoint must fit; the trainer's checkpoints record their data."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    if not getattr(checkpoint_utils.overwrite_args_by_name, "b2t_wrapped", False):
        checkpoint_utils.overwrite_args_by_name = _remember_before_overrides(checkpoint_utils.overwrite_args_by_name)
    if not getattr(Trainer.load_checkpoint, "b2t_wrapped", False):
        load = Trainer.load_checkpoint

        @functools.wraps(load)
        def load_checkpoint(self, *args, **kwargs):
            _tasks.append(self.task)
            try:
                return load(self, *args, **kwargs)
            finally:
                _tasks.pop()

        load_checkpoint.b2t_wrapped = True
        Trainer.load_checkpoint = load_checkpoint

    if not getattr(Trainer.state_dict, "b2t_wrapped", False):
        state_dict = Trainer.state_dict

        @functools.wraps(state_dict)
        def with_data(self):
            state = state_dict(self)
            if self.task is not None and isinstance(state.get("extra_state"), dict):
                try:
                    state["extra_state"]["b2t_data"] = task_data(self.task)
                except Exception as e:  # noqa: BLE001 - a task without dictionaries: record nothing
                    logger.debug("no b2t_data recorded: %s", e)
            return state

        with_data.b2t_wrapped = True
        Trainer.state_dict = with_data

    if not getattr(checkpoint_utils.load_model_ensemble_and_task, "b2t_wrapped", False):
        ensemble = checkpoint_utils.load_model_ensemble_and_task

        @functools.wraps(ensemble)
        def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, *args, **kwargs):
            if task is not None:
                _tasks.append(task)
            seen = []
            _collectors.append(seen)
            try:
                out = ensemble(filenames, arg_overrides, task, *args, **kwargs)
            finally:
                _collectors.remove(seen)
                if task is not None:
                    _tasks.pop()
            if task is None:  # fairseq-validate: the task was built from the checkpoint and the data folder
                for data, where in seen:
                    check_fits(data, where, task_data(out[2]))
            return out

        load_model_ensemble_and_task.b2t_wrapped = True
        checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task

# --- 4. collective timeout (for the torchrun launcher) ----------------------------------------

def collective_timeout(seconds):
    """Make the process groups of this process (fairseq's default one and the data-parallel group
    it creates with new_group) time out after this many seconds instead of torch's default."""
    import torch.distributed as dist

    def with_timeout(make):
        if getattr(make, "b2t_timeout", None) is not None:
            make = make.b2t_original

        def make_group(*args, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = datetime.timedelta(seconds=seconds)
            return make(*args, **kwargs)
        make_group.b2t_timeout, make_group.b2t_original = seconds, make
        return make_group

    dist.init_process_group = with_timeout(dist.init_process_group)
    dist.new_group = with_timeout(dist.new_group)


# --- 5. exact resume after epoch 1 --------------------------------------------------------------

def _batches_rebuilt_every_epoch(trainer, disable_iterator_cache):
    task, split = trainer.task, trainer.cfg.dataset.train_subset
    return (disable_iterator_cache or getattr(trainer.cfg.dataset, "update_epoch_batch_itr", False)
            or getattr(task.cfg, "rebuild_batches", False) or task.has_sharded_data(split))


def exact_resume():
    """A run resumed in epoch E > 1 gets the batches an uninterrupted run made in epoch 1 (idempotent)."""
    from fairseq.trainer import Trainer

    get = Trainer.get_train_iterator
    if getattr(get, "b2t_wrapped", False):
        return

    @functools.wraps(get)
    def get_train_iterator(self, epoch, combine=True, load_dataset=True, data_selector=None,
                           shard_batch_itr=True, disable_iterator_cache=False):
        kw = dict(combine=combine, data_selector=data_selector, shard_batch_itr=shard_batch_itr,
                  disable_iterator_cache=disable_iterator_cache)
        if epoch <= 1 or _batches_rebuilt_every_epoch(self, disable_iterator_cache):
            return get(self, epoch, load_dataset=load_dataset, **kw)
        task, split = self.task, self.cfg.dataset.train_subset
        if load_dataset:
            logger.info("loading train data for epoch %d", epoch)
            task.load_dataset(split, epoch=epoch, combine=combine, data_selector=data_selector, tpu=self.tpu)
        dataset = task.dataset(split)
        if dataset in getattr(task, "dataset_to_epoch_iter", {}) or not task.can_reuse_epoch_itr(dataset):
            return get(self, epoch, load_dataset=False, **kw)  # cached, or rebuilt every epoch anyway
        logger.info("resuming in epoch %d: making the batches of epoch 1, as an uninterrupted run did", epoch)
        itr = get(self, 1, load_dataset=False, **kw)
        itr.epoch = epoch
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return itr

    get_train_iterator.b2t_wrapped = True
    Trainer.get_train_iterator = get_train_iterator


# --- 6. binarized data and dictionaries checked as fairseq opens them ------------------------------

_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}  # fairseq's indexed_dataset._code_to_dtype


def binarized_damage(prefix):
    """Why PREFIX.idx/PREFIX.bin (fairseq's mmap format) cannot be used, or None if they look whole."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    if not (os.path.isfile(idx) and os.path.isfile(binf)):
        return None
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(26)  # magic (9), version (8), dtype code (1), number of sentences (8)
    if not head.startswith(_MMAP_MAGIC):
        return None  # another format (lazy/cached/raw): fairseq checks it itself
    if len(head) < 26:
        return f"{idx} is truncated ({size} bytes, shorter than its header)"
    n = int.from_bytes(head[18:26], "little")
    item = _DTYPE_SIZES.get(head[17])
    want = 26 + 12 * n  # then n int32 sizes and n int64 pointers
    if size != want:
        return f"{idx} is truncated or damaged ({size} bytes, its header promises {want})"
    if n == 0:
        return "empty"
    sizes = np.memmap(idx, dtype=np.int32, mode="r", offset=26, shape=(n,))
    tokens = int(sizes.sum(dtype=np.int64))
    if item and os.path.getsize(binf) != tokens * item:
        return (f"{binf} is truncated or damaged ({os.path.getsize(binf)} bytes, its index {os.path.basename(idx)} "
                f"needs {tokens * item})")
    return None


def _checked_loading(load):
    @functools.wraps(load)
    def load_indexed_dataset(path, *args, **kwargs):
        for k in range(1000):  # combine=True reads PATH, PATH1, PATH2, ...
            part = path + (str(k) if k else "")
            if not os.path.isfile(part + ".idx"):
                break
            damage = binarized_damage(part)
            if damage == "empty":
                split = os.path.basename(part).split(".")[0]
                raise B2TError(f"split '{split}' in {os.path.dirname(part) or '.'} has no sentences ({part}.idx lists "
                               "none); binarize it from a non-empty file with fairseq-preprocess, or leave it out "
                               "(--disable-validation or --valid-subset for training, --gen-subset for decoding)")
            if damage:
                raise B2TError(f"{damage}; binarize the data again with fairseq-preprocess (a copy may have been cut short)")
        return load(path, *args, **kwargs)

    load_indexed_dataset.b2t_wrapped = True
    return load_indexed_dataset


def _checked_dictionary(add_from_file):
    @functools.wraps(add_from_file)
    def checked_add_from_file(self, f):
        if not isinstance(f, str):
            return add_from_file(self, f)
        try:
            return add_from_file(self, f)
        except (ValueError, RuntimeError) as e:
            text = str(e)
            if not text.startswith(("Incorrect dictionary format", "Duplicate word found")):
                raise
            bad = text.split(": ", 1)[-1].strip().strip('"').strip()
            line = None
            try:
                with open(f, encoding="utf-8") as fd:
                    line = next((i for i, ln in enumerate(fd, 1) if ln.strip() == bad
                                 or ln.rstrip("\n").rsplit(" ", 1)[0].strip() == bad), None)
            except OSError:
                pass
            where = f"{f} line {line}" if line else f
            what = "repeats a word" if text.startswith("Duplicate") else "is not '<word> <count>'"
            raise B2TError(f"dictionary {where} {what} ({bad[:60]!r}); restore the dict file fairseq-preprocess "
                           "wrote with this data, or binarize again") from e
        except Exception as e:  # noqa: BLE001 - fairseq's "Incorrect encoding detected in ..." is a plain Exception
            if not str(e).startswith("Incorrect encoding detected"):
                raise
            raise B2TError(f"dictionary {f} is not UTF-8; restore the dict file fairseq-preprocess wrote, or "
                           "binarize again") from e

    checked_add_from_file.b2t_wrapped = True
    return checked_add_from_file


def check_data_files():
    """Install the data and dictionary checks (idempotent)."""
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    if not getattr(data_utils.load_indexed_dataset, "b2t_wrapped", False):
        data_utils.load_indexed_dataset = _checked_loading(data_utils.load_indexed_dataset)
    if not getattr(Dictionary.add_from_file, "b2t_wrapped", False):
        Dictionary.add_from_file = _checked_dictionary(Dictionary.add_from_file)


def apply():
    """Apply repairs 1-3, 5 and 6 (idempotent); called when the plugin is imported."""
    allow_fairseq_checkpoints()
    keep_remainder_batches()
    safe_checkpoints()
    exact_resume()
    check_data_files()
