"""What a request to the viewer may reach: only the host names the server answers to (DNS rebinding), only a path that
is a path, only files strictly inside the viewer's own folders. Every refusal is an answer (403, 404), never a 500."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["EVERY_INTERFACE", "LOOPBACK", "NotFound", "host_allowed", "request_path", "static_file"]

LOOPBACK = ("localhost", "127.0.0.1", "::1")
EVERY_INTERFACE = ("", "0.0.0.0", "::")
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9._-]+))(?::\d{1,5})?")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".map": "application/json",
}


class NotFound(LookupError):
    """What the server answers with 404."""


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host header names the server bound to address `bound`. Against DNS rebinding (a page's own
    domain re-pointed at 127.0.0.1, so that its script reads the viewer as same-origin): loopback's names and `bound`
    pass, with any port; bound to every interface (`--host 0.0.0.0`: exposed by choice), so do IP literals (a page
    whose origin is an IP literal was loaded from that address, the server's own) and this machine's host names; no
    other DNS name does. No header (HTTP/1.0) passes."""
    if header is None:
        return True
    match = _HOST.fullmatch(header.strip().lower())
    if match is None:
        return False
    host = match["ip6"] or match["name"].removesuffix(".")
    if host in (*LOOPBACK, bound.lower()):
        return True
    return bound in EVERY_INTERFACE and (_is_ip(host) or host in _machine_names())


@functools.cache
def _machine_names() -> tuple[str, ...]:
    """This machine's host name and fully qualified name (a DNS lookup: once)."""
    return socket.gethostname().lower(), socket.getfqdn().lower()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def request_path(raw: str) -> str:
    """The request target's path, %-decoded; NotFound where it is no path (a NUL byte, an unparsable URL)."""
    try:
        path = unquote(urlsplit(raw).path)
    except ValueError:
        raise NotFound(raw) from None
    if "\x00" in path:
        raise NotFound(raw)
    return path


def static_file(folder: Path, relative: str, cache: bool = False) -> tuple[bytes, str, bool]:
    """(body, content type, cacheable) of a file strictly inside `folder` (no `..`, links or absolute paths out of
    it) of a type the viewer uses; NotFound for anything else, names the file system refuses included."""
    try:
        path = (folder / relative).resolve()
        found = path.is_relative_to(folder.resolve()) and path.is_file() and path.suffix in _TYPES
    except (OSError, ValueError):  # a name too long, a NUL byte
        found = False
    if not found:
        raise NotFound(relative)
    return path.read_bytes(), _TYPES[path.suffix], cache
