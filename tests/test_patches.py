"""b2t_fairseq/patches: what importing the plugin changes in fairseq, and the shape of the fairseq code each
patch relies on (if fairseq renames or re-signs it, these fail instead of a patch silently not applying)."""

import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import run, toy_train_argv, write_toy_corpus

import b2t_fairseq  # noqa: F401
from b2t_fairseq import patches
from b2t_fairseq.patches import context


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


def test_exact_resume_relies_on_this_fairseq_code(monkeypatch):
    """patches/exact_resume.py relies on these shapes of fairseq's code."""
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.trainer import Trainer

    from b2t_fairseq.patches import exact_resume

    monkeypatch.delenv(patches.STRICT_ENV, raising=False)  # restored after: other tests' subprocesses
    patches.enable_behaviour()
    src = inspect.getsource(FairseqTask.get_batch_iterator)
    if not exact_resume.needed():  # upstream 0.12.2: batches seeded without the epoch, exact already
        assert "numpy_seed(seed)" in src and not getattr(Trainer.get_train_iterator, "b2t_exact_resume", False)
        return
    assert Trainer.get_train_iterator.b2t_exact_resume
    params = list(inspect.signature(Trainer.get_train_iterator.__wrapped__).parameters)
    assert params == ["self", "epoch", "combine", "load_dataset", "data_selector", "shard_batch_itr",
                      "disable_iterator_cache"]
    src = inspect.getsource(FairseqTask.get_batch_iterator)
    # the reason for the patch: batches made once, their length ties broken by a seed + epoch permutation
    assert "numpy_seed(seed + epoch)" in src and "self.dataset_to_epoch_iter[dataset] = epoch_iter" in src
    assert hasattr(FairseqTask, "can_reuse_epoch_itr") and hasattr(FairseqTask, "has_sharded_data")


def _params(fn):
    return list(inspect.signature(inspect.unwrap(fn)).parameters)


def test_torch_load_relies_on_safe_globals():
    import argparse

    assert argparse.Namespace in torch.serialization.get_safe_globals()


def test_remainder_batches_relies_on_batch_by_size():
    from fairseq.data import data_utils

    assert data_utils.batch_by_size.b2t_keeps_remainder
    assert _params(data_utils.batch_by_size)[:7] == [
        "indices", "num_tokens_fn", "num_tokens_vec", "max_tokens", "max_sentences", "required_batch_size_multiple",
        "fixed_shapes"]  # fixed_shapes is read positionally (args[5] after indices)


def test_atomic_checkpoints_relies_on_fairseqs_save_path():
    from fairseq import checkpoint_utils, trainer

    assert checkpoint_utils.PathManager.b2t_atomic and checkpoint_utils.torch_persistent_save.b2t_wrapped
    assert _params(checkpoint_utils.torch_persistent_save) == ["obj", "filename", "async_write"]
    # both are looked up as module attributes when fairseq saves, so replacing them takes effect
    assert "checkpoint_utils.torch_persistent_save(" in inspect.getsource(trainer.Trainer.save_checkpoint)
    assert "PathManager.copy(" in inspect.getsource(checkpoint_utils.save_checkpoint)
    assert hasattr(checkpoint_utils.PathManager, "supports_rename")


def test_checkpoint_load_relies_on_load_checkpoint_to_cpu():
    from fairseq import checkpoint_utils

    for name in ("load_checkpoint_to_cpu", "overwrite_args_by_name", "_upgrade_state_dict"):
        assert getattr(checkpoint_utils, name).b2t_checkpoint_load, name
    assert _params(checkpoint_utils.load_checkpoint_to_cpu)[:2] == ["path", "arg_overrides"]
    src = inspect.getsource(inspect.unwrap(checkpoint_utils.load_checkpoint_to_cpu))
    assert 'overwrite_args_by_name(state["cfg"], arg_overrides)' in src and "_upgrade_state_dict(state)" in src
    assert _params(checkpoint_utils.overwrite_args_by_name) == ["cfg", "overrides"]


def test_layer_type_guard_relies_on_load_state_dict():
    from fairseq.models.fairseq_model import BaseFairseqModel

    assert BaseFairseqModel.load_state_dict.b2t_layer_guard
    assert _params(BaseFairseqModel.load_state_dict) == ["self", "state_dict", "strict", "model_cfg", "args"]


def test_data_files_relies_on_fairseqs_readers():
    from fairseq.data import data_utils, indexed_dataset
    from fairseq.data.dictionary import Dictionary

    assert data_utils.load_indexed_dataset.b2t_data_files and Dictionary.add_from_file.b2t_data_files
    assert _params(data_utils.load_indexed_dataset)[0] == "path"
    assert _params(Dictionary.add_from_file) == ["self", "f"]
    src = inspect.getsource(Dictionary)
    assert "Incorrect dictionary format" in src and "Duplicate word found" in src
    assert indexed_dataset.MMapIndexedDataset.Index._HDR_MAGIC == b"MMIDIDX\x00\x00"


def test_data_fit_relies_on_trainer_and_ensemble_loading(monkeypatch):
    from fairseq import checkpoint_utils
    from fairseq.models.fairseq_model import BaseFairseqModel
    from fairseq.trainer import Trainer

    monkeypatch.delenv(patches.STRICT_ENV, raising=False)
    patches.enable_behaviour()
    for fn in (checkpoint_utils.load_model_ensemble_and_task, Trainer.load_checkpoint, Trainer.state_dict,
               BaseFairseqModel.load_state_dict):
        assert getattr(fn, "b2t_data_fit", False), fn
    assert _params(checkpoint_utils.load_model_ensemble_and_task)[:3] == ["filenames", "arg_overrides", "task"]
    assert _params(Trainer.state_dict) == ["self"]


def test_run_guards_rely_on_where_every_training_entry_point_resumes(monkeypatch):
    """patches/run_guards.py wraps checkpoint_utils.load_checkpoint, which fairseq_cli/train.py's main
    (fairseq-train, fairseq-hydra-train and ours) calls as a module attribute, and reads these of the trainer."""
    import fairseq_cli.train
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq.trainer import Trainer

    monkeypatch.delenv(patches.STRICT_ENV, raising=False)
    patches.enable_behaviour()
    assert checkpoint_utils.load_checkpoint.b2t_run_guards
    assert checkpoint_utils.load_model_ensemble_and_task.b2t_run_guards
    assert _params(checkpoint_utils.load_checkpoint) == ["cfg", "trainer", "passthrough_args"]
    assert "checkpoint_utils.load_checkpoint(" in inspect.getsource(fairseq_cli.train.main)
    assert "from fairseq import checkpoint_utils" in inspect.getsource(fairseq_cli.train)
    for name in ("checkpoint_suffix", "get_model", "device", "task", "cfg"):
        assert hasattr(Trainer, name) or name in inspect.getsource(Trainer.__init__), name
    src = inspect.getsource(inspect.unwrap(checkpoint_utils.load_checkpoint))  # the rule resume_target repeats
    for key in ("restore_file", "continue_once", "finetune_from_model", "reset_dataloader", "checkpoint_last{}.pt"):
        assert key in src, key
    assert _params(distributed_utils.broadcast_object) == ["obj", "src_rank", "group", "dist_device"]


def test_collective_timeout_relies_on_timeout_arguments():
    import torch.distributed as dist

    for fn in (dist.init_process_group, dist.new_group):
        assert "timeout" in _params(fn), fn


# fairseq names the behaviour changes wrap (the repairs' names are checked above)
BEHAVIOUR_PROBE = r"""
import b2t_fairseq
from fairseq import checkpoint_utils
from fairseq.trainer import Trainer
print(getattr(Trainer.get_train_iterator, "b2t_exact_resume", False),
      getattr(checkpoint_utils.load_model_ensemble_and_task, "b2t_data_fit", False),
      getattr(checkpoint_utils.load_checkpoint_to_cpu, "b2t_checkpoint_load", False),
      getattr(checkpoint_utils.load_checkpoint, "b2t_run_guards", False))
"""


@pytest.mark.slow  # a child process or a whole pipeline: e2e
def test_behaviour_changes_only_with_the_switch():
    """Importing the plugin repairs fairseq but changes no behaviour; B2T_FAIRSEQ_STRICT=1 (which our
    commands set for their fairseq workers) adds exact resume and the data-fit check."""
    env = {k: v for k, v in os.environ.items() if k != patches.STRICT_ENV}
    plain = subprocess.run([sys.executable, "-c", BEHAVIOUR_PROBE], env=env, capture_output=True, text=True)
    strict = subprocess.run([sys.executable, "-c", BEHAVIOUR_PROBE], env={**env, patches.STRICT_ENV: "1"},
                            capture_output=True, text=True)
    assert plain.stdout.split() == ["False", "False", "True", "False"], plain.stderr[-2000:]
    assert strict.stdout.split() == ["True", "True", "True", "True"], strict.stderr[-2000:]


def test_every_installer_is_idempotent():
    from fairseq import checkpoint_utils
    from fairseq.models.fairseq_model import BaseFairseqModel

    before = (checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.torch_persistent_save,
              BaseFairseqModel.load_state_dict)
    patches.install()
    for patch in patches.REPAIRS:
        patch()
    assert before == (checkpoint_utils.load_checkpoint_to_cpu, checkpoint_utils.torch_persistent_save,
                      BaseFairseqModel.load_state_dict)


# --- the loading context ---------------------------------------------------------------------

def test_weights_carry_their_origin_and_save_as_a_plain_dict(tmp_path):
    import collections

    origin = context.Origin("checkpoint x.pt", "b2t")
    w = context.attach(collections.OrderedDict(a=torch.ones(2)), origin)
    assert context.origin_of(w) is origin and context.origin_of({"a": 1}) is None
    torch.save({"model": w}, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)["model"]  # nothing of ours in the file
    assert type(back) is collections.OrderedDict and torch.equal(back["a"], torch.ones(2))


def test_nested_loads_share_the_task_and_see_each_checkpoint():
    task = object()
    with context.loading(task=task) as outer:
        with context.loading(path="a.pt") as inner:
            assert context.current() is inner and inner.task is task and inner.path == "a.pt"
            context.record(context.Origin("checkpoint a.pt", "post"))
        assert context.current() is outer
    assert context.current() is None
    assert [o.where for o in outer.seen] == ["checkpoint a.pt"]


def test_numpy_compat_relies_on_fairseqs_numpy_names():
    import importlib
    import inspect

    from b2t_fairseq.patches import numpy_compat

    for name, needed in numpy_compat.MODULES.items():
        module = importlib.import_module(name)
        source = inspect.getsource(module)
        assert "import numpy as np" in source, name
        for attr in needed:
            assert f"np.{attr}" in source, (name, attr)  # fairseq still uses the removed name
            assert getattr(module.np, attr) is not None  # and the plugin's np has it


def test_encoder_fast_path_relies_on_this_fairseq_code():
    """patches/encoder_fast_path.py: on a fairseq with the fused path (upstream 0.12.2) both forwards take it
    only when ``load_to_BT`` is set, which only the layer's state-dict loader sets; elsewhere it is absent."""
    from fairseq.models.transformer import transformer_encoder
    from fairseq.modules import transformer_layer

    from b2t_fairseq.patches import encoder_fast_path

    layer_src = inspect.getsource(transformer_layer.TransformerEncoderLayerBase)
    encoder_src = inspect.getsource(transformer_encoder)
    if encoder_fast_path.has_fast_path(transformer_layer.TransformerEncoderLayerBase):
        assert "and self.load_to_BT" in layer_src and "and layer.load_to_BT" in encoder_src
        assert layer_src.count("self.load_to_BT = True") == 1
        assert transformer_layer.TransformerEncoderLayerBase._load_from_state_dict.b2t_no_fast_path
    else:  # fairseq-fixed: no fused path, nothing patched
        assert "load_to_BT" not in layer_src and "_transformer_encoder_layer_fwd" not in encoder_src


def test_broadcast_load_relies_on_fairseqs_slow_broadcast():
    from fairseq.distributed import utils as distributed_utils

    assert distributed_utils._broadcast_object_slow.b2t_trusted_receive
    assert _params(distributed_utils._broadcast_object_slow) == ["obj", "src_rank", "group", "dist_device"]
    # looked up as a module global by broadcast_object, so replacing it takes effect
    assert "_broadcast_object_slow(" in inspect.getsource(distributed_utils.broadcast_object)
    src = inspect.getsource(inspect.unwrap(distributed_utils._broadcast_object_slow))
    # the receiver reads what the sender wrote: a length, then torch.save's bytes
    assert "torch.save(obj, buffer)" in src and "broadcast(length, src=src_rank, group=group)" in src
