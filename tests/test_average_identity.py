"""Averages of one run, as it was: fingerprints of the weights averaged, the newest input's training state,
no mixing of runs (the run identity in every checkpoint), and one line (output untouched) when an
input is rotated away or the disk fills up while averaging or importing."""

import argparse
import errno
import io
import os

import pytest
import torch
from helpers import assert_one_line_error, write_fork_checkpoint

from b2t_tools.checkpoints import fingerprint
from b2t_tools.commands import average_checkpoints as avg
from b2t_tools.commands import import_checkpoint as imp


def _ckpt(path, value, updates=None, epoch=1, run=None):
    extra = {"epoch": epoch, **({"b2t_run": run} if run else {})}
    history = [{"num_updates": updates}] if updates is not None else []
    torch.save({"model": {"w": torch.full((2, 3), float(value))},
                "args": argparse.Namespace(arch="transformer_b2t", ln_position="b2t"),
                "extra_state": extra, "optimizer_history": history, "last_optimizer_state": {"n": updates}}, path)
    return str(path)


def _avg(capsys, *args):
    rc = avg.main([str(a) for a in args])
    return rc, capsys.readouterr().err


# --- the fingerprint is of the weights averaged -----------------------------------------------

def test_fingerprint_is_of_the_file_read_even_if_training_replaces_it_meanwhile(tmp_path, monkeypatch):
    last = _ckpt(tmp_path / "checkpoint_last.pt", 1.0, updates=100)
    old = tmp_path / "old.pt"
    old.write_bytes((tmp_path / "checkpoint_last.pt").read_bytes())
    newer = _ckpt(tmp_path / "newer.pt", 5.0, updates=200)
    other = _ckpt(tmp_path / "checkpoint1.pt", 3.0, updates=50)
    real, replaced = torch.load, []

    def load_then_training_saves(*a, **kw):  # the run saves its next checkpoint_last.pt right after our read
        state = real(*a, **kw)
        if not replaced:
            os.replace(newer, last)
            replaced.append(True)
        return state

    monkeypatch.setattr(torch, "load", load_then_training_saves)
    state = avg.average([last, other])
    monkeypatch.setattr(torch, "load", real)
    assert replaced
    assert torch.equal(state["model"]["w"], torch.full((2, 3), 2.0))  # (1 + 3) / 2: the old content averaged
    recorded = state[avg.PROVENANCE_KEY]["sources"][0]
    assert recorded["fingerprint"] == fingerprint(old) != fingerprint(last)
    assert recorded["num_updates"] == 100


# --- the training state comes from the newest input, whatever the order -----------------------

def test_training_state_is_the_newest_inputs_in_any_order(tmp_path):
    paths = [_ckpt(tmp_path / f"checkpoint_1_{u}.pt", u, updates=u, epoch=u // 100) for u in (100, 300, 200)]
    for order in (paths, paths[::-1], [paths[1], paths[0], paths[2]]):
        state = avg.average(order)
        assert state["optimizer_history"][-1]["num_updates"] == 300, order
        assert state["last_optimizer_state"] == {"n": 300} and state["extra_state"]["epoch"] == 3
        assert torch.equal(state["model"]["w"], torch.full((2, 3), 200.0))


# --- one run only -----------------------------------------------------------------------------

def test_checkpoints_of_two_runs_are_refused_in_one_line(tmp_path, capsys):
    a = _ckpt(tmp_path / "checkpoint1.pt", 1, updates=10, epoch=1, run="aaaa")
    b = _ckpt(tmp_path / "checkpoint2.pt", 2, updates=5, epoch=2, run="bbbb")  # a new run in the same folder
    out = tmp_path / "avg.pt"
    rc, err = _avg(capsys, "--inputs", tmp_path, "--num-epoch-checkpoints", 2, "--output", out)
    assert rc == 2 and not out.exists()
    assert_one_line_error(err, "b2t-average-checkpoints", "another training run", "one training run only")
    # the same run, or checkpoints saved without an id (older ones): averaged as before
    _ckpt(tmp_path / "checkpoint2.pt", 2, updates=20, epoch=2, run="aaaa")
    _ckpt(tmp_path / "checkpoint3.pt", 3, updates=30, epoch=3)
    rc, err = _avg(capsys, "--inputs", a, tmp_path / "checkpoint2.pt", tmp_path / "checkpoint3.pt", "--output", out)
    assert rc == 0, err
    assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], torch.full((2, 3), 2.0))
    del b


class _StandIn:
    """fairseq's Trainer as run_identity sees it: state_dict() and load_checkpoint() -> extra_state."""

    def __init__(self, files):
        self.files = files

    def state_dict(self):
        return {"model": {}, "extra_state": {"metrics": {}}}

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False, optimizer_overrides=None,
                        reset_meters=False):
        return self.files[filename]["extra_state"] if filename in self.files else None


def test_run_identity_is_stored_kept_on_resume_and_new_for_a_fresh_run():
    import inspect

    from fairseq.trainer import Trainer

    from b2t_fairseq import patches
    from b2t_fairseq.patches import run_identity

    assert run_identity.install in patches.REPAIRS and Trainer.state_dict.b2t_run_identity
    assert list(inspect.signature(inspect.unwrap(Trainer.load_checkpoint)).parameters) == [
        "self", "filename", "reset_optimizer", "reset_lr_scheduler", "optimizer_overrides", "reset_meters"]
    assert "extra_state" in inspect.getsource(inspect.unwrap(Trainer.state_dict))

    run_identity.wrap(_StandIn)
    run_identity.wrap(_StandIn)  # idempotent
    files = {}
    first = _StandIn(files)
    files["last.pt"] = first.state_dict()
    rid = files["last.pt"]["extra_state"]["b2t_run"]
    assert isinstance(rid, str) and len(rid) >= 16 and first.state_dict()["extra_state"]["b2t_run"] == rid
    resumed = _StandIn(files)
    assert resumed.load_checkpoint("last.pt") is files["last.pt"]["extra_state"]
    assert resumed.state_dict()["extra_state"]["b2t_run"] == rid
    fresh = _StandIn(files)
    assert fresh.load_checkpoint("missing.pt") is None  # a run from scratch: a new id
    assert fresh.state_dict()["extra_state"]["b2t_run"] != rid
    tuned = _StandIn(files)  # --finetune-from-model loads with every reset: a new run
    tuned.load_checkpoint("last.pt", reset_optimizer=True, reset_lr_scheduler=True, reset_meters=True)
    assert tuned.state_dict()["extra_state"]["b2t_run"] != rid


# --- one line, never a traceback ----------------------------------------------------------------

def test_input_rotated_away_between_selection_and_reading_says_so(tmp_path, capsys, monkeypatch):
    for e in (1, 2, 3):
        _ckpt(tmp_path / f"checkpoint{e}.pt", e, updates=e * 10, epoch=e)
    real = avg.last_checkpoints

    def select_then_rotate(*a, **kw):  # --keep-last-epochs removes the oldest as the next epoch is saved
        paths = real(*a, **kw)
        os.remove(paths[-1])
        return paths

    monkeypatch.setattr(avg, "last_checkpoints", select_then_rotate)
    out = tmp_path / "avg.pt"
    rc, err = _avg(capsys, "--inputs", tmp_path, "--num-epoch-checkpoints", 3, "--output", out)
    assert rc == 2 and not out.exists()
    line = assert_one_line_error(err, "b2t-average-checkpoints", "checkpoint1.pt", "removed while", "re-run")
    assert "check the path" not in line


def _failing_save(error):
    real = torch.save

    def save(obj, f, *a, **kw):  # the disk fills (or the size limit is hit) half way through the write
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise error
    return save


UNEXPECTED_POS = RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 1472 vs 1360")


def test_full_disk_while_averaging_is_one_line_and_output_untouched(tmp_path, capsys, monkeypatch):
    a, b = _ckpt(tmp_path / "a.pt", 1, updates=1), _ckpt(tmp_path / "b.pt", 3, updates=2)
    out = tmp_path / "avg.pt"
    out.write_bytes(b"previous average")
    monkeypatch.setattr(torch, "save", _failing_save(UNEXPECTED_POS))
    rc, err = _avg(capsys, "--inputs", a, b, "--output", out)
    assert rc == 2 and out.read_bytes() == b"previous average"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert_one_line_error(err, "b2t-average-checkpoints", "cannot write --output", "unchanged")


@pytest.fixture
def fork(tmp_path, toy_dicts):
    path = tmp_path / "b2t_layer6.pt"
    write_fork_checkpoint(path, toy_dicts)  # in-process: the dictionaries give the sizes
    return path


def _imp(capsys, *args):
    rc = imp.main([str(a) for a in args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("error", [OSError(errno.EFBIG, os.strerror(errno.EFBIG)), UNEXPECTED_POS],
                         ids=["EFBIG", "unexpected-pos"])
def test_full_disk_while_importing_is_one_line_and_output_untouched(fork, tmp_path, capsys, monkeypatch, error):
    out = tmp_path / "imported.pt"
    out.write_bytes(b"previous import")
    monkeypatch.setattr(torch, "save", _failing_save(error))
    rc, err = _imp(capsys, fork, out)
    assert rc == 2 and out.read_bytes() == b"previous import"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert_one_line_error(err, "b2t-import-checkpoint", "cannot write OUT.pt", "unchanged")


def test_import_output_that_is_a_folder_under_a_file_or_the_input_is_one_line(fork, tmp_path, capsys):
    original = fork.read_bytes()
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, what in ((tmp_path / "folder", "is a folder"), (tmp_path / "afile" / "out.pt", "is a file, not a folder"),
                      (fork, "overwrite the authors' original")):
        rc, err = _imp(capsys, fork, out)
        assert rc == 2, out
        assert_one_line_error(err, "b2t-import-checkpoint", what)
    assert fork.read_bytes() == original
    assert os.listdir(tmp_path / "folder") == [] and (tmp_path / "afile").read_text() == "x"
