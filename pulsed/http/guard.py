"""Who may talk to the HTTP API from a browser: the Host, Origin and
Content-Type rules (issue 23, item 9).

With no token on loopback (the default), two browser attacks are possible
and both are refused here:

- DNS rebinding: a page on attacker.example re-points its name at 127.0.0.1
  and reads the API as "same origin". Its requests carry
  ``Host: attacker.example``. Only the names the server is known by are
  served (421 otherwise): the listen address, ``localhost``, ``127.0.0.1``
  and ``[::1]`` when it listens on loopback, any IP address literal and the
  host's name when it listens on a wildcard address (an address cannot be
  rebound), and ``api.allowed_hosts``. Ports are not compared: rebinding changes the name,
  and a proxy or a port forward may change the port.
- Cross-site request forgery: a page the operator visits posts to
  http://localhost:8080/jobs. Browsers send ``Origin`` on every cross-origin
  POST, and ``Sec-Fetch-Site`` too (current ones): a write whose Origin is
  not this server's own (scheme://Host), or whose Sec-Fetch-Site is
  ``cross-site`` or ``same-site``, gets 403 naming the header.

Defence in depth for browsers that send neither: a write with a body must
be ``application/json`` (or carry no Content-Type); a browser form cannot
send that without a CORS preflight, which this server never grants.
``application/x-www-form-urlencoded`` is accepted too, but only from a
client showing no sign of being a browser (no Origin, no Sec-Fetch-Site):
it is what ``curl -d`` sends, and SPEC §7's example uses it. A browser form
of that type percent-encodes ``{`` and ``"``, so its body can never be the
JSON object a write needs. ``text/plain`` and ``multipart/form-data`` (the
forms that can carry raw JSON) get 415.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from pulsed.http.messages import HttpError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # reads: no CSRF check
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::")
ANY_HOST = "*"
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"  # curl -d
FOREIGN_FETCH_SITES = ("cross-site", "same-site")  # same-site: another port or subdomain
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Authority:
    """A Host header's or an allowed_hosts entry's name and port (None: any)."""

    name: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> "Authority | None":
        """'Example.com:8080' -> ('example.com', 8080); '[::1]' -> ('::1', None);
        None when it is not a host[:port]."""
        text = text.strip().lower()
        if text.startswith("["):
            name, bracket, rest = text[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                return None
            port_text = rest[1:] if rest else None
        else:
            name, colon, port_text = text.partition(":")
            port_text = port_text if colon else None
        if not name or (port_text is not None and not _is_port(port_text)):
            return None
        return cls(name, int(port_text) if port_text is not None else None)


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdigit() and 0 < int(text) <= 65535


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class HostPolicy:
    """Which Host headers the server answers, and which Origins may write."""

    def __init__(self, bound_host: str, *, allowed_hosts: tuple[str, ...] = ()) -> None:
        host = bound_host.strip("[]").lower()
        self.any_host = ANY_HOST in allowed_hosts
        self.any_ip = host in WILDCARD_ADDRESSES
        names = {host}
        if host in LOOPBACK_NAMES or (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
            names.update(LOOPBACK_NAMES)
        if self.any_ip:  # not getfqdn(): a DNS lookup could stall the start for seconds
            names.add(socket.gethostname().lower())
        self.names = frozenset(names)
        self.entries = tuple(entry for text in allowed_hosts if text != ANY_HOST
                             if (entry := Authority.parse(text)) is not None)

    def check_host(self, headers: Mapping[str, str]) -> None:
        """421 unless the Host header names this server (400 if missing or malformed)."""
        text = headers.get("Host")
        if text is None:
            raise HttpError(400, "invalid_argument", "a Host header is required", "Host")
        host = Authority.parse(text) if "," not in text else None
        if host is None:
            raise HttpError(400, "invalid_argument", f"the Host header {text[:100]!r} is not "
                            "one host[:port]", "Host")
        if not self._known(host):
            raise HttpError(421, "misdirected_request", f"this server does not answer to "
                            f"Host {text[:100]!r}; add it to api.allowed_hosts if clients "
                            "really use that name", "Host")

    def _known(self, host: Authority) -> bool:
        if self.any_host or host.name in self.names or (self.any_ip and _is_ip(host.name)):
            return True
        return any(entry.name == host.name and entry.port in (None, host.port)
                   for entry in self.entries)

    def check_write(self, method: str, headers: Mapping[str, str], has_body: bool) -> None:
        """403 for a write a browser sent from another origin; 415 for a body
        that is not JSON (see the module's docstring for the rule)."""
        if method in SAFE_METHODS:
            return
        origin = headers.get("Origin")
        if origin is not None and not _same_origin(origin, headers.get("Host", "")):
            raise HttpError(403, "forbidden", f"cross-origin writes are refused (Origin "
                            f"{origin[:100]!r} is not this server)", "Origin")
        site = (headers.get("Sec-Fetch-Site") or "").strip().lower()
        if site in FOREIGN_FETCH_SITES:
            raise HttpError(403, "forbidden", f"cross-origin writes are refused "
                            f"(Sec-Fetch-Site: {site})", "Sec-Fetch-Site")
        if has_body:
            _check_content_type(headers, from_browser=origin is not None or bool(site))


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether Origin (scheme://host[:port]) is this server as the client named it."""
    parts = urlsplit(origin.strip().lower())
    default = DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.path or parts.query or not parts.netloc:
        return False  # "null", a file: page, garbage
    mine, theirs = Authority.parse(host_header), Authority.parse(parts.netloc)
    if mine is None or theirs is None:
        return False
    return (mine.name, mine.port or default) == (theirs.name, theirs.port or default)


def _check_content_type(headers: Mapping[str, str], *, from_browser: bool) -> None:
    text = headers.get("Content-Type")
    media = (text or "").split(";", 1)[0].strip().lower()
    if text is None or media == JSON_TYPE or (media == FORM_TYPE and not from_browser):
        return
    raise HttpError(415, "unsupported_media_type", f"send the body as JSON with Content-Type: "
                    f"{JSON_TYPE} (got {text[:100]!r})", "Content-Type")
