"""Fetching an ``http(s)`` image URL, bounded: ``safeclip-serve --allow-remote-images`` and ``safeclip-scan``'s
URL items both fetch through :func:`fetch_image`.

A program that fetches what someone else names is an SSRF hole and a way to tie up its threads, so every fetch
is bounded:

- **total time**: one deadline for connect, headers, redirects and body together (a watchdog shuts the socket
  at the deadline, so a server trickling one byte at a time cannot stretch it; ``getaddrinfo`` itself is the
  resolver's and not covered);
- **size while reading**: a declared ``Content-Length`` over the limit is refused before the body, and the
  body is read in pieces and abandoned as soon as it passes the limit;
- **addresses**: the host is resolved once and the connection goes to that address (no second lookup to
  rebind); loopback, private, link-local (cloud metadata), multicast and reserved addresses are refused
  unless ``allow_private`` (``--allow-private-image-hosts``), and so is an IPv6 address that carries such an
  IPv4 address inside it: ``ipaddress``'s IPv4-mapped and 6to4 views, Teredo (always), NAT64 (``64:ff9b::/96``; the
  local-use ``64:ff9b:1::/48`` always), IPv4-compatible ``::a.b.c.d`` and IPv4-translated ``::ffff:0:a.b.c.d``
  (each reaches the IPv4 host through a translator or the kernel); every redirect target is checked the same
  way, at most :data:`MAX_REDIRECTS` of them, and only to ``http(s)``.

Every problem raises :class:`FetchError` (one line; its ``kind`` says which: ``refused``, ``too_large`` or
``failed``); the server maps it to its HTTP error, scan to an error row. Standard library only.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

MAX_REDIRECTS = 3


class FetchError(ValueError):
    """An image URL that was not fetched. ``kind``: ``refused`` (a loopback or private host while those are not
    allowed), ``too_large`` (over ``max_bytes``), ``failed`` (anything else: a bad URL, no answer in time, an
    HTTP error, too many redirects)."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


_V4_IN_LOW_32 = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
_NEVER = ipaddress.ip_network("64:ff9b:1::/48")          # local-use NAT64 (RFC 8215): IPv4 at prefix-dependent bits


def _embedded_ipv4(a: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address leads to (see the module docstring)."""
    views = [a.ipv4_mapped, a.sixtofour, *(a.teredo or ())]
    if any(a in net for net in _V4_IN_LOW_32):
        views.append(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
    return [v for v in views if v is not None]


def _address_ok(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(a, ipaddress.IPv6Address):
        if a in _NEVER or a.teredo is not None:      # Teredo tunnels to its embedded client: never an image host
            return False
        inner = _embedded_ipv4(a)
        if inner:                                   # judged by where it leads (::ffff:8.8.8.8 is fine)
            return all(v.is_global and not v.is_multicast for v in inner)
    return a.is_global and not a.is_multicast


def _resolve(host: str, port: int, allow_private: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise FetchError(f"cannot fetch the image URL (cannot resolve '{host[:60]}': {e})") from None
    addrs = [info[4][0] for info in infos]
    if not allow_private:
        bad = [a for a in addrs if not _address_ok(a)]
        if bad:
            raise FetchError(f"image URL host '{host[:60]}' is a loopback or private address ({bad[0]}); refused "
                          "(--allow-private-image-hosts allows it)", "refused")
    return addrs[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address resolved beforehand, with SNI and certificate checks for the URL's host name."""

    def __init__(self, ip: str, host: str, port: int, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_image(url: str, *, max_bytes: int, timeout_s: float, allow_private: bool = False) -> bytes:
    """The body of ``url`` (an http or https URL), bounded in total time, size and addresses."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"image URL must be http(s) with a host, got '{url[:60]}'")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise FetchError("image URL has an invalid port") from None
        ip = _resolve(parts.hostname, port, allow_private)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        conn = (_PinnedHTTPS(ip, parts.hostname, port, remaining) if scheme == "https"
                else http.client.HTTPConnection(ip, port, timeout=remaining))
        expired = threading.Event()

        def kill(conn=conn):
            expired.set()
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(remaining, kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
            conn.request("GET", path, headers={"Host": host, "User-Agent": "safeclip-edge",
                                               "Accept": "image/*"})
            r = conn.getresponse()
            if r.status in (301, 302, 303, 307, 308) and r.getheader("Location"):
                url = urllib.parse.urljoin(url, r.getheader("Location"))
                continue
            if r.status != 200:
                raise FetchError(f"cannot fetch the image URL (HTTP {r.status} {r.reason[:40]})")
            declared = r.getheader("Content-Length")
            if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
                raise FetchError(f"the remote image of {int(declared)} bytes exceeds {max_bytes} bytes",
                                 "too_large")
            parts_read, n = [], 0
            while True:
                piece = r.read1(65536)
                if not piece:
                    break
                n += len(piece)
                if n > max_bytes:
                    raise FetchError(f"the remote image exceeds {max_bytes} bytes", "too_large")
                if time.monotonic() > deadline:
                    raise TimeoutError()
                parts_read.append(piece)
            if expired.is_set():
                raise TimeoutError()
            return b"".join(parts_read)
        except FetchError:
            raise
        except Exception as e:                  # socket, TLS and http.client errors: many types
            if expired.is_set() or isinstance(e, TimeoutError):
                raise FetchError(f"the image URL did not answer within {timeout_s:g} s") from None
            raise FetchError(f"cannot fetch the image URL ({' '.join(str(e).split())[:120] or type(e).__name__})") \
                from None
        finally:
            watchdog.cancel()
            conn.close()
    if time.monotonic() >= deadline:
        raise FetchError(f"the image URL did not answer within {timeout_s:g} s")
    raise FetchError(f"the image URL redirected more than {MAX_REDIRECTS} times")
