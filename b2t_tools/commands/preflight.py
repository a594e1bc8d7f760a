"""Checks b2t-train, b2t-generate, b2t-validate and b2t-interactive make before fairseq starts, on
the arguments as fairseq's own parser read them (``cli.parse_args``; cheap: values, paths, file
headers, no model): a finished run, and bad values fairseq would take for a traceback or worse.

``finished_run(args)``: fairseq-train re-run on a run that reached --max-update trains ONE MORE update
(its loop checks the limit only after a step) and overwrites checkpoint_last.pt with it. That is a
fairseq bug for our users: a finished run must stay finished. b2t-train reads the checkpoint it would
resume from (its pickled header only, memory-mapped: no weights are read) and, if the run is finished,
says so in one line and exits 0 without starting fairseq.

``check_resume(args)``: the checkpoint b2t-train would resume from must be of the run the command
describes: the same layer type (a Post-LN checkpoint would otherwise train on as B2T, since the
load-time guard lets Post-LN weights start any type for fine-tuning) and the same data. Fine-tuning
from another type is asked for with a --reset-* flag. It runs before ``finished_run``, so "the run is
finished" never answers a folder of another run.

Both are b2t_fairseq.run_guards' functions, which the plugin runs again for every training entry point
where fairseq resumes (patches/run_guards.py); here they answer before fairseq builds a model.
``check_checkpoint_task``: a decoding command's --path checkpoints must be of its task's kind.
``check_resume_setup(args)``: the same --lr-scheduler and (Admin) --admin-omega as the checkpoint,
which fairseq cannot load otherwise. The checks of the setup that need no checkpoint of the run (task
and model kinds, blocks, dictionaries, --bf16) are in preflight_setup.py.
"""

import os

from b2t_fairseq import layer_types, run_guards
from b2t_fairseq.patches import data_fit

from ..errors import ToolError
from . import preflight_setup as setup

RESETS = ("reset_optimizer", "reset_dataloader", "reset_meters", "reset_lr_scheduler", "finetune_from_model",
          "continue_once")


def check(args, prog):
    """All the checks on parsed arguments (ToolError for the first problem)."""
    check_flags(args, prog)
    check_paths(args, prog)
    check_devices(args, prog)
    check_model_fits(args, prog)
    check_checkpoint_task(args, prog)
    setup.check(args, prog)


def resume_path(args):
    """The checkpoint fairseq-train would resume from (it may not exist): checkpoint_utils.load_checkpoint's rule."""
    return run_guards.resume_target(args, getattr(args, "checkpoint_suffix", "") or "")[0]


def peek(path):
    """A checkpoint's dict with its tensors memory-mapped (cheap), or None if it cannot be read so."""
    return run_guards.read_header(path)


def _command_data(args):
    """What task_data would record for the command's data (translation only), or None if unknown here."""
    from fairseq.data import Dictionary
    from fairseq.data.data_utils import infer_language_pair

    data = getattr(args, "data", None)
    if getattr(args, "task", None) != "translation" or not isinstance(data, str):
        return None
    first = data.split(os.pathsep)[0]
    src, tgt = getattr(args, "source_lang", None), getattr(args, "target_lang", None)
    if (src is None or tgt is None) and os.path.isdir(first):
        src, tgt = infer_language_pair(first)
    if src is None or tgt is None:
        return None
    out = {}
    for side, lang in (("source", src), ("target", tgt)):
        path = os.path.join(first, f"dict.{lang}.txt")
        d = Dictionary.load(path) if os.path.isfile(path) else None
        out[side] = {"lang": lang, "types": len(d) if d is not None else None,
                     "md5": data_fit._dict_md5(d) if d is not None else None}
    return out


def check_resume(args):
    """Refuse resuming a checkpoint of another layer type, task or data (B2TError): run_guards.check_same_run,
    which the plugin runs again where fairseq resumes (patches/run_guards.py); here it answers before a
    model is built."""
    path, resets = run_guards.resume_target(args, getattr(args, "checkpoint_suffix", "") or "")
    state = None if resets or not path else peek(path)
    if state is None:
        return
    want = run_guards.Run(layer_types.which(args).key, getattr(args, "task", None), _command_data(args))
    run_guards.check_same_run(state, want, path)


def check_checkpoint_task(args, prog):
    """An LM checkpoint given to a translation command, or the reverse (B2TError): run_guards.check_task.
    The plugin checks it again as fairseq loads (b2t-validate takes the checkpoint's task: only here)."""
    path = getattr(args, "path", None)
    if not path or not prog.endswith(("generate", "validate", "interactive", "eval-lm")):
        return
    for p in path.split(os.pathsep):
        state = peek(p)
        if state is not None:
            run_guards.check_task(run_guards.task_of_checkpoint(state), getattr(args, "task", None),
                                  f"checkpoint {p}", doing="runs")


def check_resume_setup(args):
    """Refuse resuming with a learning-rate schedule or Admin shortcuts other than the checkpoint's (B2TError):
    run_guards.check_same_setup, which every training entry point also runs where fairseq resumes."""
    path = resume_path(args)
    state = peek(path) if os.path.isfile(path) else None
    if not isinstance(state, dict):
        return
    run_guards.check_same_setup(state, path, getattr(args, "lr_scheduler", None), getattr(args, "ln_position", None),
                                getattr(args, "admin_omega", None), getattr(args, "reset_lr_scheduler", False),
                                getattr(args, "reset_optimizer", False))


def finished_run(args):
    """The one-line note if b2t-train with these arguments would resume a finished run, else None."""
    if any(getattr(args, f, None) for f in RESETS):
        return None
    path = resume_path(args)
    return run_guards.finished(peek(path), path, getattr(args, "max_update", 0), getattr(args, "max_epoch", 0))


# --- flag values fairseq takes without complaint and then fails on (or trains wrongly with) ---------

# flag: (lowest allowed, integer?, what it is, fix)
AT_LEAST = {
    "--max-tokens": (1, True, "the most tokens in a batch on each device", "e.g. --max-tokens 4096"),
    "--max-tokens-valid": (1, True, "the most tokens in a validation batch", "e.g. --max-tokens-valid 4096"),
    "--batch-size": (1, True, "the most sentences in a batch", "e.g. --batch-size 64, or drop it and use --max-tokens"),
    "--batch-size-valid": (1, True, "the most sentences in a validation batch", "e.g. --batch-size-valid 64"),
    "--required-batch-size-multiple": (1, True, "the number every batch's sentence count is a multiple of", "the default is 8; "
                                       "1 for none"),
    "--required-seq-len-multiple": (1, True, "the number every batch's length is padded to a multiple of", "the default is 1"),
    "--update-freq": (1, True, "batches accumulated per update", "1 accumulates none; the paper trains on 8 GPUs "
                      "with --update-freq 16"),
    "--encoder-layers": (1, True, "the encoder depth", "the paper uses 6 or 18"),
    "--decoder-layers": (1, True, "the decoder depth", "the paper uses 6 or 18"),
    "--encoder-embed-dim": (1, True, "the encoder width", "the paper uses 512"),
    "--decoder-embed-dim": (1, True, "the decoder width", "the paper uses 512"),
    "--encoder-ffn-embed-dim": (1, True, "the encoder FFN width", "the paper uses 2048"),
    "--decoder-ffn-embed-dim": (1, True, "the decoder FFN width", "the paper uses 2048"),
    "--encoder-attention-heads": (1, True, "the encoder's attention heads", "the paper uses 8"),
    "--decoder-attention-heads": (1, True, "the decoder's attention heads", "the paper uses 8"),
    "--beam": (1, True, "the beam size", "--beam 1 is greedy search; the paper decodes with --beam 4"),
    "--nbest": (1, True, "hypotheses printed per sentence", "e.g. --nbest 1"),
    "--max-update": (0, True, "the number of updates to train (0: no limit)", "e.g. --max-update 50000"),
    "--max-epoch": (0, True, "the number of epochs to train (0: no limit)", "e.g. --max-epoch 10"),
    "--seed": (0, True, "the random seed", "use a seed from 0 to 2**32-1"),
    "--num-workers": (0, True, "data loading processes", "0 loads data in the main process"),
    "--warmup-updates": (0, True, "the updates of learning rate warmup", "the paper uses 4000"),
    "--save-interval-updates": (0, True, "updates between checkpoints (0: only at epoch ends)", "e.g. 1000"),
    "--log-interval": (1, True, "updates between log lines", "e.g. --log-interval 100"),
    "--save-interval": (1, True, "epochs between checkpoints", "e.g. --save-interval 1"),
    "--validate-interval": (1, True, "epochs between validations", "e.g. --validate-interval 1, or "
                            "--disable-validation"),
    "--max-source-positions": (1, True, "the longest source sentence the model takes", "the default is 1024"),
    "--max-target-positions": (1, True, "the longest target sentence the model takes", "the default is 1024"),
    "--tokens-per-sample": (1, True, "the tokens in a language model's block", "e.g. --tokens-per-sample 512"),
    "--clip-norm": (0, False, "the gradient norm clipping threshold (0: no clipping)", "the paper uses 0.1 "
                    "for deep models"),
}
# flag: (highest allowed, what breaks above it)
AT_MOST = {
    "--seed": (2 ** 32 - 1, "numpy's seeds are 32-bit"),
    "--required-batch-size-multiple": (2 ** 31 - 1, "fairseq's batching code keeps it in a 32-bit integer"),
    "--lenpen": (100, "scores are divided by length ** lenpen, which overflows; the paper uses 0.6 and 1.0"),
}
POSITIVE = {"--lr": ("the learning rate", "the paper uses --lr 0.001 (see recipe.py)")}
PROBABILITIES = ("--dropout", "--attention-dropout", "--activation-dropout", "--relu-dropout", "--label-smoothing")


LARGEST_INT = 2 ** 63 - 1  # fairseq hands counts to numpy and C code as 64-bit integers


def _dest(flag):
    return flag[2:].replace("-", "_")


def _shown(value):
    """A parsed value as the command line would write it (lists comma-separated)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _values(args, flag):
    """The numbers a flag was parsed to (a list; empty if this command has no such flag or it is unset)."""
    v = getattr(args, _dest(flag), None)
    if v is None or isinstance(v, bool):
        return []
    values = v if isinstance(v, (list, tuple)) else [v]
    return [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]


def check_flags(args, prog=""):
    """Raise a ToolError for a flag value out of range (0, negative, or absurd)."""
    if prog.endswith(("train", "validate")) and getattr(args, "max_tokens", None) is None \
            and getattr(args, "batch_size", None) is None:
        raise ToolError("no batch size given; pass --max-tokens (tokens per batch and device, e.g. 4096) or --batch-size "
                       "(sentences per batch)")
    for dest, value in sorted(vars(args).items()):
        values = _values(args, "--" + dest.replace("_", "-"))
        if any(isinstance(x, int) and abs(x) > LARGEST_INT for x in values):
            raise ToolError(f"--{dest.replace('_', '-')} {_shown(value)}: too large (fairseq keeps it in a 64-bit "
                           f"integer, at most {LARGEST_INT}); give a realistic value")
    for flag, (low, integer, what, fix) in AT_LEAST.items():
        values = _values(args, flag)
        if values and min(values) < low:
            need = ("a whole number of at least 1" if low == 1 else "0 or more") if integer else f"{low} or more"
            raise ToolError(f"{flag} {_shown(getattr(args, _dest(flag)))}: {what} must be {need}; {fix}")
    for flag, (high, why) in AT_MOST.items():
        values = _values(args, flag)
        if values and max(values) > high:
            raise ToolError(f"{flag} {_shown(getattr(args, _dest(flag)))}: at most {high} ({why}); give a smaller value")
    for flag, (what, fix) in POSITIVE.items():
        values = _values(args, flag)
        if values and min(values) <= 0:
            text = _shown(getattr(args, _dest(flag)))
            raise ToolError(f"{flag} {text}: {what} must be above 0 (with {text} the model does not learn); {fix}")
    for flag in PROBABILITIES:
        values = _values(args, flag)
        if values and not all(0 <= v < 1 for v in values):
            raise ToolError(f"{flag} {_shown(getattr(args, _dest(flag)))}: must be a probability from 0 up to 1 "
                           "(1 itself excluded); the paper uses 0.1 or 0.3")
    if getattr(args, "lr_scheduler", None) == "inverse_sqrt" and getattr(args, "warmup_updates", None) == 0:
        raise ToolError("--lr-scheduler inverse_sqrt with --warmup-updates 0 divides by zero; give it at least 1 "
                       "warmup update (the paper uses 4000), or use --lr-scheduler fixed")
    beam, nbest = getattr(args, "beam", None), getattr(args, "nbest", None)
    if beam and nbest and nbest > beam:
        raise ToolError(f"--nbest {nbest} is more than --beam {beam}: a beam search keeps only --beam "
                       "hypotheses; raise --beam or lower --nbest")
    for side in ("encoder", "decoder"):
        dim, heads = (getattr(args, f"{side}_{k}", None) for k in ("embed_dim", "attention_heads"))
        if isinstance(dim, int) and isinstance(heads, int) and dim % heads:
            raise ToolError(f"--{side}-embed-dim {dim} is not divisible by --{side}-attention-heads {heads}; "
                           "choose a width that is a multiple of the heads (512 with 8 heads, 1024 with 16)")
    if prog.endswith("train"):
        _check_stop_min_lr(args)


def _check_stop_min_lr(args):
    """fairseq-train stops before an epoch whose learning rate is at or below --stop-min-lr, the first too."""
    stop = getattr(args, "stop_min_lr", -1.0)
    if stop is None or stop < 0:
        return
    start = start_lr(args)
    if start is not None and start <= stop:
        why = (" (inverse_sqrt starts its warmup at --warmup-init-lr, which is 0 when not given)"
               if args.lr_scheduler == "inverse_sqrt" and getattr(args, "warmup_init_lr", -1) < 0 else "")
        raise ToolError(f"--stop-min-lr {stop:g} (fairseq 0.9's --min-lr) is at or above the learning rate at update 0, "
                       f"{start:g}{why}, so training would stop before its first update; start higher "
                       "(the authors' command adds --warmup-init-lr 1e-07) or lower --stop-min-lr")


def start_lr(args):
    """The learning rate fairseq's trainer starts from (its scheduler after step_update(0)), or None."""
    import torch
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.optim import FairseqOptimizer, lr_scheduler

    class Probe(FairseqOptimizer):  # what a scheduler touches of an optimizer: one parameter group
        def __init__(self, lr):
            super().__init__(None)
            self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)

    try:
        cfg = convert_namespace_to_omegaconf(args)
        probe = Probe(cfg.optimization.lr[0])
        scheduler = lr_scheduler.build_lr_scheduler(cfg.lr_scheduler, probe)
        scheduler.step_update(0)
        return probe.get_lr()
    except Exception:  # noqa: BLE001 - a schedule that cannot be built here is reported by fairseq itself
        return None


def check_devices(args, prog):
    """--fp16, --memory-efficient-fp16 and --amp on a machine (or with --cpu) without CUDA: a traceback in
    training, slow garbage in decoding, or (--amp, --memory-efficient-fp16) fp32 that the user did not ask for."""
    import torch

    asked = [f for f in ("amp", "memory_efficient_fp16", "fp16") if getattr(args, f, False)]
    if not asked:
        return
    flag = "--" + asked[0].replace("_", "-")  # fairseq sets --fp16 with --memory-efficient-fp16: name the one given
    why = "--cpu is given" if getattr(args, "cpu", False) else "torch sees no CUDA GPU here" \
        if not torch.cuda.is_available() else None
    if why:
        raise ToolError(f"{flag} needs a CUDA GPU and {why}; drop {flag} to run in fp32 on the CPU")


def check_model_fits(args, prog):
    """A model whose weights, gradients and Adam's two moments (4 x 4 bytes a parameter) exceed this
    machine's memory: fairseq would build layer after layer until the allocator fails or the system
    kills it (--encoder-layers 10**12 never returns). Embeddings are left out: a lower bound."""
    if not prog.endswith("train"):
        return
    sizes = {k: getattr(args, k, None) for k in ("encoder_layers", "decoder_layers", "encoder_embed_dim",
                                                 "decoder_embed_dim", "encoder_ffn_embed_dim", "decoder_ffn_embed_dim")}
    if not all(isinstance(v, int) and v > 0 for v in sizes.values()):
        return
    e, d = sizes["encoder_embed_dim"], sizes["decoder_embed_dim"]
    params = (sizes["encoder_layers"] * (4 * e * e + 2 * e * sizes["encoder_ffn_embed_dim"])
              + sizes["decoder_layers"] * (8 * d * d + 2 * d * sizes["decoder_ffn_embed_dim"]))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on Linux: no check
        return
    if params * 16 > memory:
        raise ToolError(f"the model has at least {params:.3g} parameters ({params * 16 / 2 ** 30:,.0f} GiB with gradients "
                       f"and Adam's state), more than this machine's {memory / 2 ** 30:,.0f} GiB of memory; lower "
                       "--encoder/decoder-layers or the widths (the paper's 18-layer model has about 1.3e+08 by this count)")


def check_paths(args, prog):
    """Raise a ToolError for an output place that cannot be written or an input of the wrong kind."""
    if prog.endswith("train") and not getattr(args, "no_save", False):
        save_dir = getattr(args, "save_dir", None) or "checkpoints"
        _check_writable_dir(save_dir, "--save-dir", "pass a folder that can be written (it is created if missing)")
    log_file = getattr(args, "log_file", None)
    if log_file and prog.endswith("train"):
        folder = os.path.dirname(os.path.abspath(log_file))
        if not os.path.isdir(folder):
            raise ToolError(f"--log-file {log_file}: folder {folder} does not exist; create it first, or log to a "
                           "file in an existing folder")
        if os.path.isdir(log_file):
            raise ToolError(f"--log-file {log_file} is a folder; pass a file name such as {log_file}/train.log")
        if not os.access(folder, os.W_OK):
            raise ToolError(f"--log-file {log_file}: folder {folder} cannot be written; log to a folder you can write")
    restore = getattr(args, "restore_file", None)
    if prog.endswith("train") and restore and restore != "checkpoint_last.pt":
        if os.path.isdir(restore):
            raise ToolError(f"--restore-file {restore} is a folder; pass a checkpoint file in it, such as "
                           f"{os.path.join(restore, 'checkpoint_last.pt')}")
        if not os.path.exists(resume_path(args)):
            # fairseq would log "No existing checkpoint found" and silently train from scratch
            raise ToolError(f"--restore-file {restore} does not exist; fix the path (it is used as given, not "
                           "relative to --save-dir), or drop the flag to resume from SAVE_DIR/checkpoint_last.pt")
    path = getattr(args, "path", None)
    if path and prog.endswith(("generate", "validate", "interactive", "eval-lm")):
        for p in path.split(os.pathsep):
            if os.path.isdir(p):
                raise ToolError(f"--path {p} is a folder; pass a checkpoint file in it, such as "
                               f"{os.path.join(p, 'checkpoint_best.pt')} (separate several with ':')")


def _check_writable_dir(path, flag, fix):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ToolError(f"{flag} {path} is a file, not a folder; {fix}")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):  # the nearest existing folder above it must be a folder we can write
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ToolError(f"{flag} {path} cannot be created: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ToolError(f"{flag} {path} cannot be written: {parent} is read-only for this user; {fix}")
