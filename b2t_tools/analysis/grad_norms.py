"""``b2t-grad-norms``: per-layer gradient norms of Post-LN, Pre-LN, B2T, DeepNorm and Admin transformers.

For each model (an architecture at fresh initialization, or a trained checkpoint) it runs
forward and backward on K real batches in fp32 and records, for the encoder and the decoder:

- per layer: the norm of the gradient of all the layer's parameters;
- per sub-layer: self-attention, its LayerNorm, cross-attention, its LayerNorm, FFN, its LayerNorm
  (Admin's omega vectors count in the layer's norm, under "other");
- the points the paper analyses inside a Post-LN layer: the gradient with respect to the input
  of each LayerNorm (the residual sum before it) and its output, taken with hooks on the
  layer's LayerNorm modules (the layer classes are not changed).

The loss is fairseq's criterion divided by its sample size (what the trainer backpropagates);
dropout is off (eval mode) so the numbers depend only on the weights and the batches. Each
number is the mean over the K batches of the per-batch norm. Layers are listed lowest first.

    b2t-grad-norms DATA-BIN --layers 18 --json gn.json --csv gn.csv --png gn.png
    b2t-grad-norms DATA-BIN --checkpoint b2t=runs/b2t-18L/checkpoint_last.pt --json gn.json
    b2t-grad-norms DATA-BIN --arch post_ln --arch pre_ln --arch b2t --arch deepnorm --arch admin --layers 18 --png five.png

The default is the paper's three; DeepNorm and Admin are asked for by name.
"""

import argparse
import math
import os
import sys
from pathlib import Path

from b2t_fairseq import layer_types
from b2t_fairseq.errors import B2TError

from ..checkpoints import read_checkpoint
from ..commands import run_command
from ..errors import ToolError
from ..util import check_writable, write_json
from .grad_norms_output import LN_POINTS, default_title, label, plot, write_csv  # noqa: F401  (label: the API)

DEFAULT_ARCHS = layer_types.PAPER_SHORTS
SUBLAYERS = {  # parameter-name prefix inside a layer -> sub-layer name
    "self_attn_layer_norm": "self_attn_ln", "self_attn": "self_attn",
    "encoder_attn_layer_norm": "cross_attn_ln", "encoder_attn": "cross_attn",
    "fc1": "ffn", "fc2": "ffn", "final_layer_norm": "ffn_ln",
}
LN_MODULES = dict(zip(("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"), LN_POINTS))


def set_threads():
    """Use the machine's cores unless OMP_NUM_THREADS says otherwise."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(os.cpu_count() or 1, 8)))


def _is_lm_data(data):
    """A language-model data-bin (fairseq-preprocess --only-source: dict.txt) rather than a translation one."""
    return (Path(data) / "dict.txt").is_file() and not (Path(data) / "dict.en.txt").is_file()


def _check_data(data):
    if not (Path(data) / "dict.en.txt").is_file() and not _is_lm_data(data):
        raise ToolError(f"{data} is not a fairseq data-bin folder (no dict.en.txt); pass the folder "
                       "fairseq-preprocess wrote (b2t-demo keeps it under its cache folder, in bin/)")


def build_fresh(data, arch, layers=None, model_args=(), seed=1, max_tokens=2048):
    """(task, model, criterion) for --arch at fresh initialization, parsed as b2t-train would."""
    import torch
    from fairseq import options, tasks


    if _is_lm_data(data):  # a decoder-only model (transformer_lm_*): fairseq's language modelling task
        from fairseq.dataclass.utils import convert_namespace_to_omegaconf

        argv = [str(data), "--task", "language_modeling", "--arch", arch, "--cpu", "--seed", str(seed),
                "--criterion", "cross_entropy", "--tokens-per-sample", str(min(512, max_tokens))]
        argv += ["--decoder-layers", str(layers)] if layers else []  # blocks fit in a batch of max_tokens
        args = options.parse_args_and_arch(options.get_training_parser(), argv + list(model_args))
        cfg = convert_namespace_to_omegaconf(args)  # as fairseq-train: transformer_lm is a dataclass model
        torch.manual_seed(seed)
        task = tasks.setup_task(cfg.task)
        return task, task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    argv = [str(data), "--arch", arch, "--share-all-embeddings", "--cpu", "--seed", str(seed),
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--source-lang", "en", "--target-lang", "de"]
    if layers:
        argv += ["--encoder-layers", str(layers), "--decoder-layers", str(layers)]
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, argv + list(model_args))
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    return task, task.build_model(args), task.build_criterion(args)


def load_checkpoint(path, data):
    """(task, model, criterion) from a checkpoint trained with the plugin, reading batches from data."""
    from fairseq import checkpoint_utils


    if Path(path).is_dir():
        raise ToolError(f"checkpoint {path} is a folder; pass a checkpoint_*.pt file written by b2t-train")
    if not Path(path).is_file():
        raise ToolError(f"checkpoint {path} does not exist; pass a checkpoint_*.pt written by b2t-train")
    # one line for an empty, truncated, corrupt or foreign file
    read_checkpoint(str(path), "pass another checkpoint written by b2t-train", flag="checkpoint", mmap=True)
    try:
        # use_plasma_view off: converting an old checkpoint's args (the authors' fork LMs) turns its missing
        # "${common.use_plasma_view}" into True, and fairseq's plasma view needs pyarrow
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data), "use_plasma_view": False})
    except (ToolError, B2TError, SystemExit, KeyboardInterrupt):
        raise
    except Exception as e:  # a state dict without fairseq's configuration, a model this fairseq cannot build ...
        raise ToolError(f"cannot build a model from checkpoint {path} ({type(e).__name__}: "
                        f"{str(e).strip()[:160]}); pass a checkpoint written by b2t-train or fairseq-train") from None
    return task, models[0], task.build_criterion(cfg.criterion)


def batches(task, split, k, max_tokens, seed=1):
    """K shuffled batches of split (the same ones for every model with the same data and seed)."""
    task.load_dataset(split)
    ds = task.dataset(split)
    it = task.get_batch_iterator(ds, max_tokens=max_tokens, seed=seed, ignore_invalid_inputs=True)
    out = []
    for b in it.next_epoch_itr(shuffle=True):
        out.append(b)
        if len(out) == k:
            break
    if not out:
        raise ToolError(f"no batches in split '{split}' of {task.cfg.data}; pick another --split")
    return out


def _layer_groups(stack):
    """{layer index: {sub-layer: [params]}} for one stack."""
    groups = []
    for layer in stack.layers:
        subs = {}
        for name, p in layer.named_parameters():
            key = next((v for k, v in SUBLAYERS.items() if name.startswith(k + ".")), "other")
            subs.setdefault(key, []).append(p)
        groups.append(subs)
    return groups


def _norm(tensors):
    sq = sum(float(t.detach().double().pow(2).sum()) for t in tensors if t is not None)
    return math.sqrt(sq) if math.isfinite(sq) else float("nan")


def _ln_hooks(stack, side, store):
    """Forward hooks on each layer's LayerNorms recording the gradient norm of their input and output."""
    handles = []
    for i, layer in enumerate(stack.layers):
        for attr, short in LN_MODULES.items():
            mod = getattr(layer, attr, None)
            if mod is None:
                continue

            def hook(module, inputs, output, key=(side, i, short)):
                for where, t in (("in", inputs[0]), ("out", output)):
                    if t.requires_grad:
                        t.register_hook(lambda g, k=key + (where,): store.setdefault(k, []).append(_norm([g])))

            handles.append(mod.register_forward_hook(hook))
    return handles


def measure(model, criterion, batch_list):
    """Gradient norms of one model over the batches (see the module docstring)."""
    model.eval()  # dropout off; gradients still flow
    stacks = {side: getattr(model, side) for side in ("encoder", "decoder") if getattr(model, side, None) is not None}
    groups = {side: _layer_groups(stack) for side, stack in stacks.items()}
    per_batch = {side: [] for side in stacks}
    points = {}
    handles = [h for side, stack in stacks.items() for h in _ln_hooks(stack, side, points)]
    try:
        for batch in batch_list:
            model.zero_grad(set_to_none=True)
            loss, sample_size, _ = criterion(model, batch)
            (loss / max(float(sample_size), 1.0)).backward()
            for side in stacks:
                per_batch[side].append([{k: _norm([p.grad for p in ps]) for k, ps in subs.items()} |
                                        {"layer": _norm([p.grad for ps in subs.values() for p in ps])}
                                        for subs in groups[side]])
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    out = {}
    for side in stacks:
        n_layers = len(groups[side])
        subs = [{k: _mean(b[i][k] for b in per_batch[side]) for k in per_batch[side][0][i]} for i in range(n_layers)]
        out[side] = [s.pop("layer") for s in subs]
        out[f"{side}_sublayers"] = subs
        out[f"{side}_ln_points"] = [
            {f"{short}.{where}": _mean(points[(side, i, short, where)])
             for short in LN_MODULES.values() for where in ("in", "out") if (side, i, short, where) in points}
            for i in range(n_layers)]
    return out


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_models(data, specs, *, layers=None, model_args=(), k=4, max_tokens=2048, split="train", seed=1, log=print):
    """specs: [(name, arch or None, checkpoint or None)] -> {name: results}."""
    _check_data(data)
    import logging

    for name in ("fairseq", "hydra"):  # keep the progress lines readable (hydra: the LM models' config)
        logging.getLogger(name).setLevel(logging.WARNING)
    results = {}
    for name, arch, ckpt in specs:
        log(f"grad-norms: {name} ({ckpt or arch + ', fresh init'}) on {k} batches of {split}")
        if ckpt:
            task, model, crit = load_checkpoint(ckpt, data)
        else:
            task, model, crit = build_fresh(data, arch, layers, model_args, seed, max_tokens)
        model = model.float()
        # the label is the layer type of the model built, never the --arch word: --model-args may change it
        kind = layer_types.of_model(model)
        if not ckpt and kind is not None:
            name = layer_types.BY_KEY[kind].short
        if name in results:
            raise ToolError(f"two models would both be reported as '{name}' ({results[name]['source']}: "
                            f"{results[name]['arch']} and {ckpt or arch}); give each --checkpoint its own NAME=, "
                            "and note that --model-args applies to every --arch (--ln-position there makes them "
                            "all one layer type)")
        res = measure(model, crit, batches(task, split, k, max_tokens, seed))
        cfg = getattr(model, "cfg", None)  # a translation model's config; fairseq's LMs keep none
        res.update({"source": str(ckpt) if ckpt else "fresh init", "arch": arch or getattr(cfg, "arch", None),
                    "ln_position": getattr(cfg, "ln_position", None) if cfg is not None else kind,
                    "layer_type": kind, "label": layer_types.BY_KEY[kind].label if kind else "mixed layer types",
                    "layers": {side: len(getattr(model, side).layers) for side in ("encoder", "decoder")
                               if getattr(model, side, None) is not None},
                    "batches": k, "split": split})
        results[name] = res
    return results


def bottom_top_ratio(norms, n=3):
    """mean of the lowest n layers' norms / mean of the top n layers' norms."""
    return _mean(norms[:n]) / _mean(norms[-n:])


def parse_specs(args):
    specs, given = [], []
    for c in args.checkpoint or []:
        name, _, path = c.rpartition("=")
        if name and name in given:
            raise ToolError(f"--checkpoint {c}: the name '{name}' is given twice; give each checkpoint its own NAME=")
        given.append(name)
        specs.append((name, None, path))
    # a checkpoint without NAME= is named by its folder, and by folder/file where a folder gives more than one
    folders = [Path(p).parent.name for n, _, p in specs if not n]
    specs = [(n or (Path(p).parent.name if folders.count(Path(p).parent.name) == 1 else
                    f"{Path(p).parent.name}/{Path(p).stem}"), a, p) for n, a, p in specs]
    if not specs or args.arch:
        for a in args.arch or DEFAULT_ARCHS:
            family = "transformer_lm_" if _is_lm_data(args.data) else "transformer_"  # decoder-only data: an LM
            arch = a if a.startswith("transformer") else f"{family}{a}_{args.size}"
            name = a if not a.startswith("transformer") else a
            specs.append((name, arch, None))
    return specs


def get_parser():
    p = argparse.ArgumentParser(prog="b2t-grad-norms", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="fairseq data-bin folder with a joined dictionary (e.g. b2t-demo's cache .../bin)")
    p.add_argument("--arch", action="append", metavar="ARCH",
                   help=f"{', '.join(layer_types.SHORTS)} (-> transformer_<x>_<size>) or a full --arch name; "
                        "repeatable (default: the paper's three, post_ln, pre_ln and b2t, unless only "
                        "--checkpoint is given)")
    p.add_argument("--size", default="tiny", choices=("tiny", "18l", "base"),
                   help="architecture family for the short names: tiny (width 64) or the paper's sizes")
    p.add_argument("--checkpoint", action="append", metavar="[NAME=]PATH", help="a trained checkpoint; repeatable")
    p.add_argument("--layers", type=int, help="encoder and decoder layers for fresh models (default: the arch's)")
    p.add_argument("--model-args", default="", help="extra fairseq model flags for fresh models, one string, "
                                                    "e.g. '--encoder-embed-dim 128 --decoder-embed-dim 128'")
    p.add_argument("--batches", type=int, default=4, metavar="K", help="batches to average over (default 4)")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="PATH", help="write {model: {encoder: [...], decoder: [...], ...}}")
    p.add_argument("--csv", metavar="PATH")
    p.add_argument("--png", metavar="PATH")
    p.add_argument("--title", help="title of the --png figure (default: the source and depth)")
    return p


MAX_TOKENS = 2**31 - 1
MAX_LAYERS = 1000  # DeepNorm's deepest model has 1000 layers in all; more would only exhaust the memory


def check_args(args):
    """Impossible numbers and output places, before any model is built (measuring takes minutes)."""
    for flag, v, most in (("--batches", args.batches, None), ("--max-tokens", args.max_tokens, MAX_TOKENS),
                          ("--layers", args.layers, MAX_LAYERS)):
        if v is not None and v < 1:
            raise ToolError(f"{flag} {v} is not a positive number; pass 1 or more (see --help for the default)")
        if v is not None and most is not None and v > most:
            raise ToolError(f"{flag} {v} is more than a model or batch here can hold; pass at most {most}")
    outs = [(f, p) for f, p in (("--json", args.json), ("--csv", args.csv), ("--png", args.png)) if p]
    if not outs:
        raise ToolError("nothing to write; pass --json PATH, --csv PATH and/or --png PATH")
    _check_data(args.data)
    data = Path(args.data).resolve()
    inputs = {Path(c.rpartition("=")[2]).resolve() for c in args.checkpoint or []}
    seen = {}
    for flag, p in outs:
        r = Path(p).resolve()
        if r in seen:
            raise ToolError(f"{flag} and {seen[r]} are both {p}; one would overwrite the other: give each its own path")
        seen[r] = flag
        if r in inputs or data == r or data in r.parents:
            raise ToolError(f"{flag} {p} is {'a --checkpoint' if r in inputs else 'inside the data folder'}; it "
                            "would be overwritten: choose a path outside the inputs")
        check_writable(p, flag)


def run(argv):
    args = get_parser().parse_args(argv)
    if args.size == "base":
        args.size = ""
    check_args(args)
    set_threads()
    specs = [(n, a.rstrip("_") if a else a, c) for n, a, c in parse_specs(args)]
    results = run_models(args.data, specs, layers=args.layers, model_args=args.model_args.split(),
                         k=args.batches, max_tokens=args.max_tokens, split=args.split, seed=args.seed,
                         log=lambda m: print(m, file=sys.stderr))
    if args.json:
        write_json(args.json, results)
    if args.csv:
        write_csv(results, args.csv)
    if args.png:
        plot(results, args.png, args.title or default_title(results))
    for name, res in results.items():
        enc = f", encoder {bottom_top_ratio(res['encoder']):.3g}" if "encoder" in res else ""  # none in an LM
        print(f"{name}: decoder lowest/top-3 grad-norm ratio {bottom_top_ratio(res['decoder']):.3g}{enc}")


def main(argv=None):
    return run_command("b2t-grad-norms", run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
