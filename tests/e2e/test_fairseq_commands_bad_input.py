"""Bad input to b2t-train / b2t-generate / b2t-validate / b2t-interactive: ONE line, the right fix.

Flags at 0, negative or absurd, damaged data files, a checkpoint used with data of another language
direction or dictionary, output places that cannot be written, a full disk, Ctrl-C. Each case runs
through the same function as its console command, all in ONE driver process (starting fairseq costs
seconds a process on the 2-core test machine); most are refused before fairseq starts.
"""

import errno
import os
import shutil

import pytest
from helpers import (
    assert_one_line_error,
    run,
    run_commands_in_one_process,
    toy_train_argv,
)

from b2t_tools.commands import cli, preflight
from b2t_tools.errors import ToolError

TRAIN = toy_train_argv(json_log=False)
GEN = ["--batch-size", "16", "--beam", "2", "--cpu"]
VALID = ["--batch-size", "16", "--cpu"]



def _truncate(path, keep):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def _reversed_copy(src, dst):
    """The same data binarized as de->en: fairseq reads the language pair from the file names."""
    dst.mkdir()
    for f in os.listdir(src):
        shutil.copy(src / f, dst / f.replace(".en-de.", ".de-en."))
    return dst


def _empty_split(folder, split):
    from fairseq.data import indexed_dataset

    for lang in ("en", "de"):
        prefix = folder / f"{split}.en-de.{lang}"
        indexed_dataset.make_builder(f"{prefix}.bin", impl="mmap", vocab_size=64).finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def bad(toy_data_bin, tmp_path_factory):
    """{case: result} for every case below, and the paths they use."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    ck_dir = tmp / "trained"
    run(["b2t-train", toy_data_bin, *TRAIN, "--max-update", "2", "--save-dir", ck_dir])
    ck = str(ck_dir / "checkpoint_last.pt")
    d = str(toy_data_bin)

    def copy(name):
        shutil.copytree(toy_data_bin, tmp / name)
        return tmp / name

    _truncate(copy("short_bin") / "train.en-de.en.bin", 0.5)
    _truncate(copy("short_idx") / "test.en-de.de.idx", 0.5)
    _empty_split(copy("empty_valid"), "valid")
    for name, line in (("bad_dict", "brokenline\n"), ("more_words", "zzz 1\n")):
        folder = copy(name)
        for lang in ("en", "de"):
            with open(folder / f"dict.{lang}.txt", "a") as f:
                f.write(line)
    swapped = copy("swapped_dict")  # same size, two words swapped: token ids mean other words
    for lang in ("en", "de"):
        lines = (swapped / f"dict.{lang}.txt").read_text().splitlines(keepends=True)
        lines[0], lines[1] = lines[1], lines[0]
        (swapped / f"dict.{lang}.txt").write_text("".join(lines))
    deen = str(_reversed_copy(toy_data_bin, tmp / "de_en"))
    unequal = copy("unequal")  # German sides of other splits: 40 target sentences for 400 source ones, and back
    for ext in ("bin", "idx"):
        shutil.copy(toy_data_bin / f"valid.en-de.de.{ext}", unequal / f"train.en-de.de.{ext}")
        shutil.copy(toy_data_bin / f"train.en-de.de.{ext}", unequal / f"test.en-de.de.{ext}")
    (tmp / "a_file").write_text("x")
    (tmp / "ck_folder").mkdir()
    (tmp / "ro").mkdir()
    t = [str(a) for a in TRAIN]

    def train(*extra, data=d):
        return [data, *t, "--max-update", "1", *extra]

    cases = [
        # refused before fairseq starts
        ("max_tokens_0", "train", train("--max-tokens", "0", "--no-save"), None),
        ("update_freq_0", "train", train("--update-freq", "0", "--no-save"), None),
        ("encoder_layers_0", "train", train("--encoder-layers", "0", "--no-save"), None),
        ("decoder_layers_neg", "train", train("--decoder-layers", "-2", "--no-save"), None),
        ("lr_0", "train", train("--lr", "0", "--no-save"), None),
        ("lr_neg", "train", train("--lr", "-0.001", "--no-save"), None),
        ("max_update_neg", "train", train("--max-update", "-1", "--no-save"), None),
        ("dropout_1_5", "train", train("--dropout", "1.5", "--no-save"), None),
        ("no_batch_size", "train", [x for x in train("--no-save") if x not in ("--max-tokens", "200")], None),
        ("beam_0", "generate", [d, "--path", ck, "--batch-size", "16", "--beam", "0", "--cpu"], None),
        ("validate_max_tokens_0", "validate", [d, "--path", ck, "--max-tokens", "0", "--cpu"], None),
        ("save_dir_file", "train", train("--save-dir", str(tmp / "a_file")), None),
        ("save_dir_under_file", "train", train("--save-dir", str(tmp / "a_file/run")), None),
        ("save_dir_read_only", "train", train("--save-dir", str(tmp / "ro/run")), "read_only"),
        ("log_file_missing_folder", "train", train("--no-save", "--log-file", str(tmp / "nodir/train.log")), None),
        ("generate_path_folder", "generate", [d, "--path", str(tmp / "ck_folder"), *GEN], None),
        ("validate_path_folder", "validate", [d, "--path", str(tmp / "ck_folder"), *VALID], None),
        ("save_interval_0", "train", train("--save-interval", "0", "--no-save"), None),
        ("clip_norm_neg", "train", train("--clip-norm", "-1", "--no-save"), None),
        ("inverse_sqrt_no_warmup", "train", train("--lr-scheduler", "inverse_sqrt", "--warmup-updates", "0",
                                                  "--no-save"), None),
        ("nbest_over_beam", "generate", [d, "--path", ck, "--batch-size", "16", "--beam", "2", "--nbest", "5",
                                         "--cpu"], None),
        ("restore_folder", "train", train("--save-dir", str(tmp / "s1"), "--restore-file", str(tmp / "ck_folder")), None),
        # found as fairseq opens the data or the checkpoint
        ("short_bin", "train", train("--no-save", data=str(tmp / "short_bin")), None),
        ("short_idx", "generate", [str(tmp / "short_idx"), "--path", ck, *GEN], None),
        ("empty_valid", "validate", [str(tmp / "empty_valid"), "--path", ck, *VALID], None),
        ("bad_dict", "generate", [str(tmp / "bad_dict"), "--path", ck, *GEN], None),
        ("generate_de_en", "generate", [deen, "--path", ck, *GEN], None),
        ("generate_de_en_flags", "generate", [deen, "--path", ck, *GEN, "-s", "en", "-t", "de"], None),
        ("validate_de_en", "validate", [deen, "--path", ck, *VALID], None),
        ("interactive_de_en", "interactive", [deen, "--path", ck, "--cpu", "--beam", "2"], None),
        ("restore_de_en", "train", train("--save-dir", str(tmp / "s2"), "--restore-file", ck, "--max-update", "10",
                                         data=deen), None),
        ("generate_more_words", "generate", [str(tmp / "more_words"), "--path", ck, *GEN], None),
        ("validate_swapped_dict", "validate", [str(tmp / "swapped_dict"), "--path", ck, *VALID], None),
        ("restore_other_depth", "train", train("--save-dir", str(tmp / "s3"), "--restore-file", ck,
                                               "--max-update", "10", "--encoder-layers", "3"), None),
        ("every_sentence_too_long", "train", train("--max-tokens", "3", "--no-save"), None),
        ("data_is_a_file", "train", train("--no-save", data=str(tmp / "a_file")), None),
        ("validate_missing_split", "validate", [d, "--path", ck, *VALID, "--valid-subset", "nope"], None),
        ("max_len_below_min_len", "generate", [d, "--path", ck, *GEN, "--max-len-b", "-50"], None),
        ("fp16_cpu", "train", train("--fp16", "--no-save"), None),
        ("generate_fp16_cpu", "generate", [d, "--path", ck, *GEN, "--fp16"], None),
        ("generate_b2t_fast", "generate", [d, "--path", ck, *GEN, "--b2t-fast"], None),
        ("max_tokens_1e20", "train", train("--max-tokens", "1e20", "--no-save"), None),
        ("generate_max_tokens_1e20", "generate", [d, "--path", ck, "--max-tokens", "1e20", "--cpu"], None),
        ("max_tokens_2_to_70", "train", train("--max-tokens", str(2 ** 70), "--no-save"), None),
        ("generate_batch_size_2_to_70", "generate", [d, "--path", ck, "--batch-size", str(2 ** 70), "--cpu"], None),
        ("unequal_sides", "train", train("--no-save", data=str(unequal)), None),
        ("generate_unequal_sides", "generate", [str(unequal), "--path", ck, *GEN], None),
        ("min_lr_without_warmup_init_lr", "train", train("--lr-scheduler", "inverse_sqrt", "--min-lr", "1e-9",
                                                         "--no-save"), None),
        ("min_lr_and_stop_min_lr", "train", train("--min-lr", "1e-9", "--stop-min-lr", "1e-8", "--no-save"), None),
        ("b2t_and_ln_position_post", "train", train("--residual-bottom-to-top", "--ln-position", "post", "--no-save"),
         None),
        ("unknown_arch", "train", train("--arch", "transformer_nope", "--no-save"), None),
        ("seed_2_to_40", "train", train("--seed", str(2 ** 40), "--no-save"), None),
        ("batch_multiple_0", "train", train("--required-batch-size-multiple", "0", "--no-save"), None),  # was SIGFPE
        ("batch_multiple_huge", "train", train("--required-batch-size-multiple", str(10 ** 12), "--no-save"), None),
        ("ffn_dim_absurd", "train", train("--encoder-ffn-embed-dim", str(10 ** 12), "--no-save"), None),
        ("positions_absurd", "train", train("--max-source-positions", str(10 ** 12), "--no-save"), None),
        ("layers_absurd", "train", train("--encoder-layers", str(10 ** 12), "--no-save"), None),  # never returned
        ("relu_dropout_absurd", "train", train("--relu-dropout", "1e20", "--no-save"), None),
        ("base_layers_one_process", "train", train("--base-layers", "1", "--no-save"), None),
        ("lenpen_absurd", "generate", [d, "--path", ck, *GEN, "--lenpen", "1e20"], None),
        ("topk_without_sampling", "generate", [d, "--path", ck, *GEN, "--sampling-topk", "3"], None),
        ("temperature_0", "generate", [d, "--path", ck, *GEN, "--temperature", "0"], None),
        ("beam_groups_indivisible", "generate", [d, "--path", ck, *GEN, "--diverse-beam-groups", "3"], None),
        ("full_disk", "train", train("--save-dir", str(tmp / "s4")), "full_disk"),
        ("file_too_big", "train", train("--save-dir", str(tmp / "s5")), "file_too_big"),
        ("zip_writer_fails", "train", train("--save-dir", str(tmp / "s6")), "zip_writer_fails"),
        ("ctrl_c", "train", train("--no-save"), "ctrl_c"),
    ]
    return run_commands_in_one_process(cases, tmp, env={"RO": str(tmp / "ro")}), tmp, ck


def error(bad, name, prog, *words):
    res = bad[0][name]
    assert res["code"] == 2, f"{name}: exit {res['code']}\n{res['stderr'][-3000:]}"
    return assert_one_line_error(res["stderr"], prog, *words)


@pytest.mark.parametrize("name,words", [
    ("max_tokens_0", ["--max-tokens 0", "at least 1", "--max-tokens 4096"]),
    ("update_freq_0", ["--update-freq 0", "at least 1", "1 accumulates none"]),
    ("encoder_layers_0", ["--encoder-layers 0", "at least 1"]),
    ("decoder_layers_neg", ["--decoder-layers -2", "at least 1"]),
    ("lr_0", ["--lr 0", "above 0"]),
    ("lr_neg", ["--lr -0.001", "above 0"]),
    ("max_update_neg", ["--max-update -1", "0 or more"]),
    ("dropout_1_5", ["--dropout 1.5", "probability"]),
    ("no_batch_size", ["no batch size", "--max-tokens", "--batch-size"]),
    ("save_dir_file", ["is a file, not a folder"]),
    ("save_dir_under_file", ["cannot be created", "a_file is a file"]),
    ("save_dir_read_only", ["cannot be written", "read-only"]),
    ("log_file_missing_folder", ["--log-file", "nodir does not exist", "create it"]),
    ("restore_folder", ["--restore-file", "is a folder", "checkpoint_last.pt"]),
    ("short_bin", ["train.en-de.en.bin is truncated", "binarize the data again"]),
    ("restore_de_en", ["translates en->de", "reversed: de->en", "-s en -t de"]),
    ("restore_other_depth", ["does not fit the model", "2 encoder layers", "3 encoder layers", "--encoder-layers"]),
    ("full_disk", ["no space left on the device", "--keep-last-epochs"]),
    ("file_too_big", ["larger than this system allows", "ulimit -f"]),
    ("zip_writer_fails", ["writing a checkpoint failed", "unexpected pos", "run the same command again"]),
    ("save_interval_0", ["--save-interval 0", "at least 1"]),
    ("clip_norm_neg", ["--clip-norm -1", "0 or more"]),
    ("inverse_sqrt_no_warmup", ["--warmup-updates 0 divides by zero", "--lr-scheduler fixed"]),
    ("every_sentence_too_long", ["no sentence left to batch", "raise --max-tokens"]),
    ("data_is_a_file", ["a_file is a file, not a folder", "fairseq-preprocess"]),
    ("fp16_cpu", ["--fp16 needs a CUDA GPU", "drop --fp16"]),
    ("max_tokens_1e20", ["--max-tokens", "invalid int value: '1e20'", "whole number"]),
    ("max_tokens_2_to_70", [f"--max-tokens {2 ** 70}: too large"]),
    ("unequal_sides", ["split 'train'", "400 en sentences but 40 de sentences", "binarize both sides together"]),
    ("min_lr_without_warmup_init_lr", ["--stop-min-lr 1e-09 (fairseq 0.9's --min-lr)", "update 0, 0 ",
                                       "--warmup-init-lr 1e-07"]),
    ("min_lr_and_stop_min_lr", ["--min-lr 1e-9 and --stop-min-lr 1e-8", "give one"]),
    ("b2t_and_ln_position_post", ["--residual-bottom-to-top (B2T) contradicts --ln-position post", "drop one"]),
    ("unknown_arch", ["invalid choice: 'transformer_nope'", "--help for the choices"]),
    ("seed_2_to_40", [f"--seed {2 ** 40}: at most 4294967295"]),
    ("batch_multiple_0", ["--required-batch-size-multiple 0", "at least 1"]),
    ("batch_multiple_huge", ["--required-batch-size-multiple 1000000000000: at most 2147483647"]),
    ("ffn_dim_absurd", ["the model has at least", "more than this machine's", "--encoder/decoder-layers"]),
    ("layers_absurd", ["the model has at least", "GiB with gradients"]),
    ("positions_absurd", ["out of memory", "GiB at once", "lower --max-tokens"]),
    ("relu_dropout_absurd", ["--relu-dropout 1e+20", "probability"]),
    ("base_layers_one_process", ["need a distributed run", "--base-layers"]),
])
def test_b2t_train_bad_input(bad, name, words):
    error(bad, name, "b2t-train", *words)


@pytest.mark.parametrize("name,prog,words", [
    ("beam_0", "b2t-generate", ["--beam 0", "greedy"]),
    ("validate_max_tokens_0", "b2t-validate", ["--max-tokens 0"]),
    ("generate_path_folder", "b2t-generate", ["is a folder", "checkpoint_best.pt"]),
    ("validate_path_folder", "b2t-validate", ["is a folder"]),
    ("short_idx", "b2t-generate", ["test.en-de.de.idx is truncated"]),
    ("empty_valid", "b2t-validate", ["split 'valid'", "has no sentences", "--valid-subset"]),
    ("bad_dict", "b2t-generate", ["dict.en.txt line", "is not '<word> <count>'", "'brokenline'"]),
    ("generate_de_en", "b2t-generate", ["translates en->de", "reversed: de->en", "-s en -t de"]),
    ("validate_de_en", "b2t-validate", ["translates en->de", "reversed: de->en", "-s en -t de"]),
    ("interactive_de_en", "b2t-interactive", ["translates en->de", "-s en -t de"]),
    ("generate_more_words", "b2t-generate", ["source dictionary", "has", "types", "--srcdict"]),
    ("validate_swapped_dict", "b2t-validate", ["another source dictionary", "same size", "--srcdict"]),
    ("nbest_over_beam", "b2t-generate", ["--nbest 5 is more than --beam 2"]),
    ("validate_missing_split", "b2t-validate", ["split 'nope' not found", "--valid-subset"]),
    ("max_len_below_min_len", "b2t-generate", ["below --min-len", "--max-len-b"]),
    ("generate_fp16_cpu", "b2t-generate", ["--fp16 needs a CUDA GPU", "drop --fp16"]),
    ("generate_b2t_fast", "b2t-generate", ["unrecognized arguments: --b2t-fast", "--model-overrides"]),
    ("generate_max_tokens_1e20", "b2t-generate", ["invalid int value: '1e20'"]),
    ("generate_batch_size_2_to_70", "b2t-generate", [f"--batch-size {2 ** 70}: too large"]),
    ("generate_unequal_sides", "b2t-generate", ["split 'test'", "40 en sentences but 400 de sentences"]),
    ("lenpen_absurd", "b2t-generate", ["--lenpen 1e+20: at most 100"]),
    ("topk_without_sampling", "b2t-generate", ["--sampling-topk requires --sampling", "change the flags"]),
    ("temperature_0", "b2t-generate", ["--temperature must be greater than 0"]),
    ("beam_groups_indivisible", "b2t-generate", ["--beam to be divisible by the number of groups"]),
])
def test_evaluation_bad_input(bad, name, prog, words):
    error(bad, name, prog, *words)


def test_the_fix_named_for_a_reversed_data_bin_works(bad):
    """-s en -t de, as the message says, decodes the de-en folder in the checkpoint's direction."""
    res = bad[0]["generate_de_en_flags"]
    assert res["code"] == 0, res["stderr"][-3000:]
    assert sum(ln.startswith("H-") for ln in res["stdout"].splitlines()) == 40


def test_ctrl_c_is_one_line(bad):
    res = bad[0]["ctrl_c"]
    assert res["code"] == 130 and "Traceback" not in res["stderr"], res["stderr"][-3000:]
    lines = [ln for ln in res["stderr"].splitlines() if ln.startswith("b2t-train: ")]
    assert lines == ["b2t-train: interrupted; run the same command again to resume"], lines


def test_checkpoints_record_their_data(bad):
    import torch

    state = torch.load(bad[2], map_location="cpu", weights_only=False)
    data = state["extra_state"]["b2t_data"]
    assert (data["source"]["lang"], data["target"]["lang"]) == ("en", "de")
    assert data["source"]["types"] == state["model"]["encoder.embed_tokens.weight"].shape[0]


# --- the checks, in-process -------------------------------------------------------------------

def _parsed(*argv, prog="b2t-train"):
    """argv as b2t-train reads it (fairseq's parser with the plugin; no data needed to parse)."""
    return cli.parse_args(prog, ["--user-dir", cli.PLUGIN_DIR, "DATA", "--arch", "transformer_b2t_tiny", *argv])


def test_flag_checks_accept_good_values():
    preflight.check_flags(_parsed("--max-tokens", "4096", "--update-freq", "1,2", "--lr", "5e-4", "--dropout", "0",
                                  "--encoder-embed-dim", "512", "--encoder-attention-heads", "8", "--max-update", "0"),
                          "b2t-train")
    with pytest.raises(ToolError, match="not divisible by --encoder-attention-heads 8"):
        preflight.check_flags(_parsed("--max-tokens", "1", "--encoder-embed-dim", "500", "--encoder-attention-heads", "8"))
    with pytest.raises(ToolError, match="--lr 0.1,0"):
        preflight.check_flags(_parsed("--max-tokens", "1", "--lr", "0.1,0"))


def test_a_stop_learning_rate_above_the_first_one_is_refused():
    """fairseq 0.9's --min-lr (0.12's --stop-min-lr) without --warmup-init-lr: inverse_sqrt starts at 0 and
    training stops before its first update, exit 0; the authors' command starts at 1e-07."""
    schedule = ["--max-tokens", "1", "--lr", "0.001", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000"]
    with pytest.raises(ToolError, match=r"--stop-min-lr 1e-09 .* at or above the learning rate at update 0, 0 "):
        preflight.check_flags(_parsed(*schedule, "--stop-min-lr", "1e-9"), "b2t-train")
    preflight.check_flags(_parsed(*schedule, "--stop-min-lr", "1e-9", "--warmup-init-lr", "1e-7"), "b2t-train")
    with pytest.raises(ToolError, match="at or above the learning rate at update 0, 0.001"):
        preflight.check_flags(_parsed("--max-tokens", "1", "--lr", "0.001", "--stop-min-lr", "0.01"), "b2t-train")
    assert preflight.start_lr(_parsed(*schedule, "--warmup-init-lr", "1e-7")) == pytest.approx(1e-7)


def test_explain_os_errors():
    from b2t_tools.commands.explain import explain

    full = OSError(errno.ENOSPC, "No space left on device", "/ck/checkpoint_last.pt.tmp")
    assert "no space left on the device writing /ck/checkpoint_last.pt.tmp" in explain(full, "b2t-train")
    ro = OSError(errno.EROFS, "Read-only file system", "/ck/dummy")
    assert "cannot write /ck/dummy (Read-only file system); pass a --save-dir" in explain(ro, "b2t-train")
    # a missing file outside fairseq's data reading is not blamed on the data directory
    assert explain(FileNotFoundError(errno.ENOENT, "No such file", "/x/log.txt"), "b2t-train") is None
