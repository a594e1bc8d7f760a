"""Setups fairseq ends in a traceback (or runs otherwise than asked), as our commands answer them: one
line ``PROG: error: problem; fix`` and exit 2, or, for fairseq's --bf16, training in the plugin's bf16
autocast. All cases run in ONE driver process (helpers.run_commands_in_one_process), the checkpoints
they need made by its first cases."""

import random
import shutil

import pytest
import torch
from helpers import assert_one_line_error, run, run_commands_in_one_process, toy_train_argv, write_fork_checkpoint

WORDS = "the a cat dog house tree red blue big small runs sees eats".split()


def _lm_data(root):
    rng = random.Random(0)
    for split, lines in (("train", 60), ("valid", 8), ("test", 8)):
        (root / f"{split}.txt").write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n"
                                                   for _ in range(lines)))
    run(["fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt", "--validpref", root / "valid.txt",
         "--testpref", root / "test.txt", "--destdir", root / "bin", "--workers", "1"])
    return root / "bin"


@pytest.fixture(scope="module")
def cases(toy_data_bin, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("setup_errors")
    lm = _lm_data(tmp)
    d = str(toy_data_bin)
    for name, src in (("empty_dict", toy_data_bin), ("lm_empty_dict", lm)):
        shutil.copytree(src, tmp / name)
    (tmp / "empty_dict" / "dict.de.txt").write_text("")
    (tmp / "lm_empty_dict" / "dict.txt").write_text("")
    fork = tmp / "fork.pt"
    write_fork_checkpoint(fork, d)  # torch 1.4's pickled format, as the authors' checkpoints
    data = fork.read_bytes()
    (tmp / "fork_truncated.pt").write_bytes(data[: len(data) // 2])

    def train(*extra, arch="transformer_post_ln_tiny", data=d):
        return [data, *toy_train_argv(arch=arch, json_log=False), "--max-update", "1", *extra]

    lm_flags = ["--task", "language_modeling", "--optimizer", "adam", "--lr", "0.002", "--tokens-per-sample", "32",
                "--max-tokens", "256", "--num-workers", "0", "--no-progress-bar", "--cpu", "--max-update", "1"]

    def lm_train(*extra, data=str(lm)):
        return [data, "--arch", "transformer_lm_post_ln_tiny", *lm_flags, *extra]

    post, admin, lmck = tmp / "post", tmp / "admin", tmp / "lm"
    ck, lm_ck = str(post / "checkpoint_last.pt"), str(lmck / "checkpoint_last.pt")
    gen = ["--batch-size", "16", "--cpu"]
    todo = [
        # the checkpoints the cases below use
        ("make_post", "train", train("--save-dir", str(post)), None),
        ("make_admin", "train", train("--save-dir", str(admin), arch="transformer_admin_tiny"), None),
        ("make_lm", "train", lm_train("--save-dir", str(lmck)), None),
        # fairseq's --bf16 sets --tpu: AttributeError 'xla_device'
        ("bf16_trains", "train", train("--bf16", "--save-dir", str(tmp / "bf16")), None),
        ("bf16_lm", "train", lm_train("--bf16", "--no-save"), None),
        ("bf16_generate", "generate", [d, "--path", ck, *gen, "--bf16"], None),
        # mixed precision on a CPU ran silently in fp32
        ("amp_cpu", "train", train("--amp", "--no-save"), None),
        ("memory_efficient_fp16_cpu", "train", train("--memory-efficient-fp16", "--no-save"), None),
        ("fully_sharded", "train", train("--ddp-backend", "fully_sharded", "--no-save"), None),
        # a task and a model of different kinds
        ("translation_arch_lm_task", "train", lm_train("--arch", "transformer_post_ln_tiny", "--no-save"), None),
        ("lm_arch_translation_task", "train", [d, "--arch", "transformer_lm_post_ln_tiny", "--optimizer", "adam",
                                               "--lr", "0.001", "--max-tokens", "200", "--cpu", "--no-save"], None),
        ("generate_lm_checkpoint", "generate", [d, "--path", lm_ck, *gen], None),
        ("eval_lm_translation_checkpoint", "eval_lm", [str(lm), "--path", ck, "--cpu"], None),
        # blocks and sentences that do not fit
        ("block_over_max_tokens", "train", lm_train("--tokens-per-sample", "512", "--no-save"), None),
        ("block_over_positions", "train", lm_train("--max-target-positions", "16", "--no-save"), None),
        ("tokens_per_sample_0", "train", lm_train("--tokens-per-sample", "0", "--no-save"), None),
        ("context_window_full", "eval_lm", [str(lm), "--path", lm_ck, "--cpu", "--tokens-per-sample", "32",
                                            "--context-window", "32"], None),
        ("sentence_over_positions", "generate", [d, "--path", ck, *gen, "--max-source-positions", "4"], None),
        ("sentence_over_max_tokens", "generate", [d, "--path", ck, "--max-tokens", "5", "--cpu"], None),
        ("train_sentence_over_max_tokens", "train", train("--max-tokens", "8", "--no-save"), None),
        # dictionaries and checkpoints
        ("empty_dict", "train", train("--no-save", data=str(tmp / "empty_dict")), None),
        ("lm_empty_dict", "train", lm_train("--no-save", data=str(tmp / "lm_empty_dict")), None),
        ("fork_truncated", "generate", [d, "--path", str(tmp / "fork_truncated.pt"), *gen], None),
        # resumes that fairseq cannot load
        ("resume_other_scheduler", "train", train("--save-dir", str(post), "--max-update", "3", "--lr-scheduler",
                                                  "inverse_sqrt", "--warmup-updates", "4"), None),
        ("resume_same_scheduler", "train", train("--save-dir", str(post), "--max-update", "2"), None),
        ("resume_admin_omega_switched", "train", train("--save-dir", str(admin), "--max-update", "3", "--admin-omega",
                                                       "fixed", arch="transformer_admin_tiny"), None),
    ]
    return run_commands_in_one_process(todo, tmp), tmp


def error(cases, name, prog, *words):
    res = cases[0][name]
    assert res["code"] == 2, f"{name}: exit {res['code']}\n{res['stderr'][-3000:]}"
    return assert_one_line_error(res["stderr"], prog, *words)


@pytest.mark.parametrize("name,prog,words", [
    ("bf16_lm", "b2t-train", ["--bf16: fairseq's --bf16 is for TPUs", "--arch transformer_lm_post_ln_tiny"]),
    ("bf16_generate", "b2t-generate", ["--bf16", "decoding in fp32", "drop it"]),
    ("amp_cpu", "b2t-train", ["--amp needs a CUDA GPU", "drop --amp"]),
    ("memory_efficient_fp16_cpu", "b2t-train", ["--memory-efficient-fp16 needs a CUDA GPU"]),
    ("fully_sharded", "b2t-train", ["fully_sharded needs fairscale", "pip install fairscale"]),
    ("translation_arch_lm_task", "b2t-train", ["--arch transformer_post_ln_tiny is a translation",
                                               "--task language_modeling trains a language model", "--task translation"]),
    ("lm_arch_translation_task", "b2t-train", ["is a language model but --task translation",
                                               "--task language_modeling"]),
    ("generate_lm_checkpoint", "b2t-generate", ["holds a language model", "--task language_modeling"]),
    ("eval_lm_translation_checkpoint", "b2t-eval-lm", ["holds a translation", "b2t-generate"]),
    ("block_over_max_tokens", "b2t-train", ["--tokens-per-sample 512 is more than --max-tokens 256"]),
    ("block_over_positions", "b2t-train", ["--tokens-per-sample 32 is more than", "--max-target-positions 16"]),
    ("tokens_per_sample_0", "b2t-train", ["--tokens-per-sample 0", "at least 1"]),
    ("context_window_full", "b2t-eval-lm", ["--context-window 32 must be below --tokens-per-sample 32"]),
    ("sentence_over_positions", "b2t-generate", ["longer than the model takes", "--skip-invalid-size-inputs-valid-test"]),
    ("sentence_over_max_tokens", "b2t-generate", ["longer than --max-tokens 5", "raise --max-tokens"]),
    ("train_sentence_over_max_tokens", "b2t-train", ["longer than --max-tokens 8", "raise --max-tokens"]),
    ("empty_dict", "b2t-train", ["dict.de.txt is empty", "fairseq-preprocess"]),
    ("lm_empty_dict", "b2t-train", ["dict.txt is empty"]),
    ("fork_truncated", "b2t-generate", ["fork_truncated.pt is truncated or damaged", "--path"]),
    ("resume_other_scheduler", "b2t-train", ["trained with --lr-scheduler fixed", "--reset-lr-scheduler"]),
    ("resume_admin_omega_switched", "b2t-train", ["trained with --admin-omega trainable", "--admin-omega fixed",
                                                  "pass --admin-omega trainable"]),
])
def test_one_line(cases, name, prog, words):
    error(cases, name, prog, *words)


def test_bf16_trains_in_the_plugins_bf16_autocast(cases):
    res = cases[0]["bf16_trains"]
    assert res["code"] == 0, res["stderr"][-3000:]
    state = torch.load(cases[1] / "bf16" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    model = state["cfg"]["model"]
    assert model.b2t_bf16 and not model.bf16 and not model.tpu
    assert state["model"]["encoder.embed_tokens.weight"].dtype == torch.float32  # fp32 weights, bf16 forward


def test_the_same_schedule_resumes(cases):
    """The guard refuses only another schedule: the same command resumes (the checkpoints the cases made work)."""
    for name in ("make_post", "make_admin", "make_lm", "resume_same_scheduler"):
        assert cases[0][name]["code"] == 0, f"{name}:\n{cases[0][name]['stderr'][-3000:]}"
    assert "Loaded checkpoint" in cases[0]["resume_same_scheduler"]["stdout"]
