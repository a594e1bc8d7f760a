"""Build stock fairseq and plugin models in-process, exactly as fairseq-train would."""

import torch
from fairseq import options, tasks

import b2t_fairseq  # noqa: F401  (registers transformer_b2t)

TINY = ["--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "4",
        "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "4",
        "--encoder-layers", "3", "--decoder-layers", "2"]


def parse(data_bin, arch, *extra):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, [str(data_bin), "--task", "translation", "--arch", arch, "--share-all-embeddings", "--cpu", *extra])


def build(data_bin, arch, *extra, seed=1):
    args = parse(data_bin, arch, *extra)
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    model = task.build_model(args)
    return model, task, args


def toy_batch(task, bsz=4, src_len=7, tgt_len=6, seed=0):
    """Random token ids from the task's dictionary, with some left padding on the source."""
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    lo, hi = d.nspecial, len(d)
    src = torch.randint(lo, hi, (bsz, src_len), generator=g)
    src[0, :2] = d.pad()  # left-padded like fairseq's translation task
    src[:, -1] = d.eos()
    lengths = (src != d.pad()).sum(1)
    tgt = torch.randint(lo, hi, (bsz, tgt_len), generator=g)
    prev = torch.cat([torch.full((bsz, 1), d.eos()), tgt[:, :-1]], dim=1)
    return src, lengths, prev
