"""Resumable downloads: an interrupted archive download continues with an HTTP Range request where the server
honours it, starts again where it does not, and the whole file's checksum is verified either way. The servers
are local (127.0.0.1), started by the test."""

import http.server
import threading

import pytest

from b2t_tools.wmt import prepare

DATA = bytes(range(256)) * 4000  # 1 MB of known bytes (the payload; check_tar is replaced below)


class _Handler(http.server.BaseHTTPRequestHandler):
    honour_range = True
    cut_after = None  # send only this many bytes of the body, then close (an interrupted transfer)
    log = []

    def do_GET(self):  # noqa: N802
        rng = self.headers.get("Range")
        start = 0
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(DATA):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body = body[:self.cut_after]
        type(self).log.append((rng, len(body)))  # before writing: the client may finish before this thread
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(prepare, "check_tar", lambda path, name: None)  # the payload is not a tar archive

    def start(honour_range=True, cut_after=None):
        handler = type("H", (_Handler,), {"honour_range": honour_range, "cut_after": cut_after, "log": []})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", handler

    servers = []
    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def _sums(tmp_path, data=DATA):
    import hashlib

    path = tmp_path / "sums.md5"
    path.write_text(f"{hashlib.md5(data).hexdigest()}  dev.tgz\n")
    return path


def _get(tmp_path, base, sums):
    return prepare.download_all(tmp_path / "work", {"dev": f"{base}/dev.tgz"}, sums)["dev"]


def test_interrupted_download_resumes_with_range(tmp_path, server):
    base, handler = server(cut_after=300_000)
    with pytest.raises(prepare.ToolError, match="short .*re-run to resume"):
        _get(tmp_path, base, _sums(tmp_path))
    partial = tmp_path / "work/downloads/dev.tgz.partial"
    assert partial.read_bytes() == DATA[:300_000]  # kept for the next run

    base, handler = server()
    path = _get(tmp_path, base, _sums(tmp_path))
    assert path.read_bytes() == DATA and not partial.exists()
    assert handler.log == [("bytes=300000-", len(DATA) - 300_000)]  # only the rest was sent


def test_server_that_ignores_range_gets_a_fresh_download(tmp_path, server):
    downloads = tmp_path / "work/downloads"
    downloads.mkdir(parents=True)
    (downloads / "dev.tgz.partial").write_bytes(DATA[:1000])
    base, handler = server(honour_range=False)
    path = _get(tmp_path, base, _sums(tmp_path))
    assert path.read_bytes() == DATA  # not the first 1000 bytes twice
    assert handler.log == [("bytes=1000-", len(DATA))]


def test_resumed_file_failing_its_checksum_is_downloaded_whole(tmp_path, server):
    downloads = tmp_path / "work/downloads"
    downloads.mkdir(parents=True)
    (downloads / "dev.tgz.partial").write_bytes(b"x" * 1000)  # a partial file from another version of the file
    base, handler = server()
    path = _get(tmp_path, base, _sums(tmp_path))
    assert path.read_bytes() == DATA
    assert handler.log == [("bytes=1000-", len(DATA) - 1000), (None, len(DATA))]


def test_complete_partial_file_and_a_wrong_checksum(tmp_path, server):
    downloads = tmp_path / "work/downloads"
    downloads.mkdir(parents=True)
    (downloads / "dev.tgz.partial").write_bytes(DATA)  # killed after the last byte, before the rename
    base, handler = server()
    assert _get(tmp_path, base, _sums(tmp_path)).read_bytes() == DATA  # 416 -> verified as it is
    (downloads / "dev.tgz").unlink()
    with pytest.raises(prepare.ToolError, match="checksum mismatch for dev.tgz"):
        _get(tmp_path, base, _sums(tmp_path, b"other"))
    assert not (downloads / "dev.tgz.partial").exists() and not (downloads / "dev.tgz").exists()
