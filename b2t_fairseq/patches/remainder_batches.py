"""Repair: the last, short batch is kept, and nothing to batch is one line.

fairseq after 0.12.2 silently drops the last batch whose size is not a multiple of
``--required-batch-size-multiple`` (fairseq-generate translated 16 of 21 test sentences); we keep it,
as 0.12.2 and the authors' 0.9.0 did. Nothing to batch (every sentence longer than --max-tokens) is
one line instead of an IndexError.
Relies on: ``fairseq.data.data_utils.batch_by_size(indices, num_tokens_fn, num_tokens_vec, max_tokens,
max_sentences, required_batch_size_multiple, fixed_shapes)`` returning consecutive slices of indices.
"""

import functools

import numpy as np

from ..errors import B2TError


def install():
    from fairseq.data import data_utils

    drops = data_utils.batch_by_size
    if getattr(drops, "b2t_keeps_remainder", False):
        return

    @functools.wraps(drops)
    def batch_by_size(indices, *args, **kwargs):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        if len(indices) == 0:  # fairseq: IndexError: list index out of range
            raise B2TError("no sentence left to batch: the split is empty, or every sentence is longer than "
                           "--max-tokens or the model's --max-source-positions/--max-target-positions (fairseq-train "
                           "skips those); raise --max-tokens to at least the longest sentence pair, or the positions")
        batches = drops(indices, *args, **kwargs)
        fixed_shapes = kwargs.get("fixed_shapes", args[5] if len(args) > 5 else None)
        covered = sum(len(b) for b in batches)
        if fixed_shapes is None and covered < len(indices):
            # batches are consecutive slices of indices: what is missing is the dropped tail
            batches = list(batches) + [indices[covered:]]
        return batches

    batch_by_size.b2t_keeps_remainder = True
    data_utils.batch_by_size = batch_by_size
