"""b2t-fairseq: the B2T connection (Takase et al., Findings of ACL 2023) as a fairseq plugin.

Importing this package (``--user-dir b2t_fairseq`` or ``import b2t_fairseq``) registers the
``transformer_b2t`` and ``transformer_lm_b2t`` models and their named architectures, and applies the runtime repairs listed in
``repairs.py`` (checkpoint loading under torch >= 2.6, remainder batches, atomic checkpoint copies).
Nothing else happens at import time; the console commands and tools live in the sibling package
``b2t_tools``, which the plugin never imports.
"""

__version__ = "0.2.0"

from . import repairs  # noqa: E402

repairs.apply()
from .patches import numpy_compat  # noqa: E402
numpy_compat.install()  # fairseq's language modelling and batch buckets on numpy 2

from . import transformer_b2t  # noqa: E402,F401  (registers the model and architectures)
from . import transformer_lm_b2t  # noqa: E402,F401  (the decoder-only model and its architectures)
