"""One line, never a traceback, for the WMT chain: b2t-average-checkpoints, b2t-wmt-evaluate,
b2t-results-table, b2t-wmt-prepare --sums and scripts/train.sh (b2t-wmt-train).

Every case drives the command's in-process ``main(argv)`` and checks the contract: exit status 2, exactly
one line ``PROG: error: problem; fix`` on stderr, no traceback, the expected diagnosis, and nothing
written where nothing should be. CASES is also the README's bad-input table for these commands."""

import argparse
import errno
import importlib
import json
import zipfile

import pytest
import torch

MAINS = {"b2t-average-checkpoints": "b2t_tools.commands.average_checkpoints",
         "b2t-wmt-evaluate": "b2t_tools.wmt.evaluate",
         "b2t-results-table": "b2t_tools.wmt.results_table",
         "b2t-wmt-prepare": "b2t_tools.wmt.prepare",
         "train.sh": "b2t_tools.wmt.train"}


def _ckpt(path, value, epoch=1, updates=None):
    torch.save({"model": {"w": torch.full((2, 3), float(value))},
                "args": argparse.Namespace(arch="transformer_b2t", ln_position="b2t", encoder_layers=6),
                "extra_state": {"train_iterator": {"epoch": epoch}},
                "optimizer_history": [{"num_updates": updates if updates is not None else 10 * epoch}]}, path)
    return path


def make_world(w):
    """Every kind of good and bad input and output place, under the folder w."""
    run = w / "run"
    run.mkdir()
    for e in (1, 2, 3):
        _ckpt(run / f"checkpoint{e}.pt", e, epoch=e)
    good = _ckpt(w / "good.pt", 1)
    data = good.read_bytes()
    (w / "empty.pt").write_bytes(b"")
    (w / "trunc.pt").write_bytes(data[: len(data) // 2])
    (w / "text.pt").write_text("this is not a checkpoint\n")
    with zipfile.ZipFile(w / "zip.pt", "w") as z:
        z.writestr("readme.txt", "a zip, but not torch's")
    torch.save(torch.zeros(3), w / "tensor.pt")
    (w / "dir.pt").mkdir()
    (w / "afile").write_text("a regular file\n")
    (w / "emptyrun").mkdir()
    # a b2t-wmt-prepare --dest folder with one year (the binarized files only need to exist here)
    d = w / "data"
    (d / "refs").mkdir(parents=True)
    (d / "subsets.json").write_text(json.dumps({"2014": "test"}))
    for f in ("newstest2014.de", "newstest2014.tok.de"):
        (d / "refs" / f).write_text("Ein Haus .\n")
    for lang in ("en", "de"):
        for ext in ("bin", "idx"):
            (d / f"test.en-de.{lang}.{ext}").write_bytes(b"x")
    for name, subsets in (("data_badjson", "{not json"), ("data_list", "[2014]"), ("data_noyear", '{"2013": "valid"}')):
        (w / name).mkdir()
        (w / name / "subsets.json").write_text(subsets)
    (w / "data_nosubsets").mkdir()
    nobin = w / "data_nobin"
    (nobin / "refs").mkdir(parents=True)
    (nobin / "subsets.json").write_text(json.dumps({"2014": "test"}))
    norefs = w / "data_norefs"
    norefs.mkdir()
    (norefs / "subsets.json").write_text(json.dumps({"2014": "test"}))
    for lang in ("en", "de"):
        for ext in ("bin", "idx"):
            (norefs / f"test.en-de.{lang}.{ext}").write_bytes(b"x")
    # result JSONs for b2t-results-table
    res = w / "results"
    res.mkdir()
    good_result = {"name": "run", "years": {"2014": {"sacrebleu": 1.0, "tok_bleu": 2.0}},
                   "provenance": {"checkpoint": str(w / "gone.pt"), "fingerprint": "zipcrc:0"}}
    (res / "good.json").write_text(json.dumps(good_result))
    bad = {"malformed.json": "{\"name\": ", "empty.json": "", "list.json": "[1, 2]",
           "noyears.json": json.dumps({"name": "x"}), "yearslist.json": json.dumps({"name": "x", "years": [1]}),
           "yearnum.json": json.dumps({"name": "x", "years": {"2014": 5}}),
           "strscore.json": json.dumps({"name": "x", "years": {"2014": {"sacrebleu": "high", "tok_bleu": 1}}}),
           "noname.json": json.dumps({"years": {}})}
    for name, text in bad.items():
        (w / name).write_text(text)
    (w / "latin1.json").write_bytes('{"name": "Müller"}'.encode("latin-1"))
    (w / "withdir").mkdir()
    (w / "withdir" / "sub.json").mkdir()
    (w / "noresults").mkdir()
    (w / "sums_bad").write_text("d41d8cd98f00b204e9800998ecf8427e  dev.tgz\nnot a sum line\n")
    (w / "sums_hex").write_text("xyz  dev.tgz\n")
    (w / "sums_bin").write_bytes(b"\xff\xfe\x00binary")
    return w


AVG = "b2t-average-checkpoints"
EV = "b2t-wmt-evaluate"
TAB = "b2t-results-table"
PREP = "b2t-wmt-prepare"
TRAIN = "train.sh"
RO = "/sys/b2t-test-readonly/out"  # root ignores chmod: /sys refuses new files even to root
EVAL = ["--data", "{W}/data", "--checkpoint", "{W}/good.pt", "--years", "2014", "--cpu"]
EVOUT = EVAL + ["--out", "{W}/out/r.json"]
AV1 = ["--inputs", "{W}/good.pt", "--output"]
AVRUN = ["--inputs", "{W}/run", "--output", "{W}/avg.pt"]
PREPARE = ["--work", "{W}/work", "--dest", "{W}/bin", "--mirror", "file:///nonexistent"]
TR = ["transformer_b2t", "6", "--gpus", "8", "--dry-run"]

# (command, argv, expected part of the message)
CASES = [
    # b2t-average-checkpoints: inputs
    (AVG, ["--inputs", "{W}/missing.pt", "--output", "{W}/o.pt"], "checkpoint {W}/missing.pt does not exist"),
    (AVG, ["--inputs", "{W}/empty.pt", "--output", "{W}/o.pt"], "is empty (0 bytes)"),
    (AVG, ["--inputs", "{W}/trunc.pt", "--output", "{W}/o.pt"], "truncated or corrupt"),
    (AVG, ["--inputs", "{W}/text.pt", "--output", "{W}/o.pt"], "truncated or corrupt"),
    (AVG, ["--inputs", "{W}/zip.pt", "--output", "{W}/o.pt"], "truncated or corrupt"),
    (AVG, ["--inputs", "{W}/tensor.pt", "--output", "{W}/o.pt"], "is not a fairseq checkpoint"),
    (AVG, ["--inputs", "{W}/dir.pt", "--output", "{W}/o.pt"], "is a folder, not a checkpoint file"),
    (AVG, ["--inputs", "{W}/run", "--output", "{W}/o.pt"], "--num-epoch-checkpoints N"),
    (AVG, ["--inputs", "{W}/good.pt", "{W}/good.pt", "--output", "{W}/o.pt"], "is given twice"),
    (AVG, ["--inputs", "{W}/nodir", "--num-epoch-checkpoints", "2", "--output", "{W}/o.pt"],
     "checkpoint folder {W}/nodir does not exist"),
    (AVG, ["--inputs", "{W}/afile", "--num-epoch-checkpoints", "2", "--output", "{W}/o.pt"], "is a file, not a folder"),
    (AVG, ["--inputs", "{W}/emptyrun", "--num-epoch-checkpoints", "2", "--output", "{W}/o.pt"],
     "has 0 epoch checkpoint(s), 2 needed"),
    (AVG, AVRUN + ["--num-epoch-checkpoints", "0"], "--num-epoch-checkpoints 0 is not a number of checkpoints"),
    (AVG, AVRUN + ["--num-epoch-checkpoints", "-3"], "--num-epoch-checkpoints -3 is not a number of checkpoints"),
    (AVG, AVRUN + ["--num-update-checkpoints", "0"], "--num-update-checkpoints 0 is not a number of checkpoints"),
    (AVG, AVRUN + ["--num-epoch-checkpoints", "1000000"], "has 3 epoch checkpoint(s), 1000000 needed"),
    (AVG, AVRUN + ["--num-epoch-checkpoints", "2", "--checkpoint-upper-bound", "0"], "is not a positive epoch number"),
    (AVG, AVRUN + ["--checkpoint-upper-bound", "2"], "--checkpoint-upper-bound needs --num-epoch-checkpoints"),
    (AVG, ["--inputs", "{W}/run", "{W}/good.pt", "--num-epoch-checkpoints", "2", "--output", "{W}/o.pt"],
     "needs one folder as --inputs, got 2 paths"),
    # b2t-average-checkpoints: output places
    (AVG, AV1 + ["{W}/dir.pt"], "--output {W}/dir.pt is a folder"),
    (AVG, AV1 + ["{W}/afile/o.pt"], "{W}/afile is a file, not a folder"),
    (AVG, AV1 + [RO], "cannot write --output " + RO),
    (AVG, AV1 + ["{W}/good.pt"], "is one of the inputs"),
    # b2t-wmt-evaluate: inputs
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/missing.pt", "--out", "{W}/r.json"], "does not exist"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/dir.pt", "--out", "{W}/r.json"], "is a folder; pass a checkpoint file"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/run", "--out", "{W}/r.json"], "is a folder; pass a checkpoint file"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/empty.pt", "--out", "{W}/r.json"], "is empty (0 bytes)"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/trunc.pt", "--out", "{W}/r.json"], "truncated or corrupt"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/text.pt", "--out", "{W}/r.json"], "truncated or corrupt"),
    (EV, ["--data", "{W}/data", "--checkpoint", "{W}/tensor.pt", "--out", "{W}/r.json"], "is not a fairseq checkpoint"),
    (EV, ["--data", "{W}/nodata", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "--data {W}/nodata does not exist"),
    (EV, ["--data", "{W}/afile", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "is a file, not a folder"),
    (EV, ["--data", "{W}/data_nosubsets", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "subsets.json is missing"),
    (EV, ["--data", "{W}/data_badjson", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "is not valid JSON"),
    (EV, ["--data", "{W}/data_list", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "is not a year -> subset map"),
    (EV, ["--data", "{W}/data_noyear", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json"], "newstest2010 is not in"),
    (EV, ["--data", "{W}/data_nobin", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json", "--years", "2014"],
     "test.en-de.en.bin is missing or empty"),
    (EV, ["--data", "{W}/data_norefs", "--checkpoint", "{W}/good.pt", "--out", "{W}/r.json", "--years", "2014"],
     "newstest2014.de is missing"),
    (EV, EVOUT + ["--beam", "0"], "--beam 0 is not a beam size"),
    (EV, EVOUT + ["--beam", "-4"], "--beam -4 is not a beam size"),
    (EV, EVOUT + ["--max-tokens", "0"], "--max-tokens 0 is not a positive number"),
    (EV, EVOUT + ["--max-tokens", "-1"], "--max-tokens -1 is not a positive number"),
    (EV, EVOUT + ["--lenpen-test", "nan"], "--lenpen-test nan is not a finite number"),
    (EV, EVOUT + ["--name", " "], "--name is empty"),
    (EV, EVOUT + ["--generate-args", "--max-len-b '5"], "cannot be split into flags"),
    # b2t-wmt-evaluate: output places
    (EV, EVAL + ["--out", "{W}/dir.pt"], "--out {W}/dir.pt is a folder"),
    (EV, EVAL + ["--out", "{W}/afile/r.json"], "{W}/afile is a file, not a folder"),
    (EV, EVAL + ["--out", RO], "cannot write --out " + RO),
    (EV, EVAL + ["--out", "{W}/r.json", "--keep-outputs", "{W}/afile"], "{W}/afile is a file, not a folder"),
    # b2t-wmt-evaluate: outputs that would overwrite inputs, absurd numbers
    (EV, EVAL + ["--out", "{W}/good.pt"], "--out {W}/good.pt is the --checkpoint"),
    (EV, EVAL + ["--out", "{W}/data/subsets.json"], "is inside --data {W}/data"),
    (EV, EVAL + ["--out", "{W}/r.json", "--keep-outputs", "{W}/data/refs"], "--keep-outputs {W}/data/refs is inside --data"),
    (EV, EVOUT + ["--beam", "100000000000000000000"], "pass at most 10000"),
    (EV, EVOUT + ["--max-tokens", "100000000000000000000"], "pass at most 2147483647"),
    # b2t-results-table
    (TAB, ["{W}/results", "--out", "{W}/results/good.json"], "the next table would read it as a result"),
    (TAB, ["{W}/results/good.json", "--out", "{W}/results/good.json"], "is one of the results read"),
    (TAB, ["{W}/nothing"], "{W}/nothing does not exist"),
    (TAB, ["{W}/noresults"], "holds no result JSON"),
    (TAB, ["{W}/malformed.json"], "is not valid JSON"),
    (TAB, ["{W}/empty.json"], "is not valid JSON"),
    (TAB, ["{W}/latin1.json"], "is not valid JSON"),
    (TAB, ["{W}/list.json"], "is not a b2t-wmt-evaluate result (a JSON list"),
    (TAB, ["{W}/noyears.json"], "is not a b2t-wmt-evaluate result (no 'years' object)"),
    (TAB, ["{W}/yearslist.json"], "is not a b2t-wmt-evaluate result (no 'years' object)"),
    (TAB, ["{W}/yearnum.json"], "year 2014 has no numeric sacrebleu"),
    (TAB, ["{W}/strscore.json"], "year 2014 has no numeric sacrebleu"),
    (TAB, ["{W}/noname.json"], "(no run name)"),
    (TAB, ["{W}/withdir"], "is a folder, not a result JSON"),
    (TAB, ["{W}/results", "--out", "{W}/dir.pt"], "--out {W}/dir.pt is a folder"),
    (TAB, ["{W}/results", "--out", "{W}/afile/t.md"], "{W}/afile is a file, not a folder"),
    (TAB, ["{W}/results", "--out", RO], "cannot write --out " + RO),
    # b2t-wmt-prepare --sums (checked before any download)
    (PREP, PREPARE + ["--sums", "{W}/nosums.md5"], "--sums {W}/nosums.md5 does not exist"),
    (PREP, PREPARE + ["--sums", "{W}/run"], "is a folder"),
    (PREP, PREPARE + ["--sums", "{W}/sums_bad"], "line 2 is not 'MD5 NAME'"),
    (PREP, PREPARE + ["--sums", "{W}/sums_hex"], "line 1 is not 'MD5 NAME'"),
    (PREP, PREPARE + ["--sums", "{W}/sums_bin"], "is not a text file"),
    # scripts/train.sh: never an --update-freq 0 or negative
    (TRAIN, TR + ["--max-tokens", "0"], "--max-tokens 0 is not a positive number"),
    (TRAIN, TR + ["--max-tokens", "-7"], "--max-tokens -7 is not a positive number"),
    (TRAIN, TR + ["--tokens-per-update", "0"], "--tokens-per-update 0 is not a positive number"),
    (TRAIN, TR + ["--tokens-per-update", "-458752"], "--tokens-per-update -458752 is not a positive number"),
    (TRAIN, ["transformer_b2t", "6", "--gpus", "-1", "--dry-run"], "--gpus -1 is negative"),
    (TRAIN, TR + ["--nodes", "0"], "--nodes 0 is not a number of nodes"),
    (TRAIN, TR + ["--nodes", "-2"], "--nodes -2 is not a number of nodes"),
    (TRAIN, ["transformer_b2t", "6", "--gpus", "0", "--cpu-procs", "0", "--dry-run"], "--cpu-procs 0 is not a number of processes"),
    (TRAIN, ["transformer_b2t", "0", "--gpus", "8", "--dry-run"], "LAYERS 0 is not a number of layers"),
    (TRAIN, ["transformer_b2t", "-6", "--gpus", "8", "--dry-run"], "LAYERS -6 is not a number of layers"),
    (TRAIN, ["transformer_b2t", "1000000000", "--gpus", "8", "--dry-run"], "pass at most 1000"),
    (TRAIN, ["transformer_b3t", "6", "--gpus", "8", "--dry-run"], "unknown ARCH 'transformer_b3t'; choose one of"),
    (TRAIN, TR + ["--nodes", "2", "--node-rank", "2"], "--node-rank 2 does not exist with --nodes 2; pass 0 to 1"),
    (TRAIN, TR + ["--node-rank", "-1"], "--node-rank -1 is negative"),
    (TRAIN, TR + ["--master-port", "0"], "--master-port 0 is not a TCP port"),
    (TRAIN, TR + ["--master-port", "70000"], "--master-port 70000 is not a TCP port"),
    (TRAIN, TR + ["--max-tokens", "4000"], "use --max-tokens 3584"),
    (TRAIN, ["transformer_b2t", "6", "--gpus", "0", "--data", "{W}/afile"], "--data {W}/afile is a file"),
    (TRAIN, ["transformer_b2t", "6", "--gpus", "0", "--data", "{W}/nodata"], "--data {W}/nodata does not exist"),
]


def run_case(w, prog, argv, capsys):
    main = importlib.import_module(MAINS[prog]).main
    rc = main([a.replace("{W}", str(w)) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def world(tmp_path):
    return make_world(tmp_path)


@pytest.mark.parametrize("prog,argv,expect", CASES, ids=[f"{c[0]}:{' '.join(c[1])[-60:]}" for c in CASES])
def test_bad_input_is_one_line(world, capsys, prog, argv, expect):
    rc, out, err = run_case(world, prog, argv, capsys)
    expect = expect.replace("{W}", str(world))
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    assert expect in err, err
    assert "; " in err  # problem; fix
    assert "--update-freq" not in out
    assert not (world / "o.pt").exists() and not (world / "out").exists() and not (world / "avg.pt").exists()


def test_train_sh_default_data_missing_is_one_line(world, capsys, monkeypatch):
    """Non-dry-run: --save-dir that is a file, or under a file, is refused before anything starts."""
    from b2t_tools.wmt import train

    monkeypatch.setattr(train, "check_data", lambda data: None)
    monkeypatch.setattr(train.subprocess, "call", lambda cmd: pytest.fail("must not launch"))
    for save, expect in ((world / "afile", "is a file, not a folder"),
                         (world / "afile" / "run", f"{world / 'afile'} is a file, not a folder")):
        rc = train.main(["transformer_b2t", "6", "--gpus", "0", "--save-dir", str(save)])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and expect in err, err


def test_full_disk_while_writing_is_one_line(world, capsys, monkeypatch):
    """ENOSPC while the average is written (root cannot make a real full disk here: simulated)."""
    from b2t_tools.commands import average_checkpoints as avg

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(avg.torch, "save", full)
    rc = avg.main(["--inputs", str(world / "good.pt"), "--output", str(world / "o.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "No space left on device" in err and "free some space" in err
    assert not (world / "o.pt").exists() and not (world / "o.pt.tmp").exists()


def test_results_table_out_in_missing_folder_is_created(world, capsys):
    """Our call for --out in a missing folder: create it, like every other output of the chain."""
    from b2t_tools.wmt import results_table

    out = world / "new" / "deeper" / "table.md"
    assert results_table.main([str(world / "results"), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out and "| run |" in out.read_text()


def test_empty_sums_file_is_accepted(world, monkeypatch):
    from b2t_tools.wmt import prepare

    (world / "sums_empty").write_text("")
    assert prepare.read_sums_option(world / "sums_empty") == {}
    (world / "sums_ok").write_text("d41d8cd98f00b204e9800998ecf8427e  *dev.tgz\n\n")
    assert prepare.read_sums_option(world / "sums_ok") == {"dev.tgz": "d41d8cd98f00b204e9800998ecf8427e"}


@pytest.mark.parametrize("args,expect", [
    (["--last", "-1"], "--last -1 is not a number of checkpoints"),
    (["--last", "0"], "--last 0 is not a number of checkpoints"),
    (["--last", "ten"], "--last ten is not a number of checkpoints"),
    (["--out"], "--out needs a value"),
    (["--bogus"], "unknown option --bogus"),
])
def test_evaluate_sh_options_are_one_line(world, args, expect):
    """The shell wrapper refuses its own bad options before any Python starts (milliseconds)."""
    from helpers import REPO, run

    p = run(["bash", REPO / "scripts" / "evaluate.sh", world / "run"] + args, check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("evaluate.sh: error: ")
    assert expect in p.stderr and "; " in p.stderr and not list((world / "run").glob("checkpoint_avg*"))


def test_reproduce_table_refuses_unbalanced_quotes(world):
    from helpers import REPO, run

    p = run(["bash", REPO / "scripts" / "reproduce-table.sh"], check=False, env={"EVAL_ARGS": "--last '5"})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "EVAL_ARGS cannot be split" in p.stderr


def test_results_table_reads_a_file_named_twice_once(world, capsys):
    from b2t_tools.wmt import results_table

    assert results_table.main([str(world / "results"), str(world / "results" / "good.json")]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| run | - |")]
    assert len(rows) == 2  # the SacreBLEU and the tokenized table, one row each
