"""The prepares' --dest (b2t_tools/dest.py, shared by b2t-lm-prepare and b2t-wmt-prepare): a folder we made
is replaced only while it holds nothing but what its marker lists; fairseq-preprocess dies with the prepare."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, assert_one_line_error, sigint_default

from b2t_tools.errors import ToolError
from b2t_tools.lm import prepare as lm_prepare
from b2t_tools.wmt import prepare as wmt_prepare

OURS = {"lm": (lm_prepare.DEST, ["dict.txt", "train.bin", "train.idx"]),
        "wmt": (wmt_prepare.DEST, ["dict.en.txt", "train.en-de.en.bin", "refs/newstest2014.de", "subsets.json"])}


def _made(dest_obj, dest, names):
    """A --dest as the command leaves it: built in DEST.partial, then committed."""
    tmp = dest_obj.begin(dest, {"recipe": "test"})
    for n in names:
        (tmp / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp / n).write_text(f"{n}\n")
    dest_obj.commit(tmp, dest)
    return dest


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("which", OURS)
def test_our_dest_with_the_users_files_in_it_is_never_replaced(tmp_path, which):
    dest_obj, names = OURS[which]
    dest = _made(dest_obj, tmp_path / "bin", names)
    assert dest_obj.check_places(tmp_path / "work", dest)  # only what we wrote: ours to replace
    listed = json.loads((dest / dest_obj.marker).read_text())["files"]
    assert set(names) <= set(listed) and dest_obj.marker not in listed
    (dest / "notes.txt").write_text("mine\n")  # the user's file, put in later
    (dest / names[0]).write_text("edited by hand, now longer\n")  # ours, changed since
    before = _tree(dest)
    with pytest.raises(ToolError, match="did not write") as e:
        dest_obj.check_places(tmp_path / "work", dest)
    assert "notes.txt" in str(e.value) and f"{names[0]} (changed)" in str(e.value)
    with pytest.raises(ToolError, match="notes.txt"):  # the last check before the rename, too
        dest_obj.commit(dest_obj.begin(tmp_path / "bin2", {}), dest)
    assert _tree(dest) == before


def test_a_marker_without_a_file_list_owns_only_the_names_the_command_writes(tmp_path):
    dest = tmp_path / "bin"
    dest.mkdir()
    (dest / lm_prepare.MARKER).write_text(json.dumps({"made_by": "b2t-lm-prepare"}))  # an older marker
    (dest / "dict.txt").write_text("a 1\n")
    (dest / "test.bin").write_text("x")
    (dest / "train.pt1.bin").write_text("x")  # a worker's part, left by a stopped fairseq-preprocess
    assert lm_prepare.DEST.check_places(tmp_path / "work", dest)
    (dest / "README").write_text("mine\n")
    with pytest.raises(ToolError, match="README"):
        lm_prepare.DEST.check_places(tmp_path / "work", dest)


def test_lm_prepare_refuses_in_one_line_before_anything_is_written(tmp_path, capsys):
    dest = _made(lm_prepare.DEST, tmp_path / "bin", ["dict.txt", "train.bin"])
    (dest / "sub").mkdir()
    (dest / "sub" / "x").write_text("mine\n")
    before = _tree(dest)
    rc = lm_prepare.main(["--work", str(tmp_path / "work"), "--dest", str(dest), "--url", "file:///nowhere.zip",
                          "--workers", "1", "--force"])
    line = assert_one_line_error(capsys.readouterr().err, "b2t-lm-prepare", "did not write", "sub/x")
    assert rc == 2 and "move them out" in line
    assert _tree(dest) == before and not (tmp_path / "work").exists()


# --- the fairseq-preprocess child dies with the prepare -------------------------------------------

FAKE = """#!{python}
import os, subprocess, sys, time
worker = subprocess.Popen(["sleep", "120"])  # as fairseq-preprocess's worker processes
with open(os.environ["PIDS"] + ".tmp", "w") as f:
    f.write(f"{{os.getpid()}} {{worker.pid}}")
os.replace(os.environ["PIDS"] + ".tmp", os.environ["PIDS"])
time.sleep(120)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_preprocess_child_dies_with_the_prepare(tmp_path, sig):
    """A prepare killed, stopped or interrupted mid-binarize leaves no fairseq-preprocess writing on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")  # its folder is where the prepare finds fairseq-preprocess
    (bin_dir / "fairseq-preprocess").write_text(FAKE.format(python=sys.executable))
    (bin_dir / "fairseq-preprocess").chmod(0o755)
    pids = tmp_path / "pids"
    code = ("import sys; from b2t_tools.commands import run_command; from b2t_tools.dest import preprocess; "
            "sys.exit(run_command('b2t-lm-prepare', preprocess, [], sys.argv[1], 1, lambda m: None))")
    p = subprocess.Popen([str(bin_dir / "python"), "-c", code, str(tmp_path / "out")], cwd=REPO, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), PIDS=str(pids)), stderr=subprocess.PIPE,
                         preexec_fn=sigint_default)
    try:
        deadline = time.time() + 60
        while not pids.exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert pids.exists(), p.communicate()[1]
        child, worker = map(int, pids.read_text().split())
        p.send_signal(sig)
        err = p.communicate(timeout=30)[1]
        deadline = time.time() + 10
        while (_alive(child) or (sig != signal.SIGKILL and _alive(worker))) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "fairseq-preprocess outlived the prepare"
        if sig != signal.SIGKILL:  # stopped: its whole process group too, and the prepare says so in one line
            assert not _alive(worker), "fairseq-preprocess's worker outlived the prepare"
            assert p.returncode == 130 and err.strip().splitlines()[-1] == \
                "b2t-lm-prepare: interrupted; run the same command again to resume", err
    finally:
        for pid in (map(int, pids.read_text().split()) if pids.exists() else ()):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if p.poll() is None:
            p.kill()
