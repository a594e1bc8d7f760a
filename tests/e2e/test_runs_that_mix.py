"""Runs that mix: b2t-train resumes only a checkpoint of the run its command describes (same layer type,
same data), says "the run is finished" only of such a run, and refuses a second writer of one --save-dir."""

import fcntl
import os
import signal
import subprocess
import time

import pytest

from helpers import BIN, assert_one_line_error, run, toy_train_argv

TINY_RUN = ["--max-tokens", "1000", "--disable-validation", "--log-format", "simple"]


def train_in_process(data, save, arch, max_update, *extra):
    """b2t-train in this process (starting fairseq costs seconds a process): its exit code."""
    from b2t_tools.commands import cli

    argv = [str(data), *toy_train_argv(*TINY_RUN, "--max-update", str(max_update), "--save-dir", str(save),
                                       *extra, arch=arch, json_log=False)]
    try:
        return cli.train(argv)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def post_ln_run(toy_data_bin, tmp_path_factory):
    """A finished 2-update Post-LN run."""
    save = tmp_path_factory.mktemp("post_ln")
    assert train_in_process(toy_data_bin, save, "transformer_post_ln_tiny", 2) == 0
    return save


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".pt"}


@pytest.mark.parametrize("arch,label", [("transformer_b2t_tiny", "B2T"), ("transformer_deepnorm_tiny", "DeepNorm")])
@pytest.mark.parametrize("max_update", [4, 2])  # 2: the run is finished, but not as the run this command describes
def test_resuming_another_layer_type_is_refused(toy_data_bin, post_ln_run, capsys, arch, label, max_update):
    before = _files(post_ln_run)
    capsys.readouterr()
    assert train_in_process(toy_data_bin, post_ln_run, arch, max_update) == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-train", "Post-LN", label, "--reset-optimizer")
    assert "finished" not in line
    assert _files(post_ln_run) == before


def test_fine_tuning_another_layer_type_on_purpose_passes_the_check(toy_data_bin, post_ln_run):
    from b2t_tools.commands import cli, preflight

    def args(*extra):
        argv = cli._with_user_dir([str(toy_data_bin), *toy_train_argv(
            *TINY_RUN, "--max-update", "4", "--save-dir", str(post_ln_run), *extra, arch="transformer_b2t_tiny")])
        return cli.parse_args("b2t-train", argv)

    preflight.check_resume(args("--reset-optimizer", "--reset-lr-scheduler", "--reset-dataloader", "--reset-meters"))
    preflight.check_resume(args("--reset-optimizer"))
    with pytest.raises(Exception, match="Post-LN"):
        preflight.check_resume(args())
    with pytest.raises(Exception, match="Post-LN"):  # another file, resumed as it is: the same rule
        preflight.check_resume(args("--restore-file", str(post_ln_run / "checkpoint_last.pt")))
    preflight.check_resume(cli.parse_args("b2t-train", cli._with_user_dir([str(toy_data_bin), *toy_train_argv(
        *TINY_RUN, "--max-update", "4", "--save-dir", str(post_ln_run), arch="transformer_post_ln_tiny")])))


def test_a_finished_run_on_other_data_is_not_finished(toy_data_bin, post_ln_run, capsys):
    """The run trained en->de; the same folder read de->en is another run, not a finished one."""
    before = _files(post_ln_run)
    capsys.readouterr()
    assert train_in_process(toy_data_bin, post_ln_run, "transformer_post_ln_tiny", 2, "-s", "de", "-t", "en") == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-train", "en->de", "de->en")
    assert "finished" not in line
    assert _files(post_ln_run) == before
    # the same run, same data: still finished
    assert train_in_process(toy_data_bin, post_ln_run, "transformer_post_ln_tiny", 2) == 0
    assert "the run is finished" in capsys.readouterr().err


def test_a_second_writer_of_one_save_dir_is_refused(toy_data_bin, tmp_path):
    save = tmp_path / "run"
    argv = [str(toy_data_bin), *toy_train_argv(*TINY_RUN, "--save-dir", str(save), arch="transformer_b2t_tiny",
                                               json_log=False)]
    first = subprocess.Popen([str(BIN / "b2t-train"), *argv, "--max-update", "1000000"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                             start_new_session=True)
    try:
        lock = save / ".b2t-train.lock"
        deadline = time.time() + 240
        while not (lock.exists() and "pid" in lock.read_text()):
            assert first.poll() is None, first.stderr.read()[-3000:]
            if time.time() > deadline:  # today's main writes no lock: wait until it trains instead
                if (save / "checkpoint_last.pt").exists() or time.time() > deadline + 120:
                    break
            time.sleep(0.5)
        second = run(["b2t-train", *argv, "--max-update", "3"], check=False, timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        assert_one_line_error(second.stderr, "b2t-train", f"pid {first.pid}", "another --save-dir")
        assert first.poll() is None  # the first run trains on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # killed: the kernel dropped its lock, so nothing stale blocks the next run
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
