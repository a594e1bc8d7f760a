"""Two-process CPU training (torchrun, gloo): if one worker dies, the job fails loudly and soon.

The run uses b2t_fairseq.torchrun_train, which gives each process the flags of reference section 5
(--distributed-rank from torchrun's RANK, env://, no spawn, gloo, legacy_ddp). A sitecustomize
module on the workers' PYTHONPATH SIGKILLs rank 1 right after its 5th update.
"""

import os
import signal
import subprocess
import sys
import time

from conftest import BIN

KILL_RANK_HOOK = r'''
import os, signal
if os.environ.get("RANK") == "1":
    import fairseq.trainer
    _step = fairseq.trainer.Trainer.train_step

    def train_step(self, *a, **kw):
        out = _step(self, *a, **kw)
        if self.get_num_updates() >= int(os.environ["B2T_TEST_KILL_AT"]):
            import time
            open(os.environ["B2T_TEST_KILL_STAMP"], "w").write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    fairseq.trainer.Trainer.train_step = train_step
'''

LIMIT_S = 120  # the job must be gone by then; it would train for minutes if the survivor hung on
# measured on the 2-core VM (shared): the job exits ~2-3 s after the kill (torchrun notices the
# dead worker and SIGTERMs the other; on its own the survivor's gloo all-reduce fails with
# "Connection reset by peer" ~2 s after the kill)


def test_killed_worker_fails_the_job_within_bounded_time(toy_data_bin, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_RANK_HOOK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "b2t_fairseq.torchrun_train", str(toy_data_bin),
           "--arch", "transformer_b2t_tiny", "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.001",
           "--max-tokens", "200", "--max-update", "3000", "--num-workers", "0", "--no-progress-bar",
           "--log-format", "json", "--log-interval", "1", "--save-dir", str(tmp_path / "ck"), "--no-save"]
    stamp = tmp_path / "killed_at"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path / "hook"), B2T_TEST_KILL_AT="5",
               B2T_TEST_KILL_STAMP=str(stamp), PATH=f"{BIN}:{os.environ['PATH']}")
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers
        out, _ = p.communicate()
        raise AssertionError(f"the job still ran {LIMIT_S} s after starting; it hangs:\n{out[-4000:]}")
    elapsed, after_kill = time.monotonic() - start, time.time() - float(stamp.read_text())

    assert "distributed init (rank 1)" in out and "initialized host" in out, out[-4000:]
    assert '"num_updates": "4"' in out, out[-4000:]  # both workers trained before the kill
    assert '"num_updates": "200"' not in out  # ... and the survivor did not carry on alone
    assert p.returncode != 0, out[-4000:]
    assert "Signal 9 (SIGKILL) received by PID" in out and "rank      : 1" in out, out[-4000:]  # names the dead one
    assert after_kill < LIMIT_S
    print(f"job failed {after_kill:.1f} s after the kill, {elapsed:.1f} s after start (exit {p.returncode})")
