"""Checks of a run's setup, made by the b2t commands on the parsed arguments before fairseq starts
(preflight.check calls ``check``): flags that fairseq takes and then ends in a traceback, or runs
differently from what was asked.

- a task and a model of different kinds (a translation architecture with --task language_modeling,
  a language model with --task translation, or a checkpoint of the other kind);
- a language model's block longer than --max-tokens or the model's positions, --context-window not
  below --tokens-per-sample;
- an empty dictionary in the data folder;
- --ddp-backend fully_sharded without fairscale;
- fairseq's --bf16, which sets --tpu (fairseq/options.py): ``bf16_argv`` turns it into the plugin's
  --b2t-bf16 where the model and the device can run it, and refuses it in one line elsewhere.
"""

import os
import re

from ..errors import ToolError
from ..util import has_flag

EVALUATION = ("generate", "validate", "interactive", "eval-lm")

# kind: (what it is, the task that trains it, an architecture of that kind)
KINDS = {"lm": ("a language model", "--task language_modeling", "transformer_lm_b2t"),
         "translation": ("a translation (encoder-decoder) model", "--task translation", "transformer_b2t")}


def check(args, prog):
    check_task_and_model(args, prog)
    check_blocks(args, prog)
    check_dictionaries(args, prog)
    check_backend(args)


def model_kind(arch):
    """'lm', 'translation' or None for an architecture (or model) name."""
    from fairseq.models import (
        ARCH_MODEL_REGISTRY,
        MODEL_REGISTRY,
        FairseqEncoderDecoderModel,
        FairseqLanguageModel,
    )

    cls = ARCH_MODEL_REGISTRY.get(arch) or MODEL_REGISTRY.get(arch)
    if cls is None:
        return None
    if issubclass(cls, FairseqLanguageModel):
        return "lm"
    return "translation" if issubclass(cls, FairseqEncoderDecoderModel) else None


def task_kind(task):
    from fairseq.tasks import TASK_REGISTRY
    from fairseq.tasks.language_modeling import LanguageModelingTask
    from fairseq.tasks.translation import TranslationTask

    cls = TASK_REGISTRY.get(task)
    if cls is None:
        return None
    if issubclass(cls, LanguageModelingTask):
        return "lm"
    return "translation" if issubclass(cls, TranslationTask) else None


def _checkpoint_arch(path):
    """The architecture a checkpoint was trained with (its header only), or None."""
    from .preflight import peek

    state = peek(path) if os.path.isfile(path) else None
    if not isinstance(state, dict):
        return None
    cfg = state.get("cfg")
    model = cfg.get("model") if isinstance(cfg, dict) else None  # a dict, or the legacy models' Namespace
    for source in (state.get("args"), model):
        if isinstance(source, dict):
            arch = source.get("arch") or source.get("_name")
        else:
            arch = getattr(source, "arch", None) or getattr(source, "_name", None)
        if arch:
            return arch
    return None


def check_task_and_model(args, prog):
    """fairseq builds the model whatever the task and fails deep inside (a translation model has no
    'supported_targets'), or decodes a language model's checkpoint as a translation one."""
    task = getattr(args, "task", None)
    want = task_kind(task)
    if want is None:
        return
    if prog.endswith("train"):
        arch, where = getattr(args, "arch", None), f"--arch {getattr(args, 'arch', None)}"
    elif prog.endswith(EVALUATION) and getattr(args, "path", None):
        path = args.path.split(os.pathsep)[0]
        arch, where = _checkpoint_arch(path), f"{path}"
    else:
        return
    have = model_kind(arch) if arch else None
    if have is None or have == want:
        return
    (what, task_flag, example), (other, _, other_example) = KINDS[have], KINDS[want]
    if prog.endswith("train"):
        fix = f"pass {task_flag} for it, or an architecture of {other} (e.g. --arch {other_example})"
        raise ToolError(f"{where} is {what} but --task {task} trains {other}; {fix}")
    fix = f"pass {task_flag} (and that model's data), or a checkpoint of {other}"
    if prog.endswith("eval-lm"):
        fix = "b2t-eval-lm evaluates language models: use b2t-validate or b2t-generate for a translation checkpoint"
    raise ToolError(f"{where} holds {what} ({arch}) but --task {task} evaluates {other}; {fix}")


def check_blocks(args, prog):
    """A language model's blocks (--tokens-per-sample tokens each) must fit a batch and the model's
    positions: fairseq skips every block that does not (a warning, then training on what is left, or
    nothing), and --context-window >= --tokens-per-sample divides by zero in fairseq-eval-lm."""
    if task_kind(getattr(args, "task", None)) != "lm":
        return
    block = getattr(args, "tokens_per_sample", None)
    if not isinstance(block, int) or block < 1:
        return
    for flag in ("--max-tokens", "--max-tokens-valid"):
        limit = getattr(args, flag[2:].replace("-", "_"), None)
        if isinstance(limit, int) and 0 < limit < block:
            raise ToolError(f"--tokens-per-sample {block} is more than {flag} {limit}: no block fits in a batch, so "
                            f"fairseq would skip them all; raise {flag} to at least {block} or lower --tokens-per-sample")
    positions = getattr(args, "max_target_positions", None)
    if prog.endswith("train") and isinstance(positions, int) and 0 < positions < block:
        raise ToolError(f"--tokens-per-sample {block} is more than the model's --max-target-positions {positions}: "
                        f"fairseq would skip every block; raise --max-target-positions to {block} or lower "
                        "--tokens-per-sample")
    window = getattr(args, "context_window", 0) or 0
    if window > 0 and window >= block:
        raise ToolError(f"--context-window {window} must be below --tokens-per-sample {block} (each block scores "
                        f"--tokens-per-sample minus --context-window new tokens); lower --context-window or raise "
                        "--tokens-per-sample")


DICT_NAME = re.compile(r"dict(\.[^./\s]+)?\.txt")


def check_dictionaries(args, prog):
    """An empty dict.txt gives a model with the 4 special symbols only, and fairseq fails on the first
    batch (IndexError in the embedding)."""
    data = getattr(args, "data", None)
    if not isinstance(data, str) or not prog.endswith(("train",) + EVALUATION):
        return
    folder = data.split(os.pathsep)[0]
    if not os.path.isdir(folder):
        return  # fairseq reports a missing folder (explain.py)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not DICT_NAME.fullmatch(name) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            empty = not f.read(1 << 16).strip()
        if empty:
            raise ToolError(f"{path} is empty: a dictionary lists each word with its count, and the data was "
                            "binarized with one; binarize the data again with fairseq-preprocess (it writes the "
                            "dictionary) or copy back the one it wrote")


def check_backend(args):
    if getattr(args, "ddp_backend", None) != "fully_sharded":
        return
    try:
        import fairscale  # noqa: F401
    except ImportError:
        raise ToolError("--ddp-backend fully_sharded needs fairscale, which is not installed here; pip install "
                        "fairscale, or use the default --ddp-backend pytorch_ddp") from None


# --- fairseq's --bf16 -------------------------------------------------------------------------

def _plugin_bf16_model(arch):
    """The plugin's translation models run their forward in bf16 autocast with --b2t-bf16."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from b2t_fairseq.transformer_b2t import TransformerB2TModel

    cls = ARCH_MODEL_REGISTRY.get(arch)
    return cls is not None and issubclass(cls, TransformerB2TModel)


def bf16_argv(args, argv, prog):
    """argv with fairseq's --bf16 (or --memory-efficient-bf16) replaced by --b2t-bf16, or None to leave
    argv as it is. fairseq's --bf16 sets --tpu, and the trainer then asks torch_xla for a TPU
    (AttributeError 'xla_device') on CPUs and GPUs alike; the decoding commands ignore it and run fp32.
    With --tpu given, fairseq's meaning stands."""
    flags = [f for f in ("--bf16", "--memory-efficient-bf16") if has_flag(argv, f)]
    if not flags or has_flag(argv, "--tpu"):
        return None
    flag = flags[0]
    if not prog.endswith("train"):
        raise ToolError(f"{flag}: fairseq's {flag} is for TPUs (it sets --tpu) and {prog} ignores it here, decoding "
                        "in fp32; drop it (fp32), or use --fp16 on a GPU")
    arch = getattr(args, "arch", None)
    if not _plugin_bf16_model(arch):
        raise ToolError(f"{flag}: fairseq's {flag} is for TPUs (it sets --tpu, and training then fails without "
                        f"torch_xla), and --arch {arch} has no bf16 autocast of the plugin's (--b2t-bf16 is for the "
                        "plugin's translation architectures); drop it to train in fp32, or use --fp16 on a GPU")
    import torch

    if torch.cuda.is_available() and not getattr(args, "cpu", False) and not torch.cuda.is_bf16_supported():
        raise ToolError(f"{flag}: this GPU ({torch.cuda.get_device_name()}) has no bf16 support; use --fp16, or "
                        "drop it to train in fp32")
    return [a for a in argv if a not in flags] + ["--b2t-bf16"]
