"""What ``--log-layer-norms`` costs: the same model trained with and without it, in one process.

``python -m b2t_tools.analysis.monitor_cost [--layers 6] [--log-interval 100] [--rounds 3]``

Builds two identical trainers (b2t-bench's synthetic WMT-shaped batches, its "cpu" sizes unless
``--size``), one with the flag, and times rounds of ``--log-interval`` updates each (so every round
holds exactly one logged update), alternating the two; prints the median time per update of each and
their ratio, in wall and in this process's CPU seconds (the robust one on a shared machine).
"""

import argparse
import statistics
import sys
import tempfile

from ..commands import run_command
from ..util import machine
from .bench import (
    SIZES,
    build_trainer,
    fairseq_argv,
    make_batches,
    quiet,
    write_dictionary,
)
from .measure import log, run_updates

PROG = "b2t-monitor-cost"


def measure(opts):
    from fairseq.data import Dictionary

    quiet()
    with tempfile.TemporaryDirectory(prefix="b2t-monitor-cost-") as workdir:
        write_dictionary(workdir, SIZES[opts.size]["vocab"])
        batches = make_batches(Dictionary.load(f"{workdir}/dict.src.txt"), opts.max_tokens, opts.log_interval)
        base = fairseq_argv(f"plugin_{opts.arch}", workdir, opts.size, opts.layers, opts.max_tokens, "cpu", "fp32")
        base += ["--log-interval", str(opts.log_interval)]
        trainers = {"without": build_trainer(base), "with": build_trainer(base + ["--log-layer-norms"])}
        while len(batches) < opts.log_interval:
            batches = batches + batches
        batches = batches[:opts.log_interval]
        for t in trainers.values():
            run_updates(t, batches[:2], "cpu")  # untimed warm-up
        wall, cpu = {k: [] for k in trainers}, {k: [] for k in trainers}
        for r in range(opts.rounds):
            for k in (("without", "with") if r % 2 == 0 else ("with", "without")):
                # align each round to the log interval: exactly one logged update per round
                t = trainers[k]
                done = t.get_num_updates() % opts.log_interval
                if done:
                    run_updates(t, batches[:opts.log_interval - done], "cpu")
                w, c = run_updates(t, batches, "cpu", cpu_time=True)
                wall[k].append(w / len(batches))
                cpu[k].append(c / len(batches))
            log(f"  round {r + 1}/{opts.rounds} done")
    med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in trainers}
    info = machine()
    print(f"{PROG}: {opts.arch} {opts.layers}+{opts.layers} layers, sizes {opts.size} {SIZES[opts.size]}, "
          f"--max-tokens {opts.max_tokens}, --log-interval {opts.log_interval}, {opts.rounds} rounds, "
          f"CPU {info['cpu']} ({info['threads']} threads)")
    for k in trainers:
        print(f"  {k:8s} --log-layer-norms: {1000 * med[k][0]:.1f} ms/update wall, {1000 * med[k][1]:.1f} ms CPU")
    print(f"  ratio with/without: {med['with'][0] / med['without'][0]:.4f} wall, "
          f"{med['with'][1] / med['without'][1]:.4f} CPU")
    return med


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="post_ln", help="layer type (b2t-bench's plugin_* names without plugin_)")
    p.add_argument("--layers", type=int, default=6, help="encoder = decoder depth")
    p.add_argument("--size", choices=tuple(SIZES), default="cpu")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    return run_command(PROG, lambda a: measure(p.parse_args(a)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
