"""Behaviour change (our commands, or B2T_FAIRSEQ_STRICT=1): every training and decoding entry point
runs the run guards (b2t_fairseq/run_guards.py).

Training: fairseq_cli/train.py's ``main`` (fairseq-train, fairseq-hydra-train, b2t-train,
b2t-hydra-train, b2t-stability's cells) resumes through ``checkpoint_utils.load_checkpoint(cfg,
trainer, ...)``, looked up as a module attribute: before it reads anything, the writer (global rank
0) takes the --save-dir lock; the checkpoint it would resume from must be of the run the built model
and task describe (layer type, task, data); a finished run says so in one line and exits 0. Rank 0
decides and the other ranks follow its answer, so all refuse or exit together. A resume with another
--lr-scheduler or (Admin) --admin-omega is refused in one line where fairseq fails loading the saved state.
Decoding: ``checkpoint_utils.load_model_ensemble_and_task(filenames, arg_overrides, task, ...)``
(fairseq-generate, -interactive, -eval-lm and ours) refuses a checkpoint of another task kind than
the command's (an LM checkpoint decoding a translation test set), before a model is built for it.
Plain fairseq-train with B2T_FAIRSEQ_STRICT=1 prints the plugin's refusals as one line, exit 2.
Not a repair: fairseq resumes any checkpoint its model can load, and re-runs a finished run.
Relies on: ``fairseq.checkpoint_utils.load_checkpoint(cfg: CheckpointConfig, trainer, **passthrough)``
called by ``fairseq_cli.train.main`` as ``checkpoint_utils.load_checkpoint``; ``Trainer.cfg``,
``Trainer.task``, ``Trainer.get_model()``, ``Trainer.checkpoint_suffix``, ``Trainer.device``;
``fairseq.distributed.utils.broadcast_object(obj, src_rank, group, dist_device)``.
"""

import functools
import os
import re
import sys

from .. import layer_types, run_guards
from ..errors import B2TError
from . import context
from .data_fit import task_data


def _prog():
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"


def decide(ckpt_cfg, trainer):
    """Rank 0's answer for a training run: None (go on), ("finished", note) or ("refused", message).
    Takes the --save-dir lock first."""
    cfg = trainer.cfg
    try:
        if not ckpt_cfg.no_save:
            run_guards.lock_dir(ckpt_cfg.save_dir, "--save-dir", "training run")
        path, resets = run_guards.resume_target(ckpt_cfg, trainer.checkpoint_suffix)
        state = run_guards.read_header(path) if path else None
        if state is None:
            return None
        t = layer_types.which(trainer.get_model())
        if not resets:
            want = run_guards.Run(t.key if t is not None else None, cfg.task._name, task_data(trainer.task))
            run_guards.check_same_run(state, want, path)
        # another schedule or Admin omega: fairseq would fail on loading the saved state, with a traceback
        run_guards.check_same_setup(state, path, getattr(cfg.lr_scheduler, "_name", None), t.key if t else None,
                                    getattr(cfg.model, "admin_omega", None), ckpt_cfg.reset_lr_scheduler,
                                    ckpt_cfg.reset_optimizer)
        if resets or ckpt_cfg.finetune_from_model is not None or getattr(ckpt_cfg, "continue_once", None):
            return None
        note = run_guards.finished(state, path, cfg.optimization.max_update, cfg.optimization.max_epoch)
        return ("finished", note) if note else None
    except B2TError as e:
        return ("refused", e)


def _everyone(answer, trainer):
    """Rank 0's answer on every rank (the others hold None)."""
    import torch.distributed as dist

    from fairseq.distributed import utils as distributed_utils

    if trainer.cfg.distributed_training.distributed_world_size <= 1 or not dist.is_initialized():
        return answer
    shared = (answer[0], str(answer[1])) if answer else None  # an exception need not unpickle elsewhere
    shared = distributed_utils.broadcast_object(shared, src_rank=0, group=distributed_utils.get_global_group(),
                                                dist_device=trainer.device)
    return answer if answer is not None or shared is None else (shared[0], B2TError(shared[1]) if
                                                                 shared[0] == "refused" else shared[1])


def _guarded(load_checkpoint):
    @functools.wraps(load_checkpoint)
    def guarded_load_checkpoint(cfg, trainer, **passthrough_args):
        from fairseq.distributed import utils as distributed_utils

        master = distributed_utils.is_master(trainer.cfg.distributed_training)
        answer = _everyone(decide(cfg, trainer) if master else None, trainer)
        if answer and answer[0] == "refused":
            raise answer[1]
        if answer and answer[0] == "finished":
            if master:
                print(f"{_prog()}: {answer[1]}", file=sys.stderr, flush=True)
            raise SystemExit(0)
        if master and not cfg.no_save:
            run_guards.claim(cfg.save_dir, _prog())  # only now: a finished or refused run writes nothing
        return load_checkpoint(cfg, trainer, **passthrough_args)

    guarded_load_checkpoint.b2t_run_guards = True
    return guarded_load_checkpoint


def _task_checked(ensemble):
    @functools.wraps(ensemble)
    def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, *args, **kwargs):
        if task is None:  # fairseq-validate: the task is the checkpoint's own (b2t-validate's preflight checks it)
            return ensemble(filenames, arg_overrides, task, *args, **kwargs)
        want = getattr(getattr(task, "cfg", None), "_name", None) or _registered_name(task)

        def check(origin):
            run_guards.check_task(origin.task, want, origin.where, doing="runs")

        with context.loading(task=task) as ctx:
            ctx.checks.append(check)
            return ensemble(filenames, arg_overrides, task, *args, **kwargs)

    load_model_ensemble_and_task.b2t_run_guards = True
    return load_model_ensemble_and_task


def _registered_name(task):
    from fairseq.tasks import TASK_REGISTRY

    return next((name for name, cls in TASK_REGISTRY.items() if cls is type(task)), None)


# --- plain fairseq-train: the plugin's refusals as one line -----------------------------------------

_ERROR_LINE = re.compile(r"^b2t_fairseq\.errors\.\w+: (.+)$", re.M)


def _one_line(previous):
    def excepthook(kind, value, tb):
        from ..errors import B2TError as Ours

        msg = str(value) if isinstance(value, Ours) else None
        if msg is None and value is not None:  # a spawned worker's error, as torch.multiprocessing re-raises it
            found = _ERROR_LINE.findall(str(value))
            msg = found[-1] if found else None
        if msg is None:
            return previous(kind, value, tb)
        import atexit
        import logging

        # the process's own stderr: torch.distributed's excepthook, around this one, captures sys.stderr
        print(f"{_prog()}: error: {' '.join(msg.split())}", file=sys.__stderr__ or sys.stderr, flush=True)
        atexit._run_exitfuncs()  # what an ordinary exit would run, then the status of a usage error
        logging.shutdown()
        sys.stdout.flush()
        os._exit(2)

    excepthook.b2t_run_guards = True
    return excepthook


def install():
    from fairseq import checkpoint_utils

    for name, wrap in (("load_checkpoint", _guarded), ("load_model_ensemble_and_task", _task_checked)):
        fn = getattr(checkpoint_utils, name)
        if not getattr(fn, "b2t_run_guards", False):
            setattr(checkpoint_utils, name, wrap(fn))
    if not getattr(sys.excepthook, "b2t_run_guards", False):
        sys.excepthook = _one_line(sys.excepthook)
