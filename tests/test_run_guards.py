"""b2t_fairseq/run_guards.py: the one-writer lock (one registry a process: its holder, its forks and the
workers it spawns never lock themselves out), resume_target (fairseq's rule), the finished-run note
and the task kinds. The guards on real runs: tests/e2e/test_run_guards_matrix.py."""

import os
import subprocess
import sys
from argparse import Namespace

import pytest

from b2t_fairseq import run_guards
from b2t_fairseq.errors import B2TError

TRY_LOCK = ("import fcntl, sys\nf = open(sys.argv[1], 'a+')\ntry:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "    print('free')\nexcept OSError:\n    print('held')\n")


def _seen_by_another_process(folder):
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(folder / run_guards.LOCK_NAME)], capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if k != run_guards.LOCKS_ENV}).stdout.strip()


@pytest.fixture
def folder(tmp_path):
    yield tmp_path / "out"
    run_guards.release_locks()


def test_the_holder_does_not_lock_itself_out_and_others_are_refused(folder):
    before = run_guards.held()
    assert run_guards.lock_dir(folder, "--out", "b2t-stability sweep") is True
    assert run_guards.lock_dir(folder, "--save-dir") is False  # again in this process: already its own
    run_guards.claim(folder, "b2t-stability")
    assert f"pid {os.getpid()} " in (folder / run_guards.LOCK_NAME).read_text()
    assert _seen_by_another_process(folder) == "held"
    run_guards.release_locks(keep=before)
    assert _seen_by_another_process(folder) == "free"


def test_a_second_process_is_refused_in_one_line_naming_the_holder(folder):
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\n"
                               "fcntl.flock(f, fcntl.LOCK_EX)\nf.write('pid 4242 on elsewhere'); f.flush()\n"
                               "print('ok', flush=True)\ntime.sleep(60)\n", str(folder / run_guards.LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(B2TError, match=r"^--out .* is being written by another b2t-stability sweep "
                                           r"\(pid 4242 on elsewhere\); wait .* or pass another --out$"):
            run_guards.lock_dir(folder, "--out", "b2t-stability sweep")
    finally:
        holder.kill()
        holder.wait()
    assert run_guards.lock_dir(folder, "--out") is True  # the kernel dropped the dead holder's lock


@pytest.mark.slow  # a child process that imports fairseq
def test_a_fork_and_a_spawned_worker_share_their_parents_lock(folder):
    """A forked cell of a sweep, and fairseq's spawned workers of a b2t-train that locked first."""
    run_guards.lock_dir(folder)
    pid = os.fork()
    if pid == 0:  # the child: its parent's lock is its own; closing its copy leaves the parent's
        try:
            ok = run_guards.lock_dir(folder) is False
            run_guards.release_locks()
        finally:
            os._exit(0 if ok else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert _seen_by_another_process(folder) == "held"  # still the parent's
    worker = subprocess.run([sys.executable, "-c", "import sys; from b2t_fairseq import run_guards\n"
                             "print(run_guards.lock_dir(sys.argv[1]))", str(folder)], capture_output=True, text=True)
    assert worker.stdout.strip() == "False", worker.stderr[-2000:]  # a child process: inherits it (LOCKS_ENV)


def test_resume_target_follows_fairseqs_rule(tmp_path):
    ck = Namespace(save_dir=str(tmp_path), restore_file="checkpoint_last.pt", reset_optimizer=False,
                   reset_lr_scheduler=False, reset_meters=False, reset_dataloader=False, finetune_from_model=None,
                   continue_once=None)
    assert run_guards.resume_target(ck) == (str(tmp_path / "checkpoint_last.pt"), False)
    assert run_guards.resume_target(ck, "-shard0") == (str(tmp_path / "checkpoint_last-shard0.pt"), False)
    ck.finetune_from_model = "pre.pt"  # a first launch: fine-tuning, every reset on
    assert run_guards.resume_target(ck) == ("pre.pt", True)
    (tmp_path / "checkpoint_last.pt").write_bytes(b"")  # a later launch resumes its own run
    assert run_guards.resume_target(ck) == (str(tmp_path / "checkpoint_last.pt"), False)
    ck.restore_file, ck.reset_optimizer = "x.pt", True
    assert run_guards.resume_target(ck) == ("x.pt", True)


def test_finished_says_what_it_reached():
    state = {"optimizer_history": [{"num_updates": 5}], "extra_state": {"train_iterator": {"epoch": 2,
                                                                                          "iterations_in_epoch": 3}}}
    assert run_guards.finished(state, "c.pt", 6, 0) is None
    assert "has reached --max-update 5" in run_guards.finished(state, "c.pt", 5, 0)
    assert "(update 5, in epoch 2)" in run_guards.finished(state, "c.pt", 4, 0)
    assert "trained --max-epoch 1 epochs" in run_guards.finished(state, "c.pt", 0, 1)
    assert run_guards.finished(state, "c.pt", 0, 0) is None and run_guards.finished(None, "c.pt", 5, 0) is None


def test_task_kinds_and_the_refusal():
    assert run_guards.task_kind("translation") == run_guards.task_kind("translation_lev") == "translation"
    assert run_guards.task_kind("language_modeling") == "language model"
    assert run_guards.task_kind("masked_lm") is None and run_guards.task_kind(None) is None  # not judged
    run_guards.check_task("translation_lev", "translation", "c.pt")
    run_guards.check_task("masked_lm", "translation", "c.pt")
    with pytest.raises(B2TError, match="c.pt holds a language model .* trains a translation"):
        run_guards.check_task("language_modeling", "translation", "c.pt")


def _state(scheduler, **model):
    return {"cfg": {"lr_scheduler": {"_name": scheduler}, "model": {"_name": "transformer", **model}}}


def test_another_schedule_or_admin_omega_is_refused_unless_reset():
    run_guards.check_same_setup(_state("fixed"), "c.pt", "fixed")
    run_guards.check_same_setup(_state("fixed"), "c.pt", None)  # not judged
    with pytest.raises(B2TError, match=r"c.pt was trained with --lr-scheduler fixed, .* asks for --lr-scheduler "
                                       r"inverse_sqrt; .*--reset-lr-scheduler"):
        run_guards.check_same_setup(_state("fixed"), "c.pt", "inverse_sqrt")
    run_guards.check_same_setup(_state("fixed"), "c.pt", "inverse_sqrt", reset_lr_scheduler=True)

    admin = _state("fixed", arch="transformer_admin", ln_position="admin", admin_omega="fixed")
    run_guards.check_same_setup(admin, "c.pt", "fixed", "admin", admin_omega="fixed")
    with pytest.raises(B2TError, match="trained with --admin-omega fixed, .* asks for --admin-omega trainable"):
        run_guards.check_same_setup(admin, "c.pt", "fixed", "admin", admin_omega="trainable")
    run_guards.check_same_setup(admin, "c.pt", "fixed", "admin", admin_omega="trainable", reset_optimizer=True)
    # an Admin run saved before the option was written down ran with the default omega (trainable)
    unnamed = _state("fixed", arch="transformer_admin", ln_position="admin")
    with pytest.raises(B2TError, match="trained with --admin-omega trainable"):
        run_guards.check_same_setup(unnamed, "c.pt", "fixed", "admin", admin_omega="fixed")
    # Post-LN weights starting an Admin run are not an Admin run resumed
    post = _state("fixed", arch="transformer_post_ln", ln_position="post")
    run_guards.check_same_setup(post, "c.pt", "fixed", "admin", admin_omega="fixed")
