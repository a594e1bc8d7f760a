"""Moses-compatible text processing for Google's WMT'16 En-De recipe, written from the behaviour of the perl
scripts (our own code; tests/test_wmt_text.py runs the real scripts and compares byte for byte).

- ``moses_tokenize``   ``tokenizer.perl -q -l LANG`` as it was in mosesdecoder when Google built the archive
  (spring 2017): no ``-a``, XML escapes on, the rules of 2016 (a comma after a number at the end of a line
  is split off; a final ``.'`` is split) and NOT the rule of November 2018 that splits every final period
  (mosesdecoder PR #204): "U.S." at the end of a line stays one token, as in Google's files.
- ``sgm_segments``     ``input-from-sgm.perl`` (bytes, ASCII whitespace, multi-line segments joined as perl does).
- ``clean_pair``       ``clean-corpus-n.perl CORPUS de en OUT 1 80`` (ratio 9, max word length 1000).
- ``moses_detokenize`` ``detokenizer.perl -l LANG`` (sacremoses, checked against the perl script).
- ``compound_split``   the ``##AT##`` step of fairseq's ``scripts/compound_split_bleu.sh``.

Character classes come from the pinned ``regex`` module (its Unicode tables); perl uses its own Unicode
version, so the two can differ only on characters whose properties changed between the two versions.
"""

import codecs
import functools
import hashlib
import re
from pathlib import Path

import regex

# --- bytes that are not UTF-8 ----------------------------------------------------------------------
# tokenizer.perl and clean-corpus-n.perl read with perl's lax :utf8 layer: an encoded surrogate (ED A0..BF xx)
# is one character that is neither a letter nor a space, and comes out as the same three bytes; input-from-sgm.perl
# and cat copy bytes. BYTES is a codec error handler that keeps every such byte sequence: an encoded surrogate
# decodes to that surrogate (as perl reads it), any other byte that is not UTF-8 to the private-use character
# U+10FF00 + byte (a symbol, neither letter nor space; modern perl dies on such bytes, the 2017 scripts had no
# defined behaviour), and ``encode`` turns both back into the bytes they came from. (A real U+10FF80..U+10FFFF in
# the text would come back as one byte: private-use plane 16 is not in WMT's text.)
BYTES = "b2t-bytes"
_BYTE_BASE = 0x10FF00
_ESCAPED = re.compile("[\U0010ff80-\U0010ffff]+")


def _bytes_handler(e):
    if isinstance(e, UnicodeDecodeError):
        raw, i = e.object, e.start
        b = raw[i:i + 3]
        if len(b) == 3 and b[0] == 0xED and 0xA0 <= b[1] <= 0xBF and 0x80 <= b[2] <= 0xBF:
            return chr(0xD000 | ((b[1] & 0x3F) << 6) | (b[2] & 0x3F)), i + 3
        return chr(_BYTE_BASE + raw[i]), i + 1
    raise e


codecs.register_error(BYTES, _bytes_handler)


def decode(raw):
    return raw.decode("utf-8", BYTES)


def encode(text):
    """The bytes ``decode`` read (surrogates as perl writes them, escaped bytes as themselves)."""
    if not _ESCAPED.search(text):
        return text.encode("utf-8", "surrogatepass")
    out, pos = [], 0
    for m in _ESCAPED.finditer(text):
        out.append(text[pos:m.start()].encode("utf-8", "surrogatepass"))
        out.append(bytes(ord(c) - _BYTE_BASE for c in m.group()))
        pos = m.end()
    out.append(text[pos:].encode("utf-8", "surrogatepass"))
    return b"".join(out)


# perl's \s on character strings (perlrecharclass): ASCII \t \n \v \f \r and space plus the Unicode spaces.
# Python's own \s also matches \x1c-\x1f, which perl does not (tokenizer.perl deletes them instead).
_PERL_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE = f"[{_PERL_SPACE}]"
_ALNUM = r"\p{Alphabetic}\p{Nd}"  # perl \p{IsAlnum} = XPosixAlnum
_ALPHA = r"\p{Alphabetic}"  # perl \p{IsAlpha}
_NUM = r"\p{N}"  # perl \p{IsN}
_LOWER = r"\p{Lowercase}"  # perl \p{IsLower}

_R = {
    "blank_line": regex.compile(f"^{_SPACE}*$"),
    "space_run": regex.compile(f"{_SPACE}+"),
    "junk": regex.compile(r"[\x00-\x1f]"),
    "special": regex.compile(f"([^{_ALNUM}{_PERL_SPACE}.'`,\\-])"),
    "aggressive": regex.compile(f"([{_ALNUM}])-(?=[{_ALNUM}])"),
    "comma1": regex.compile(f"([^{_NUM}])[,]"),
    "comma2": regex.compile(f"[,]([^{_NUM}])"),
    "comma3": regex.compile(f"([{_NUM}])[,]$"),
    "en_apos": [(regex.compile(f"([^{_ALPHA}])[']([^{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([^{_ALPHA}{_NUM}])[']([{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([{_ALPHA}])[']([^{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([{_ALPHA}])[']([{_ALPHA}])"), r"\1 '\2"),
                (regex.compile(f"([{_NUM}])[']([s])"), r"\1 '\2")],
    "fr_apos": [(regex.compile(f"([^{_ALPHA}])[']([^{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([^{_ALPHA}])[']([{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([{_ALPHA}])[']([^{_ALPHA}])"), r"\1 ' \2"),
                (regex.compile(f"([{_ALPHA}])[']([{_ALPHA}])"), r"\1' \2")],
    "split": regex.compile(_SPACE),
    "final_dot": regex.compile(f"^([^{_PERL_SPACE}]+)\\.$"),
    "lower_start": regex.compile(f"^[{_LOWER}]"),
    "digit_start": regex.compile(r"^[0-9]+"),
    "dot_apos_end": regex.compile(r"\.' ?$"),
}
# tokenizer.perl's escapes, in its order (& first); these are the escapes the model sees
ESCAPES = (("&", "&amp;"), ("|", "&#124;"), ("<", "&lt;"), (">", "&gt;"), ("'", "&apos;"), ('"', "&quot;"),
           ("[", "&#91;"), ("]", "&#93;"))


# Moses' scripts/share/nonbreaking_prefixes as Google's script cloned them in March 2017 (mosesdecoder
# 1d6500619, 2017-03-29: nonbreaking_prefix.en as of 7c507bfa7, 2015-01-19; .de as of 93bff3f20, 2012-06-26):
# the SHA-256 of each file, and the lines Moses added since (4da86c360, 2019-11-05: "# rupees" / "Rs"), which
# are taken out of sacremoses' newer copy.
PREFIXES_2017 = {
    "en": ("82ed99e34cd69b449f150d17b369041604861d1b9b2a7932794d1269785596ad", (b"# rupees\n", b"Rs\n")),
    "de": ("caec29277f3cb15748430cdcd41dc341d3d01aab7ef849cda131818b3e52df83", ()),
}


class PrefixFileError(ValueError):
    pass


def prefix_file_2017(lang):
    """The bytes of Moses' nonbreaking_prefix.LANG of March 2017, from sacremoses' copy (checked by SHA-256)."""
    import sacremoses

    path = Path(sacremoses.__file__).parent / "data" / "nonbreaking_prefixes" / f"nonbreaking_prefix.{lang}"
    want, later = PREFIXES_2017[lang]
    data = path.read_bytes()
    if later:
        data = data.replace(b"".join(later), b"", 1)
    if hashlib.sha256(data).hexdigest() != want:
        raise PrefixFileError(f"{path} (sacremoses {getattr(sacremoses, '__version__', '?')}) is not Moses' "
                              f"nonbreaking_prefix.{lang} of March 2017 plus known later lines; install the "
                              "sacremoses of requirements.txt")
    return data


@functools.lru_cache(maxsize=None)
def nonbreaking_prefixes(lang, path=None):
    """{prefix: 1 (always) or 2 (only before a number)}, read as tokenizer.perl's load_prefixes does
    (no stripping; a line that is empty, "0" or starts with # is skipped). Default: for en and de Moses' files
    of March 2017 (``prefix_file_2017``), for other languages sacremoses' copy of Moses' current files."""
    if path is None and lang in PREFIXES_2017:
        lines = prefix_file_2017(lang).decode("utf-8").split("\n")
        lines = [x + "\n" for x in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    else:
        if path is None:
            import sacremoses

            folder = Path(sacremoses.__file__).parent / "data" / "nonbreaking_prefixes"
            path = folder / f"nonbreaking_prefix.{lang}"
            if not path.exists():
                path = folder / "nonbreaking_prefix.en"
        with open(path, encoding="utf-8", newline="\n") as f:
            lines = list(f)
    out = {}
    for item in lines:
        item = item[:-1] if item.endswith("\n") else item
        if item and item != "0" and not item.startswith("#"):
            m = re.match(r"(.*)[\s]+(#NUMERIC_ONLY#)", item)
            if m:
                out[m.group(1)] = 2
            else:
                out[item] = 1
    return out


def _multidots(text):
    text = re.sub(r"\.([.]+)", r" DOTMULTI\1", text)
    while "DOTMULTI." in text:
        text = re.sub(r"DOTMULTI\.([^.])", r"DOTDOTMULTI \1", text)
        text = text.replace("DOTMULTI.", "DOTDOTMULTI")
    return text


def _nonbreaking(text, prefixes):
    words = _R["split"].split(text)
    while words and words[-1] == "":  # perl's split drops trailing empty fields, keeps the others
        words.pop()
    out = []
    n = len(words)
    for i, word in enumerate(words):
        m = _R["final_dot"].match(word)
        if m:
            pre = m.group(1)
            following = words[i + 1] if i < n - 1 else None
            if (("." in pre and regex.search(f"[{_ALPHA}]", pre)) or prefixes.get(pre) == 1
                    or (following is not None and _R["lower_start"].match(following))):
                pass
            elif prefixes.get(pre) == 2 and following is not None and _R["digit_start"].match(following):
                pass
            else:
                word = pre + " ."
        out.append(word + " ")
    return "".join(out)


def moses_tokenize(line, lang, aggressive=False, escape=True, rules_2016=True, prefix_file=None):
    """One line (without its newline) as ``tokenizer.perl -q -l LANG`` writes it (without the newline).

    ``rules_2016=False`` leaves out the two rules mosesdecoder gained in 2016 (PR #144 ``.'`` at the end,
    PR #163 comma after a number at the end): that is the older script the ``mosestokenizer`` package ships,
    which the parity test runs."""
    if _R["blank_line"].match(line):
        return line  # tokenizer.perl prints blank lines unchanged
    text = _R["space_run"].sub(" ", f" {line} ")
    text = _R["junk"].sub("", text)
    text = re.sub(" +", " ", text)
    text = text[1:] if text.startswith(" ") else text
    text = text[:-1] if text.endswith(" ") else text
    text = _R["special"].sub(r" \1 ", text)
    if aggressive:
        text = _R["aggressive"].sub(r"\1 @-@ ", text)
    text = _multidots(text)
    text = _R["comma1"].sub(r"\1 , ", text)
    text = _R["comma2"].sub(r" , \1", text)
    if rules_2016:
        text = _R["comma3"].sub(r"\1 ,", text)
    if lang == "en":
        for rx, sub in _R["en_apos"]:
            text = rx.sub(sub, text)
    elif lang in ("fr", "it"):
        for rx, sub in _R["fr_apos"]:
            text = rx.sub(sub, text)
    else:
        text = text.replace("'", " ' ")
    text = _nonbreaking(text, nonbreaking_prefixes(lang, prefix_file))
    text = re.sub(" +", " ", text)
    text = text[1:] if text.startswith(" ") else text
    text = text[:-1] if text.endswith(" ") else text
    if rules_2016:
        text = _R["dot_apos_end"].sub(" . ' ", text, count=1)
    while "DOTDOTMULTI" in text:
        text = text.replace("DOTDOTMULTI", "DOTMULTI.")
    text = text.replace("DOTMULTI", ".")
    if escape:
        for raw, esc in ESCAPES:
            text = text.replace(raw, esc)
    return text


# --- input-from-sgm.perl --------------------------------------------------------------------------

_SEG_OPEN_END = re.compile(rb"<seg[^>]+>[ \t\n\x0b\x0c\r]*$", re.I)
_SEG_OPEN = re.compile(rb"<seg[^>]+>[ \t\n\x0b\x0c\r]*(.*)[ \t\n\x0b\x0c\r]*$", re.I)
_SEG = re.compile(rb"<seg[^>]+>[ \t\n\x0b\x0c\r]*(.*)[ \t\n\x0b\x0c\r]*</seg>", re.I)


def _chop(b):
    return b[:-1]


def sgm_segments(data):
    """The lines ``input-from-sgm.perl < FILE`` prints, from FILE's bytes (a list of bytes, no newlines).

    Like the perl script: it works on bytes (only ASCII whitespace counts), a segment may span lines (joined
    with nothing between them, since each line loses its last character), the text runs to the LAST </seg>
    of the line, whitespace runs become one space, and ``<seg>`` without attributes is not a segment."""
    lines = data.split(b"\n")
    lines = [x + b"\n" for x in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    it = iter(lines)
    out = []
    for line in it:
        line = _chop(line)
        while _SEG_OPEN_END.search(line):
            line = _chop(line + next(it, b""))
        while _SEG_OPEN.search(line) and not _SEG.search(line):
            line = _chop(line + next(it, b""))
        m = _SEG.search(line)
        if m:
            text = re.sub(rb"[ \t\n\x0b\x0c\r]+", b" ", m.group(1))
            text = text[1:] if text.startswith(b" ") else text
            text = text[:-1] if text.endswith(b" ") else text
            out.append(text)
    return out


# --- clean-corpus-n.perl --------------------------------------------------------------------------

_CLEAN_SPACE = regex.compile(f"{_SPACE}+")


def _clean_norm(s, factored):
    if not factored:
        s = s.replace("|", "")
    s = _CLEAN_SPACE.sub(" ", s)
    s = s[1:] if s.startswith(" ") else s
    return s[:-1] if s.endswith(" ") else s


def clean_corpus(pairs, min_len=1, max_len=80, ratio=9.0, max_word_length=1000):
    """clean-corpus-n.perl on (l1, l2) line pairs (l1 = de, l2 = en in Google's call): yields the kept pairs,
    whitespace-normalized as the script writes them. Drops a pair when a side is empty, has more than max_len
    or fewer than min_len words, the word-count ratio exceeds ratio either way, or a word is longer than
    max_word_length characters. "|" is deleted unless the first pair contains one (factored corpus)."""
    factored = None
    long_word = regex.compile(f"[^{_PERL_SPACE}|]{{{max_word_length + 1}}}")
    for f, e in pairs:
        if factored is None:
            factored = "|" in e or "|" in f
        e, f = _clean_norm(e, factored), _clean_norm(f, factored)
        if not f or not e:
            continue
        ec, fc = len(e.split(" ")), len(f.split(" "))
        if ec > max_len or fc > max_len or ec < min_len or fc < min_len:
            continue
        if ec / fc > ratio or fc / ec > ratio:
            continue
        if long_word.search(e) or long_word.search(f):
            continue
        yield f, e


def keep_pair(src, tgt, min_len=1, max_len=80, ratio=9.0):
    """Whether clean-corpus-n.perl keeps this one pair."""
    return any(True for _ in clean_corpus([(src, tgt)], min_len, max_len, ratio))


# --- evaluation -----------------------------------------------------------------------------------

_detok = {}


def moses_detokenize(line, lang="de"):
    """Moses-tokenized text (BPE removed) -> plain text as ``detokenizer.perl -l LANG``: it undoes the escapes
    of ``ESCAPES`` and re-attaches punctuation and quotes (sacremoses' port; see the parity test)."""
    if lang not in _detok:
        from sacremoses import MosesDetokenizer

        _detok[lang] = MosesDetokenizer(lang)
    return _detok[lang].detokenize(line.split())


def detokenize_line(line, lang):
    return moses_detokenize(line, lang)


_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line):
    """fairseq's scripts/compound_split_bleu.sh: perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g' (same on hypothesis
    and reference; non-overlapping, so a-b-c -> 'a ##AT##-##AT## b-c' as in perl)."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)
