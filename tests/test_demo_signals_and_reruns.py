"""b2t-demo under hostile use: stopped by signals, re-run with other options, bad input.

Runs use a synthetic Tatoeba-like zip (a made-up word-for-word language pair, written here) and
tiny settings (1+1 layers, width 16, a dozen updates), so each demo run takes seconds.
"""

import json
import math
import os
import random
import signal
import subprocess
import time
import warnings
import zipfile
from pathlib import Path

import pytest
from helpers import BIN, assert_one_line_error

from b2t_tools.demo import cli as demo
from b2t_tools.demo import data as tatoeba
from b2t_tools.demo import runs
from b2t_tools.errors import ToolError

TINY_DEMO = ["--quick", "--depths", "1", "--dim", "16", "--heads", "2", "--max-tokens", "256", "--vocab", "150",
             "--valid-every", "4", "--jobs", "1", "--no-grad-norms"]


def tatoeba_lines(n=1500, seed=0):
    rng = random.Random(seed)
    syl = "ka ri to mu se la no pe vi da".split()
    words = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(80)})
    lines = []
    for _ in range(n):
        s = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        lines.append(f"{' '.join(s).capitalize()}.\t{' '.join(w[::-1] + 'n' for w in s).capitalize()}.\t"
                     "CC-BY 2.0 (France) Attribution: tatoeba.org")
    return lines


def write_zip(path, data, name="deu.txt"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def toy_zip(tmp_path_factory):
    return write_zip(tmp_path_factory.mktemp("corpus") / "deu-eng.zip", ("\n".join(tatoeba_lines()) + "\n").encode())


# --- bad input: one line, the right fix ---------------------------------------------------------

@pytest.fixture
def demo_main(toy_zip, tmp_path):
    """b2t-demo in-process (its signal handlers and warning filters restored afterwards)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def call(*argv, corpus=toy_zip, out=None):
        argv = [str(a) for a in argv]
        if "--corpus" not in argv:
            argv += ["--corpus", str(corpus)]
        if "--out" not in argv:
            argv += ["--out", str(out or tmp_path / "out")]
        with warnings.catch_warnings():
            return demo.main(argv)
    yield call
    for s, h in handlers.items():
        signal.signal(s, h)


BAD_OPTIONS = [
    (["--depths", "six"], "--depths six is not a comma list of positive integers"),
    (["--depths", "0"], "--depths 0 is not a comma list of positive integers"),
    (["--depths", "6,-1"], "positive integers"),
    (["--depths", "6,500"], "pass depths of 100 or fewer"),
    (["--jobs", "0"], "--jobs 0 must be at least 1"),
    (["--archs", ","], "names no architecture"),
    (["--archs", "post_ln,b2tt"], "unknown --archs b2tt"),
    (["--max-update", "0"], "--max-update 0 must be at least 1"),
    (["--max-update", "-5"], "--max-update -5 must be at least 1"),
    (["--dim", "0"], "--dim 0 must be at least 1"),
    (["--heads", "0"], "--heads 0 must be at least 1"),
    (["--heads", "3", "--dim", "64"], "--dim 64 is not divisible by --heads 3"),
    (["--lr", "0"], "--lr 0.0 must be a positive number"),
    (["--lr", "nan"], "--lr nan must be a positive number"),
    (["--lr", "-0.001"], "must be a positive number"),
    (["--dropout", "1.5"], "--dropout 1.5 must be in [0, 1)"),
    (["--dropout", "-0.1"], "must be in [0, 1)"),
    (["--warmup", "0"], "--warmup 0 must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens 0 must be at least 1"),
    (["--vocab", "0"], "--vocab 0 is too small"),
    (["--seed", "-1"], "--seed -1 must be 0 or more"),
    (["--valid-every", "0"], "--valid-every 0 must be at least 1"),
]


@pytest.mark.parametrize("argv,fragment", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line(demo_main, capsys, tmp_path, argv, fragment):
    assert demo_main(*argv) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", fragment)
    assert not (tmp_path / "out").exists()  # checked before anything is made


def test_bad_output_places_are_one_line(demo_main, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert demo_main("--out", tmp_path / "afile") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "is a file, not a folder")
    assert demo_main("--cache", tmp_path / "afile") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "--cache", "is a file, not a folder")
    assert demo_main("--out", tmp_path / "afile" / "sub") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "cannot create --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_is_one_line(demo_main, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    assert demo_main("--out", ro) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "not writable")


LATIN1 = "Caf\u00e9.\tKaffee.\tCC-BY".encode("latin-1")
BAD_CORPORA = {
    "latin-1 line": (b"\n".join(l.encode() for l in tatoeba_lines(20)) + b"\n" + LATIN1 + b"\n",
                     ["line 21 of deu.txt", "is not UTF-8", "byte 0xe9", "Latin-1", "re-save deu.txt as UTF-8"]),
    "utf-16 file": ("\n".join(tatoeba_lines(20)).encode("utf-16"), ["line 1 of deu.txt", "UTF-16?", "UTF-8"]),
    "utf-16 line": (b"Hi.\tHallo.\n" + "Run!\tLauf!\n".encode("utf-16-le"), ["line 2", "NUL bytes (UTF-16", "UTF-8"]),
    "50 pairs": (("\n".join(tatoeba_lines(50)) + "\n").encode(),
                 ["has only 50 usable sentence pairs", "too few for 100 test + 200 valid", "full deu-eng.zip"]),
    "empty deu.txt": (b"", ["has only 0 usable sentence pairs"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CORPORA))
def test_bad_corpus_is_one_line(demo_main, capsys, tmp_path, case):
    content, fragments = BAD_CORPORA[case]
    z = write_zip(tmp_path / "deu-eng.zip", content)
    assert demo_main(*TINY_DEMO, corpus=z) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", *fragments)


def test_bad_corpus_files_are_one_line(demo_main, capsys, tmp_path):
    z = write_zip(tmp_path / "other.zip", b"x\ty\n", name="fra.txt")
    assert demo_main(*TINY_DEMO, corpus=z) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "has no deu.txt (it holds fra.txt)")
    (tmp_path / "text.zip").write_text("not a zip\n")
    assert demo_main(*TINY_DEMO, corpus=tmp_path / "text.zip") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "not a readable zip file")
    assert demo_main(*TINY_DEMO, corpus=tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "is a folder; pass the zip itself")


def test_vocab_too_large_for_the_corpus_is_one_line(demo_main, capsys):
    argv = [a if a != "150" else "5000" for a in TINY_DEMO]  # --vocab 5000 on an 80-word language
    assert demo_main(*argv) == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-demo", "sentencepiece cannot learn 5000 pieces")
    assert "pass --vocab" in line and "or less" in line


# --- every option that shapes a run is in its key -----------------------------------------------

SHAPING = [["--dim", "32"], ["--heads", "4"], ["--dropout", "0.2"], ["--lr", "0.001"], ["--warmup", "10"],
           ["--max-tokens", "512"], ["--max-update", "7"], ["--seed", "3"], ["--valid-every", "5"]]


def test_run_key_changes_with_every_shaping_option(tmp_path):
    def key(*extra, arch="b2t", layers=1, data_root=tmp_path / "tatoeba-x"):
        cfg = demo.resolve_config(demo.get_parser().parse_args([*TINY_DEMO, *extra]))
        return runs.run_key(arch, layers, data_root, cfg)
    base = key()
    keys = {" ".join(o): key(*o) for o in SHAPING}
    keys["arch"], keys["layers"], keys["data"] = key(arch="post_ln"), key(layers=2), key(data_root=tmp_path / "y")
    assert base not in keys.values() and len(set(keys.values())) == len(keys), keys
    assert key("--jobs", "2") == base and key("--no-grad-norms") == base  # these shape no run


def test_data_tag_changes_with_every_input():
    base = ("abc", 2000, 200, 100, 20000, 1)
    tags = {tatoeba.data_tag(*base[:i], v, *base[i + 1:]) for i, v in enumerate(("abd", 1000, 201, 101, None, 2))}
    assert tatoeba.data_tag(*base) not in tags and len(tags) == 6


# --- signals and re-runs (real subprocesses) ----------------------------------------------------

def demo_popen(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([str(BIN / "b2t-demo"), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def children_of(pid):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid):
    """Running (a zombie nobody reaped is dead)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(cond, timeout=120, what=""):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def ckpt_updates(out):
    ck = list((out / "runs").glob("b2t-1L-*/checkpoint_last.pt"))
    if not ck:
        return -1
    try:
        return runs.checkpoint_state(ck[0])["updates"]
    except Exception:  # noqa: BLE001 - being written
        return -1


def stop_mid_training(argv, out, sig, after):
    """Start b2t-demo, wait until a checkpoint past update `after` exists, send sig; returns
    (process, the training children it had)."""
    p = demo_popen(argv)
    wait_for(lambda: ckpt_updates(out) > after or p.poll() is not None, what="a checkpoint")
    assert p.poll() is None, p.communicate()
    kids = children_of(p.pid)
    assert kids, "no training child running"
    os.kill(p.pid, sig)
    p.wait(30)
    return p, kids


STOP_RUN_UPDATES = 64


@pytest.mark.e2e
def test_stopped_demo_takes_its_children_along_and_resumes_right(toy_zip, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    # room for two stops before the end: under load a poll can see a checkpoint several saves late
    n = STOP_RUN_UPDATES
    argv = [*TINY_DEMO, "--archs", "b2t", "--max-update", str(n), "--corpus", toy_zip, "--out", out, "--cache", cache]

    # kill PID (SIGTERM): one line, its children end with it
    p, kids = stop_mid_training(argv, out, signal.SIGTERM, after=0)
    err = p.stderr.read()
    assert p.returncode == 130, err
    assert_one_line_error(err.replace("b2t-demo: interrupted", "b2t-demo: error: interrupted"), "b2t-demo",
                          "run the same command again to resume")
    wait_for(lambda: not any(alive(k) for k in kids), timeout=10, what="the children to end after SIGTERM")

    # kill -9 PID: the kernel ends the children (PR_SET_PDEATHSIG)
    first = ckpt_updates(out)
    p, kids = stop_mid_training(argv, out, signal.SIGKILL, after=first)
    assert p.returncode == -signal.SIGKILL
    wait_for(lambda: not any(alive(k) for k in kids), timeout=10, what="the children to end after SIGKILL")
    stopped_at = ckpt_updates(out)
    assert 0 < first < stopped_at < n

    # the re-run resumes and reports the checkpoint's count and losses
    p = demo_popen(argv)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert f"resuming at update {stopped_at}" in so
    (rec,) = json.loads((out / "results.json").read_text())["runs"]
    (run_dir,) = (out / "runs").glob("b2t-1L-*")
    state = runs.checkpoint_state(run_dir / "checkpoint_last.pt")
    assert rec["updates"] == state["updates"] == n
    assert rec["valid_loss"] == state["val_loss"]
    assert math.isclose(rec["valid_loss"], [v for v in rec_curves(run_dir)["valid"]][-1]["valid_loss"], abs_tol=1e-3)

    # finished, but its log lost the last lines (a demo killed before reading them, as it used to be):
    # the checkpoint says it is finished, so no update more, and the same numbers
    log_path = run_dir / "train.log"
    lines = log_path.read_text().splitlines()
    last_valid = max(i for i, l in enumerate(lines) if f'"valid_num_updates": "{n}"' in l)
    log_path.write_text("\n".join(lines[:last_valid]) + "\n")
    (run_dir / "result.json").unlink()
    before = (run_dir / "checkpoint_last.pt").stat().st_mtime_ns
    p = demo_popen(argv)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert "b2t-1L: training" not in so
    assert (run_dir / "checkpoint_last.pt").stat().st_mtime_ns == before
    (again,) = json.loads((out / "results.json").read_text())["runs"]
    assert again["updates"] == n and again["valid_loss"] == rec["valid_loss"]


def rec_curves(run_dir):
    return json.loads((run_dir / "result.json").read_text())["curves"]


@pytest.mark.e2e
def test_rerun_with_other_options_never_reuses_runs(toy_zip, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = [*TINY_DEMO, "--archs", "b2t", "--max-update", "8", "--corpus", toy_zip, "--out", out, "--cache", cache]
    p = demo_popen(base)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    (first,) = json.loads((out / "results.json").read_text())["runs"]

    p = demo_popen([*base, "--dim", "32", "--max-update", "6"])  # the last --max-update wins
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert "finished earlier" not in so and "b2t-1L: training, 6 updates" in so
    res = json.loads((out / "results.json").read_text())
    (second,) = res["runs"]
    assert second["key"] != first["key"] and second["updates"] == 6 and second["params"] > first["params"]
    assert res["config"]["dim"] == 32

    p = demo_popen(base)  # back to the first options: that run is reused, unchanged
    so, se = p.communicate(timeout=300)
    assert p.returncode == 0, se
    assert "finished earlier with the same options" in so
    (third,) = json.loads((out / "results.json").read_text())["runs"]
    assert third == first


def test_damaged_state_files(tmp_path, capsys):
    bad = tmp_path / "checkpoint_last.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ToolError, match=r"cannot read .*checkpoint_last.pt .*; delete .* and run b2t-demo again"):
        runs.checkpoint_state(bad)
    assert runs._read_json(tmp_path / "missing.json", 0.0) == 0.0
    (tmp_path / "half.json").write_text('{"key": "ab')
    assert runs._read_json(tmp_path / "half.json", {}) == {}  # a damaged result.json: the run is redone


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is visible")
def test_fp16_without_gpu_is_one_line(demo_main, capsys):
    assert demo_main("--fp16") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", "--fp16 needs a CUDA GPU", "drop --fp16")


# --- the mechanism alone, in seconds --------------------------------------------------------------

def test_stop_all_ends_children_and_grandchildren():
    from b2t_tools.demo import children

    children.STOPPING.clear()
    p = children.popen(["sh", "-c", "sleep 60 & sleep 60"])
    wait_for(lambda: children_of(p.pid), timeout=10, what="the grandchildren")
    grandchildren = children_of(p.pid)
    assert children.stop_all(timeout=5) == [p]
    wait_for(lambda: not any(alive(x) for x in [p.pid, *grandchildren]), timeout=10,
             what="child and grandchildren to end")
    with pytest.raises(children.Stopped):  # no new child while stopping
        children.popen(["true"])
    children.STOPPING.clear()
    children.forget(p)


def test_a_failed_demo_leaves_this_process_able_to_start_children(demo_main, capsys, tmp_path):
    """A demo that stops on an error ends its children; the process that called it (a test, a notebook)
    can start new ones afterwards: the stop does not outlive the call."""
    from b2t_tools.demo import children

    assert demo_main("--quick", corpus=tmp_path / "missing.zip") == 2
    capsys.readouterr()
    assert not children.STOPPING.is_set()
    assert children.run(["true"]).returncode == 0


def test_sigkill_of_the_parent_ends_the_child(tmp_path):
    """The parent (a Python process using children.popen) is killed with SIGKILL: no handler runs,
    the kernel ends the child (PR_SET_PDEATHSIG)."""
    import sys

    pid_file = tmp_path / "child.pid"
    from b2t_tools.demo import children

    code = ("import importlib.util as u, time; "  # children.py alone (stdlib only): no fairseq import, fast
            f"s = u.spec_from_file_location('children', {children.__file__!r}); "
            "children = u.module_from_spec(s); s.loader.exec_module(children); "
            "p = children.popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code])
    wait_for(lambda: pid_file.is_file() and pid_file.read_text(), timeout=60, what="the child")
    child = int(pid_file.read_text())
    assert alive(child)
    parent.kill()
    parent.wait()
    wait_for(lambda: not alive(child), timeout=10, what="the orphan to end")


def test_damaged_data_cache_is_one_line(toy_zip, tmp_path):
    tag = tatoeba.data_tag(tatoeba.file_digest(toy_zip), 150, 200, 100, 20000, 1)
    (tmp_path / tag).mkdir()
    (tmp_path / tag / "meta.json").write_text('{"pairs": ')
    with pytest.raises(ToolError, match=r"meta.json is damaged; delete .* and run again"):
        tatoeba.prepare(toy_zip, tmp_path, vocab_size=150, n_valid=200, n_test=100, max_train=20000, seed=1)


def test_longest_sentence(tmp_path):
    for split in tatoeba.SPLITS:
        for lang in tatoeba.LANGS:
            (tmp_path / f"{split}.{lang}").write_text("a b\n" + ("x " * (9 if (split, lang) == ("valid", "de") else 3)))
    assert tatoeba.longest_sentence(tmp_path) == 10  # 9 pieces and the end of sentence


@pytest.mark.e2e
def test_max_tokens_below_the_longest_sentence_is_one_line(demo_main, capsys, tmp_path):
    argv = [a if a != "256" else "8" for a in TINY_DEMO]  # the toy corpus has sentences of up to 15 tokens
    assert demo_main(*argv, "--cache", tmp_path / "cache") == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-demo", "--max-tokens 8 is below the longest sentence")
    longest = int(line.split("(")[1].split()[0])
    assert longest > 8 and f"pass --max-tokens {longest} or more" in line


@pytest.mark.e2e
def test_unwritable_place_inside_out_is_one_line(demo_main, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs").write_text("a file where the runs folder goes")
    assert demo_main(*TINY_DEMO, "--archs", "b2t", "--out", out, "--cache", tmp_path / "cache") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-demo", f"cannot write {out / 'runs'}", "then run b2t-demo again")


def test_progress_lines_quiet_unless_verbose(capsys):
    cfg = demo.resolve_config(demo.get_parser().parse_args(TINY_DEMO))
    noise = "INFO:fairseq.trainer:begin training epoch 1"
    valid = 'INFO:valid:{"epoch": 1, "valid_loss": "7.77", "valid_num_updates": "4"}'
    for line in (noise, valid):
        runs._progress(line, "b2t-1L", cfg)
    out = capsys.readouterr().out
    assert "begin training" not in out and "b2t-1L: update 4/60 valid loss 7.77" in out
    cfg.verbose = True
    runs._progress(noise, "b2t-1L", cfg)
    assert "b2t-1L| INFO:fairseq.trainer:begin training epoch 1" in capsys.readouterr().out
