"""b2t-lm-evaluate's records: each row says what data and which checkpoint it measured, rows of other data or
of a checkpoint that changed since are marked stale, and its own --out never costs a result or a traceback.
The perplexity itself (b2t-eval-lm, seconds a run) is stubbed: test_lm_recipe.py runs the real one."""

import errno
import json

import pytest
import torch
from helpers import assert_one_line_error

from b2t_fairseq import recipe
from b2t_tools.lm import evaluate as ev


@pytest.fixture
def setup(tmp_path, monkeypatch):
    calls = []

    def fake_evaluate(data, checkpoint, subset, flags, cpu):
        calls.append(str(checkpoint))
        return {"loss": 3.0, "ppl": 10.0 + len(calls)}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    return calls


def _data(folder, words="a b c"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dict.txt").write_text("".join(f"{w} 1\n" for w in words.split()))
    for ext in ("bin", "idx"):
        (folder / f"test.{ext}").write_bytes(words.encode())
    return folder


def _checkpoint(path, value):
    torch.save({"model": {"w": torch.full((4,), float(value))},
                "cfg": {"model": {"_name": "transformer_lm_b2t", "ln_position": "b2t", "decoder_layers": 2}}}, path)
    return path


def _table(out_text):
    return [ln for ln in out_text.splitlines() if ln.startswith("| B2T")]


def test_rows_of_other_data_or_of_a_changed_checkpoint_are_marked_stale(tmp_path, setup, capsys):
    a, b = _data(tmp_path / "a"), _data(tmp_path / "b", "x y z")
    ck, out = _checkpoint(tmp_path / "checkpoint_last.pt", 1), tmp_path / "ppl.json"
    assert ev.main([str(a), str(ck), "--out", str(out)]) == 0
    rows = _table(capsys.readouterr().out)
    assert len(rows) == 1 and "| 11.00 |" in rows[0] and rows[0].endswith("| current |")
    row = next(iter(json.loads(out.read_text()).values()))
    assert row["data"]["path"] == str(a.resolve()) and row["provenance"]["fingerprint"].startswith("zipcrc:")
    _checkpoint(ck, 2)  # the run trained on and saved over it
    assert ev.main([str(a), str(ck), "--out", str(out)]) == 0
    rows = _table(capsys.readouterr().out)
    assert len(rows) == 2 and "| 12.00 |" in rows[0] and rows[0].endswith("| current |")
    assert rows[1].startswith("| B2T (stale) |") and "| 11.00 |" in rows[1] and "changed since" in rows[1]
    assert ev.main([str(b), str(ck), "--out", str(out)]) == 0  # other data: both earlier rows stale
    rows = _table(capsys.readouterr().out)
    assert [r for r in rows if "current" in r] == [rows[0]] and "| 13.00 |" in rows[0]
    assert sum(f"measured on other data ({a.resolve()})" in r for r in rows) == 2
    assert len(json.loads(out.read_text())) == 3  # nothing dropped from the record
    assert ev.main([str(b), str(ck), "--out", str(out)]) == 0 and len(setup) == 3  # measured: not again


def test_the_published_number_is_labelled_pre_ln(tmp_path):
    text = ev.table([])
    line = next(ln for ln in text.splitlines() if "30.46" in ln)
    assert line.startswith("| Pre-LN | 6 | test | 30.46 |") and "fairseq commit 0790c0cf" in line
    assert recipe.LM_PUBLISHED[6]["layer_type"] == "Pre-LN"


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "is not valid JSON"),
    ('["a list"]', "a JSON list"),
    ('{"k": {"label": "B2T"}}', "entry 'k' is not a result"),
    (None, "is a folder"),
])
def test_a_damaged_out_is_one_line_before_any_evaluation_and_kept(tmp_path, setup, capsys, content, fragment):
    out = tmp_path / "ppl.json"
    if content is None:
        out.mkdir()
    else:
        out.write_text(content)
    rc = ev.main([str(_data(tmp_path / "a")), str(_checkpoint(tmp_path / "c.pt", 1)), "--out", str(out)])
    assert rc == 2 and fragment in assert_one_line_error(capsys.readouterr().err, "b2t-lm-evaluate")
    assert setup == [] and (out.is_dir() if content is None else out.read_text() == content)


def test_a_failure_to_save_after_the_evaluation_loses_no_result(tmp_path, setup, capsys, monkeypatch):
    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev, "write_json", full_disk)
    ck = _checkpoint(tmp_path / "c.pt", 1)
    rc = ev.main([str(_data(tmp_path / "a")), str(ck), "--out", str(tmp_path / "ppl.json")])
    err, stdout = capsys.readouterr()[::-1]
    line = assert_one_line_error(err, "b2t-lm-evaluate", "No space left on device", "perplexity 11.00")
    assert rc == 2 and str(ck) in line and any("| 11.00 |" in r for r in _table(stdout))


def test_a_damaged_checkpoint_or_data_is_one_line(tmp_path, setup, capsys):
    bad = tmp_path / "c.pt"
    bad.write_bytes(_checkpoint(tmp_path / "good.pt", 1).read_bytes()[:200])
    assert ev.main([str(_data(tmp_path / "a")), str(bad), "--out", str(tmp_path / "o.json")]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-lm-evaluate", "cannot read checkpoint")
    assert ev.main([str(tmp_path), str(tmp_path / "good.pt"), "--out", str(tmp_path / "o.json")]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-lm-evaluate", "no dict.txt")
    assert setup == []


def test_an_out_damaged_during_the_evaluation_is_kept_and_the_result_printed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "ppl.json"

    def evaluate_while_someone_writes_out(*a):
        out.write_text("{half")
        return {"loss": 3.0, "ppl": 7.0}

    monkeypatch.setattr(ev, "evaluate", evaluate_while_someone_writes_out)
    rc = ev.main([str(_data(tmp_path / "a")), str(_checkpoint(tmp_path / "c.pt", 1)), "--out", str(out)])
    err, stdout = capsys.readouterr()[::-1]
    assert rc == 2 and "perplexity 7.00" in assert_one_line_error(err, "b2t-lm-evaluate", "not valid JSON")
    assert out.read_text() == "{half" and any("| 7.00 |" in r for r in _table(stdout))
