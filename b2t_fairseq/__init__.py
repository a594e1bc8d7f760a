"""b2t-fairseq: the B2T connection (Takase et al., Findings of ACL 2023) as a fairseq plugin.

Importing this package (``--user-dir b2t_fairseq`` or ``import b2t_fairseq``) registers the
``transformer_b2t`` and ``transformer_lm_b2t`` models and their named architectures, and applies
the fairseq repairs of ``patches/`` (see its ``__init__``: checkpoint loading under torch >= 2.6, remainder batches, atomic
checkpoint saves and copies, one-line errors for damaged files); the behaviour changes there apply
only in the console commands or with ``B2T_FAIRSEQ_STRICT=1``. Nothing else happens at import time;
the console commands and tools live in the sibling package ``b2t_tools``, which the plugin never imports.
"""

__version__ = "0.3.0"

from . import patches  # noqa: E402

patches.install()

from . import (
    transformer_b2t,  # noqa: E402,F401  (registers the model and architectures)
    transformer_lm_b2t,  # noqa: E402,F401  (the decoder-only model and its architectures)
)
