"""fairseq 0.12 under numpy 2: the numpy names it uses that numpy has removed.

fairseq's code relies on these, all gone from numpy 2 (np.compat) or numpy >= 1.24 (np.int, np.float):
    fairseq/data/token_block_dataset.py     np.compat.long   (TokenBlockDataset, --sample-break-mode eos)
    fairseq/data/language_pair_dataset.py   np.compat.long   (LanguagePairDataset, --num-batch-buckets)
    fairseq/data/data_utils.py              np.int           (compute_mask_indices: wav2vec-style masking)
    fairseq/modules/dynamic_crf_layer.py    np.float         (DynamicCRF: the NAT models' CRF)
numpy 1.x defined each as the Python builtin (np.compat.long is int, np.int is int, np.float is float).

The repair gives each of those fairseq modules its own ``np``: numpy itself plus the missing names.
numpy is not modified, so no other library sees the old names; nothing changes under numpy 1.x,
where the names exist.
"""

import importlib
import types

import numpy

# fairseq module -> the names it needs, with numpy 1.x's values
MODULES = {
    "fairseq.data.token_block_dataset": ("compat",),
    "fairseq.data.language_pair_dataset": ("compat",),
    "fairseq.data.data_utils": ("int",),
    "fairseq.modules.dynamic_crf_layer": ("float",),
}
OLD_NAMES = {"compat": types.SimpleNamespace(long=int), "int": int, "float": float}


class NumpyWithOldNames(types.ModuleType):
    """numpy, as seen by one fairseq module, plus the old names numpy no longer has."""

    def __init__(self, names):
        super().__init__("numpy")
        for name in names:
            setattr(self, name, OLD_NAMES[name])

    def __getattr__(self, name):  # everything else is numpy's own
        return getattr(numpy, name)


def _missing(names):
    missing = []
    for name in names:
        try:
            getattr(numpy, name)
        except AttributeError:
            missing.append(name)
    return missing


def install():
    """Give each fairseq module above an ``np`` with the names it lacks; idempotent. Returns the
    modules repaired by this call."""
    repaired = []
    for module_name, names in MODULES.items():
        module = importlib.import_module(module_name)
        current = getattr(module, "np", None)
        if current is not numpy:
            continue  # already repaired (or fairseq changed how it imports numpy: leave it alone)
        missing = _missing(names)
        if missing:
            module.np = NumpyWithOldNames(missing)
            repaired.append(module_name)
    return repaired
