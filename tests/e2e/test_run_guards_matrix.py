"""Every training entry point under the same run guards (b2t_fairseq/run_guards.py): entry points x guards.

Entry points: b2t-train (translation), b2t-train with the LM's own architecture name (transformer_lm_b2t),
b2t-hydra-train, plain fairseq-train with the plugin in strict mode (translation, and a Post-LN LM).
(b2t-lm-train is b2t-train with the recipe's flags; b2t-stability's cells are b2t-train in a fork.)
Guards: the same run resumes and trains on; another layer type, another task, other data, another
learning-rate schedule are refused with nothing written; a finished run exits 0 without training; a second writer is refused by the lock;
the final save is there. One 2-update run per entry point, reused by its cases (copied where a case
could write); everything in this process (starting fairseq costs seconds a process) but one case that
checks what plain fairseq-train prints.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, REPO, run

from b2t_fairseq import patches, run_guards
from b2t_fairseq.errors import B2TError

PLUGIN = str(REPO / "b2t_fairseq")
TRANSLATION = ["--share-all-embeddings", "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "1000",
               "--seed", "1", "--num-workers", "0", "--no-progress-bar", "--cpu", "--disable-validation",
               "--log-format", "simple", "--no-epoch-checkpoints"]
LM_SIZES = ["--decoder-layers", "1", "--decoder-embed-dim", "16", "--decoder-ffn-embed-dim", "32",
            "--decoder-attention-heads", "2"]
LM = ["--task", "language_modeling", "--optimizer", "adam", "--lr", "0.002", "--tokens-per-sample", "32",
      "--max-tokens", "256", "--sample-break-mode", "none", "--seed", "1", "--num-workers", "0", "--no-progress-bar",
      "--cpu", "--disable-validation", "--log-format", "simple", "--no-epoch-checkpoints", *LM_SIZES]
_WORDS = "the a cat dog house tree red blue big small runs sees eats and with on".split()


# --- the entry points, each driven in this process --------------------------------------------------

def _b2t(command, argv):
    from b2t_tools.commands import cli

    try:
        return getattr(cli, command)([str(a) for a in argv])
    except SystemExit as e:
        return e.code or 0


def _fairseq_train(argv):
    """fairseq_cli.train.cli_main as the fairseq-train script runs it (strict: patches.enable_behaviour);
    the plugin's error surfaces as the exception that script would print; locks end with it, as a process's."""
    from fairseq_cli import train

    patches.enable_behaviour()  # what B2T_FAIRSEQ_STRICT=1 does when fairseq imports the plugin
    before, argv0 = run_guards.held(), sys.argv
    sys.argv = ["fairseq-train", "--user-dir", PLUGIN, *[str(a) for a in argv]]
    try:
        train.cli_main()
        return 0
    except SystemExit as e:
        return e.code or 0
    except B2TError as e:
        print(f"fairseq-train: error: {e}", file=sys.stderr)  # what the plugin's excepthook prints
        return 2
    finally:
        sys.argv = argv0
        run_guards.release_locks(keep=before)


def _hydra_argv(data, save, arch, max_update, other_data=False):
    return ["--config-dir", REPO / "configs", "--config-name", "transformer_post_ln_6l", f"task.data={data}",
            f"model._name={arch}", "common.fp16=false", "common.cpu=true", "distributed_training.distributed_world_size=1",
            "optimization.update_freq=[1]", f"optimization.max_update={max_update}", "dataset.max_tokens=1000",
            f"checkpoint.save_dir={save}", "checkpoint.no_epoch_checkpoints=true", f"hydra.run.dir={save}.hydra",
            "common.log_format=simple", "dataset.num_workers=0", "common.no_progress_bar=true",
            "dataset.disable_validation=true", *(["+task.source_lang=de", "+task.target_lang=en"] if other_data else [])]


class Entry:
    def __init__(self, name, kind, arch, other_arch, call, argv):
        self.name, self.kind, self.arch, self.other_arch, self.call, self._argv = name, kind, arch, other_arch, call, argv

    def run(self, data, save, max_update, arch=None, other_data=False, extra=()):
        return self.call([*self._argv(self, data, save, arch or self.arch, max_update, other_data), *extra])


def _flags(entry, data, save, arch, max_update, other_data):
    base = TRANSLATION if entry.kind == "translation" else LM
    return [data, "--arch", arch, *base, "--max-update", max_update, "--save-dir", save,
            *(["-s", "de", "-t", "en"] if other_data and entry.kind == "translation" else [])]


ENTRIES = {e.name: e for e in (
    Entry("b2t-train", "translation", "transformer_post_ln_tiny", "transformer_b2t_tiny",
          lambda a: _b2t("train", a), _flags),
    # the LM's own name: fairseq registers it as an architecture that sets nothing (issue 24, item 1)
    Entry("b2t-train --arch transformer_lm_b2t", "lm", "transformer_lm_b2t", "transformer_lm_post_ln",
          lambda a: _b2t("train", a), _flags),
    Entry("b2t-hydra-train", "translation", "transformer_post_ln_tiny", "transformer_b2t_tiny",
          lambda a: _b2t("hydra_train", a),
          lambda e, data, save, arch, mu, other: _hydra_argv(data, save, arch, mu, other)),
    Entry("fairseq-train (strict)", "translation", "transformer_post_ln_tiny", "transformer_deepnorm_tiny",
          _fairseq_train, _flags),
    # a Post-LN LM resumed as transformer_lm_b2t trained on as B2T (issue 24, item 1)
    Entry("fairseq-train (strict) LM", "lm", "transformer_lm_post_ln", "transformer_lm_b2t", _fairseq_train, _flags),
)}


# --- data and runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """A tiny English corpus binarized for language modelling (in this process), and a copy whose
    dictionary has other words (same size): other data for the same model."""
    from fairseq import options
    from fairseq_cli import preprocess

    import random

    root = tmp_path_factory.mktemp("lm")
    rng = random.Random(0)
    for split, lines in (("train", 120), ("valid", 8)):
        (root / f"{split}.txt").write_text("".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
                                                   + "\n" for _ in range(lines)))
    parser = options.get_preprocessing_parser()
    preprocess.main(parser.parse_args(["--only-source", "--trainpref", str(root / "train.txt"), "--validpref",
                                       str(root / "valid.txt"), "--destdir", str(root / "bin"), "--workers", "1"]))
    other = root / "other"
    shutil.copytree(root / "bin", other)
    d = other / "dict.txt"
    d.write_text("".join(f"x{line}" for line in d.read_text().splitlines(keepends=True)))
    return {"same": root / "bin", "other": other}


@pytest.fixture(scope="module")
def data(toy_data_bin, lm_data):
    return {"translation": toy_data_bin, "lm": lm_data["same"], "lm-other": lm_data["other"]}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """name -> the save dir of that entry point's finished 2-update run (trained on first use)."""
    done = {}

    def get(name):
        if name not in done:
            entry = ENTRIES[name]
            save = tmp_path_factory.mktemp("run") / "save"
            assert entry.run(data[entry.kind], save, 2) == 0, name
            done[name] = save
        return done[name]
    yield get
    run_guards.release_locks()


def _pts(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file() and p.name != run_guards.LOCK_NAME}


def _updates(save):
    return run_guards.position(run_guards.read_header(str(save / "checkpoint_last.pt")))[1]


@pytest.fixture
def copy_of(tmp_path):
    def copy(save):
        dst = tmp_path / "save"
        shutil.copytree(save, dst)
        return dst
    return copy


NAMES = list(ENTRIES)


# --- the guards -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_the_final_save_is_there(runs, name):
    assert _updates(runs(name)) == 2


@pytest.mark.parametrize("name", NAMES)
def test_the_same_run_resumes_and_trains_on(runs, data, copy_of, name, capsys):
    entry = ENTRIES[name]
    save = copy_of(runs(name))
    assert entry.run(data[entry.kind], save, 3) == 0
    assert _updates(save) == 3
    assert "the run is finished" not in capsys.readouterr().err


@pytest.mark.parametrize("name", NAMES)
def test_a_finished_run_exits_0_without_training(runs, data, name, capsys):
    entry = ENTRIES[name]
    save = runs(name)
    before = _pts(save)
    capsys.readouterr()
    assert entry.run(data[entry.kind], save, 2) == 0
    err = capsys.readouterr().err
    assert err.count("the run is finished: ") == 1 and "has reached --max-update 2" in err, err[-2000:]
    assert _pts(save) == before


def _refused(entry, capsys, rc, *fragments):
    err = capsys.readouterr().err
    assert rc not in (0, None), err[-3000:]
    # b2t-hydra-train shows it in Hydra's report; the others as one line
    assert any(all(f in line for f in fragments) for line in err.splitlines()), err[-3000:]
    return err


def _refused_untouched(entry, save, data, capsys, fragments, **run):
    """The entry point's run over ``save`` is refused, naming ``fragments``, and writes nothing there."""
    before = _pts(save)
    capsys.readouterr()
    rc = entry.run(data, save, 3, **run)
    _refused(entry, capsys, rc, *fragments)
    assert _pts(save) == before


@pytest.mark.parametrize("name", NAMES)
def test_another_layer_type_is_refused(runs, data, name, capsys):
    entry = ENTRIES[name]
    have = "Post-LN" if "post" in entry.arch else "B2T"
    _refused_untouched(entry, runs(name), data[entry.kind], capsys, (f"holds a {have} run", "--reset-optimizer"),
                       arch=entry.other_arch)


@pytest.mark.parametrize("name", NAMES)
def test_another_task_is_refused(runs, data, copy_of, name, capsys):
    """A folder of an LM run resumed by a translation command, and the reverse."""
    entry = ENTRIES[name]
    other = "b2t-train --arch transformer_lm_b2t" if entry.kind == "translation" else "b2t-train"
    have, want = ("language model", "translation") if entry.kind == "translation" else ("translation", "language model")
    _refused_untouched(entry, copy_of(runs(other)), data[entry.kind], capsys, (f"holds a {have}", f"trains a {want}"))


@pytest.mark.parametrize("name", NAMES)
def test_other_data_is_refused(runs, data, name, capsys):
    entry = ENTRIES[name]
    if entry.kind == "translation":  # the same folder read de->en
        _refused_untouched(entry, runs(name), data["translation"], capsys, ("translates en->de", "de->en"),
                           other_data=True)
    else:  # a dictionary of other words
        _refused_untouched(entry, runs(name), data["lm-other"], capsys, ("was trained with another", "dictionary"))


# the 2-update runs use fairseq's default schedule (fixed), b2t-hydra-train its config's (inverse_sqrt,
# whose warmup_init_lr the fixed schedule has no key for)
OTHER_SCHEDULE = {"b2t-hydra-train": ["lr_scheduler._name=fixed", "~lr_scheduler.warmup_init_lr"]}


@pytest.mark.parametrize("name", NAMES)
def test_another_lr_scheduler_is_refused(runs, data, name, capsys):
    """fairseq would load the saved schedule's state into the new one: KeyError 'best', a traceback."""
    entry = ENTRIES[name]
    extra = OTHER_SCHEDULE.get(name, ["--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2"])
    _refused_untouched(entry, runs(name), data[entry.kind], capsys,
                       ("was trained with --lr-scheduler", "--reset-lr-scheduler"), extra=extra)


HOLD = ("import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on a test'); f.flush()\nprint('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def held_lock():
    """Another process holding a folder's --save-dir lock (as every entry point takes it)."""
    holders = []

    def hold(save):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(Path(save) / run_guards.LOCK_NAME)],
                             stdout=subprocess.PIPE, text=True)
        holders.append(p)
        assert p.stdout.readline().strip() == "held"
        return p.pid
    yield hold
    for p in holders:
        p.kill()
        p.wait()


@pytest.mark.parametrize("name", NAMES)
def test_a_second_writer_is_refused(runs, data, copy_of, held_lock, name, capsys):
    entry = ENTRIES[name]
    save = copy_of(runs(name))
    before = _pts(save)
    pid = held_lock(save)
    capsys.readouterr()
    rc = entry.run(data[entry.kind], save, 3)
    _refused(entry, capsys, rc, f"--save-dir {save} is being written by another training run (pid {pid} ",
             "pass another --save-dir")
    assert _pts(save) == before


def test_plain_fairseq_train_prints_the_refusal_in_one_line(runs, data, held_lock, copy_of):
    """What the fairseq-train script itself prints (its own process): one line, exit 2, no traceback."""
    save = copy_of(runs("fairseq-train (strict)"))
    pid = held_lock(save)
    p = run([BIN / "fairseq-train", "--user-dir", PLUGIN,
             *_flags(ENTRIES["fairseq-train (strict)"], data["translation"], save, "transformer_post_ln_tiny", 3, False)],
            check=False, env={patches.STRICT_ENV: "1"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fairseq-train: error: ")]
    assert len(lines) == 1 and f"(pid {pid} " in lines[0], p.stderr[-3000:]


# --- decoding: a checkpoint runs only under its own task --------------------------------------------

def test_an_lm_checkpoint_does_not_decode_a_translation_test_set(runs, data, capsys):
    lm = runs("b2t-train --arch transformer_lm_b2t") / "checkpoint_last.pt"
    capsys.readouterr()
    rc = _b2t("generate", [data["translation"], "--path", lm, "--cpu", "--beam", "1", "--max-len-b", "5",
                           "--batch-size", "8"])
    assert rc == 2
    _refused(None, capsys, rc, "b2t-generate: error: ", "holds a language model", "runs a translation")


def test_a_translation_checkpoint_does_not_score_a_language_model_test_set(runs, data, capsys):
    mt = runs("b2t-train") / "checkpoint_last.pt"
    capsys.readouterr()
    rc = _b2t("eval_lm", [data["lm"], "--path", mt, "--cpu", "--batch-size", "2", "--tokens-per-sample", "32",
                          "--gen-subset", "valid", "--num-workers", "0"])
    assert rc == 2
    _refused(None, capsys, rc, "b2t-eval-lm: error: ", "holds a translation", "runs a language model")


def test_fairseqs_own_loader_refuses_another_task_kind(runs, data):
    """The plugin's check (not only the commands' early one): fairseq's ensemble loader with a translation task."""
    from fairseq import checkpoint_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    patches.enable_behaviour()
    task = TranslationTask.setup_task(TranslationConfig(data=str(data["translation"]), source_lang="en", target_lang="de"))
    lm = runs("b2t-train --arch transformer_lm_b2t") / "checkpoint_last.pt"
    with pytest.raises(B2TError, match="holds a language model .* runs a translation"):
        checkpoint_utils.load_model_ensemble_and_task([str(lm)], task=task)
    mt = runs("b2t-train") / "checkpoint_last.pt"
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(mt)], task=task)
    assert len(models) == 1
