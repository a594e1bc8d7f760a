"""A training run killed with SIGKILL resumes exactly, in any epoch; a kill while a checkpoint is
written loses nothing; a finished run stays finished.

The kills are real SIGKILLs, placed deterministically by a ``sitecustomize`` module put on the
PYTHONPATH of the training process only (see KILL_HOOK): after update N, or in the middle of
writing a checkpoint file.
"""

import os
import re
import signal

import pytest
import torch
from helpers import run, toy_train_argv, train_losses

KILL_HOOK = r'''
import os, signal
_at = int(os.environ.get("B2T_TEST_KILL_AT", "0"))
_where = os.environ.get("B2T_TEST_KILL_IN", "step")

def _half_then_die(data, f):
    f.write(data[: len(data) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if _at:
    import io, shutil, torch
    import fairseq.trainer
    _updates = [0]
    _step = fairseq.trainer.Trainer.train_step

    def train_step(self, *a, **kw):
        out = _step(self, *a, **kw)
        _updates[0] = self.get_num_updates()
        if _where == "step" and _updates[0] >= _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    fairseq.trainer.Trainer.train_step = train_step
    _copyfileobj = shutil.copyfileobj

    def copyfileobj(fsrc, fdst, *a, **kw):  # "copy:NAME": die halfway through copying onto NAME (or NAME.tmp)
        dst = getattr(fdst, "name", "")
        if _where.startswith("copy:") and _updates[0] >= _at and os.path.basename(str(dst)).startswith(_where[5:]):
            _half_then_die(fsrc.read(), fdst)
        return _copyfileobj(fsrc, fdst, *a, **kw)

    shutil.copyfileobj = copyfileobj
    _save = torch.save

    def save(obj, f, *a, **kw):  # "save": die halfway through torch.save of a checkpoint
        if _where == "save" and _updates[0] >= _at:
            buf = io.BytesIO()
            _save(obj, buf, *a, **kw)
            if hasattr(f, "write"):
                _half_then_die(buf.getvalue(), f)
            with open(f, "wb") as d:
                _half_then_die(buf.getvalue(), d)
        return _save(obj, f, *a, **kw)

    torch.save = save
'''

# 400 toy pairs at --max-tokens 200: 16 updates an epoch; checkpoints every 5 updates
TRAIN = toy_train_argv("--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
                       "--save-interval-updates", "5")


@pytest.fixture(scope="module")
def kill_hook(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill_hook")
    (folder / "sitecustomize.py").write_text(KILL_HOOK)
    return folder


def train(data, save_dir, max_update, kill=None, hook=None, check=True):
    env = {}
    if kill:
        path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))  # the hook, then the code under test
        env = {"PYTHONPATH": path, "B2T_TEST_KILL_AT": str(kill[0]), "B2T_TEST_KILL_IN": kill[1]}
    return run(["b2t-train", data, *TRAIN, "--max-update", max_update, "--save-dir", save_dir], check=check, env=env)


losses = train_losses


def loaded_from(log):
    m = re.search(r"Loaded checkpoint (\S+) \(epoch (\d+) @ (\d+) updates\)", log)
    return m and (m.group(1), int(m.group(2)), int(m.group(3)))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_killed(p):
    assert p.returncode == -signal.SIGKILL, f"the kill hook did not fire:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def whole(toy_data_bin, tmp_path_factory):
    """An uninterrupted run of 36 updates: epochs 1 and 2 (16 updates each) and 4 updates of epoch 3."""
    save = tmp_path_factory.mktemp("whole")
    return train(toy_data_bin, save, 36), save


def test_sigkill_mid_epoch_then_same_command_resumes_exactly(toy_data_bin, tmp_path, kill_hook):
    whole = train(toy_data_bin, tmp_path / "whole", 30)
    killed = train(toy_data_bin, tmp_path / "run", 30, kill=(13, "step"), hook=kill_hook, check=False)
    assert_killed(killed)
    # killed right after update 13 (before fairseq logs it): epoch 1 has 16 updates, the last checkpoint is at 10
    assert max(losses(killed.stdout)) == 12
    resumed = train(toy_data_bin, tmp_path / "run", 30)

    _, epoch, update = loaded_from(resumed.stdout)
    assert (epoch, update) == (1, 10)
    ref, got = losses(whole.stdout), losses(resumed.stdout)
    assert sorted(got) == list(range(11, 31))  # mid-epoch: continues at update 11, not at an epoch start
    worst = max(abs(got[u] - ref[u]) for u in got)
    assert worst <= 1e-3, f"losses after resume differ by up to {worst} (log precision 1e-3)"
    a, b = load(tmp_path / "whole/checkpoint_last.pt")["model"], load(tmp_path / "run/checkpoint_last.pt")["model"]
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-6, f"final weights differ by {diff}"  # measured: 0.0 (bitwise equal)


def test_kill_while_copying_checkpoint_last_keeps_previous_one(toy_data_bin, tmp_path, kill_hook):
    """fairseq copies the saved checkpoint onto checkpoint_last.pt; die halfway through that copy."""
    save = tmp_path / "ck"
    killed = train(toy_data_bin, save, 30, kill=(10, "copy:checkpoint_last.pt"), hook=kill_hook, check=False)
    assert_killed(killed)
    assert (save / "checkpoint_1_10.pt").exists()  # the kill came after update 10 was saved
    state = load(save / "checkpoint_last.pt")  # without the atomic copy: a half file that cannot load
    assert state["extra_state"]["train_iterator"]["iterations_in_epoch"] == 5
    resumed = train(toy_data_bin, save, 12)
    assert loaded_from(resumed.stdout)[2] == 5
    assert sorted(losses(resumed.stdout)) == list(range(6, 13))


def test_kill_while_saving_checkpoint_keeps_previous_ones(toy_data_bin, tmp_path, kill_hook):
    """fairseq's own save writes NAME.tmp and renames it: a kill inside torch.save leaves the old files."""
    save = tmp_path / "ck"
    killed = train(toy_data_bin, save, 30, kill=(10, "save"), hook=kill_hook, check=False)
    assert_killed(killed)
    assert (save / "checkpoint_1_10.pt.tmp").exists() and not (save / "checkpoint_1_10.pt").exists()
    for name in ("checkpoint_1_5.pt", "checkpoint_last.pt", "checkpoint_best.pt"):
        assert load(save / name)["optimizer_history"][-1]["num_updates"] == 5, name


@pytest.mark.parametrize("kill_at,resumed_at", [(18, (2, 16)), (23, (2, 20))], ids=["epoch_boundary", "mid_epoch_2"])
def test_sigkill_in_a_later_epoch_resumes_bit_for_bit(toy_data_bin, tmp_path, kill_hook, whole, kill_at, resumed_at):
    """Resumed in epoch 2 (from the end-of-epoch-1 checkpoint, or mid-epoch) and trained on into epoch 3,
    the run has the uninterrupted run's losses and bitwise equal weights. Before patches.exact_resume
    fairseq made the batches of a run resumed in epoch E with seed + E ("creating new batches for
    epoch 2"): other sentences per batch, losses up to 0.13 apart."""
    killed = train(toy_data_bin, tmp_path / "run", 36, kill=(kill_at, "step"), hook=kill_hook, check=False)
    assert_killed(killed)
    resumed = train(toy_data_bin, tmp_path / "run", 36)
    _, epoch, update = loaded_from(resumed.stdout)
    assert (epoch, update) == resumed_at
    ref, got = losses(whole[0].stdout), losses(resumed.stdout)
    assert sorted(got) == list(range(update + 1, 37))
    assert {u: got[u] for u in got} == {u: ref[u] for u in got}
    a, b = load(whole[1] / "checkpoint_last.pt")["model"], load(tmp_path / "run/checkpoint_last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


def test_a_finished_run_stays_finished(toy_data_bin, whole, capsys):
    """fairseq-train re-run on a finished run trains one more update and overwrites checkpoint_last.pt;
    b2t-train says the run is finished (exit 0) and touches nothing."""
    from b2t_tools.commands import cli

    save = whole[1]
    before = {p.name: p.read_bytes() for p in save.iterdir()}
    for limit, words in ((["--max-update", "36"], "reached --max-update 36"),
                         (["--max-update", "20"], "reached --max-update 20"),
                         (["--max-epoch", "2"], "trained --max-epoch 2 epochs")):
        assert cli.train([str(toy_data_bin), *TRAIN, *limit, "--save-dir", str(save)]) == 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("b2t-train: the run is finished: "), lines
        assert words in lines[0] and "update 36, in epoch 3" in lines[0] and "to train on" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in save.iterdir()} == before
