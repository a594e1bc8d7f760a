"""``python -m torch.distributed.run ... -m b2t_fairseq.wmt.torchrun_entry ARGS``: b2t-train with the rank.

On CPU (gloo) fairseq must be given ``--distributed-init-method env:// --distributed-no-spawn``; it then
skips reading the rank from the environment, so this entry adds ``--distributed-rank $RANK``. On GPUs
(no explicit init method) fairseq reads RANK/LOCAL_RANK itself and the added flag agrees with it.
"""

import os
import sys


def main(argv=None):
    from b2t_fairseq import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    rank = os.environ.get("RANK")
    if rank is None:
        raise SystemExit("torchrun_entry: error: RANK is not set; start this module with torchrun "
                         "(python -m torch.distributed.run), or use b2t-train for one process")
    sys.argv[0] = "b2t-train"
    return cli.train(argv + ["--distributed-rank", rank])


if __name__ == "__main__":
    main()
