"""b2t-fairseq: the B2T connection (Takase et al., Findings of ACL 2023) as a fairseq plugin.

Importing this package (``--user-dir b2t_fairseq`` or ``import b2t_fairseq``) registers the
``transformer_b2t`` model and its named architectures, and lets torch >= 2.6 load fairseq
checkpoints. Nothing else happens at import time.
"""

__version__ = "0.1.0"

from . import compat  # noqa: F401  (torch.load of fairseq checkpoints under torch >= 2.6)
from . import transformer_b2t  # noqa: F401  (registers the model and architectures)
