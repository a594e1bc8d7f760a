"""Our commands print what fairseq's own print, where they print it: the progress in fairseq's
``DATE TIME | LEVEL | logger | message`` format on stdout (so ``b2t-train ... > log`` keeps it), no
deprecation warnings of fairseq's making, and ``--help`` with an ``--arch`` shows that model's flags."""

import os
import re
import subprocess
import warnings

from helpers import BIN, run, toy_train_argv
from b2t_fairseq import layer_types

FAIRSEQ_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO \| train_inner \| epoch 001:")
WARNING = re.compile(r"(Deprecation|User|Future)Warning|deprecation_warning")


def test_train_logs_to_stdout_in_fairseq_format(toy_data_bin, tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as out:
        p = subprocess.run([str(BIN / "b2t-train"), str(toy_data_bin), *toy_train_argv(
            "--max-update", "2", "--log-interval", "1", "--no-save", arch="transformer_post_ln_tiny", json_log=False)],
            stdout=out, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    lines = log.read_text().splitlines()
    assert sum(bool(FAIRSEQ_LINE.match(ln)) for ln in lines) == 2, lines[-5:]
    assert not any(ln.startswith("INFO:") for ln in lines + p.stderr.splitlines())  # logging's default format
    assert "has already been imported" not in log.read_text()
    assert not WARNING.search(p.stderr) and "deprecat" not in p.stderr.lower(), p.stderr[-3000:]


def test_help_with_an_arch_shows_its_flags_and_no_warnings():
    p = run(["b2t-train", "--arch", "transformer_post_ln_tiny", "--help"])
    choices = "{" + ",".join(layer_types.KEYS) + "}"  # every record's key, as argparse lists them
    assert f"--ln-position {choices}, --layer-type {choices}" in p.stdout and "--encoder-layers" in p.stdout
    assert not WARNING.search(p.stderr + p.stdout), p.stderr[-3000:]
    lm = run(["b2t-train", "--arch", "transformer_lm_post_ln_tiny", "--task", "language_modeling", "--help"])
    assert "--ln-position" in lm.stdout and "--tokens-per-sample" in lm.stdout
    hydra = run(["b2t-hydra-train", "--help"])
    assert not WARNING.search(hydra.stderr + hydra.stdout), hydra.stderr[-3000:]


def test_only_fairseqs_deprecations_are_silenced():
    from b2t_tools.util import quiet_fairseq_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_fairseq_warnings()
        warnings.warn_explicit("\nThe strict flag in the compose API is deprecated.", UserWarning, "compose.py", 56,
                               module="hydra.compose")
        warnings.warn_explicit("Usage of deprecated keyword in package header", UserWarning, "x.py", 1,
                               module="my_project.config")  # not Hydra's header message: shown
        warnings.warn("a warning of the user's own")
    assert [str(w.message) for w in seen] == ["Usage of deprecated keyword in package header",
                                              "a warning of the user's own"]
