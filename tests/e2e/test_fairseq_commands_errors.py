"""The bad-input catalogue: each case exits non-zero with ONE line naming the problem and the fix.

The contract (commands/__init__.py run_command): ``PROG: error: <problem>; <fix>`` on stderr, exit status 2, no traceback.
Failures outside the catalogue keep their traceback. The README's Troubleshooting section lists them all.
"""

import shutil
import sys
import types

import pytest
import torch
from helpers import run, run_commands_in_one_process, toy_train_argv

from b2t_fairseq import checkpoint_io as safe_checkpoint
from b2t_tools.commands import explain as errors
from b2t_tools.commands import run_command
from b2t_tools.commands.torchrun_train import torchrun_argv
from b2t_tools.errors import ToolError

TRAIN = toy_train_argv(json_log=False)
GEN = ["--batch-size", "16", "--beam", "2", "--cpu"]
VALID = ["--batch-size", "16", "--cpu"]


def one_line_error(p, prog, *words):
    """Assert the one-line contract and that the line names the given words; return the line."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, p.stderr[-3000:]
    line = lines[0]
    assert ";" in line or prog + ": error: argument" in line, line  # "<problem>; <fix>" (argparse: its own line)
    for w in words:
        assert w in line, line
    return line


@pytest.fixture(scope="module")
def trained(toy_data_bin, tmp_path_factory):
    """A save dir with a short plugin training run's checkpoints."""
    save = tmp_path_factory.mktemp("trained")
    run(["b2t-train", toy_data_bin, *TRAIN, "--max-update", "8", "--save-interval-updates", "4",
         "--save-dir", save])
    return save


def truncate(src, dst, keep=0.5):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * keep)])
    return dst


# --- the catalogue, run through the console functions -----------------------------------------------
# Starting fairseq costs ~4 s a process on the 2-core test machine, so the cases below run one after
# another in ONE process (helpers.run_commands_in_one_process), each through the same function as its console command (b2t-train is
# b2t_tools.commands.cli:train); test_missing_data_directory and the fp16 test run the installed commands.



@pytest.fixture(scope="module")
def catalogue(toy_data_bin, trained, tmp_path_factory):
    """{case: {"code", "stderr", "stdout"}} for every case, and the paths they used."""
    tmp = tmp_path_factory.mktemp("catalogue")
    paths = {"tmp": tmp, "data": toy_data_bin, "ck": trained / "checkpoint_last.pt"}
    not_bin = tmp / "not_binarized"
    not_bin.mkdir()
    (not_bin / "train.en").write_text("a b\n")
    split_dicts = tmp / "split_dicts"
    shutil.copytree(toy_data_bin, split_dicts)
    lines = (split_dicts / "dict.de.txt").read_text().splitlines(keepends=True)
    (split_dicts / "dict.de.txt").write_text("".join(lines[:-1]))  # now dict.en.txt != dict.de.txt
    paths["bad"] = truncate(trained / "checkpoint_last.pt", tmp / "bad.pt")
    paths["flipped"] = tmp / "flipped.pt"
    data = bytearray((trained / "checkpoint_last.pt").read_bytes())
    for i in range(len(data) // 3, len(data) // 2, 4099):  # inside the weights: torch.load alone accepts it
        data[i] ^= 0xFF
    paths["flipped"].write_bytes(bytes(data))
    paths["resume"] = tmp / "resume"
    shutil.copytree(trained, paths["resume"])
    truncate(trained / "checkpoint_last.pt", paths["resume"] / "checkpoint_last.pt", keep=0.9)

    d, ck, s = str(toy_data_bin), str(paths["ck"]), str(tmp / "s")
    t = [str(a) for a in TRAIN]
    cases = [
        ("not_binarized", "train", [str(not_bin), "-s", "en", "-t", "de", *t, "--no-save"]),
        ("split_dicts", "train", [str(split_dicts), *t, "--no-save"]),
        ("b2t_pre", "train", [d, *t, "--encoder-normalize-before", "--no-save"]),
        ("ln_position", "train", [d, *t, "--ln-position", "middle", "--no-save"]),
        ("generate_ok", "generate", [d, "--path", ck, *GEN]),
        ("validate_ok", "validate", [d, "--path", ck, *VALID]),
        ("generate_truncated", "generate", [d, "--path", str(paths["bad"]), *GEN]),
        ("validate_truncated", "validate", [d, "--path", str(paths["bad"]), *VALID]),
        ("generate_missing", "generate", [d, "--path", str(tmp / "nope.pt"), *GEN]),
        ("resume_truncated_last", "train", [d, *t, "--max-update", "12", "--save-dir", str(paths["resume"])]),
        ("restore_flipped", "train", [d, *t, "--save-dir", s, "--restore-file", str(paths["flipped"])]),
        ("restore_typo", "train", [d, *t, "--save-dir", s, "--restore-file", str(tmp / "typo.pt")]),
    ]
    return run_commands_in_one_process(cases, tmp), paths


def case(catalogue, name):
    res = catalogue[0][name]
    return types.SimpleNamespace(returncode=res["code"], stderr=res["stderr"], stdout=res["stdout"])


@pytest.mark.e2e
def test_missing_data_directory(tmp_path):
    p = run(["b2t-train", tmp_path / "nope", *TRAIN, "--max-update", "1", "--no-save"], check=False)
    one_line_error(p, "b2t-train", f"data directory {tmp_path / 'nope'} does not exist", "fairseq-preprocess")


def test_folder_that_is_not_binarized(catalogue):
    one_line_error(case(catalogue, "not_binarized"), "b2t-train", "has no dict.en.txt", "fairseq-preprocess")


def test_share_all_embeddings_without_joined_dictionary(catalogue):
    one_line_error(case(catalogue, "split_dicts"), "b2t-train", "--share-all-embeddings needs one joined dictionary",
                   "--joined-dictionary")


def test_b2t_with_normalize_before(catalogue):
    one_line_error(case(catalogue, "b2t_pre"), "b2t-train", "B2T cannot be combined with --encoder-normalize-before")


def test_unknown_ln_position(catalogue):
    one_line_error(case(catalogue, "ln_position"), "b2t-train", "--ln-position", "invalid choice: 'middle'", "'b2t'")


def test_plugin_checkpoint_just_works_with_the_b2t_commands(catalogue):
    gen = case(catalogue, "generate_ok")
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert sum(ln.startswith("H-") for ln in gen.stdout.splitlines()) == 40
    val = case(catalogue, "validate_ok")  # stock fairseq-validate without --task: KeyError: None
    assert val.returncode == 0, val.stderr[-3000:]


def test_plugin_checkpoint_with_stock_fairseq_generate(toy_data_bin, trained):
    """Without --user-dir, stock fairseq-generate fails as the README's Troubleshooting section says."""
    ck = trained / "checkpoint_last.pt"
    stock = run(["fairseq-generate", toy_data_bin, "--path", ck, *GEN], check=False)
    assert stock.returncode != 0
    # torch >= 2.6 refuses the checkpoint first
    assert "Weights only load failed" in stock.stderr and "argparse.Namespace" in stock.stderr, stock.stderr[-2000:]
    blunt = run(["fairseq-generate", toy_data_bin, "--path", ck, *GEN], check=False,
                env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert blunt.returncode != 0
    assert "IndexError: Replacement index 1 out of range" in blunt.stderr, blunt.stderr[-2000:]


@pytest.mark.parametrize("cmd", ["generate", "validate"])
def test_truncated_checkpoint_for_evaluation(catalogue, cmd):
    bad = catalogue[1]["bad"]
    one_line_error(case(catalogue, f"{cmd}_truncated"), f"b2t-{cmd}", f"checkpoint {bad} cannot be read",
                   "truncated", "--path")


def test_missing_checkpoint_for_generate(catalogue):
    nope = catalogue[1]["tmp"] / "nope.pt"
    one_line_error(case(catalogue, "generate_missing"), "b2t-generate", f"checkpoint {nope} not found", "--path")


def test_corrupt_checkpoint_last_when_resuming(catalogue):
    save = catalogue[1]["resume"]
    one_line_error(case(catalogue, "resume_truncated_last"), "b2t-train",
                   f"checkpoint {save / 'checkpoint_last.pt'} cannot be read", f"--restore-file {save}/checkpoint_best.pt")


def test_corrupt_restore_file(catalogue):
    flipped = catalogue[1]["flipped"]
    one_line_error(case(catalogue, "restore_flipped"), "b2t-train", f"checkpoint {flipped} cannot be read",
                   "CRC mismatch", "--restore-file")


def test_missing_restore_file(catalogue):
    """A typo in --restore-file would otherwise silently train from scratch."""
    typo = catalogue[1]["tmp"] / "typo.pt"
    one_line_error(case(catalogue, "restore_typo"), "b2t-train", f"--restore-file {typo} does not exist")


# --- fp16 ---------------------------------------------------------------------------------------

def test_fp16_collapse_to_minimum_loss_scale_gives_guidance(toy_data_bin, tmp_path):
    """A real fp16 run whose loss scale starts so high that the fp16 gradients overflow, so fairseq's
    DynamicLossScaler reaches --min-loss-scale at once. fairseq's memory-efficient fp16 runs on a CPU;
    b2t-train refuses it there (preflight.check_devices), so this driver lifts that one check."""
    argv = [str(a) for a in (toy_data_bin, *TRAIN, "--memory-efficient-fp16", "--fp16-init-scale", 2 ** 20,
                             "--min-loss-scale", 2 ** 19, "--max-update", 3, "--save-dir", tmp_path)]
    driver = ("import sys; from b2t_tools.commands import cli, preflight; "
              "preflight.check_devices = lambda *a: None; cli.train(sys.argv[1:])")
    p = run([sys.executable, "-c", driver, *argv], check=False)
    line = one_line_error(p, "b2t-train", "fp16 training collapsed", "minimum (524288.0)",
                          "--lr", "--warmup-updates", "--clip-norm", "--fp16-scale-window")
    assert "NaN" in line


def _raised(exc, during=None):
    """exc as raised, optionally while handling `during` (the chain fairseq's NanDetector re-run leaves)."""
    try:
        try:
            raise during or exc
        except BaseException:
            if during is None:
                raise
            raise exc
    except BaseException as e:
        return e


@pytest.mark.parametrize("exc,words", [
    # fairseq.optim.dynamic_loss_scaler, as raised
    (FloatingPointError("Minimum loss scale reached (0.0001). Your loss is probably exploding. Try lowering "
                        "the learning rate, using gradient clipping or increasing the batch size."),
     ["minimum (0.0001)", "--fp16-scale-window"]),
    (FloatingPointError("AMP: Minimum loss scale reached (0.0001). Your loss is probably exploding. "
                        "Try restarting training or use fp32. 5e-05"), ["minimum (0.0001)"]),
    (FloatingPointError("gradients are Nan/Inf"), ["diverged", "--clip-norm"]),
])
def test_divergence_messages_also_through_nandetector_chain(exc, words):
    for e in (_raised(exc), _raised(StopIteration(), during=exc)):
        msg = errors.explain(e, "b2t-train")
        assert msg and all(w in msg for w in words), msg


def _raiser(e):
    def work():
        raise e
    return work


def test_unknown_failures_keep_their_traceback():
    for e in (RuntimeError("a real bug"), KeyError("x"), ValueError("other"), FileNotFoundError("no filename"),
              FloatingPointError("Fatal error: gradients are inconsistent between workers.")):
        assert errors.explain(e, "b2t-train") is None
        with pytest.raises(type(e)):
            run_command("b2t-train", _raiser(e))


# --- the pieces, in-process ---------------------------------------------------------------------

def test_atomic_copy_never_leaves_a_partial_destination(tmp_path, monkeypatch):
    src, dst = tmp_path / "new.pt", tmp_path / "checkpoint_last.pt"
    torch.save({"n": 2}, src)
    torch.save({"n": 1}, dst)

    def dies_halfway(fsrc, fdst, *args, **kw):
        fdst.write(fsrc.read()[:10])
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(shutil, "copyfileobj", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        safe_checkpoint.atomic_copy(str(src), str(dst))
    assert torch.load(dst)["n"] == 1
    monkeypatch.undo()
    safe_checkpoint.atomic_copy(str(src), str(dst))
    assert torch.load(dst)["n"] == 2 and not (tmp_path / "checkpoint_last.pt.tmp").exists()


def test_find_damage(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert safe_checkpoint.find_damage(good) is None
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    assert "CRC" in safe_checkpoint.find_damage(tmp_path / "flip.pt")
    (tmp_path / "short.pt").write_bytes(good.read_bytes()[:-30])
    assert "truncated" in safe_checkpoint.find_damage(tmp_path / "short.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "truncated" in safe_checkpoint.find_damage(tmp_path / "empty.pt")


def test_torchrun_argv():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    argv = torchrun_argv(["data", "--ddp-backend", "no_c10d"], env=env, cuda=False)
    assert argv[argv.index("--distributed-rank") + 1] == "1"
    assert argv[argv.index("--distributed-world-size") + 1] == "2"
    assert argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert argv.count("--ddp-backend") == 1 and "no_c10d" in argv  # the user's flag wins
    assert "--distributed-no-spawn" in argv
    assert "--distributed-backend" not in torchrun_argv(["data"], env=env, cuda=True)
    with pytest.raises(ToolError, match="RANK.*not set; start this command under torchrun"):
        torchrun_argv(["data"], env={}, cuda=False)
