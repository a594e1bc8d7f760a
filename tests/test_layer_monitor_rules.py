"""The decisions of --log-layer-norms (b2t_fairseq/patches/layer_monitor.py), fed in-process with a
sequence of training losses: when a run counts as stalled, which saves are held back (never the
last), which layer a divergence names, and which cures it suggests."""

import random
from types import SimpleNamespace

import pytest
import torch

from b2t_fairseq.patches import layer_monitor

LEVEL = 8.5  # bits per token: the unigram level these runs are judged by


class FakeTrainer:
    """What the monitor reads of fairseq's Trainer: the update count, the model and the stopping config."""

    def __init__(self, model, warmup=10, max_update=300, max_epoch=0):
        self.model, self.n = model, 0
        self.cfg = SimpleNamespace(
            lr_scheduler=SimpleNamespace(warmup_updates=warmup),
            optimization=SimpleNamespace(max_update=max_update, max_epoch=max_epoch, stop_time_hours=0,
                                         stop_min_lr=-1.0),
            checkpoint=SimpleNamespace(patience=-1))

    def get_model(self):
        return self.model

    def get_num_updates(self):
        return self.n

    def get_lr(self):
        return 1e-3

    def cumulative_training_time(self):
        return 1.0


EPOCH = SimpleNamespace(epoch=1, end_of_epoch=lambda: False)


def _monitored(patience=100, on_divergence="stop", **trainer_kw):
    model = torch.nn.Module()
    mon = layer_monitor.LayerMonitor(model, on_divergence, patience)
    mon.unigram = LEVEL
    layer_monitor._MONITORS[model] = mon
    return FakeTrainer(model, **trainer_kw), mon


def _train(trainer, mon, losses):
    """Feed one training loss per update; returns the update at which the run stopped, or None."""
    for loss in losses:
        trainer.n += 1
        try:
            layer_monitor._check_loss(trainer, mon, trainer.n, loss)
        except layer_monitor.TrainingDiverged:
            return trainer.n
    return None


def _save(trainer):
    """fairseq's save_checkpoint as the monitor wraps it; returns whether it wrote."""
    saved = []
    layer_monitor._save_checkpoint(lambda *a: saved.append(a) or "path")(None, trainer, EPOCH, None)
    return bool(saved)


def _healthy_then_noisy(rng, n_down=40, n_noisy=60):
    """Warm-up, a loss that falls well below the unigram level, then a noisy stretch around it."""
    return ([11.0] * 10 + [LEVEL - 1.5 + rng.gauss(0, 0.1) for _ in range(n_down)]
            + [LEVEL + 0.05 + rng.gauss(0, 0.3) for _ in range(n_noisy)])


def test_the_last_save_of_a_run_is_never_held_back():
    rng = random.Random(0)
    trainer, mon = _monitored(patience=100, max_update=110)
    assert _train(trainer, mon, _healthy_then_noisy(rng, n_noisy=54) + [LEVEL + 0.3] * 5) is None
    assert mon.suspect() and trainer.n == 109
    assert not _save(trainer)  # mid-run: held back, checkpoint_last.pt stays the good state
    assert _train(trainer, mon, [LEVEL + 0.1]) is None and trainer.n == 110
    assert _save(trainer)  # max_update reached: the run's final state is saved
    # the end of the last epoch ends a run too
    trainer, mon = _monitored(patience=100, max_update=0, max_epoch=3)
    _train(trainer, mon, _healthy_then_noisy(random.Random(0)) + [LEVEL + 0.3] * 5)
    assert mon.suspect()
    last_epoch_end = SimpleNamespace(epoch=3, end_of_epoch=lambda: True)
    saved = []
    layer_monitor._save_checkpoint(lambda *a: saved.append(a))(None, trainer, last_epoch_end, None)
    assert saved


def test_patience_zero_never_judges_and_never_holds_back():
    rng = random.Random(1)
    trainer, mon = _monitored(patience=0, max_update=1000)
    assert _train(trainer, mon, _healthy_then_noisy(rng) + [LEVEL + 1.0] * 300) is None
    assert _save(trainer)


def test_a_stalled_run_is_stopped_though_single_batches_dip_below_the_level():
    rng = random.Random(2)
    # 18+18 Post-LN stalled at word frequencies: about half of the batches are below the level
    stalled = [11.0] * 10 + [LEVEL + 0.02 + rng.gauss(0, 0.2) for _ in range(400)]
    assert sum(x < LEVEL for x in stalled[10:]) > 150
    trainer, mon = _monitored(patience=100)
    assert _train(trainer, mon, stalled) == 10 + 100  # warm-up, then the patience, not a batch more


def test_a_healthy_run_through_the_level_is_not_stopped():
    rng = random.Random(3)
    falling = [max(6.0, 11.0 - 5.0 * i / 100) + rng.gauss(0, 0.2) for i in range(300)]  # 8.5 near update 50
    trainer, mon = _monitored(patience=100, warmup=10)
    assert _train(trainer, mon, falling) is None
    assert mon.streak_start is None and mon.was_below


def _layered_monitor():
    model = torch.nn.Module()
    model.encoder = torch.nn.Module()
    model.encoder.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))
    return model


def test_the_divergence_names_the_layer_at_the_divergence_not_a_warm_up_jump():
    mon = layer_monitor.LayerMonitor(_layered_monitor(), "stop", 100)
    # update 10, in warm-up: layer 1's gradient jumps 60x (normal early growth), then stays in range
    for u in range(5, 75, 5):
        g = {0: 1.0 if u < 10 else 60.0, 1: 1.0, 2: float("inf") if u == 70 else 1.0}
        mon.record(u, {f"enc{i:02d}_gnorm": v for i, v in g.items()})
    line = mon.message(70, "non-finite gradients")
    assert "encoder layer 3's parameter gradient norm stopped being finite at update 70" in line, line
    assert "encoder layer 1" not in line
    # a loss that turns non-finite between logged updates, all in range: the warm-up jump is not named
    mon = layer_monitor.LayerMonitor(_layered_monitor(), "stop", 100)
    for u in range(5, 70, 5):
        mon.record(u, {"enc00_gnorm": 1.0 if u < 10 else 60.0, "enc01_gnorm": 1.0})
    line = mon.message(67, "the loss is not finite")
    assert "every layer's norms were in range at the last logged update (65)" in line and "layer 1" not in line


def test_cures_follow_the_layer_type_of_the_model(toy_dicts, monkeypatch):
    from helpers import TINY, build

    from b2t_fairseq import layer_types

    for arch, other_type in (("transformer_b2t_tiny", False), ("transformer_post_ln_tiny", True)):
        model, _, args = build(toy_dicts, arch, *TINY)
        layer_monitor.attach(model, args)
        line = layer_monitor._MONITORS[model].message(5, "the loss is not finite")
        assert ("--layer-type b2t" in line) == other_type, (arch, line)
        assert "a lower --lr" in line
    # layer_types.which(model) gives the type's record (of_model its key): either is read
    monkeypatch.setattr(layer_types, "which", lambda m: layer_types.BY_KEY["deepnorm"], raising=False)
    layer_monitor.attach(model, args)
    assert layer_monitor._MONITORS[model].layer_type == "deepnorm"
