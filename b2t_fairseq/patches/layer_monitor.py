"""Per-layer norms while training (``--log-layer-norms``), and divergence named as it happens.

Every ``--log-interval`` updates, for each encoder and decoder layer, three numbers go into
fairseq's own metrics (so into the json log, the progress bar and tensorboard):

* ``enc03_gnorm``: the norm of the gradient of the layer's parameters, after the all-reduce and
  fairseq's normalization by the sample size, before clipping (every rank logs the same number);
* ``enc03_ingrad``: the norm of the gradient reaching the layer's input (the loss normalized as
  above; summed over ranks);
* ``enc03_amax``: the largest absolute value of any input or output of the layer's sublayers (the
  residual sums are the LayerNorms' inputs): the fp16 headroom is 65504 / amax. ``amax`` is the
  largest over all layers.

On other updates no hook is registered, so the cost is one check per update.

Divergence: a non-finite loss or gradient, fp16's minimum loss scale, or (after warm-up) a training
nll that is not clearly below the unigram level of the training targets (b2t_fairseq/unigram.py) for
``--divergence-patience`` updates stops the run with one line (:class:`TrainingDiverged`) that names
the first layer whose norms left their range in the divergence's own stretch of updates (grew past
10x their earlier maximum, or stopped being finite) and the update, and the cures for the run's layer
type. "Clearly below" judges the mean of the last few losses, not one batch's, with a margin of its
noise (see :meth:`LayerMonitor.below`): a run stalled at word frequencies dips below the level from
batch to batch, and must not reset the count. ``--divergence-patience 0`` never judges the loss.
``--on-divergence warn`` logs the line and trains on (as fairseq would, checkpoints included); in the
default ``stop`` mode, while the judged loss is not below the unigram level after it had been, or
after a layer's norms jumped, a save is held back so ``checkpoint_last.pt`` stays the last good state;
the save that ends the run is never held back. (Non-finite gradients stop fairseq in either mode.)

Relies on (tests/e2e/test_layer_monitor.py fails if these change shape):
``fairseq.trainer.Trainer.train_step(samples, raise_oom=False)``, which fairseq_cli/train.py calls
inside ``metrics.aggregate("train_inner")`` and which returns the update's logging output (None on
overflow); ``Trainer.clip_grad_norm(clip_norm)``, called after ``all_reduce_grads`` and
``multiply_grads`` and before the optimizer step, returning the unclipped total norm; and
``fairseq.checkpoint_utils.save_checkpoint(cfg, trainer, epoch_itr, val_loss)``, which
fairseq_cli/train.py looks up on the module at each call.
"""

import collections
import functools
import logging
import math
import statistics
import sys
import weakref

import torch

from .. import layer_types, unigram
from ..errors import B2TError

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
GROWTH = 10.0  # a norm "left its range" when it grew past GROWTH x its earlier maximum
QUANTITIES = {"gnorm": "parameter gradient norm", "ingrad": "input gradient norm", "amax": "largest activation"}
WINDOW = 25        # the unigram rule judges the mean of up to this many recent losses (patience / 4 if fewer)
MARGIN = 0.01      # ... and counts it below the level only when below by 1% of the level or 3 standard errors
# a layer type's own way out first; Pre-LN and the others already keep an identity path, so lr and warm-up
OTHER_TYPE = {"post": "--layer-type b2t (or another of --layer-type)"}

_MONITORS = weakref.WeakKeyDictionary()  # model -> LayerMonitor


class TrainingDiverged(B2TError):
    """Training diverged; the message names the update, the first layer out of range and the cures."""


def attach(model, args):
    """Monitor ``model`` (a built transformer_b2t model) while fairseq trains it."""
    install()
    found = getattr(layer_types, "which", layer_types.of_model)(model)
    _MONITORS[model] = LayerMonitor(model, getattr(args, "on_divergence", None) or "stop",
                                    getattr(args, "divergence_patience", None),
                                    layer_type=getattr(found, "key", found))  # which(): the record; of_model(): its key


def monitor_of(trainer):
    return _MONITORS.get(trainer.get_model())


def layer_names(model):
    """[(metric prefix, readable name, layer module)] for the encoder's then the decoder's layers."""
    out = []
    for side, short in (("encoder", "enc"), ("decoder", "dec")):
        stack = getattr(model, side, None)
        for i, layer in enumerate(getattr(stack, "layers", None) or []):
            out.append((f"{short}{i:02d}", f"{side} layer {i + 1}", layer))
    return out


def unigram_level(task, split="train"):
    """The unigram level of the task's training targets (translation or language model), or None."""
    return unigram.of_task(task, split)


def cures(layer_type, half=False, clip_norm=None):
    """The usual ways out of a divergence, for this layer type and precision."""
    out = [OTHER_TYPE[layer_type]] if layer_type in OTHER_TYPE else []
    out += ["a lower --lr", "a longer --warmup-updates"]
    if clip_norm == 0:
        out.append("--clip-norm 1.0")
    if half:
        out.append("--b2t-bf16 instead of --fp16")
    return "try " + ", ".join(out[:-1]) + (", or " if len(out) > 1 else "") + out[-1]


class LayerMonitor:
    def __init__(self, model, on_divergence="stop", patience=None, layer_type=None):
        self.layers = layer_names(model)
        self.on_divergence = on_divergence
        self.patience = 100 if patience is None else patience  # 0: the loss is never judged
        self.layer_type = layer_type  # b2t_fairseq.layer_types key, or None (mixed or unknown)
        self.half, self.clip_norm = False, None  # the run's precision and clipping, for the cures
        self.recent = collections.deque(maxlen=min(WINDOW, max(1, self.patience // 4)))
        self.active = False
        self.handles = []
        self.history = []     # [(update, {key: value})] at each logged update
        self.events = []      # [(update, ratio, layer name, quantity, value)] norms out of range
        self.unigram = None   # bits per token; computed on the first update
        self.streak_start = None  # first update of the current run of losses not below the unigram level
        self.was_below = False    # the loss has been below the unigram level: a good state to keep
        self.pending = None
        self.diverged = None
        self.last_saved = None

    # --- hooks, registered for one update at a time ---------------------------------------------

    def start(self):
        n = len(self.layers)
        self.in_sq = torch.zeros(n, dtype=torch.float64)
        self.act = torch.zeros(n, dtype=torch.float64)
        for j, (_, _, layer) in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(functools.partial(self._on_input, j),
                                                                with_kwargs=True))
            for m in layer.modules():
                self.handles.append(m.register_forward_hook(functools.partial(self._on_sublayer, j)))
        self.active = True

    def stop(self):
        for h in self.handles:
            h.remove()
        self.handles, self.active = [], False

    def _on_input(self, j, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled():
            def add(g):
                self.in_sq[j] += g.detach().double().pow(2).sum().cpu()
            x.register_hook(add)

    def _on_sublayer(self, j, module, inputs, output):
        for t in _tensors(inputs, output):
            if t.is_floating_point() and t.numel():
                self.act[j] = max(self.act[j].item(), t.detach().abs().max().double().item())

    def suspect(self):
        """The loss is not below the unigram level after warm-up, and was below it or a layer's norms jumped since."""
        return self.streak_start is not None and (
            self.was_below or any(e[0] >= self.streak_start for e in self.events))

    def holds_back(self):
        """Whether a save now is held back: only where the user let the loss be judged (patience > 0)."""
        return self.on_divergence == "stop" and self.patience > 0 and self.suspect()

    # --- the unigram rule -------------------------------------------------------------------------

    def below(self):
        """The recent training loss is clearly below the unigram level: the mean of the last losses is
        below it by more than 3 standard errors of that mean (one batch's noise is not learning) and
        more than 1% of the level (a run stalled at word frequencies learns a sliver more, not that)."""
        xs = list(self.recent)
        mean = sum(xs) / len(xs)
        se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
        return mean < self.unigram - max(3 * se, MARGIN * self.unigram)

    def observe(self, update, loss, warmup):
        """Judge one update's training loss; returns why the run diverged, or None."""
        if loss is None:
            return None
        if not math.isfinite(loss):
            return "the loss is not finite"
        if not self.patience or self.unigram is None or not math.isfinite(self.unigram):
            return None  # patience 0, or no level: never judged
        self.recent.append(loss)
        if self.below():
            self.streak_start, self.was_below = None, True
            return None
        if update <= warmup:
            self.streak_start = None
            return None
        if self.streak_start is None:
            self.streak_start = update
        if update - self.streak_start + 1 >= self.patience:
            n = len(self.recent)
            return (f"the training loss{f' (mean of {n} updates)' if n > 1 else ''} was not below the unigram "
                    f"level of the training targets ({self.unigram:.2f} bits, less 1% or its noise) for "
                    f"{self.patience} updates after warm-up")
        return None

    # --- numbers ----------------------------------------------------------------------------------

    def grad_sq(self):
        """Per-layer sum of squared parameter gradients as they are now, and the total over the model."""
        per = []
        for _, _, layer in self.layers:
            grads = [p.grad.detach() for p in layer.parameters() if p.grad is not None]
            per.append(sum(g.double().pow(2).sum() for g in grads).cpu().item() if grads else 0.0)
        return per

    def record(self, update, values):
        """Keep the logged numbers; note every layer quantity that left its range."""
        out = []
        for key, v in values.items():
            prefix, q = key.split("_", 1)
            earlier = [h[key] for _, h in self.history if key in h and math.isfinite(h[key])]
            if not math.isfinite(v):
                out.append((update, math.inf, prefix, q, v))
            elif earlier and max(earlier) > 0 and v > GROWTH * max(earlier):
                out.append((update, v / max(earlier), prefix, q, v))
        self.history.append((update, values))
        self.events.extend(out)

    def episode_start(self):
        """The first update of the divergence's own stretch: the unigram streak's start, else the first of
        the logged updates, counted back from the last, at which some layer was out of range (a jump
        followed by logged updates in range, as in warm-up, is another episode)."""
        if self.streak_start is not None and any(e[0] >= self.streak_start for e in self.events):
            return self.streak_start
        out = {e[0] for e in self.events}
        start = None
        for update, _ in reversed(self.history):
            if update not in out:
                break
            start = update
        return start

    def first_out_of_range(self, since):
        """The earliest layer quantity out of range at or after update ``since``, as words, or None."""
        found = [e for e in self.events if since is not None and e[0] >= since]
        if not found:
            return None
        first = min(e[0] for e in found)
        update, ratio, prefix, q, v = max((e for e in found if e[0] == first), key=lambda e: e[1])
        name = dict((p, n) for p, n, _ in self.layers)[prefix]
        how = "stopped being finite" if not math.isfinite(v) else f"grew to {v:.3g}, {ratio:.0f}x its earlier maximum"
        return f"{name}'s {QUANTITIES[q]} {how} at update {update}"

    def message(self, update, reason):
        where = self.first_out_of_range(self.episode_start())
        if where is None:  # the last logged update had every layer in range (an earlier jump is another episode)
            where = (f"every layer's norms were in range at the last logged update ({self.history[-1][0]})"
                     if self.history else "no layer's norms logged yet (lower --log-interval to see them)")
        kept = (f"checkpoint_last.pt (update {self.last_saved}) is kept" if self.last_saved is not None
                else "the checkpoints saved before it are kept")
        return (f"training diverged at update {update} ({reason}): {where}; {kept}; "
                f"{cures(self.layer_type, self.half, self.clip_norm)}")


def _tensors(*objs):
    for o in objs:
        if torch.is_tensor(o):
            yield o
        elif isinstance(o, (tuple, list)):
            yield from _tensors(*o)


def _loss_scale(trainer):
    scaler = getattr(trainer.optimizer, "scaler", None)
    if scaler is None:
        return 1.0
    if hasattr(scaler, "loss_scale"):
        return float(scaler.loss_scale)
    return float(scaler.get_scale()) if hasattr(scaler, "get_scale") else 1.0


def _warmup(trainer):
    sched = getattr(trainer.cfg, "lr_scheduler", None)
    try:
        return int(getattr(sched, "warmup_updates", 0) or 0)
    except (TypeError, ValueError):
        return 0


# --- the fairseq patches ---------------------------------------------------------------------------

def _train_step(orig):
    @functools.wraps(orig)
    def train_step(self, samples, raise_oom=False):
        mon = monitor_of(self)
        if mon is None:
            return orig(self, samples, raise_oom)
        update = self.get_num_updates() + 1
        if mon.unigram is None:
            common = self.cfg.common
            mon.half = bool(common.fp16 or common.memory_efficient_fp16 or getattr(common, "amp", False))
            mon.clip_norm = getattr(self.cfg.optimization, "clip_norm", None)
            level = unigram_level(self.task, self.cfg.dataset.train_subset) if mon.patience else None
            mon.unigram = level or math.inf  # no level (or patience 0): the unigram rule is off
        mon.pending = None
        if update % max(1, self.cfg.common.log_interval) == 0:
            mon.start()
        scale = _loss_scale(self)
        try:
            out = orig(self, samples, raise_oom)
        except FloatingPointError as e:
            reason = "fp16 reached its minimum loss scale" if "loss scale" in str(e) else "non-finite gradients"
            if mon.pending is not None:
                mon.record(update, mon.pending)
            raise TrainingDiverged(mon.message(update, reason)) from e
        finally:
            was_active = mon.active
            mon.stop()
        if out is None:
            return out
        if was_active and mon.pending is not None:
            _log(self, mon, update, out, scale)
        loss = out.get("nll_loss", out.get("loss"))
        _check_loss(self, mon, update, loss)
        return out
    train_step.b2t_layer_monitor = True
    return train_step


def _log(trainer, mon, update, out, scale):
    from fairseq import distributed_utils, metrics

    ss = float(out.get("sample_size", 1.0) or 1.0)
    in_sq, act = mon.in_sq, mon.act
    if trainer.data_parallel_world_size > 1:
        dev = trainer.device if hasattr(trainer, "device") else torch.device("cpu")
        in_sq = distributed_utils.all_reduce(in_sq.to(dev), group=trainer.data_parallel_process_group).cpu()
        act = distributed_utils.all_reduce(act.to(dev), group=trainer.data_parallel_process_group, op="max").cpu()
    values = dict(mon.pending)
    for j, (prefix, _, _) in enumerate(mon.layers):
        values[f"{prefix}_ingrad"] = math.sqrt(in_sq[j].item()) / (scale * ss)
        values[f"{prefix}_amax"] = act[j].item()
    for i, (key, v) in enumerate(values.items()):
        metrics.log_scalar(key, v, weight=1, priority=3000 + i)
    metrics.log_scalar("amax", max(act.tolist()), weight=1, priority=2999)
    mon.record(update, values)


def _check_loss(trainer, mon, update, loss):
    reason = mon.observe(update, loss, _warmup(trainer))
    if reason is None or mon.diverged is not None:
        return
    msg = mon.message(update, reason)
    if mon.on_divergence == "stop" or not math.isfinite(loss):
        raise TrainingDiverged(msg)
    mon.diverged = update
    logger.warning(msg)


def _clip_grad_norm(orig):
    @functools.wraps(orig)
    def clip_grad_norm(self, clip_norm):
        mon = monitor_of(self)
        if mon is None:
            return orig(self, clip_norm)
        raw = mon.grad_sq() if mon.active else None
        try:
            total = orig(self, clip_norm)
        except FloatingPointError:  # fp16's minimum loss scale: name the layers as they are
            mon.pending = {f"{p}_gnorm": math.inf for p, _, _ in mon.layers}
            raise
        finite = bool(torch.isfinite(total).all()) if torch.is_tensor(total) else math.isfinite(total)
        if raw is None and not finite:
            raw = mon.grad_sq()
        if raw is not None:
            exact = not (self.cfg.common.fp16 or self.cfg.common.amp or self.cfg.common.memory_efficient_fp16)
            # with fp16/amp the model's gradients are still loss-scaled; the total norm is not
            r = math.sqrt(sum(raw))
            factor = 1.0 if exact or not finite or r == 0 else float(total) / r
            mon.pending = {f"{p}_gnorm": math.sqrt(s) * factor if math.isfinite(s) else math.inf
                           for (p, _, _), s in zip(mon.layers, raw)}
        return total
    clip_grad_norm.b2t_layer_monitor = True
    return clip_grad_norm


def _save_checkpoint(orig):
    @functools.wraps(orig)
    def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
        mon = monitor_of(trainer)
        if mon is not None and not getattr(cfg, "no_save", False) and mon.holds_back():  # --no-save: nothing to hold
            n = trainer.get_num_updates()
            why = (f"the training loss has not been below the unigram level since update {mon.streak_start} "
                   "(a divergence may be starting)")
            if not run_ends(trainer, epoch_itr):
                logger.warning(f"not saving a checkpoint at update {n}: {why}; the last saved checkpoint is kept")
                return None
            logger.warning(f"saving the run's final state at update {n} although {why}: a run's last save is "
                           "never held back")
        result = orig(cfg, trainer, epoch_itr, val_loss)
        if mon is not None:
            mon.last_saved = trainer.get_num_updates()
        return result
    save_checkpoint.b2t_layer_monitor = True
    return save_checkpoint


def run_ends(trainer, epoch_itr):
    """Whether fairseq_cli/train.py stops training after this save (its own stopping rules): that save
    is the run's last, and is never held back, or a finished run could never be saved."""
    cfg = trainer.cfg
    opt, n = cfg.optimization, trainer.get_num_updates()
    if opt.max_update and n >= opt.max_update:
        return True
    if opt.stop_time_hours > 0 and trainer.cumulative_training_time() / 3600 > opt.stop_time_hours:
        return True
    end_of_epoch = bool(epoch_itr.end_of_epoch())
    if end_of_epoch and opt.max_epoch and epoch_itr.epoch >= opt.max_epoch:
        return True
    if end_of_epoch and trainer.get_lr() <= opt.stop_min_lr:
        return True
    early = getattr(getattr(sys.modules.get("fairseq_cli.train"), "should_stop_early", None), "num_runs", 0)
    return bool(cfg.checkpoint.patience > 0 and early >= cfg.checkpoint.patience)


def install():
    """Wrap the three fairseq names above, once per process."""
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    if not getattr(Trainer.train_step, "b2t_layer_monitor", False):
        Trainer.train_step = _train_step(Trainer.train_step)
    if not getattr(Trainer.clip_grad_norm, "b2t_layer_monitor", False):
        Trainer.clip_grad_norm = _clip_grad_norm(Trainer.clip_grad_norm)
    if not getattr(checkpoint_utils.save_checkpoint, "b2t_layer_monitor", False):
        checkpoint_utils.save_checkpoint = _save_checkpoint(checkpoint_utils.save_checkpoint)
