"""b2t-stability (b2t_tools/analysis/stability.py): cells keyed on every option, the unigram level,
a small sweep that draws its map and JSON and resumes without redoing finished cells."""

import collections
import json
import math

import pytest
from helpers import assert_one_line_error, run

from b2t_tools.analysis import stability


def _cfg(*argv):
    return stability.resolve(stability.get_parser().parse_args(list(argv)))


def test_cells_are_keyed_on_every_option():
    base = _cfg("--layer-types", "post_ln,b2t", "--depths", "6-6,12-3", "--lrs", "0.001,0.002")
    grid = stability.cells(base, "data1")
    assert len(grid) == 2 * 2 * 2 and len({c["key"] for c in grid}) == 8
    assert {(c["encoder_layers"], c["decoder_layers"]) for c in grid} == {(6, 6), (12, 3)}
    same = {c["key"] for c in stability.cells(base, "data1")}
    assert same == {c["key"] for c in grid}
    for flag, value in (("--dim", "32"), ("--max-update", "50"), ("--warmup", "5"), ("--max-tokens", "512"),
                        ("--seed", "2")):
        other = stability.cells(_cfg("--layer-types", "post_ln,b2t", "--depths", "6-6,12-3", "--lrs", "0.001,0.002",
                                     flag, value), "data1")
        assert not same & {c["key"] for c in other}, flag
    assert not same & {c["key"] for c in stability.cells(base, "data2")}  # other data


@pytest.mark.parametrize("argv, fragment", [
    (["--depths", "6x6"], "--depths"),
    (["--layer-types", "post,b2t"], "--layer-types post"),
    (["--lrs", "0.001,-1"], "--lrs"),
    # zero or empty is the user's value, never "the default"
    (["--dim", "0"], "--dim 0 must be at least 1"),
    (["--max-update", "0"], "--max-update 0 must be at least 1"),
    (["--jobs", "0"], "--jobs 0 must be at least 1"),
    (["--jobs", "-1"], "--jobs -1 must be at least 1"),
    (["--layer-types", ""], "--layer-types '' is not a comma list"),
    (["--depths", " "], "--depths ' ' is not a comma list"),
    # a cell named twice would run twice at once into one folder
    (["--depths", "6-6,2-1,6-6"], "--depths 6-6,2-1,6-6 names 6-6 twice"),
    (["--lrs", "0.001,1e-3"], "names 0.001 twice"),
    (["--layer-types", "b2t,b2t"], "names b2t twice"),
])
def test_bad_options_are_one_line(argv, fragment, tmp_path, capsys):
    assert stability.main(["--out", str(tmp_path / "o"), "--data-bin", str(tmp_path), *argv]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-stability", fragment)
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_out_that_is_a_file_or_in_use_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine\n")
    assert stability.main(["--out", str(tmp_path / "file"), "--data-bin", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "b2t-stability", "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine\n"
    held = stability.open_out(tmp_path / "sweep")  # a sweep running in this --out
    try:
        assert stability.main(["--out", str(tmp_path / "sweep"), "--data-bin", str(tmp_path)]) == 2
        assert_one_line_error(capsys.readouterr().err, "b2t-stability", "in use by another b2t-stability sweep")
    finally:
        held.close()


def test_help_tells_the_heads_the_code_uses():
    text = " ".join(stability.get_parser().format_help().split())
    fewest = min(_cfg("--dim", str(d)).heads for d in (8, 16, 32, 48))
    assert f"at least {fewest}" in text and fewest == 2


def _log(losses):
    return ['{"epoch": 1, "num_updates": "%d", "nll_loss": "%s"}' % (10 * (i + 1), x) for i, x in enumerate(losses)]


def test_under_trained_is_told_apart_from_diverged():
    unigram = 8.6
    falling = stability.read_log(["INFO | train_inner | " + line for line in _log([13, 12.5, 12, 11.6, 11.2, 10.8,
                                                                                 10.5, 10.2, 10.0])])
    assert falling["descending"]
    flat = stability.read_log(["INFO | train_inner | " + line for line in _log([9.0, 8.7, 8.65, 8.7, 8.62, 8.68,
                                                                              8.66, 8.64, 8.65])])
    assert not flat["descending"]

    def rec(log, valid, rc=0, error=None):
        return dict(log, valid_nll_loss=valid, returncode=rc, error=error)

    assert stability.status(rec(falling, 10.0), unigram) == "under-trained"  # still learning at 10 bits
    assert stability.status(rec(flat, 8.7), unigram) == "diverged"  # stuck at word frequencies
    assert stability.status(rec(falling, 8.0), unigram) == "ok"
    assert stability.status(rec(falling, None, 2, "training diverged at update 40 (...)"), unigram) == "diverged"
    assert stability.status(rec(falling, None, 1, "ValueError: x"), unigram) == "failed"


def test_unigram_level_from_the_text(toy_data_bin, tmp_path):
    # the toy corpus again as text (same seed): counts of train.de words + eos, add-one over the dictionary
    from helpers import write_toy_corpus

    raw = write_toy_corpus(tmp_path / "raw")
    counts = collections.Counter()
    for line in open(raw / "train.de"):
        counts.update(line.split() + ["</s>"])
    vocab = 4 + sum(1 for _ in open(toy_data_bin / "dict.de.txt"))
    total = sum(counts.values()) + vocab
    valid = [w for line in open(raw / "valid.de") for w in line.split() + ["</s>"]]
    expected = -sum(math.log2((counts[w] + 1) / total) for w in valid) / len(valid)
    assert stability.unigram_level(toy_data_bin) == pytest.approx(expected, rel=1e-9)


def test_small_sweep_draws_and_resumes(toy_data_bin, tmp_path):
    out = tmp_path / "sweep"
    argv = ["b2t-stability", "--out", out, "--data-bin", toy_data_bin, "--layer-types", "post_ln,b2t",
            "--depths", "2-1,3-3", "--lrs", "0.003", "--dim", "16", "--max-update", "3", "--warmup", "1",
            "--max-tokens", "500", "--jobs", "2"]
    p = run(argv)
    assert "4 cells (0 done before)" in p.stdout + p.stderr
    # logged as fairseq logs (its data lines on stdout, its format), no DEBUG chatter of other libraries
    assert " | INFO | fairseq.data.data_utils | loaded " in p.stdout, p.stdout[-3000:]
    assert "DEBUG" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
    summary = json.loads((out / "stability.json").read_text())
    assert (out / "stability.png").stat().st_size > 10_000
    cells = summary["cells"]
    assert [(c["layer_type"], c["encoder_layers"], c["decoder_layers"]) for c in cells] == [
        ("post_ln", 2, 1), ("post_ln", 3, 3), ("b2t", 2, 1), ("b2t", 3, 3)]
    for c in cells:
        assert c["updates"] == 3 and c["returncode"] == 0, c
        assert c["status"] == ("ok" if c["valid_nll_loss"] < summary["unigram_bits"] else "diverged")
    # a stopped sweep: one cell's result lost; only that cell runs again
    first = {c["key"]: c["seconds"] for c in cells}
    lost = next(iter((out / "cells").glob("b2t-3-3-*"))) / "cell.json"
    lost.unlink()
    p = run(argv)
    assert "4 cells (3 done before)" in p.stdout + p.stderr
    again = json.loads((out / "stability.json").read_text())["cells"]
    assert [c["key"] for c in again] == list(first)
    assert sum(c["seconds"] != first[c["key"]] for c in again) <= 1


def test_demo_heat_map_reads_the_logged_norms(tmp_path):
    """The b2t-demo report's heat map (demo/report.py) takes each layer's norms from a run's json log."""
    import argparse

    from b2t_tools.demo import report

    lines = []
    for u in (5, 10, 15):
        rec = {"epoch": 1, "num_updates": str(u), "loss": "9.1"}
        rec.update({f"{s}{i:02d}_gnorm": str(10.0 ** (-i if s == "enc" else 0) * u) for s in ("enc", "dec")
                    for i in range(3)})
        lines.append("INFO:train_inner:" + json.dumps(rec))
    series = report.layer_norm_series(lines)
    assert sorted(series) == [5, 10, 15] and series[10]["enc02_gnorm"] == pytest.approx(0.1)
    runs = tmp_path / "runs"
    records = []
    for label, arch in (("Post-LN", "post_ln"), ("B2T", "b2t")):
        (runs / f"{arch}-3L").mkdir(parents=True)
        (runs / f"{arch}-3L" / "train.log").write_text("\n".join(lines) + "\n")
        records.append({"arch": arch, "label": label, "layers": 3, "run_dir": f"{arch}-3L"})
    records.append({"arch": "b2t", "label": "B2T", "layers": 1, "run_dir": "missing"})  # only the deepest are drawn
    files = report.do_layer_heatmap(tmp_path, records, argparse.Namespace(max_update=15))
    assert [f[1] for f in files] == ["layer_norms.png"] and "3+3 layers" in files[0][0]
    assert (tmp_path / "layer_norms.png").stat().st_size > 10_000
    report.remove_stale(tmp_path, [])  # a report without it removes the old picture
    assert not (tmp_path / "layer_norms.png").exists()


def test_the_map_marks_under_trained_cells_apart(tmp_path, monkeypatch):
    import argparse

    from matplotlib.axes import Axes

    cells = [dict(layer_type="b2t", encoder_layers=6, decoder_layers=6, lr=lr, valid_nll_loss=v, status=st)
             for lr, v, st in ((0.001, 7.9, "ok"), (0.002, 10.0, "under-trained"), (0.004, 8.7, "diverged"),
                               (0.008, None, "failed"))]
    cfg = argparse.Namespace(dim=64, max_update=100, max_tokens=1024, warmup=30, precision="cpu")
    drawn, text = [], Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **kw: drawn.append(s) or text(self, x, y, s, *a, **kw))
    stability.draw_map(cells, cfg, 8.6, tmp_path / "map.png")
    assert drawn == ["7.90", "~ 10.00", "x 8.70", "! n/a"]
    assert (tmp_path / "map.png").stat().st_size > 10_000
