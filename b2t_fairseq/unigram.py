"""The unigram level: the loss of a model that learned word frequencies only, in bits per token.

One definition for the layer monitor (patches/layer_monitor.py), b2t-demo and b2t-stability: the
cross-entropy of a split's target tokens (end of sentence included) under the add-one unigram model
of the *training* targets over the model's output dictionary. Each user measures it on the split
whose loss it judges: the monitor judges the training loss, so it takes the training targets; the
demo and the stability map judge the final valid loss, so they take the valid targets (a unigram
model's valid cross-entropy is the higher of the two: a training loss compared with it would let a
run stalled at word frequencies pass as learning).
"""

from pathlib import Path

import numpy as np

from .errors import B2TError

CHUNK = 1 << 24  # tokens counted at a time: a large corpus is never copied whole into int64


def counts(tokens, vocab_size):
    """How often each token id occurs in ``tokens`` (any integer array), as a float array of at least vocab_size."""
    tokens = np.asarray(tokens)
    out = np.zeros(vocab_size, dtype=np.float64)
    for i in range(0, len(tokens), CHUNK):
        c = np.bincount(tokens[i:i + CHUNK].astype(np.int64), minlength=len(out))
        if len(c) > len(out):
            out = np.concatenate([out, np.zeros(len(c) - len(out))])
        out += c
    return out


def level(train_counts, eval_counts=None):
    """Bits per token of ``eval_counts`` (default: the training counts themselves) under the add-one
    unigram model of ``train_counts``; None when there is nothing to measure."""
    train = np.asarray(train_counts, dtype=np.float64)
    ev = train if eval_counts is None else np.asarray(eval_counts, dtype=np.float64)
    n = max(len(train), len(ev))
    train, ev = np.pad(train, (0, n - len(train))), np.pad(ev, (0, n - len(ev)))
    total = ev.sum()
    if total <= 0 or n == 0:
        return None
    logp = np.log2((train + 1.0) / (train.sum() + n))
    return float(-(ev * logp).sum() / total)


def dataset_counts(dataset, vocab_size):
    """How often each token occurs among the targets of a loaded fairseq dataset, or None when they
    cannot be read. Counted here, while the dataset lives: its tokens are a view of a memory map that
    the dataset closes when it is freed."""
    tokens = _dataset_tokens(dataset)
    return None if tokens is None or not len(tokens) else counts(tokens, vocab_size)


def _dataset_tokens(dataset):
    """Every target token of a loaded fairseq dataset (a translation pair's target side, or a language
    model's text beneath its blocks), as an integer array (a view: see dataset_counts), or None."""
    node = dataset.tgt if getattr(dataset, "tgt", None) is not None else dataset
    leaf, seen = node, set()
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if hasattr(node, "_bin_buffer") and hasattr(node, "_index"):  # fairseq's mmap dataset: every sentence
            return np.frombuffer(node._bin_buffer, dtype=node._index.dtype)
        parts = getattr(node, "datasets", None)  # shards (ConcatDataset)
        if isinstance(parts, (list, tuple)) and parts:
            found = [_dataset_tokens(p) for p in parts]
            return None if any(f is None for f in found) else np.concatenate(found)
        leaf, node = node, getattr(node, "dataset", None)
    try:  # another storage format: read the innermost dataset's items (up to 200,000 of them)
        items = [leaf[i] for i in range(min(len(leaf), 200_000))]
        return np.concatenate([np.asarray(t, dtype=np.int64).reshape(-1) for t in items]) if items else None
    except Exception:  # noqa: BLE001 - items that are not token tensors: no level
        return None


def of_task(task, split="train"):
    """The level of a loaded task's training targets (what the monitor compares the training loss with), or None."""
    try:
        ds = task.dataset(split)
    except Exception:  # noqa: BLE001 - the split is not loaded: no level
        return None
    found = dataset_counts(ds, len(task.target_dictionary))
    return None if found is None else level(found)


def data_bin_files(data_bin):
    """(file prefix format with one {} for the split, dictionary path) of a data-bin's target side:
    translation's first pair (train.SRC-TGT.TGT, dict.TGT.txt) or a language model's text (train, dict.txt)."""
    data_bin = Path(data_bin)
    pairs = sorted(p.name.split(".")[1] for p in data_bin.glob("train.*-*.*.bin"))
    if pairs:
        tgt = pairs[0].split("-")[1]
        return str(data_bin / f"{{}}.{pairs[0]}.{tgt}"), data_bin / f"dict.{tgt}.txt"
    if (data_bin / "train.bin").exists():
        return str(data_bin / "{}"), data_bin / "dict.txt"
    raise B2TError(f"{data_bin} has no train split (train.SRC-TGT.TGT.bin, or train.bin for a language model); "
                   "binarize one with fairseq-preprocess")


def of_data_bin(data_bin, split="valid"):
    """The level of ``split``'s targets in a fairseq data-bin (what the tools compare the final valid loss with)."""
    from fairseq.data import Dictionary, data_utils

    prefix, dict_path = data_bin_files(data_bin)
    try:
        vocab = len(Dictionary.load(str(dict_path)))
    except (OSError, ValueError, RuntimeError) as e:
        raise B2TError(f"{dict_path} cannot be read as a fairseq dictionary ({e}); binarize {data_bin} again") from None

    def split_counts(name):
        ds = data_utils.load_indexed_dataset(prefix.format(name), None)
        if ds is None:
            raise B2TError(f"{data_bin} has no {name} split ({Path(prefix.format(name)).name}.bin); binarize one")
        found = dataset_counts(ds, vocab)
        return np.zeros(vocab) if found is None else found

    value = level(split_counts("train"), split_counts(split))
    if value is None:
        raise B2TError(f"{data_bin}'s {split} split holds no tokens; binarize a non-empty one")
    return value
