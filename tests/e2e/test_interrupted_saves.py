"""Ctrl-C while a checkpoint is written: the run ends (exit 130, one line) and no file is left damaged.

torch's zip writer calls the file's write() from C++ and reports a KeyboardInterrupt raised there as
a RuntimeError; fairseq's torch_persistent_save retried on the same half-written handle (a file of two
archives torch cannot load) and training went on. Each test runs a real command in a real process
whose checkpoint writes are made slow (each write() sleeps), waits until a save is under way, sends
it a real SIGINT and checks the exit status, the message and every checkpoint file.
"""

import os
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
from helpers import sigint_default, toy_train_argv

from b2t_fairseq.checkpoint_io import find_damage

# runs a console command's main in this process, with every torch.save to a file object made slow
DRIVER = r'''
import os, sys, time, torch
real_save = torch.save

class Slow:
    """A file whose writes take a while, so that a signal lands inside torch's zip writer."""
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, b):
        self.n += 1
        if self.n == 3:  # past the archive's first record: inside the writer that turns errors into RuntimeError
            print("DRIVER: save under way", file=sys.stderr, flush=True)
        time.sleep(0.2 if 3 <= self.n < 30 else 0)
        return self.f.write(b)
    def flush(self):
        return self.f.flush()

def slow_save(obj, f, *args, **kwargs):
    return real_save(obj, Slow(f) if hasattr(f, "write") else f, *args, **kwargs)

if os.environ.get("DRIVER_SLOW_SAVE"):
    torch.save = slow_save
module, fn = sys.argv[1].rsplit(".", 1)
main = getattr(__import__(module, fromlist=[fn]), fn)
sys.argv = [os.environ.get("DRIVER_PROG", "prog")] + sys.argv[2:]
sys.exit(main(sys.argv[1:]))
'''


def _run(tmp_path, entry, argv, prog, interrupt):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, DRIVER_PROG=prog, PYTHONUNBUFFERED="1")
    if interrupt:
        env["DRIVER_SLOW_SAVE"] = "1"
    p = subprocess.Popen([sys.executable, str(driver), entry, *map(str, argv)], env=env, text=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,  # fairseq logs to stdout
                         preexec_fn=sigint_default)
    lines = []
    if interrupt:
        for line in p.stderr:
            lines.append(line)
            if line.startswith("DRIVER: save under way"):
                p.send_signal(signal.SIGINT)
                break
    out, err = p.communicate(timeout=300)
    return p.returncode, "".join(lines) + err


def _assert_interrupted(rc, err, prog):
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    mine = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: ")]
    assert mine == [f"{prog}: interrupted; run the same command again to resume"], err[-3000:]


def test_ctrl_c_during_a_training_save(tmp_path, toy_data_bin):
    save = tmp_path / "ckpt"
    argv = [toy_data_bin, *toy_train_argv(json_log=False), "--save-dir", save]
    rc, err = _run(tmp_path, "b2t_tools.commands.cli.train", [*argv, "--max-update", "1"], "b2t-train", False)
    assert rc == 0, err[-3000:]
    before = (save / "checkpoint_last.pt").read_bytes()
    rc, err = _run(tmp_path, "b2t_tools.commands.cli.train", [*argv, "--max-update", "2"], "b2t-train", True)
    _assert_interrupted(rc, err, "b2t-train")
    assert (save / "checkpoint_last.pt").read_bytes() == before  # the last complete checkpoint, untouched
    for f in save.iterdir():  # no temporary file left; the writer's lock file stays (flock: nothing to undo)
        if f.name == ".b2t-train.lock":
            continue
        assert f.suffix == ".pt", f"left behind: {f.name}"
        assert find_damage(f) is None, f.name
        torch.load(f, map_location="cpu", weights_only=False)


def _tiny_checkpoint(path, value):
    import argparse

    torch.save({"model": {"w": torch.full((64, 64), float(value))}, "args": argparse.Namespace(arch="transformer_b2t"),
                "extra_state": {"epoch": value}, "optimizer_history": [], "last_optimizer_state": None}, path)
    return path


@pytest.mark.slow  # a real process: seconds to start
def test_ctrl_c_during_an_average_save(tmp_path):
    a, b = _tiny_checkpoint(tmp_path / "a.pt", 1), _tiny_checkpoint(tmp_path / "b.pt", 3)
    out = _tiny_checkpoint(tmp_path / "avg.pt", 9)  # an earlier average: must survive
    before = out.read_bytes()
    rc, err = _run(tmp_path, "b2t_tools.commands.average_checkpoints.main",
                   ["--inputs", a, b, "--output", out], "b2t-average-checkpoints", True)
    _assert_interrupted(rc, err, "b2t-average-checkpoints")
    assert out.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir() if f.suffix != ".py") == ["a.pt", "avg.pt", "b.pt"]


def test_ctrl_c_during_an_import_save(tmp_path, toy_data_bin):
    from helpers import write_fork_checkpoint

    src = tmp_path / "fork.pt"
    write_fork_checkpoint(src, toy_data_bin)
    out = _tiny_checkpoint(tmp_path / "out.pt", 9)
    before = out.read_bytes()
    rc, err = _run(tmp_path, "b2t_tools.commands.import_checkpoint.main", [src, out], "b2t-import-checkpoint", True)
    _assert_interrupted(rc, err, "b2t-import-checkpoint")
    assert out.read_bytes() == before and not (tmp_path / "out.pt.tmp").exists()


@pytest.mark.parametrize("how", ["junk before", "two archives"])
def test_find_damage_refuses_bytes_before_the_archive(tmp_path, how):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    # what a save retried on a half-written handle leaves: part of an archive, then a whole one
    bad.write_bytes((b"\x00" * 300 if how == "junk before" else data[: len(data) // 2]) + data)
    assert zipfile.ZipFile(bad).testzip() is None  # Python's zipfile alone accepts it
    assert "bytes before its zip archive" in find_damage(bad)
    assert find_damage(good) is None
