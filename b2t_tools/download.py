"""One download for every tool: resumed with HTTP Range after an interruption, never trusted unchecked.

Used by the WMT prepare (five archives, md5 sums) and the demo (the Tatoeba zip). No torch here.
"""

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from .errors import ToolError


def fetch(url, dest, alternative="", log=print, timeout=60):
    """Stream url into dest (a .partial file). When dest already holds the start of the file (an interrupted
    download), ask for the rest with an HTTP Range request: a 206 answer starting at that byte is appended; any
    other answer (the server or scheme ignores Range) rewrites the file from the start. A short read (fewer
    bytes than announced) keeps what arrived, so the next run resumes, and is an error. Returns whether it
    resumed. ``alternative`` names the caller's other way to get the file, for the messages."""
    dest = Path(dest)
    name = dest.name[:-len(".partial")] if dest.name.endswith(".partial") else dest.name
    final = dest.with_name(name)
    other = f"or {alternative}, or " if alternative else "or "
    have = dest.stat().st_size if dest.exists() else 0
    headers = {"User-Agent": "b2t-fairseq"}
    if have:
        headers["Range"] = f"bytes={have}-"
    resumed = False
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            status = getattr(r, "status", None)
            crange = r.headers.get("Content-Range") or ""
            resumed = have > 0 and status == 206 and crange.startswith(f"bytes {have}-")
            if have and not resumed:
                log(f"{name}: the server sent the whole file (no resume); starting again from byte 0")
            elif resumed:
                log(f"{name}: resuming at byte {have}")
            expected = r.headers.get("Content-Length")
            with open(dest, "ab" if resumed else "wb") as out:
                start = out.tell()
                shutil.copyfileobj(r, out, 1 << 20)
                got = out.tell() - start
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file already holds every byte: let the checksum decide
            return True
        raise ToolError(f"download of {url} failed ({e}); check the URL, {other}put the file at {final} "
                        "yourself") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ToolError(f"download of {url} failed ({e}); check the network, {other}put the file at {final} "
                        "yourself; a re-run resumes it") from None
    if expected is not None and int(expected) != got:
        raise ToolError(f"download of {name} is short ({got} of {expected} bytes); re-run to resume it")
    return resumed
