"""b2t-bench: what the B2T connection costs against stock fairseq, in speed and memory.

(Over 400 lines on purpose: the variants, the batches and the interleaved timing loop must stay in
step, so they are read together; the measurements themselves are in measure.py.)

Builds its variants with identical sizes, seed and batches, each exactly as ``fairseq-train``
would (fairseq's option parser, ``tasks.setup_task``, ``task.build_model``, ``Trainer``):

    stock_post_ln   fairseq ``transformer`` (``--arch transformer_wmt_en_de``), Post-LN
    stock_pre_ln    the same with ``--encoder-normalize-before --decoder-normalize-before``
    plugin_post_ln  ``transformer_b2t --ln-position post``
    plugin_pre_ln   ``transformer_b2t --ln-position pre``
    plugin_b2t      ``transformer_b2t --ln-position b2t``
    plugin_deepnorm ``transformer_b2t --ln-position deepnorm`` (DeepNet's LN(alpha x + f(x)), its init)
    plugin_admin    ``transformer_b2t --ln-position admin`` (LN(omega x + f(x)), omega trainable vectors)
    fast_*          the plugin's Post-LN, Pre-LN and B2T with ``--b2t-fast`` (fast.py)

``--task lm`` compares decoder-only language models the same way: stock fairseq ``transformer_lm``
(Post-LN; Pre-LN with ``--decoder-normalize-before``) against the plugin's ``transformer_lm_<type>`` for
every layer type, on token blocks cut as fairseq's ``language_modeling`` task cuts them
(``TokenBlockDataset``, ``--sample-break-mode none``, ``--tokens-per-sample``).

Every run times complete updates through ``Trainer.train_step`` (forward, backward, gradient scaling,
clipping, Adam step, lr schedule; ``--fp16`` on a GPU), interleaving the variants round by round
so that machine drift hits all of them alike. Batches are synthetic but shaped like fairseq's:
WMT-like sentence lengths, bucketed by ``fairseq.data.data_utils.batch_by_size`` under
``--max-tokens``, left-padded sources, random (fixed) token ids.

Reported per depth and variant: target tokens per second (median over rounds), its ratio to
stock Post-LN, peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the variant's build
and first updates, minus what the other variants hold; CPU: peak of live tensor bytes from the
same start, from torch.profiler's allocator events) and the bytes autograd saves for backward.
``--profile PATH`` also profiles one stock Post-LN update: kernel time against gaps, the largest
kernels, and the achieved fraction of the device's measured matrix-multiply peak.
"""

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile

import numpy as np
import torch

from b2t_fairseq import layer_types, recipe
from b2t_fairseq.fast import translate_argv

from ..commands import run_command
from ..commands.cli import PLUGIN_DIR
from ..errors import ToolError
from ..util import machine, write_json
from .measure import (
    build_and_measure_memory,
    log,
    profile_update,
    run_updates,
    saved_activation_bytes,
)

PROG = "b2t-bench"

VARIANTS = {
    "stock_post_ln": ["--arch", "transformer_wmt_en_de"],
    "stock_pre_ln": ["--arch", "transformer_wmt_en_de", "--encoder-normalize-before", "--decoder-normalize-before"],
    # every layer type of the plugin, at its defaults
    **{f"plugin_{t.short}": ["--arch", "transformer_b2t", "--ln-position", t.key] for t in layer_types.LAYER_TYPES},
    # the fast path (fast.py): SDPA attention and fairseq's Adam with foreach kernels (b2t_adam)
    **{f"fast_{t.short}": ["--arch", "transformer_b2t", "--ln-position", t.key, "--b2t-fast"]
       for t in layer_types.LAYER_TYPES if t.in_paper},
}
BASELINE = "stock_post_ln"
# decoder-only language models (--task lm): stock transformer_lm and the plugin's LM of every layer type
LM_VARIANTS = {
    "stock_post_ln": ["--arch", "transformer_lm"],
    "stock_pre_ln": ["--arch", "transformer_lm", "--decoder-normalize-before"],
    **{f"plugin_{t.short}": ["--arch", t.lm_family] for t in layer_types.LAYER_TYPES},
}
TASKS = {"translation": VARIANTS, "lm": LM_VARIANTS}

# width, FFN width, heads, vocabulary (joined dictionary, shared embeddings)
SIZES = {
    "quick": dict(dim=32, ffn=64, heads=2, vocab=256),
    "cpu": dict(dim=128, ffn=512, heads=4, vocab=4000),
    "paper": dict(dim=512, ffn=2048, heads=8, vocab=32768),  # transformer_wmt_en_de, 32k joint BPE
}
# per size: default --max-tokens, --rounds, --warmup, --batches (updates per round and variant)
DEFAULTS = {
    "quick": dict(max_tokens=[64], rounds=2, warmup=0, batches=1, layers=[2, 4]),
    "cpu": dict(max_tokens=[512], rounds=7, warmup=1, batches=2, layers=[6, 18]),
    "paper": dict(max_tokens=[3584, 8192, 32768], rounds=5, warmup=2, batches=3, layers=[6, 18]),
}
# --task lm: the same, with the LM recipe's depths, --max-tokens and --tokens-per-sample at the paper size
LM_DEFAULTS = {
    "quick": dict(max_tokens=[64], layers=[2, 4], tokens_per_sample=32),
    "cpu": dict(max_tokens=[512], layers=[6, recipe.LM_DEEP], tokens_per_sample=128),
    "paper": dict(max_tokens=[recipe.LM_MAX_TOKENS, 4 * recipe.LM_MAX_TOKENS], layers=list(recipe.LM_DEPTHS),
                  tokens_per_sample=recipe.LM_TOKENS_PER_SAMPLE),
}

# sentence lengths in subword tokens, roughly those of WMT En-De with 32k BPE
LEN_MEDIAN, LEN_SIGMA, LEN_MAX, TGT_RATIO = 24.0, 0.6, 250, 1.08


BenchError = ToolError  # bad input: the message names the problem and the fix


# ---------------------------------------------------------------------------------------------
# building variants the way fairseq-train does


def write_dictionary(folder, vocab, task="translation"):
    """A joined dictionary of `vocab` entries (4 specials + words) as dict.src.txt / dict.tgt.txt
    (translation) or dict.txt (lm), the files fairseq's tasks load."""
    from fairseq.data import Dictionary

    words = vocab - len(Dictionary())
    if words < 4:
        raise BenchError(f"vocabulary of {vocab} is too small; use at least 8")
    text = "".join(f"w{i} {1000 + words - i}\n" for i in range(words))
    for name in (("dict.txt",) if task == "lm" else ("dict.src.txt", "dict.tgt.txt")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    return folder


def dictionary_file(task):
    return "dict.txt" if task == "lm" else "dict.src.txt"


def fairseq_argv(variant, data_dir, size, layers, max_tokens, device, dtype, seed=1, save_dir=None):
    """The fairseq-train command line of one variant (the paper's optimizer and criterion)."""
    s = SIZES[size] if isinstance(size, str) else size
    argv = [data_dir, "--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
            "--user-dir", PLUGIN_DIR, *VARIANTS[variant],
            "--encoder-layers", layers, "--decoder-layers", layers,
            "--encoder-embed-dim", s["dim"], "--decoder-embed-dim", s["dim"],
            "--encoder-ffn-embed-dim", s["ffn"], "--decoder-ffn-embed-dim", s["ffn"],
            "--encoder-attention-heads", s["heads"], "--decoder-attention-heads", s["heads"],
            "--dropout", recipe.regularization(6)["dropout"], *recipe.optimizer_argv(),
            "--max-tokens", max_tokens, "--seed", seed, "--distributed-world-size", "1",
            "--no-progress-bar", "--save-dir", save_dir or os.path.join(data_dir, "checkpoints")]
    if not variant.startswith("stock_"):
        argv += ["--word-dropout-src", "0", "--word-dropout-tgt", "0"]
    argv += ["--cpu"] if device == "cpu" else (["--fp16"] if dtype == "fp16" else [])
    if dtype == "bf16":
        argv += ["--b2t-bf16"]  # fairseq's own --bf16 implies --tpu (see fast.py)
    return translate_argv([str(a) for a in argv])  # --b2t-fast: --optimizer b2t_adam, as b2t-train does


def lm_argv(variant, data_dir, size, layers, max_tokens, device, tokens_per_sample, seed=1, save_dir=None):
    """The fairseq-train command line of one LM variant: the LM recipe's optimizer, shared embeddings."""
    s = SIZES[size] if isinstance(size, str) else size
    argv = [data_dir, "--task", "language_modeling", "--tokens-per-sample", tokens_per_sample,
            "--sample-break-mode", "none", "--user-dir", PLUGIN_DIR, *LM_VARIANTS[variant],
            "--decoder-layers", layers, "--decoder-embed-dim", s["dim"], "--decoder-ffn-embed-dim", s["ffn"],
            "--decoder-attention-heads", s["heads"], *recipe.flags_to_argv(recipe.LM_OPTIMIZATION),
            # `--arch transformer_lm` (fairseq's dataclass defaults) keeps 512-wide input/output embeddings
            # whatever --decoder-embed-dim says, and projects: name the width so every variant has one
            "--decoder-input-dim", s["dim"], "--decoder-output-dim", s["dim"],
            "--max-tokens", max_tokens, "--seed", seed, "--distributed-world-size", "1",
            "--no-progress-bar", "--save-dir", save_dir or os.path.join(data_dir, "checkpoints")]
    argv += ["--cpu"] if device == "cpu" else ["--fp16"]
    return [str(a) for a in argv]


def build_trainer(argv):
    """cfg, task, model, criterion and Trainer as fairseq_cli/train.py builds them."""
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, input_args=argv)
    cfg = convert_namespace_to_omegaconf(args)
    utils.import_user_module(cfg.common)
    np.random.seed(cfg.common.seed)
    utils.set_torch_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    trainer.begin_epoch(1)
    return trainer


# ---------------------------------------------------------------------------------------------
# synthetic batches


def sentence_lengths(n, rng):
    src = np.clip(np.round(rng.lognormal(math.log(LEN_MEDIAN), LEN_SIGMA, n)), 2, LEN_MAX).astype(np.int64)
    tgt = np.clip(np.round(src * rng.lognormal(math.log(TGT_RATIO), 0.15, n)), 2, LEN_MAX).astype(np.int64)
    return src, tgt


def make_batches(dictionary, max_tokens, n_batches, seed=1):
    """`n_batches` fairseq-style batches (fixed for a seed): bucketed lengths, padding, random ids."""
    from fairseq.data import data_utils

    rng = np.random.RandomState(seed)
    n = max(4000, 200 * max_tokens // int(LEN_MEDIAN))
    src, tgt = sentence_lengths(n, rng)
    order = rng.permutation(n).astype(np.int64)  # as LanguagePairDataset.ordered_indices
    order = order[np.argsort(tgt[order], kind="mergesort")]
    order = order[np.argsort(src[order], kind="mergesort")]
    sizes = np.maximum(src, tgt)
    order = order[sizes[order] <= max_tokens]  # a corpus for this --max-tokens holds no longer sentence
    if len(order) < n // 2:
        raise BenchError(f"--max-tokens {max_tokens} is shorter than most sentences; use at least {LEN_MAX}")
    batches = data_utils.batch_by_size(order, lambda i: sizes[i], num_tokens_vec=sizes[order],
                                       max_tokens=max_tokens, required_batch_size_multiple=8)
    picked = rng.choice(len(batches), size=min(n_batches, len(batches)), replace=False)
    return [collate(dictionary, src[batches[i]], tgt[batches[i]], rng) for i in picked]


def collate(d, src_lens, tgt_lens, rng):
    """One sample dict, as LanguagePairDataset's collater returns it."""
    from fairseq.data import data_utils

    def sent(n):
        return torch.from_numpy(np.append(rng.randint(d.nspecial, len(d), n - 1), d.eos()).astype(np.int64))

    src = [sent(n) for n in src_lens]
    tgt = [sent(n) for n in tgt_lens]
    return {
        "id": torch.arange(len(src)),
        "nsentences": len(src),
        "ntokens": int(sum(tgt_lens)),
        "net_input": {
            "src_tokens": data_utils.collate_tokens(src, d.pad(), d.eos(), left_pad=True),
            "src_lengths": torch.tensor(src_lens, dtype=torch.long),
            "prev_output_tokens": data_utils.collate_tokens(tgt, d.pad(), d.eos(), move_eos_to_beginning=True),
        },
        "target": data_utils.collate_tokens(tgt, d.pad(), d.eos()),
    }


def make_lm_batches(dictionary, max_tokens, tokens_per_sample, n_batches, seed=1):
    """`n_batches` language-model batches as fairseq's language_modeling task makes them: a stream of
    WMT-length sentences (each ending in eos) cut into --tokens-per-sample blocks by TokenBlockDataset,
    collated by MonolingualDataset (input = the block shifted right, target = the next tokens)."""
    from fairseq.data import MonolingualDataset, TokenBlockDataset

    if max_tokens < tokens_per_sample:
        raise BenchError(f"--max-tokens {max_tokens} holds no block of --tokens-per-sample {tokens_per_sample}; "
                         "use --max-tokens at least --tokens-per-sample")
    rng = np.random.RandomState(seed)
    bsz = max_tokens // tokens_per_sample  # the task's batch size under --max-tokens, as batch_by_size makes it
    lens, total = [], 0
    while total < (bsz * n_batches + 1) * tokens_per_sample:
        n = int(np.clip(np.round(rng.lognormal(math.log(LEN_MEDIAN), LEN_SIGMA)), 2, LEN_MAX))
        lens.append(n)
        total += n
    sents = [torch.from_numpy(np.append(rng.randint(dictionary.nspecial, len(dictionary), n - 1),
                                        dictionary.eos()).astype(np.int64)) for n in lens]
    blocks = TokenBlockDataset(sents, np.array(lens), tokens_per_sample, pad=dictionary.pad(),
                               eos=dictionary.eos(), break_mode="none", include_targets=True)
    data = MonolingualDataset(blocks, blocks.sizes, dictionary, dictionary, add_eos_for_other_targets=True,
                              shuffle=False, targets=["future"], add_bos_token=False)
    full = [i for i in range(len(data)) if blocks.sizes[i] == tokens_per_sample]  # the last block may be short
    return [data.collater([data[i] for i in full[b * bsz:(b + 1) * bsz]]) for b in range(n_batches)]


# ---------------------------------------------------------------------------------------------
# one configuration: all variants at one depth and max-tokens, interleaved


def bench_config(variants, size, layers, max_tokens, opts, device, dtype, workdir):
    from fairseq.data import Dictionary

    lm = opts.task == "lm"
    dictionary = Dictionary.load(os.path.join(workdir, dictionary_file(opts.task)))
    if lm:
        batches = make_lm_batches(dictionary, max_tokens, opts.tokens_per_sample, opts.batches, seed=opts.seed)
    else:
        batches = make_batches(dictionary, max_tokens, opts.batches, seed=opts.seed)
    ntokens = sum(b["ntokens"] for b in batches)
    trainers, peak_mem, saved = {}, {}, {}
    for v in variants:
        if lm:
            argv = lm_argv(v, workdir, size, layers, max_tokens, device, opts.tokens_per_sample, opts.seed)
        else:
            argv = fairseq_argv(v, workdir, size, layers, max_tokens, device, dtype, opts.seed)
        trainers[v], peak_mem[v] = build_and_measure_memory(lambda: build_trainer(argv), batches, device, workdir)
        saved[v] = saved_activation_bytes(trainers[v], max(batches, key=lambda b: b["target"].numel()))
    for v in variants:
        for _ in range(opts.warmup):
            run_updates(trainers[v], batches, device)
    seconds = {v: [] for v in variants}
    cpu_seconds = {v: [] for v in variants}
    for t in trainers.values():
        t.b2t_bench_skipped = 0
    for r in range(opts.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the start
            wall, cpu = run_updates(trainers[v], batches, device, cpu_time=True)
            seconds[v].append(wall)
            cpu_seconds[v].append(cpu)
        log(f"  {layers}L max-tokens {max_tokens}: round {r + 1}/{opts.rounds} done")
    profile = None
    if opts.profile and BASELINE in trainers and (layers, max_tokens) == (opts.profile_layers, opts.profile_max_tokens):
        profile = profile_update(trainers[BASELINE], batches, device, dtype, workdir)
        profile.update(layers=layers, max_tokens=max_tokens, variant=BASELINE)
    params = {v: sum(p.numel() for p in trainers[v].model.parameters()) for v in variants}
    skipped = {v: trainers[v].b2t_bench_skipped for v in variants}
    if any(skipped.values()):
        log(f"  warning: fairseq skipped timed updates (fp16 overflow or out of memory): {skipped}")
    del trainers
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    recs = records(variants, layers, max_tokens, ntokens, len(batches), seconds, peak_mem, saved, params)
    for r in recs:
        r["skipped_updates"] = skipped[r["variant"]]
    if device == "cpu":
        add_cpu_time(recs, ntokens, cpu_seconds)
    return recs, profile


def add_cpu_time(recs, ntokens, cpu_seconds):
    """Throughput per CPU second of this process: on a shared CPU, time spent descheduled by other
    jobs does not count (wall-clock tokens/s stays the headline field)."""
    tps = {v: [ntokens / s for s in cpu_seconds[v]] for v in cpu_seconds}
    base = BASELINE if BASELINE in tps else next(iter(tps))
    for r in recs:
        v = r["variant"]
        r["cpu_time_tokens_per_s"] = statistics.median(tps[v])
        r["cpu_time_ratio_to_stock_post_ln"] = r["cpu_time_tokens_per_s"] / statistics.median(tps[base])
        r["cpu_time_paired_ratio_median"] = statistics.median(a / b for a, b in zip(tps[v], tps[base]))
        r["cpu_time_tokens_per_s_rounds"] = tps[v]


def records(variants, layers, max_tokens, ntokens, n_batches, seconds, peak_mem, saved, params):
    tps = {v: [ntokens / s for s in seconds[v]] for v in variants}
    base = BASELINE if BASELINE in variants else variants[0]
    out = []
    for v in variants:
        med = statistics.median(tps[v])
        paired = [a / b for a, b in zip(tps[v], tps[base])]
        out.append({
            "variant": v, "layers": layers, "max_tokens": max_tokens,
            "tokens_per_s": med,
            "ratio_to_stock_post_ln": med / statistics.median(tps[base]),
            "paired_ratio_median": statistics.median(paired),
            "paired_ratio_min": min(paired), "paired_ratio_max": max(paired),
            "tokens_per_s_rounds": tps[v],
            "ms_per_update": 1000 * statistics.median(seconds[v]) / n_batches,
            "peak_mem_bytes": int(peak_mem[v]),
            "mem_ratio_to_stock_post_ln": peak_mem[v] / peak_mem[base],
            "saved_activation_bytes": int(saved[v]),
            "saved_activation_ratio_to_stock_post_ln": saved[v] / saved[base],
            "parameters": params[v],
            "target_tokens_per_round": ntokens, "updates_per_round": n_batches,
        })
    return out


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch-size", choices=("cpu", "paper"), default=None,
                   help="model sizes: cpu = 128/512/4 heads, 4k vocab (default on CPU); "
                        "paper = transformer_wmt_en_de 512/2048/8 heads, 32k vocab (default on CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few updates: proves it runs (CI)")
    p.add_argument("--layers", type=int, nargs="+", help="encoder = decoder depths (default 6 18)")
    p.add_argument("--max-tokens", type=int, nargs="+", help="fairseq --max-tokens per batch (one run each)")
    p.add_argument("--task", choices=("translation", "lm"), default="translation",
                   help="translation: stock transformer vs transformer_b2t (default); lm: stock transformer_lm "
                        "vs the plugin's transformer_lm_<type>")
    p.add_argument("--variants", nargs="+", choices=list(dict.fromkeys([*VARIANTS, *LM_VARIANTS])),
                   help="default: every variant of --task")
    p.add_argument("--tokens-per-sample", type=int,
                   help=f"--task lm: tokens per block (default {recipe.LM_TOKENS_PER_SAMPLE} at the paper size)")
    p.add_argument("--rounds", type=int, help="timed rounds (all variants, interleaved, per round)")
    p.add_argument("--warmup", type=int, help="untimed rounds per variant before timing")
    p.add_argument("--batches", type=int, help="updates (different batches) per round and variant")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="fp16 = fairseq --fp16 (CUDA only); bf16 = --b2t-bf16 autocast (plugin and fast "
                        "variants only); auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--profile", metavar="PATH",
                   help="also profile one stock Post-LN update and write its JSON")
    p.add_argument("--profile-layers", type=int, help="depth of the profiled update (default: the first --layers)")
    p.add_argument("--profile-max-tokens", type=int,
                   help="--max-tokens of the profiled update (default: the first --max-tokens)")
    return p.parse_args(argv)


def settle(opts):
    """Resolve device, dtype, sizes and defaults; refuse impossible combinations."""
    cuda = torch.cuda.is_available()
    if opts.device == "cuda" and not cuda:
        raise BenchError("--device cuda: no CUDA device is visible; drop --device or run on a GPU machine")
    opts.device = "cuda" if opts.device == "auto" and cuda else ("cpu" if opts.device == "auto" else opts.device)
    if opts.dtype == "auto":
        opts.dtype = "fp16" if opts.device == "cuda" else "fp32"
    if opts.dtype == "fp16" and opts.device == "cpu":
        raise BenchError("--dtype fp16 needs CUDA (fairseq --fp16 does not run on CPU); use --dtype fp32")
    table = TASKS[opts.task]
    opts.variants = opts.variants or list(table)
    unknown = [v for v in opts.variants if v not in table]
    if unknown:
        raise BenchError(f"--variants {' '.join(unknown)}: not a variant of --task {opts.task}; "
                         f"choose from {', '.join(table)}")
    if opts.task == "lm" and opts.dtype == "bf16":
        raise BenchError("--task lm --dtype bf16: the LM variants run fp16 on CUDA and fp32 on CPU; drop --dtype")
    if opts.task != "lm" and opts.tokens_per_sample is not None:
        raise BenchError("--tokens-per-sample is for --task lm; drop it or add --task lm")
    if opts.dtype == "bf16" and any(v.startswith("stock_") for v in opts.variants):
        raise BenchError("--dtype bf16: stock fairseq has no bf16 on GPUs (its --bf16 implies --tpu); "
                         "choose plugin_* and fast_* variants with --variants")
    opts.size = "quick" if opts.quick else (opts.arch_size or ("paper" if opts.device == "cuda" else "cpu"))
    defaults = DEFAULTS[opts.size] | (LM_DEFAULTS[opts.size] if opts.task == "lm" else {})
    for key, value in defaults.items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    if opts.task == "lm" and (opts.tokens_per_sample < 1 or min(opts.max_tokens) < opts.tokens_per_sample):
        raise BenchError(f"--task lm: --max-tokens must hold at least one block of --tokens-per-sample "
                         f"{opts.tokens_per_sample}; raise --max-tokens or lower --tokens-per-sample")
    for key in ("rounds", "batches"):
        if getattr(opts, key) < 1:
            raise BenchError(f"--{key} must be at least 1")
    if opts.warmup < 0 or min(opts.layers) < 1 or min(opts.max_tokens) < 1:
        raise BenchError("--warmup, --layers and --max-tokens must be positive")
    if len(set(opts.variants)) != len(opts.variants):
        raise BenchError("--variants lists a variant twice; name each once")
    opts.profile_layers = opts.profile_layers or opts.layers[0]
    opts.profile_max_tokens = opts.profile_max_tokens or opts.max_tokens[0]
    if opts.profile and (opts.profile_layers not in opts.layers or opts.profile_max_tokens not in opts.max_tokens):
        raise BenchError("--profile-layers/--profile-max-tokens must be among --layers/--max-tokens")
    if opts.profile and BASELINE not in opts.variants:
        raise BenchError(f"--profile profiles {BASELINE}: add it to --variants")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    return opts


def print_table(recs, device_desc):
    print(f"\n{PROG}: {device_desc}")
    head = f"{'layers':>6} {'max_tok':>7} {'variant':<15} {'tokens/s':>10} {'ratio':>6} {'paired':>6} " \
           f"{'cpu-t':>6} {'ms/upd':>8} {'peak MiB':>9} {'mem':>6} {'saved MiB':>9} {'saved':>6}"
    print(head)
    for r in recs:
        cpu = r.get("cpu_time_ratio_to_stock_post_ln")
        print(f"{r['layers']:>6} {r['max_tokens']:>7} {r['variant']:<15} {r['tokens_per_s']:>10.0f} "
              f"{r['ratio_to_stock_post_ln']:>6.3f} {r['paired_ratio_median']:>6.3f} "
              f"{'%6.3f' % cpu if cpu else '     -'} {r['ms_per_update']:>8.1f} "
              f"{r['peak_mem_bytes'] / 2**20:>9.1f} {r['mem_ratio_to_stock_post_ln']:>6.3f} "
              f"{r['saved_activation_bytes'] / 2**20:>9.1f} {r['saved_activation_ratio_to_stock_post_ln']:>6.3f}")
    print("ratio: median tokens/s over rounds vs stock_post_ln; paired: median of per-round ratios; "
          "cpu-t: the same per CPU second of this process (CPU only)")
    by = {(r["layers"], r["max_tokens"], r["variant"]): r for r in recs}
    for (layers, max_tokens, v), r in by.items():
        plain = by.get((layers, max_tokens, v.replace("fast_", "plugin_")))
        if v.startswith("fast_") and plain:
            print(f"fast path {layers}L max-tokens {max_tokens}: {v} {r['tokens_per_s']:.0f} tokens/s, "
                  f"{r['tokens_per_s'] / plain['tokens_per_s']:.3f}x {plain['variant']}, "
                  f"{r['ratio_to_stock_post_ln']:.3f}x {BASELINE if BASELINE in opts_variants(recs) else 'the first variant'}")
    for r in recs:
        if r["variant"] == "plugin_b2t" and BASELINE in {x["variant"] for x in recs}:
            ok_t = r["ratio_to_stock_post_ln"] >= 0.99
            ok_m = r["mem_ratio_to_stock_post_ln"] <= 1.01
            cpu = r.get("cpu_time_ratio_to_stock_post_ln")
            print(f"target {r['layers']}L max-tokens {r['max_tokens']}: B2T throughput "
                  f"{r['ratio_to_stock_post_ln']:.3f}x (>= 0.99: {'met' if ok_t else 'MISSED'}"
                  f"{', per CPU second %.3fx' % cpu if cpu else ''}), "
                  f"peak memory {r['mem_ratio_to_stock_post_ln']:.3f}x (<= 1.01: {'met' if ok_m else 'MISSED'})")


def opts_variants(recs):
    return {r["variant"] for r in recs}


def quiet():
    """fairseq's info logs and torch's deprecation warnings would bury the table."""
    import warnings

    for name in ("fairseq", "hydra"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask and attn_mask.*")


def run(opts):
    quiet()
    info = machine()
    desc = f"{info.get('gpu', info['cpu'])}, {opts.device} {opts.dtype}, {info['threads']} threads, " \
           f"sizes {opts.size} {SIZES[opts.size]}, task {opts.task}"
    log(f"{PROG}: {desc}")
    recs, profile = [], None
    with tempfile.TemporaryDirectory(prefix="b2t-bench-") as workdir:
        write_dictionary(workdir, SIZES[opts.size]["vocab"], opts.task)
        for max_tokens in opts.max_tokens:
            for layers in opts.layers:
                new, prof = bench_config(opts.variants, opts.size, layers, max_tokens, opts, opts.device,
                                         opts.dtype, workdir)
                for r in new:
                    r.update(task=opts.task, device=opts.device, dtype=opts.dtype, size=opts.size,
                             **SIZES[opts.size],
                             rounds=opts.rounds, warmup_rounds=opts.warmup,
                             mem_measure="cuda_max_memory_allocated" if opts.device == "cuda"
                             else "cpu_live_tensor_bytes_peak", machine=info)
                recs += new
                if opts.json:  # after every configuration, so a run cut short keeps what it measured
                    write_json(opts.json, recs)
                if prof:
                    profile = dict(prof, machine=info)
                    write_json(opts.profile, profile)
    print_table(recs, desc)
    if profile:
        print_profile(profile)
    return recs, profile


def print_profile(p):
    frac = p["achieved_fraction_of_matmul_peak"]
    print(f"\nprofile: one {p['variant']} update, {p['layers']}L, {p['target_tokens']} target tokens, "
          f"{p['device']} {p['dtype']}: {p['update_ms_unprofiled']:.1f} ms unprofiled; "
          f"{p['busy_what']} {p['busy_ms']:.1f} ms of a {p['window_ms']:.1f} ms window "
          f"({100 * p['busy_fraction']:.0f}% busy, {p['gap_ms']:.1f} ms gaps); "
          f"achieved {'%.1f%%' % (100 * frac) if frac is not None else 'n/a'} of the measured "
          f"{p['matmul_peak_flops_per_s'] / 1e12:.2f} TFLOP/s matmul peak")
    for t in p["top"][:5]:
        print(f"  {t['ms']:8.2f} ms {t['calls']:5d}x  {t['name'][:90]}")


def main(argv=None):
    return run_command(PROG, lambda a: run(settle(parse_args(a))), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
