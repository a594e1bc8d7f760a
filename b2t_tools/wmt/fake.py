"""Tiny archives shaped like the WMT'16 En-De downloads, for tests and smoke runs of the recipes.

``python -m b2t_tools.wmt.fake DIR`` writes de-en.tgz, training-parallel-commoncrawl.tgz,
training-parallel-nc-v11.tgz, dev.tgz and test.tgz into DIR with the member names of the real ones
(a few hundred word-for-word sentence pairs); then
``b2t-wmt-prepare --mirror file://DIR --bpe-merges 300 ...`` runs the whole recipe in seconds.
"""

import io
import random
import sys
import tarfile
from pathlib import Path

from . import YEARS

_EN = ("the a cat dog house tree red blue big small runs sees eats old new car road city man woman "
       "child book reads writes well-known").split()
_DE = dict(zip(_EN, ("der ein Katze Hund Haus Baum rot blau groß klein rennt sieht isst alt neu Auto Straße "
                     "Stadt Mann Frau Kind Buch liest schreibt bekannte").split()))
_END = ((".", "."), ("!", "!"), ("?", "?"), (" \"yes\".", " \"ja\"."))


def sentence_pairs(n, rng):
    pairs = []
    for _ in range(n):
        words = [rng.choice(_EN) for _ in range(rng.randint(3, 9))]
        end_en, end_de = rng.choice(_END)
        en = " ".join(words)
        de = " ".join(_DE[w] for w in words)
        pairs.append((en[0].upper() + en[1:] + end_en, de[0].upper() + de[1:] + end_de))
    return pairs


def _add(tar, name, text):
    data = text.encode("utf-8") if isinstance(text, str) else text
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            _add(tar, name, text)
    return path


def _sgm(lines, kind, lang, setid):
    # spacing as in the WMT files varies: input-from-sgm.perl's whitespace rules must remove it
    segs = "\n".join(f'<seg id="{i}"> {s}  </seg>' if i % 3 == 0 else f'<seg id="{i}">{s}</seg>'
                     for i, s in enumerate(lines, 1))
    tag = "srcset" if kind == "src" else "refset"
    return (f'<{tag} setid="{setid}" srclang="any" trglang="{lang}">\n<doc sysid="ref" docid="d1" genre="news" '
            f'origlang="en">\n{segs}\n</doc>\n</{tag}>\n')


def newstest_files(year, pairs):
    """The files of one newstest year as dev.tgz/test.tgz hold them: up to 2013 SGM plus plain text (which
    Google's script copies); from 2014 SGM per direction (Google converts the de-en direction's files)."""
    en = [e for e, _ in pairs]
    de = [d for _, d in pairs]
    folder = "test" if year == 2016 else "dev"
    if year <= 2013:
        return {f"{folder}/newstest{year}-src.en.sgm": _sgm(en, "src", "en", f"newstest{year}"),
                f"{folder}/newstest{year}-ref.de.sgm": _sgm(de, "ref", "de", f"newstest{year}"),
                f"{folder}/newstest{year}.en": "\n".join(en) + "\n",
                f"{folder}/newstest{year}.de": "\n".join(de) + "\n"}
    files = {f"{folder}/newstest{year}-deen-src.de.sgm": _sgm(de, "src", "de", f"newstest{year}"),
             f"{folder}/newstest{year}-deen-ref.en.sgm": _sgm(en, "ref", "en", f"newstest{year}")}
    if year >= 2015:  # the En->De direction's own files: not the ones Google's script reads
        other = ["(ende file)"] * len(en)
        files[f"{folder}/newstest{year}-ende-src.en.sgm"] = _sgm(other, "src", "en", f"newstest{year}")
        files[f"{folder}/newstest{year}-ende-ref.de.sgm"] = _sgm(other, "ref", "de", f"newstest{year}")
    return files


def write_archives(folder, train=(300, 100, 100), test_size=20, seed=0):
    """Write the five archives into folder; return {file name: path}."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpora = (("de-en.tgz", "", "europarl-v7.de-en"),
               ("training-parallel-commoncrawl.tgz", "", "commoncrawl.de-en"),
               ("training-parallel-nc-v11.tgz", "training-parallel-nc-v11/", "news-commentary-v11.de-en"))
    out = {}
    for (name, prefix, stem), n in zip(corpora, train):
        pairs = sentence_pairs(n, rng)
        out[name] = _tgz(folder / name, {f"{prefix}{stem}.en": "".join(e + "\n" for e, _ in pairs),
                                         f"{prefix}{stem}.de": "".join(d + "\n" for _, d in pairs)})
    dev, test = {}, {}
    for year in YEARS:
        (test if year == 2016 else dev).update(newstest_files(year, sentence_pairs(test_size, rng)))
    out["dev.tgz"] = _tgz(folder / "dev.tgz", dev)
    out["test.tgz"] = _tgz(folder / "test.tgz", test)
    return out


if __name__ == "__main__":
    for path in write_archives(sys.argv[1] if len(sys.argv) > 1 else "fake-wmt").values():
        print(path)
