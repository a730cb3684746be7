"""runtime/fetch.py, the bounded image fetch that safeclip-serve and safeclip-scan share (standard library only,
no [serve] extra): its own one-line FetchError whose ``kind`` the callers map (the server's HTTP codes are pinned
in test_serve.py's remote-image test, scan's error rows in test_scan_sources.py); the address filter refuses
IPv6 forms that lead to loopback or link-local IPv4 and keeps those that lead to public IPv4.
"""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from safeclip.runtime.fetch import FetchError, _address_ok, fetch_image


@pytest.mark.parametrize("addr", ["64:ff9b::a9fe:a9fe", "::127.0.0.1", "2002:a9fe:a9fe::", "::ffff:0:7f00:1",
                                  "::ffff:127.0.0.1", "64:ff9b:1::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:3fff:fdd2"])
def test_remote_image_filter_refuses_ipv6_forms_of_private_ipv4(addr):
    with pytest.raises(FetchError) as e:
        fetch_image(f"http://[{addr}]/x.png", max_bytes=1 << 20, timeout_s=2)
    assert e.value.kind == "refused", str(e.value)


def test_remote_image_filter_keeps_ipv6_forms_of_public_ipv4():
    for addr in ("64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111", "8.8.8.8"):
        assert _address_ok(addr), addr


def test_fetch_errors_say_their_kind_on_one_line(tmp_path):
    """refused (loopback while private hosts are not allowed), too_large (over max_bytes), failed (HTTP 404,
    not http(s)); the body when all is well. A static file server on 127.0.0.1 only."""
    (tmp_path / "small.png").write_bytes(b"x" * 10)
    (tmp_path / "big.png").write_bytes(b"x" * 5000)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cases = {"/small.png": (False, "refused"), "/big.png": (True, "too_large"), "/gone.png": (True, "failed")}
        for path, (allow, kind) in cases.items():
            with pytest.raises(FetchError) as e:
                fetch_image(url + path, max_bytes=1000, timeout_s=5, allow_private=allow)
            assert e.value.kind == kind and "\n" not in str(e.value), (path, str(e.value))
        with pytest.raises(FetchError) as e:
            fetch_image("ftp://example.com/x.png", max_bytes=1000, timeout_s=5, allow_private=True)
        assert e.value.kind == "failed" and "must be http(s)" in str(e.value)
        assert fetch_image(url + "/small.png", max_bytes=1000, timeout_s=5, allow_private=True) == b"x" * 10
    finally:
        server.shutdown()
        server.server_close()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass
