"""One unigram level (b2t_fairseq/unigram.py) for the layer monitor, b2t-demo and b2t-stability, for
translation and language-model data alike: the add-one unigram model of the training targets over
the dictionary, measured on the split whose loss is judged."""

import collections
import math

import pytest
from fairseq import tasks
from fairseq.data import Dictionary
from helpers import parse, run, write_toy_corpus

from b2t_fairseq import unigram
from b2t_fairseq.patches import layer_monitor


def _from_text(raw, lang, vocab, split):
    """The level computed here from the text: counts of train.LANG words + eos, add-one over vocab."""
    counts = collections.Counter()
    for line in open(raw / f"train.{lang}"):
        counts.update(line.split() + ["</s>"])
    total = sum(counts.values()) + vocab
    words = [w for line in open(raw / f"{split}.{lang}") for w in line.split() + ["</s>"]]
    return -sum(math.log2((counts[w] + 1) / total) for w in words) / len(words)


def test_monitor_demo_and_map_share_one_level(toy_data_bin, tmp_path):
    from b2t_tools.analysis import stability
    from b2t_tools.demo import data

    raw = write_toy_corpus(tmp_path / "raw")  # the fixture's corpus again (same seed)
    vocab = len(Dictionary.load(str(toy_data_bin / "dict.de.txt")))
    valid = _from_text(raw, "de", vocab, "valid")
    assert stability.unigram_level(toy_data_bin) == pytest.approx(valid, rel=1e-9)
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "bin").symlink_to(toy_data_bin)
    assert data.unigram_level(tmp_path / "root") == pytest.approx(valid, rel=1e-9)
    # the monitor judges the training loss: the same definition on the training targets
    args = parse(toy_data_bin, "transformer_b2t_tiny")
    task = tasks.setup_task(args)
    task.load_dataset("train")
    train = _from_text(raw, "de", vocab, "train")
    assert layer_monitor.unigram_level(task) == pytest.approx(train, rel=1e-9)
    assert unigram.of_data_bin(toy_data_bin, "train") == pytest.approx(train, rel=1e-9)
    assert train < valid  # why each judges its own split: a stalled run's training loss sits below `valid`


@pytest.mark.slow  # runs fairseq-preprocess: an e2e test
def test_the_monitor_finds_the_level_of_a_language_model(tmp_path):
    from helpers import build_lm

    raw = write_toy_corpus(tmp_path / "raw", sizes=(("train", 200), ("valid", 20)))
    lm_bin = tmp_path / "lm-bin"
    run(["fairseq-preprocess", "--only-source", "--trainpref", raw / "train.en", "--validpref", raw / "valid.en",
         "--destdir", lm_bin, "--workers", "1"])
    _, task, _ = build_lm(lm_bin, "transformer_lm_b2t_tiny")
    task.load_dataset("train")
    vocab = len(task.target_dictionary)
    level = layer_monitor.unigram_level(task)
    assert level == pytest.approx(_from_text(raw, "en", vocab, "train"), rel=1e-9)
    assert unigram.of_data_bin(lm_bin, "valid") == pytest.approx(_from_text(raw, "en", vocab, "valid"), rel=1e-9)


def test_a_data_bin_without_a_train_split_is_one_line(tmp_path):
    (tmp_path / "dict.txt").write_text("a 1\n")
    with pytest.raises(unigram.B2TError, match="no train split"):
        unigram.of_data_bin(tmp_path)
