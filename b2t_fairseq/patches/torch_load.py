"""Repair: fairseq checkpoints load under torch >= 2.6.

torch >= 2.6 makes ``torch.load`` default to ``weights_only=True``, which refuses the pickled
``argparse.Namespace`` (fairseq < 0.10 ``args``) and numpy scalars that fairseq checkpoints hold; we
allow exactly those globals.
Relies on: ``torch.serialization.add_safe_globals`` (torch >= 2.4; older torch needs nothing).
"""

import argparse

import numpy as np
import torch


def numpy_globals():
    found = [np.ndarray, np.dtype]
    for mod, name in (("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")):
        try:
            found.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    # dtype classes such as numpy.dtypes.Float64DType appear in pickled numpy scalars
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    return found


def install():
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # adding twice is harmless
        add([argparse.Namespace] + numpy_globals())
