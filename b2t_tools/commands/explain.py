"""The catalogue of fairseq failures the commands explain in one line (problem; fix).

``explain(exc, prog)`` returns the message for a known failure raised inside fairseq, or None;
``commands.run_command`` prints it. The README's Troubleshooting section lists every message.
(The checks made before fairseq starts, on the parsed arguments, are in preflight.py.)
"""

import errno
import os
import re

from ..errors import is_one_line, plugin_error

# --- the catalogue of failures inside fairseq --------------------------------------------------

TRAINING_FIXES = ("lower --lr, raise --warmup-updates, set --clip-norm (the paper uses 0.1), "
                  "or use B2T layers (--ln-position b2t), which keep deep models stable")


def _checkpoint_fix(prog, err):
    if err.kind == "unsafe":
        return "load only checkpoints you trust; for one you do, set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"
    if prog.endswith("train"):
        folder = os.path.dirname(err.path) or "."
        return (f"resume from an intact one with --restore-file {folder}/checkpoint_best.pt (or an epoch "
                "checkpoint such as checkpoint3.pt or checkpoint_E_U.pt), or move the broken file away "
                "to start afresh")
    return "pass another checkpoint with --path (checkpoint_best.pt, an epoch checkpoint or an averaged one)"


# fairseq functions that open the data directory (a missing file there is a data problem)
_DATA_READERS = {"infer_language_pair", "load_dictionary", "add_from_file", "setup_task", "load_langpair_dataset",
                 "load_dataset", "split_exists"}


def _frames(e):
    tb, names = e.__traceback__, set()
    while tb is not None:
        names.add(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return names


def _explain_missing_file(e, prog):
    m = re.match(r"Dataset not found: (\S+) \((.*)\)$", str(e))
    if m:
        split, data = m.groups()
        other = ("--gen-subset" if prog.endswith("generate") else "--valid-subset" if prog.endswith("validate")
                 else "--valid-subset or --disable-validation")
        pref = f"--{split}pref" if split in ("train", "valid", "test") else "--trainpref/--validpref/--testpref"
        return (f"split '{split}' not found in data directory {data}; binarize it with fairseq-preprocess "
                f"({pref}) or choose another split with {other}")
    path = getattr(e, "filename", None)
    if not path or not (_frames(e) & _DATA_READERS):
        return None  # not fairseq reading the data directory: not a data problem to explain
    name = os.path.basename(os.path.normpath(path))
    folder = os.path.dirname(path) if re.fullmatch(r"dict\.[^/]*\.txt", name) else path
    if not os.path.isdir(folder):
        return (f"data directory {folder} does not exist; pass the folder that fairseq-preprocess wrote "
                "(its --destdir) as the first argument")
    if folder != path:
        return (f"data directory {folder} has no {name}; pass a folder binarized by fairseq-preprocess, "
                "with --source-lang/--target-lang matching its files")
    return None


def _explain_unequal_sides(e):
    """LanguagePairDataset's assertion, with the split, folder and counts read from the frames that raised it."""
    split = folder = None
    counts = {}
    tb = e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if tb.tb_frame.f_code.co_name == "load_langpair_dataset":
            split, folder = local.get("split"), local.get("data_path")
            counts = {"langs": (local.get("src"), local.get("tgt"))}
        elif tb.tb_frame.f_code.co_name == "__init__" and "src" in local and "tgt" in local:
            try:
                counts["sizes"] = (len(local["src"]), len(local["tgt"]))
            except TypeError:
                pass
        tb = tb.tb_next
    where = f"split '{split}' in {folder}" if split and folder else "a split of the data directory"
    (s, t), (ns, nt) = counts.get("langs", ("source", "target")), counts.get("sizes", ("?", "?"))
    return (f"{where} has {ns} {s} sentences but {nt} {t} sentences; binarize both sides together from parallel "
            "files (one fairseq-preprocess run with --trainpref/--validpref/--testpref for both languages)")


def _explain_value_error(e):
    msg = str(e)
    if msg == "--share-all-embeddings requires a joined dictionary":
        return ("--share-all-embeddings needs one joined dictionary, but the data directory's source and target "
                "dictionaries differ; binarize with fairseq-preprocess --joined-dictionary, or drop "
                "--share-all-embeddings (--share-decoder-input-output-embed needs no joined dictionary)")
    if msg.startswith("--share-all-embeddings"):
        return f"{msg}; make the flags agree or drop --share-all-embeddings"
    return None


def _explain_floating_point(e):
    m = re.search(r"Minimum loss scale reached \(([^)]*)\)", str(e))
    if m:
        return (f"fp16 training collapsed: the loss scale fell to the minimum ({m.group(1)}) because the "
                f"loss keeps overflowing, and further updates would be NaN; {TRAINING_FIXES}; a larger "
                "--fp16-scale-window lowers the scale less often, and --amp (or fp32) has more range; "
                "crash.pt in the save dir holds the last state")
    if str(e).startswith("gradients are Nan/Inf"):
        return f"training diverged: the gradients became NaN/Inf; {TRAINING_FIXES}"
    return None


def _explain_os_error(e, prog):
    """A disk that is full, or a place that cannot be written (root ignores permissions: EROFS still hits)."""
    name = f" writing {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        keep = (" (--no-epoch-checkpoints, --keep-last-epochs N and --keep-interval-updates N keep fewer "
                "checkpoints; a run resumes from its last intact checkpoint)") if prog.endswith("train") else ""
        return f"no space left on the device{name}; free space there or write to a disk with room{keep}"
    if e.errno == errno.EFBIG:
        return (f"a file{name} would be larger than this system allows (ulimit -f, or the file system's largest "
                "file); raise the limit or write to another file system")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
        where = "pass a --save-dir you can write" if prog.endswith("train") else "write to a place you can write"
        return f"cannot write {e.filename} ({e.strerror}); {where}"
    return None


def _explain_out_of_memory(e, prog):
    """torch's allocator failing: a model or batch that does not fit (often an absurd size flag)."""
    msg = str(e)
    m = re.search(r"tried to allocate (\d+) bytes", msg) or re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", msg)
    size = ""
    if m:
        size = m.group(1)
        size = f" ({int(size) / 2 ** 30:,.0f} GiB at once)" if size.isdigit() else f" ({size} at once)"
    where = "GPU" if "CUDA" in msg or "cuda" in msg else "machine"
    lower = ("--max-tokens (with a larger --update-freq for the same batch) or the model's sizes "
             "(--encoder/decoder-embed-dim, --encoder/decoder-ffn-embed-dim, --encoder/decoder-layers)"
             if prog.endswith("train") else "--max-tokens or --batch-size (and --beam)")
    return f"out of memory: the {where} cannot hold what these flags ask for{size}; lower {lower}"


def _explain_sizes(e):
    """fairseq's refusals of a sentence that does not fit the model's positions or a batch."""
    msg = str(e)
    m = re.match(r"Size of sample #(\d+) is invalid \(=(.*)\) since max_positions=(.*), skip this example", msg)
    if m:
        nums = lambda text: ", ".join(re.findall(r"\d+", text.replace("int32", "").replace("int64", "")))  # noqa: E731
        return (f"sentence #{m.group(1)} is longer than the model takes (lengths {nums(m.group(2))}; the model's "
                f"positions {nums(m.group(3))}); skip such sentences with --skip-invalid-size-inputs-valid-test, or "
                "raise --max-source-positions/--max-target-positions where the model allows it")
    m = re.search(r"should not exceed max_tokens=(\d+)|exceeds max_tokens limit of (\d+)", msg)
    if m:
        limit = m.group(1) or m.group(2)
        return (f"a sentence is longer than --max-tokens {limit} (a batch holds whole sentences); raise --max-tokens "
                "to at least the longest sentence, or batch by --batch-size instead")
    return None


def _explain_damaged_checkpoint(e, prog):
    """torch.load of a truncated or damaged file: the old pickled format (torch < 1.6, the authors'
    fairseq-0.9 checkpoints) fails in torch's legacy reader, which the plugin's checks of zip files miss."""
    import pickle

    for cause in _chain(e):
        msg = str(cause)
        if isinstance(cause, (EOFError, pickle.UnpicklingError)) or (isinstance(cause, RuntimeError) and (
                "unexpected EOF" in msg or "might be corrupted" in msg)):
            break
    else:
        return None
    path = None
    tb = e.__traceback__
    while tb is not None:
        local = tb.tb_frame.f_locals
        if tb.tb_frame.f_code.co_name in ("load_checkpoint_to_cpu", "load_model_ensemble_and_task"):
            path = local.get("path") or local.get("filename") or path
        tb = tb.tb_next
    if path is None:
        return None  # not fairseq loading a checkpoint
    why = (msg.splitlines() or [type(cause).__name__])[0][:200] or type(cause).__name__
    if prog.endswith("train"):
        folder = os.path.dirname(str(path)) or "."
        fix = (f"resume from an intact one with --restore-file {folder}/checkpoint_best.pt (or an epoch checkpoint), "
               "or move the broken file away to start afresh")
    else:
        fix = "download or copy it again (compare its size or checksum with the source), or pass another with --path"
    return f"checkpoint {path} is truncated or damaged ({why}); {fix}"


def _chain(e):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def explain(e, prog):
    """The one-line message for a known failure (problem; fix), or None for anything else."""
    if isinstance(e, plugin_error("CheckpointError")):
        return f"{e}; {_checkpoint_fix(prog, e)}"
    if is_one_line(e):
        return str(e)
    if isinstance(e, FileNotFoundError):
        return _explain_missing_file(e, prog)
    if isinstance(e, NotADirectoryError) and e.filename and _frames(e) & _DATA_READERS:
        return (f"data directory {e.filename} is a file, not a folder; pass the folder that fairseq-preprocess "
                "wrote (its --destdir) as the first argument")
    if isinstance(e, AssertionError) and str(e) == "Source and target must contain the same number of examples":
        return _explain_unequal_sides(e)
    if isinstance(e, AssertionError) and str(e).startswith("min_len cannot be larger than max_len"):
        return ("the longest output allowed (--max-len-a times the source length plus --max-len-b) is below "
                "--min-len; raise --max-len-a/--max-len-b (the defaults are 0 and 200) or lower --min-len")
    sizes = _explain_sizes(e) if type(e) in (Exception, AssertionError) else None
    if sizes:
        return sizes
    damaged = _explain_damaged_checkpoint(e, prog)
    if damaged:
        return damaged
    for cause in _chain(e):
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
            msg = _explain_os_error(cause, prog)
            if msg:
                return msg
    for cause in _chain(e):
        if isinstance(cause, RuntimeError) and ("unexpected pos" in str(cause) or "failed writing" in str(cause)):
            why = "unexpected pos" if "unexpected pos" in str(cause) else "failed writing"
            return (f"writing a checkpoint failed (torch's writer: '{why}': the disk is full or a file-size limit "
                    "was hit); free space or raise the limit, then run the same command again (the previous "
                    "checkpoint is intact: saves are atomic)")
    if isinstance(e, OSError) and str(e).startswith("Model file not found: "):
        path = str(e).split(": ", 1)[1]
        return f"checkpoint {path} not found; fix --path (separate several checkpoints with ':')"
    if isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e)):
        return _explain_out_of_memory(e, prog)
    if isinstance(e, ValueError) and _explain_value_error(e):
        return _explain_value_error(e)
    if isinstance(e, (AssertionError, ValueError)) and re.search(r"(^|\s)--[a-z]", str(e)) and "\n" not in str(e):
        # fairseq's own checks of flag combinations ("--sampling-topk requires --sampling"): they name the flags
        return f"{str(e).rstrip('.')}; change the flags it names (see {prog} --help)"
    if isinstance(e, ValueError) and str(e).startswith("Default process group has not been initialized"):
        return ("these flags need a distributed run (torch.distributed is not started; --base-layers does, for one); "
                "start it with b2t-torchrun-train, or drop the flag")
    if isinstance(e, ValueError):
        return None
    # fairseq re-raises some errors as a plain Exception ("Cannot load model parameters from checkpoint
    # ...; please ensure that the architectures match."): the plugin's own error underneath is the one to show
    for cause in _chain(e):
        if is_one_line(cause):
            return str(cause)
    # fairseq re-runs a failed fp16 step under its NanDetector, which can raise a second error
    # (StopIteration under torch >= 2.x) that hides the real one: look down the chain
    for cause in _chain(e):
        if isinstance(cause, FloatingPointError):
            return _explain_floating_point(cause)
    return None
