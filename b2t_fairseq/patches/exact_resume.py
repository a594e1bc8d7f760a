"""Behaviour change (our commands, or B2T_FAIRSEQ_STRICT=1): exact resume after epoch 1.

An uninterrupted run makes its batches once, in epoch 1 (``FairseqTask.get_batch_iterator`` breaks
length ties with a permutation seeded by seed + epoch, then caches the batches and only reshuffles
their order each epoch), but a run resumed in epoch E > 1 made them afresh with seed + E: other
sentences in each batch, and losses that drift from the uninterrupted run. A resumed run now makes
the epoch-1 batches, so it continues bit for bit. Runs whose batches fairseq rebuilds every epoch
(sharded data, --update-epoch-batch-itr, rebuild_batches) were exact already and are left alone.
Relies on: ``fairseq.trainer.Trainer.get_train_iterator(self, epoch, combine, load_dataset, data_selector,
shard_batch_itr, disable_iterator_cache)``, ``FairseqTask.dataset_to_epoch_iter``/``can_reuse_epoch_itr``
and the ``numpy_seed(seed + epoch)`` in ``FairseqTask.get_batch_iterator``.
"""

import functools
import logging

logger = logging.getLogger(__name__)


def _batches_rebuilt_every_epoch(trainer, disable_iterator_cache):
    task, split = trainer.task, trainer.cfg.dataset.train_subset
    return (disable_iterator_cache or getattr(trainer.cfg.dataset, "update_epoch_batch_itr", False)
            or getattr(task.cfg, "rebuild_batches", False) or task.has_sharded_data(split))


def needed():
    """Only where the batches depend on the epoch: upstream fairseq 0.12.2 seeds them with the seed alone,
    so a resumed run there makes the same batches already."""
    import inspect

    from fairseq.tasks.fairseq_task import FairseqTask

    return "numpy_seed(seed + epoch)" in inspect.getsource(FairseqTask.get_batch_iterator)


def install():
    from fairseq.trainer import Trainer

    get = Trainer.get_train_iterator
    if getattr(get, "b2t_exact_resume", False) or getattr(install, "skipped", False):
        return
    if not needed():
        install.skipped = True
        logger.info("patch exact_resume skipped: this fairseq makes the same batches in every epoch, so a resumed "
                    "run continues bit for bit without it")
        return

    @functools.wraps(get)
    def get_train_iterator(self, epoch, combine=True, load_dataset=True, data_selector=None,
                           shard_batch_itr=True, disable_iterator_cache=False):
        kw = dict(combine=combine, data_selector=data_selector, shard_batch_itr=shard_batch_itr,
                  disable_iterator_cache=disable_iterator_cache)
        if epoch <= 1 or _batches_rebuilt_every_epoch(self, disable_iterator_cache):
            return get(self, epoch, load_dataset=load_dataset, **kw)
        task, split = self.task, self.cfg.dataset.train_subset
        if load_dataset:
            logger.info("loading train data for epoch %d", epoch)
            task.load_dataset(split, epoch=epoch, combine=combine, data_selector=data_selector, tpu=self.tpu)
        dataset = task.dataset(split)
        if dataset in getattr(task, "dataset_to_epoch_iter", {}) or not task.can_reuse_epoch_itr(dataset):
            return get(self, epoch, load_dataset=False, **kw)  # cached, or rebuilt every epoch anyway
        logger.info("resuming in epoch %d: making the batches of epoch 1, as an uninterrupted run did", epoch)
        itr = get(self, 1, load_dataset=False, **kw)
        itr.epoch = epoch
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        return itr

    get_train_iterator.b2t_exact_resume = True
    Trainer.get_train_iterator = get_train_iterator
