"""An average and a result record the checkpoints they came from and are rebuilt when
those change; b2t-results-table refuses a result whose checkpoints changed since. In-process, toy
checkpoints, decoding replaced by a stub (the real chain runs in tests/e2e/test_wmt_pipeline.py)."""

import argparse
import json

import pytest
import torch
from helpers import assert_one_line_error

from b2t_tools.commands import average_checkpoints as avg
from b2t_tools.wmt import evaluate as ev
from b2t_tools.wmt import results_table

SENT = "Das ist ein kleines Haus am See ."


def _ckpt(path, value, epoch, updates):
    torch.save({"model": {"w": torch.full((2, 3), float(value))},
                "args": argparse.Namespace(arch="transformer_b2t", ln_position="b2t", encoder_layers=6),
                "extra_state": {"train_iterator": {"epoch": epoch}},
                "optimizer_history": [{"num_updates": updates}]}, path)
    return path


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for e in (1, 2):
        _ckpt(run / f"checkpoint{e}.pt", e, e, 100 * e)
    return run


def _average(run, out, capsys, n=2):
    assert avg.main(["--inputs", str(run), "--num-epoch-checkpoints", str(n), "--output", str(out),
                     "--reuse-if-current"]) == 0
    return capsys.readouterr().out


def test_average_records_its_inputs(run_dir, capsys):
    out = run_dir / "avg.pt"
    _average(run_dir, out, capsys)
    prov = torch.load(out, weights_only=True)[avg.PROVENANCE_KEY]
    assert [s["name"] for s in prov["sources"]] == ["checkpoint2.pt", "checkpoint1.pt"]
    assert [(s["epoch"], s["num_updates"]) for s in prov["sources"]] == [(2, 200), (1, 100)]
    assert [s["fingerprint"] for s in prov["sources"]] == [avg.fingerprint(str(run_dir / f"checkpoint{e}.pt"))
                                                           for e in (2, 1)]
    assert prov["selection"] == {"folder": str(run_dir), "kind": "epoch", "n": 2, "upper_bound": None}


def test_progress_check_average_is_not_reused_after_more_checkpoints(run_dir, capsys):
    """A progress check mid-training, at the averaging step: evaluate.sh used to reuse any existing average."""
    out = run_dir / "avg.pt"
    _average(run_dir, out, capsys)  # a progress check during training: epochs 1-2
    assert float(torch.load(out, weights_only=True)["model"]["w"][0, 0]) == 1.5
    _ckpt(run_dir / "checkpoint3.pt", 3, 3, 300)  # training goes on
    msg = _average(run_dir, out, capsys)
    assert "out of date" in msg and "checkpoint3.pt" in msg
    assert float(torch.load(out, weights_only=True)["model"]["w"][0, 0]) == 2.5  # epochs 2-3 now
    before = out.read_bytes()
    assert "up to date" in _average(run_dir, out, capsys) and out.read_bytes() == before  # nothing changed: reused
    _ckpt(run_dir / "checkpoint3.pt", 7, 3, 300)  # same name, other content (a run restarted into the folder)
    assert "changed since" in _average(run_dir, out, capsys)
    assert float(torch.load(out, weights_only=True)["model"]["w"][0, 0]) == 4.5


def test_average_without_provenance_is_rebuilt(run_dir, capsys):
    out = run_dir / "avg.pt"
    _ckpt(out, 42, 9, 9)  # an average written by an older version: records nothing
    assert "records no inputs" in _average(run_dir, out, capsys)
    assert float(torch.load(out, weights_only=True)["model"]["w"][0, 0]) == 1.5


def test_fingerprint_follows_content_not_name_or_time(run_dir, tmp_path):
    a = run_dir / "checkpoint1.pt"
    copy = tmp_path / "copy.pt"
    copy.write_bytes(a.read_bytes())
    assert avg.fingerprint(str(copy)) == avg.fingerprint(str(a)) and avg.fingerprint(str(a)).startswith("zipcrc:")
    _ckpt(copy, 1.0000001, 1, 100)  # one float changed
    assert avg.fingerprint(str(copy)) != avg.fingerprint(str(a))
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": {}}, legacy, _use_new_zipfile_serialization=False)
    assert avg.fingerprint(str(legacy)).startswith("sha256:")


# --- evaluate + table -------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    (d / "refs").mkdir(parents=True)
    (d / "subsets.json").write_text(json.dumps({"2014": "test"}))
    (d / "refs" / "newstest2014.de").write_text(SENT + "\n")
    (d / "refs" / "newstest2014.tok.de").write_text(SENT + "\n")
    for lang in ("en", "de"):
        for ext in ("bin", "idx"):
            (d / f"test.en-de.{lang}.{ext}").write_bytes(b"x")
    return d


@pytest.fixture
def decoded(monkeypatch):
    """Replace decoding by a stub whose output depends on the checkpoint's weights; count the calls."""
    calls = []

    def fake_generate(data, ckpt, subset, lenpen, args, workdir):
        w = float(torch.load(ckpt, weights_only=True)["model"]["w"][0, 0])
        calls.append(w)
        return [SENT] if w >= 2 else ["Das Haus ."]  # the early average translates worse

    monkeypatch.setattr(ev, "generate", fake_generate)
    return calls


def _evaluate(data, ckpt, out, *extra):
    return ev.main(["--data", str(data), "--checkpoint", str(ckpt), "--out", str(out), "--years", "2014", "--cpu",
                    "--name", "b2t", *extra])


def _table(*argv):
    return results_table.main([str(a) for a in argv])


def test_issue_scenario_progress_check_then_final_result(run_dir, data, decoded, tmp_path, capsys):
    """evaluate as a progress check, more checkpoints appear, re-run: new average, new result; the table
    refuses the stale result in between."""
    avg_pt, result = run_dir / "avg.pt", tmp_path / "results" / "b2t.json"
    _average(run_dir, avg_pt, capsys)
    assert _evaluate(data, avg_pt, result, "--skip-if-current") == 0
    early = json.loads(result.read_text())
    assert [s["name"] for s in early["provenance"]["averaged_from"]] == ["checkpoint2.pt", "checkpoint1.pt"]
    assert early["provenance"]["fingerprint"] == avg.fingerprint(str(avg_pt)) and decoded == [1.5]
    capsys.readouterr()

    _ckpt(run_dir / "checkpoint3.pt", 3, 3, 300)  # training goes on
    assert _table(result.parent) == 2  # the result is a mid-training score now: refused, one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is stale" in err and "checkpoint3.pt" in err and "--allow-stale" in err
    assert _table(result.parent, "--allow-stale") == 0
    assert "| b2t (stale) |" in capsys.readouterr().out

    _average(run_dir, avg_pt, capsys)  # what evaluate.sh does: the average is rebuilt ...
    assert _evaluate(data, avg_pt, result, "--skip-if-current") == 0  # ... so the result is too
    final = json.loads(result.read_text())
    assert decoded == [1.5, 2.5] and final["years"]["2014"]["sacrebleu"] > early["years"]["2014"]["sacrebleu"]
    assert [s["name"] for s in final["provenance"]["averaged_from"]] == ["checkpoint3.pt", "checkpoint2.pt"]
    assert [s["num_updates"] for s in final["provenance"]["averaged_from"]] == [300, 200]
    capsys.readouterr()
    assert _table(result.parent) == 0
    table = capsys.readouterr().out
    assert "| b2t | avg.pt | 2: checkpoint3.pt, checkpoint2.pt | 200-300 |" in table and "| current |" in table

    assert _evaluate(data, avg_pt, result, "--skip-if-current") == 0  # nothing changed: not decoded again
    assert decoded == [1.5, 2.5] and "up to date" in capsys.readouterr().out
    assert _evaluate(data, avg_pt, result, "--skip-if-current", "--beam", "5") == 0  # other settings: again
    assert decoded == [1.5, 2.5, 2.5]


def test_table_refuses_changed_checkpoint_and_old_results(run_dir, data, decoded, tmp_path, capsys):
    ckpt, result = run_dir / "checkpoint2.pt", tmp_path / "r.json"
    assert _evaluate(data, ckpt, result) == 0
    prov = json.loads(result.read_text())["provenance"]
    assert prov["averaged_from"] is None and (prov["epoch"], prov["num_updates"]) == (2, 200)
    _ckpt(ckpt, 5, 2, 200)  # rewritten in place
    assert _table(result) == 2 and "checkpoint2.pt changed since" in capsys.readouterr().err
    old = json.loads(result.read_text())
    del old["provenance"]
    result.write_text(json.dumps(old))
    assert _table(result) == 2 and "records no checkpoint provenance" in capsys.readouterr().err
    ckpt.unlink()  # results copied to another machine: their checkpoints are not here
    old["provenance"] = prov
    result.write_text(json.dumps(old))
    assert _table(result) == 0 and "not checked" in capsys.readouterr().out


def test_deleted_inputs_do_not_make_a_result_stale_but_a_rotated_selection_does(run_dir, data, decoded, tmp_path,
                                                                                 capsys):
    """fairseq's --keep-last-epochs deletes old checkpoints: an average whose inputs were deleted is still what
    it was; one whose folder has a newer checkpoint among the last N is not the run's final average."""
    avg_pt, result = tmp_path / "avg.pt", tmp_path / "res" / "r.json"
    _average(run_dir, avg_pt, capsys)
    assert _evaluate(data, avg_pt, result) == 0
    (run_dir / "checkpoint1.pt").unlink()
    assert _table(result) == 0 and "| current |" in capsys.readouterr().out
    _ckpt(run_dir / "checkpoint3.pt", 3, 3, 300)
    assert _table(result) == 2 and "now has checkpoint3.pt among its last 2 epoch" in capsys.readouterr().err


def test_legacy_checkpoint_is_evaluated_not_called_corrupt(data, decoded, tmp_path):
    ckpt = tmp_path / "old.pt"
    torch.save({"model": {"w": torch.full((2, 3), 2.0)}}, ckpt, _use_new_zipfile_serialization=False)
    assert _evaluate(data, ckpt, tmp_path / "r.json") == 0
    assert json.loads((tmp_path / "r.json").read_text())["provenance"]["fingerprint"].startswith("sha256:")


@pytest.mark.parametrize("extra,flag,instead", [
    ("--beam 1 --lenpen 2.0", "--beam", "use --beam"), ("--lenpen=2.0", "--lenpen", "--lenpen-test"),
    ("--path other.pt", "--path", "--checkpoint"), ("--max-len-b 5 --gen-subset valid", "--gen-subset", "--years"),
    ("-sde", "-s", "en-de"), ("--fp16", "--fp16", "--fp16"), ("--remove-bpe sentencepiece", "--remove-bpe", "BPE"),
])
def test_generate_args_cannot_override_what_the_result_records(run_dir, data, decoded, tmp_path, capsys, extra, flag,
                                                                instead):
    """--generate-args '--beam 1 --lenpen 2.0' decoded with beam 1 while the result recorded beam 4, and
    '--path other.pt' decoded another checkpoint than the one recorded: such flags are refused, one line."""
    out = tmp_path / "r.json"
    assert _evaluate(data, run_dir / "checkpoint2.pt", out, f"--generate-args={extra}") == 2
    line = assert_one_line_error(capsys.readouterr().err, "b2t-wmt-evaluate", f"sets {flag},", instead)
    assert "--generate-args" in line and not out.exists() and decoded == []


def test_generate_args_that_fairseq_refuses_are_one_line_before_decoding(run_dir, data, decoded, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _evaluate(data, run_dir / "checkpoint2.pt", out, "--generate-args", "--no-such-flag 3") == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-wmt-evaluate", "unrecognized arguments: --no-such-flag 3")
    assert decoded == [] and not out.exists()
    assert _evaluate(data, run_dir / "checkpoint2.pt", out, "--generate-args", "--max-len-b 50") == 0  # allowed
    assert json.loads(out.read_text())["generate_args"] == "--max-len-b 50"


def test_table_does_not_show_an_old_result_whose_generate_args_overrode_its_record(run_dir, data, decoded,
                                                                                    tmp_path, capsys):
    result = tmp_path / "r.json"
    assert _evaluate(data, run_dir / "checkpoint2.pt", result) == 0
    old = json.loads(result.read_text())
    old["generate_args"] = "--beam 1 --lenpen 2.0"  # what an older b2t-wmt-evaluate let through
    result.write_text(json.dumps(old))
    capsys.readouterr()
    assert _table(result) == 2
    assert "--generate-args set --beam, --lenpen" in assert_one_line_error(capsys.readouterr().err, "b2t-results-table")
    assert _table(result, "--allow-stale") == 0 and "| b2t (stale) |" in capsys.readouterr().out
