"""What importing the plugin changes in fairseq: one patch per module, each wrapping named fairseq code.

Every patch module has an idempotent ``install()`` and a docstring saying what it changes, why, and
which fairseq code it relies on; tests/test_patches.py fails when that code changes shape.

``REPAIRS`` apply on import (``--user-dir b2t_fairseq``, ``import b2t_fairseq``, every console
command), so fairseq's spawned workers get them too: they make fairseq do what it meant to, or fail
in one line where it gave a traceback. ``BEHAVIOUR`` changes what fairseq does on purpose, so it
applies only in our commands (``b2t-train``, ``b2t-generate``, ...: :func:`enable_behaviour`) or for
plain ``fairseq-train --user-dir`` runs with the environment variable ``B2T_FAIRSEQ_STRICT=1``.
``collective_timeout`` is installed by the torchrun launcher only.
"""

import os


def require_fairseq():
    """One line, not a chain of ImportErrors, when this environment has no fairseq (setup.py requires none)."""
    try:
        import fairseq  # noqa: F401
    except ImportError as e:
        from ..errors import FairseqMissing

        raise FairseqMissing(f"b2t_fairseq needs fairseq and none is importable here ({e}); install one: "
                             "pip install 'b2t-fairseq[fixed]' (fairseq-fixed), or "
                             "pip install fairseq==0.12.2 (Python 3.8-3.10, pip < 24.1)") from None


require_fairseq()  # before the patch modules, which import fairseq

from . import (  # noqa: E402
    atomic_checkpoints,
    broadcast_load,
    checkpoint_load,
    data_files,
    data_fit,
    encoder_fast_path,
    exact_resume,
    layer_type_guard,
    numpy_compat,
    remainder_batches,
    run_guards,
    run_identity,
    torch_load,
)

STRICT_ENV = "B2T_FAIRSEQ_STRICT"

REPAIRS = [
    torch_load.install,          # fairseq checkpoints load under torch >= 2.6
    remainder_batches.install,   # the last, short batch is kept
    atomic_checkpoints.install,  # saves and copies atomic; Ctrl-C during a save ends the run
    checkpoint_load.install,     # damaged checkpoints one line; the authors' fork checkpoints convert
    layer_type_guard.install,    # a B2T/DeepNorm/Admin checkpoint is not run as another layer type
    data_files.install,          # damaged .bin/.idx/dict files one line
    numpy_compat.install,        # np.compat.long and friends, removed in numpy 2 (language modelling, buckets)
    run_identity.install,        # every checkpoint names its training run (averages never mix runs)
    encoder_fast_path.install,   # fairseq 0.12.2: a loaded encoder runs our layers, not torch's fused Post-LN
    broadcast_load.install,      # ranks > 0 of a multi-worker run receive the resumed checkpoint under torch >= 2.6
]

BEHAVIOUR = [
    data_fit.install,            # a checkpoint must fit its data (language pair, dictionaries)
    exact_resume.install,        # a run resumed after epoch 1 continues bit for bit
    run_guards.install,          # every run: one writer per --save-dir, resumes only itself, a finished run
                                 # stays finished; a checkpoint decodes only its own task kind
]


def install():
    """Apply the repairs, and the behaviour changes if B2T_FAIRSEQ_STRICT=1 (idempotent)."""
    for patch in REPAIRS:
        patch()
    if os.environ.get(STRICT_ENV, "") not in ("", "0"):
        enable_behaviour()


def enable_behaviour():
    """Apply the behaviour changes in this process and in the fairseq workers it starts (idempotent)."""
    os.environ[STRICT_ENV] = "1"  # spawned workers import the plugin afresh: they read it
    for patch in BEHAVIOUR:
        patch()
