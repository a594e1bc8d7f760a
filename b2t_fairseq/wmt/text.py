"""Moses-compatible text processing (sacremoses) and the BLEU-side helpers.

``tokenize_line`` reproduces ``normalize-punctuation.perl -l L | remove-non-printing-char.perl |
tokenizer.perl -a -l L`` (reference section 5): the punctuation normalizer in perl-parity mode gets the
line with its newline, non-printing characters (``\\p{C}``) become spaces, and the last word's final
period is split off as tokenizer.perl does (sacremoses keeps it after a known prefix such as "U.S.").
"""

import re

import regex

_NONPRINT = regex.compile(r"\p{C}")
_LAST_PERIOD = re.compile(r"^(\S*[^.\s])\.$")  # "U.S." yes; "..." is DOTMULTI in Moses: no
_COMPOUND = re.compile(r"(\S)-(\S)")
_tools = {}


def _moses(lang):
    if lang not in _tools:
        from sacremoses import MosesDetokenizer, MosesPunctNormalizer, MosesTokenizer

        _tools[lang] = (MosesPunctNormalizer(lang, perl_parity=True), MosesTokenizer(lang), MosesDetokenizer(lang))
    return _tools[lang]


def tokenize_line(line, lang):
    """One raw line (no newline) -> Moses-tokenized text with aggressive hyphen splitting."""
    norm, tok, _ = _moses(lang)
    text = norm.normalize(line + "\n")
    if text.endswith("\n"):
        text = text[:-1]
    text = _NONPRINT.sub(" ", text)
    tokens = tok.tokenize(text, aggressive_dash_splits=True, escape=True, return_str=True).split()
    if tokens:
        m = _LAST_PERIOD.match(tokens[-1])
        if m:
            tokens[-1:] = [m.group(1), "."]
    return " ".join(tokens)


def detokenize_line(line, lang):
    """Moses-tokenized text (BPE already removed) -> plain text: undo @-@ splits and the XML escapes."""
    return _moses(lang)[2].detokenize(line.split())


def keep_pair(src, tgt, min_len=1, max_len=80, ratio=9.0):
    """clean-corpus-n.perl: both sides within [min_len, max_len] tokens and the length ratio <= ratio."""
    ns, nt = len(src.split()), len(tgt.split())
    if not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return False
    return ns / nt <= ratio and nt / ns <= ratio


def compound_split(line):
    """The ##AT## trick of tokenized WMT En-De BLEU: 'a-b' -> 'a ##AT##-##AT## b' (same on both sides)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)
