"""b2t-results-table: the published DeepNorm/Admin numbers are a labelled table of their own."""

import json

from b2t_tools.wmt import YEARS, published, results_table


def _table(capsys, *argv):
    # the fake runs record no provenance (they are not from b2t-wmt-evaluate): shown marked "(stale)"
    assert results_table.main(list(map(str, argv)) + ["--allow-stale"]) == 0
    return capsys.readouterr().out


def _fake_run(folder, name="ours_admin_18l"):
    years = {str(y): {"sacrebleu": 20.0 + i, "tok_bleu": 21.0 + i} for i, y in enumerate(YEARS)}
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "years": years,
                                                    "average_2010_2016": {"sacrebleu": 23.0, "tok_bleu": 24.0}}))


def test_published_rows_are_kept_apart_and_labelled(capsys, tmp_path):
    _fake_run(tmp_path)
    out = _table(capsys, tmp_path)
    head = "### Published DeepNorm and Admin numbers"
    assert out.count(head) == 1
    ours, theirs = out.split(head)
    assert "| ours_admin_18l (stale) | 20.00 |" in ours and "| paper: B2T 18L (2023 code) |" in ours
    assert "admin-torch" not in ours  # nothing published leaks into the paper's SacreBLEU/tokenized tables
    assert "not comparable" in theirs.splitlines()[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in theirs.splitlines() if line.startswith("| ")}
    for i, (label, entry) in enumerate(published.PUBLISHED.items(), 1):
        row = rows[label]
        for depth, bleu in entry["bleu"].items():
            assert f" {bleu:.2f} " in row
        assert f"[{i}]" in row and published.FLAGS[label] in row
        note = next(line for line in theirs.splitlines() if line.startswith(f"[{i}] "))
        assert entry["source"] in note  # every row names its source, and its setting and metric or where they are
        assert entry["setting"] in note or "setting and metric as [" in note
    for missing in published.PAPER_TABLES_NOT_CONFIRMED:
        assert missing in theirs


def test_rows_follow_published_py(capsys, tmp_path, monkeypatch):
    entry = {"source": "a made-up table", "setting": "made-up data", "metric": "made-up BLEU",
             "bleu": {"6L-6L": 11.11, "100L-100L": 33.33}}
    monkeypatch.setattr(results_table, "PUBLISHED", {"DeepNorm (test)": entry})
    _fake_run(tmp_path)
    out = _table(capsys, tmp_path)
    assert "| published run | 6L-6L | 100L-100L |" in out
    assert "| DeepNorm (test) | 11.11 | 33.33 | [1] | - |" in out
    assert "[1] Source: a made-up table; setting: made-up data; metric: made-up BLEU." in out


def test_no_published_leaves_the_table_out(capsys, tmp_path):
    _fake_run(tmp_path)
    out = _table(capsys, tmp_path, "--no-published")
    assert "Published DeepNorm and Admin" not in out and "SacreBLEU" in out
