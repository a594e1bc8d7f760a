"""The authors' ``train.py`` command lines (their fairseq-0.9 fork) for ``b2t-train``, translated.

The fork adds to fairseq's stock ``transformer`` model the switch ``--residual-bottom-to-top`` and
the perturbation flags ``--sampling-method/--enc-replace-rate/--dec-replace-rate/--decay-val``; and
fairseq 0.9's ``--min-lr`` is called ``--stop-min-lr`` today. ``translate(argv)`` rewrites them:

- ``--arch transformer_wmt_en_de`` (or ``transformer``) together with any fork flag becomes the named
  architecture of the layer type the fork builds from these flags (its ``TransformerEncoderLayer``:
  ``--residual-bottom-to-top`` is B2T with its rescaled initialization, ``--encoder-normalize-before
  --decoder-normalize-before`` Pre-LN, neither Post-LN), with the same sizes: ``transformer_b2t``,
  ``transformer_pre_ln`` or ``transformer_post_ln``. Word dropout alone does not make B2T. fairseq's
  default ``--dropout 0.1`` is passed when the command has none (the named architectures' own default is
  the paper's 0.3). What the fork would build but no layer type here is (B2T on Pre-LN layers, Pre-LN on
  one side only) is refused;
- ``--sampling-method worddrop --enc-replace-rate P --dec-replace-rate Q`` becomes
  ``--word-dropout-src P --word-dropout-tgt Q``; ``none`` drops the rates (the fork ignores them
  too); the fork's other perturbations are a one-line error;
- ``--decay-val`` is dropped (only the fork's replacement perturbations use it, not word dropout);
- ``--min-lr X`` becomes ``--stop-min-lr X`` (fairseq 0.9 stopped training when the learning rate
  fell to ``--min-lr``; 0.12 calls that ``--stop-min-lr``, and fairseq's own checkpoint upgrade maps
  it the same way), unless the chosen ``--lr-scheduler`` has a ``--min-lr`` of its own (cosine, step);
  with ``--stop-min-lr`` too, the two must agree. (A stop value at or above the schedule's first
  learning rate, as ``--min-lr`` without ``--warmup-init-lr`` gives in both fairseq versions, trains
  nothing: preflight.py refuses it.)
"""

import sys

from ..errors import ToolError

FORK_FLAGS = ("--residual-bottom-to-top", "--sampling-method", "--enc-replace-rate", "--dec-replace-rate",
              "--decay-val")
STOCK_ARCHS = ("transformer", "transformer_wmt_en_de")  # the sizes of the named architectures
SWITCHES = ("--residual-bottom-to-top", "--encoder-normalize-before", "--decoder-normalize-before")
SAMPLING_OTHERS = ("similarity", "uniform", "condprob", "worddrop_with_sim", "worddrop_with_sim_enc_drop",
                   "worddrop_with_uni", "worddrop_with_uni_enc_drop")
VALUED = ("--arch", "-a", "--sampling-method", "--enc-replace-rate", "--dec-replace-rate", "--decay-val", "--min-lr",
          "--stop-min-lr", "--lr-scheduler", "--dropout")


def _split(argv):
    """[(flag, value or None, original tokens)] for the flags we care about; other tokens pass through."""
    items, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, _, inline = a.partition("=")
        if name in VALUED and a.startswith("-"):
            if inline or "=" in a:
                items.append((name, inline, [a]))
                i += 1
            elif i + 1 < len(argv):
                items.append((name, argv[i + 1], [a, argv[i + 1]]))
                i += 2
            else:
                items.append((name, None, [a]))
                i += 1
        else:
            items.append((a if a in SWITCHES else None, None, [a]))
            i += 1
    return items


def _last(items, flag):
    vals = [v for f, v, _ in items if f == flag]
    return vals[-1] if vals else None


def _rate(items, flag):
    v = _last(items, flag)
    if v is None:
        return 0.0
    try:
        p = float(v)
    except ValueError:
        raise ToolError(f"{flag} {v}: not a number; give a probability such as 0.1") from None
    if not 0.0 <= p < 1.0:
        raise ToolError(f"{flag} {v}: must be in [0, 1); the authors use 0.1")
    return p


def _scheduler_has_min_lr(name):
    try:
        from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY
    except ImportError:  # pragma: no cover
        return False
    dc = LR_SCHEDULER_DATACLASS_REGISTRY.get(name)
    return dc is not None and "min_lr" in getattr(dc, "__dataclass_fields__", {})


def _layer_family(items):
    """The named architecture of the layer type the fork's TransformerEncoder/DecoderLayer build from these flags."""
    from b2t_fairseq import layer_types

    b2t = any(f == "--residual-bottom-to-top" for f, _, _ in items)
    enc, dec = (any(f == f"--{side}-normalize-before" for f, _, _ in items) for side in ("encoder", "decoder"))
    if b2t and (enc or dec):
        raise ToolError("--residual-bottom-to-top with --*-normalize-before: the authors' code then adds the "
                       "bottom-to-top path to Pre-LN layers, a model the paper does not define and b2t-train does not "
                       "build; drop --residual-bottom-to-top (Pre-LN) or the --*-normalize-before flags (B2T)")
    if enc != dec:
        raise ToolError(f"--{'encoder' if enc else 'decoder'}-normalize-before without the other side's: the authors' "
                       "code builds a Pre-LN stack there and a Post-LN one on the other side, which b2t-train does not "
                       "build; give both --encoder-normalize-before and --decoder-normalize-before (Pre-LN) or neither")
    return layer_types.BY_KEY["b2t" if b2t else "pre" if enc else "post"].family


def uses_fork_flags(argv):
    return any(a.split("=", 1)[0] in FORK_FLAGS for a in argv)


def translate(argv):
    """argv with the fork's flags rewritten for b2t-train (unchanged when it has none of them)."""
    items = _split(list(argv))
    fork = uses_fork_flags(argv)
    scheduler = _last(items, "--lr-scheduler")
    translate_min_lr = _last(items, "--min-lr") is not None and not _scheduler_has_min_lr(scheduler)
    if not fork and not translate_min_lr:
        return list(argv)
    method = _last(items, "--sampling-method") or "none"
    if method in SAMPLING_OTHERS:
        raise ToolError(f"--sampling-method {method} (the authors' token-replacement perturbation) is not implemented "
                       "here; use --sampling-method worddrop (word dropout, the paper's 18-layer recipe) or drop it")
    if method not in ("none", "worddrop"):
        raise ToolError(f"--sampling-method {method}: unknown; the authors' code knows none, worddrop and replacement "
                       "methods, of which b2t-train implements worddrop")
    enc_p, dec_p = _rate(items, "--enc-replace-rate"), _rate(items, "--dec-replace-rate")
    decay = _last(items, "--decay-val")
    if decay is not None:
        try:
            int(decay)
        except ValueError:
            raise ToolError(f"--decay-val {decay}: not a whole number (the authors use 1000)") from None
    if translate_min_lr and _last(items, "--stop-min-lr") not in (None, _last(items, "--min-lr")):
        raise ToolError(f"--min-lr {_last(items, '--min-lr')} and --stop-min-lr {_last(items, '--stop-min-lr')}: both "
                       "set the learning rate at which training stops (fairseq 0.9 called it --min-lr); give one")
    arch = _last(items, "--arch") or _last(items, "-a")
    family = _layer_family(items) if fork else None
    out, redirected = [], False
    for flag, value, tokens in items:
        if flag in ("--arch", "-a") and fork:
            if value in STOCK_ARCHS:
                out += ["--arch", family]
                redirected = True
            elif value is not None and not value.startswith(("transformer_b2t", "transformer_post_ln",
                                                             "transformer_pre_ln")):
                raise ToolError(f"--arch {value} with the authors' flags ({', '.join(FORK_FLAGS)}): b2t-train "
                               "translates --arch transformer_wmt_en_de; for other sizes use --arch transformer_b2t "
                               "with --encoder-embed-dim etc.")
            else:
                out += tokens
        elif flag in ("--sampling-method", "--enc-replace-rate", "--dec-replace-rate", "--decay-val") and fork:
            continue
        elif flag == "--min-lr" and translate_min_lr:
            out += ["--stop-min-lr", value] if value is not None else tokens
        else:
            out += tokens
    if fork and arch is None:
        out += ["--arch", family]  # fairseq 0.9's default arch was the stock transformer
        redirected = True
    if redirected and _last(items, "--dropout") is None:
        out += ["--dropout", "0.1"]  # the stock architecture's default, not transformer_b2t's 0.3
    if fork and method == "worddrop":
        out += ["--word-dropout-src", repr(enc_p), "--word-dropout-tgt", repr(dec_p)]
    elif fork and method == "none" and (enc_p or dec_p):
        print("b2t-train: note: --enc/dec-replace-rate without --sampling-method do nothing (as in the authors' "
              "code); add --sampling-method worddrop for word dropout", file=sys.stderr)
    return out
