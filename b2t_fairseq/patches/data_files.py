"""Repair: damaged binarized data and dictionaries are one line naming the file.

A truncated ``.bin`` or ``.idx`` (fairseq's mmap format), an empty split or a malformed dictionary
line is reported as fairseq opens it, not as a ``ValueError``/``AttributeError`` from deep inside numpy.
Relies on: ``fairseq.data.data_utils.load_indexed_dataset(path, ...)`` (reads PATH, PATH1, ... with
combine=True), ``fairseq.data.dictionary.Dictionary.add_from_file(self, f)`` and its error texts
("Incorrect dictionary format", "Duplicate word found", "Incorrect encoding detected"), and the mmap
index layout of ``fairseq.data.indexed_dataset.MMapIndexedDataset.Index``.
"""

import functools
import os

import numpy as np

from ..errors import B2TError

_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2, 9: 4, 10: 8}  # fairseq's indexed_dataset._code_to_dtype


def binarized_damage(prefix):
    """Why PREFIX.idx/PREFIX.bin (fairseq's mmap format) cannot be used, or None if they look whole."""
    idx, binf = prefix + ".idx", prefix + ".bin"
    if not (os.path.isfile(idx) and os.path.isfile(binf)):
        return None
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(26)  # magic (9), version (8), dtype code (1), number of sentences (8)
    if not head.startswith(_MMAP_MAGIC):
        return None  # another format (lazy/cached/raw): fairseq checks it itself
    if len(head) < 26:
        return f"{idx} is truncated ({size} bytes, shorter than its header)"
    n = int.from_bytes(head[18:26], "little")
    item = _DTYPE_SIZES.get(head[17])
    want = 26 + 12 * n  # then n int32 sizes and n int64 pointers
    if size != want:
        return f"{idx} is truncated or damaged ({size} bytes, its header promises {want})"
    if n == 0:
        return "empty"
    sizes = np.memmap(idx, dtype=np.int32, mode="r", offset=26, shape=(n,))
    tokens = int(sizes.sum(dtype=np.int64))
    if item and os.path.getsize(binf) != tokens * item:
        return (f"{binf} is truncated or damaged ({os.path.getsize(binf)} bytes, its index {os.path.basename(idx)} "
                f"needs {tokens * item})")
    return None


def _checked_loading(load):
    @functools.wraps(load)
    def load_indexed_dataset(path, *args, **kwargs):
        for k in range(1000):  # combine=True reads PATH, PATH1, PATH2, ...
            part = path + (str(k) if k else "")
            if not os.path.isfile(part + ".idx"):
                break
            damage = binarized_damage(part)
            if damage == "empty":
                split = os.path.basename(part).split(".")[0]
                raise B2TError(f"split '{split}' in {os.path.dirname(part) or '.'} has no sentences ({part}.idx lists "
                               "none); binarize it from a non-empty file with fairseq-preprocess, or leave it out "
                               "(--disable-validation or --valid-subset for training, --gen-subset for decoding)")
            if damage:
                raise B2TError(f"{damage}; binarize the data again with fairseq-preprocess (a copy may have been cut short)")
        return load(path, *args, **kwargs)

    load_indexed_dataset.b2t_data_files = True
    return load_indexed_dataset


def _checked_dictionary(add_from_file):
    @functools.wraps(add_from_file)
    def checked_add_from_file(self, f):
        if not isinstance(f, str):
            return add_from_file(self, f)
        try:
            return add_from_file(self, f)
        except (ValueError, RuntimeError) as e:
            text = str(e)
            if not text.startswith(("Incorrect dictionary format", "Duplicate word found")):
                raise
            bad = text.split(": ", 1)[-1].strip().strip('"').strip()
            line = None
            try:
                with open(f, encoding="utf-8") as fd:
                    line = next((i for i, ln in enumerate(fd, 1) if ln.strip() == bad
                                 or ln.rstrip("\n").rsplit(" ", 1)[0].strip() == bad), None)
            except OSError:
                pass
            where = f"{f} line {line}" if line else f
            what = "repeats a word" if text.startswith("Duplicate") else "is not '<word> <count>'"
            raise B2TError(f"dictionary {where} {what} ({bad[:60]!r}); restore the dict file fairseq-preprocess "
                           "wrote with this data, or binarize again") from e
        except Exception as e:  # noqa: BLE001 - fairseq's "Incorrect encoding detected in ..." is a plain Exception
            if not str(e).startswith("Incorrect encoding detected"):
                raise
            raise B2TError(f"dictionary {f} is not UTF-8; restore the dict file fairseq-preprocess wrote, or "
                           "binarize again") from e

    checked_add_from_file.b2t_data_files = True
    return checked_add_from_file


def install():
    from fairseq.data import data_utils
    from fairseq.data.dictionary import Dictionary

    if not getattr(data_utils.load_indexed_dataset, "b2t_data_files", False):
        data_utils.load_indexed_dataset = _checked_loading(data_utils.load_indexed_dataset)
    if not getattr(Dictionary.add_from_file, "b2t_data_files", False):
        Dictionary.add_from_file = _checked_dictionary(Dictionary.add_from_file)
