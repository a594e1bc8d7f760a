"""fairseq-fixed quirks the plugin repairs on import: no silently dropped batches."""

import numpy as np
from helpers import run, toy_train_argv, write_toy_corpus

import b2t_fairseq  # noqa: F401


def test_batching_keeps_every_sentence():
    from fairseq.data import data_utils

    sizes = np.array([5] * 21)
    for mult, max_sent in ((8, 16), (8, 5), (1, 4)):
        batches = data_utils.batch_by_size(np.arange(21), lambda i: sizes[i], max_sentences=max_sent,
                                           required_batch_size_multiple=mult)
        assert sorted(np.concatenate(batches).tolist()) == list(range(21)), (mult, max_sent)


def test_generate_translates_every_test_sentence(tmp_path, toy_data_bin):
    # 21 sentences: not a multiple of fairseq's default --required-batch-size-multiple 8
    raw = write_toy_corpus(tmp_path / "raw", sizes=(("test", 21),), seed=5)
    run(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--testpref", raw / "test",
         "--destdir", tmp_path / "bin", "--srcdict", toy_data_bin / "dict.en.txt", "--joined-dictionary",
         "--workers", "1"])
    run(["b2t-train", toy_data_bin, *toy_train_argv("--max-update", 1, "--save-dir", tmp_path / "ckpt",
                                                    max_tokens=1000, json_log=False)])
    for extra in (["--batch-size", "16"], ["--batch-size", "5"], ["--max-tokens", "4000"]):
        p = run(["b2t-generate", tmp_path / "bin", "--path", tmp_path / "ckpt/checkpoint_last.pt", "--beam", "1",
                 "--cpu", "--max-len-b", "5", *extra])
        assert sum(line.startswith("H-") for line in p.stdout.splitlines()) == 21, extra


def test_exact_resume_repair_matches_fairseq():
    """repairs.exact_resume relies on these shapes of fairseq's code; fail loudly when they change."""
    import inspect

    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.trainer import Trainer

    assert Trainer.get_train_iterator.b2t_wrapped  # applied by importing the plugin
    params = list(inspect.signature(Trainer.get_train_iterator.__wrapped__).parameters)
    assert params == ["self", "epoch", "combine", "load_dataset", "data_selector", "shard_batch_itr",
                      "disable_iterator_cache"]
    src = inspect.getsource(FairseqTask.get_batch_iterator)
    # the reason for the repair: batches made once, their length ties broken by a seed + epoch permutation
    assert "numpy_seed(seed + epoch)" in src and "self.dataset_to_epoch_iter[dataset] = epoch_iter" in src


def test_every_repair_is_in_place_and_its_fairseq_code_has_the_expected_shape():
    """Importing the plugin wraps exactly the fairseq/torch names repairs.py documents; if fairseq renames
    or re-signs one of them, this fails instead of the repair silently not applying."""
    import inspect

    import torch
    from fairseq import checkpoint_utils
    from fairseq.data import data_utils
    from fairseq.models.fairseq_model import BaseFairseqModel
    from fairseq.trainer import Trainer

    assert data_utils.batch_by_size.b2t_keeps_remainder
    assert list(inspect.signature(data_utils.batch_by_size.__wrapped__).parameters)[:7] == [
        "indices", "num_tokens_fn", "num_tokens_vec", "max_tokens", "max_sentences", "required_batch_size_multiple",
        "fixed_shapes"]  # fixed_shapes is read positionally (args[5] after indices)
    assert checkpoint_utils.PathManager.b2t_atomic
    for fn in (checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils._upgrade_state_dict,
               checkpoint_utils.overwrite_args_by_name, checkpoint_utils.load_model_ensemble_and_task,
               BaseFairseqModel.load_state_dict, Trainer.load_checkpoint, Trainer.state_dict,
               Trainer.get_train_iterator):
        assert getattr(fn, "b2t_wrapped", False), fn
    import argparse

    assert argparse.Namespace in torch.serialization.get_safe_globals()
