"""Which names the server answers to and which web pages may use it: the Host and Origin rules.

A browser says where a request comes from: `Origin` (the scheme://host:port of the page that
sent it) on every cross-origin request and on every POST, and `Host` (the name it looked up
to reach the server). A page on another site that the user merely visits can send requests
to a server on this machine; these rules are what keeps it out:

  - Host must name this server: localhost, 127.0.0.1 or [::1] (any port), the address it is
    bound to, or a name given with --allow-host. Anything else is a name some other site's DNS
    pointed here (DNS rebinding), after which that site would count as the server's own origin.
    Bound to every address (0.0.0.0 or ::, which needs --api-auth), the server cannot know all
    the names and addresses it is reached by, so any Host is accepted there; the Origin rule
    and the credentials still hold.
  - Origin, when sent, must be the server's own (the scheme and the Host of the request
    itself) or one listed with --cors-allow-origins; "null" (sandboxed frames, local files,
    some redirects) is nobody's and always foreign.

Origins are compared in one spelling: lower case, the default port (80, 443) left out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_ADDRESS = frozenset({"0.0.0.0", "::", ""})
DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$")


def split_host(value: str) -> tuple[str, int | None] | None:
    """(lower-case name, IPv6 without brackets; port or None) from a Host header; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
        if port is not None and ":" in port:
            return None  # a bare IPv6 address: a Host header must bracket it
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return None
    if not _is_name_or_address(name):
        return None
    return name, None if port is None else int(port)


def _is_name_or_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return bool(_HOST_NAME.match(name))


def _spell(scheme: str, name: str, port: int | None) -> str:
    shown = f"[{name}]" if ":" in name else name
    return f"{scheme}://{shown}" if port is None or port == DEFAULT_PORTS.get(scheme) else f"{scheme}://{shown}:{port}"


def normalize_origin(text: str) -> str | None:
    """`text` as "scheme://host[:port]" in one spelling; None when it is not an http(s) origin."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        return None
    if not _is_name_or_address(parts.hostname.lower()):
        return None
    return _spell(scheme, parts.hostname.lower(), port)


@dataclass(frozen=True)
class OriginRules:
    """The Host and Origin rules of one server (see the module's docstring)."""

    bound_host: str = "127.0.0.1"
    allowed_hosts: frozenset[str] = frozenset()
    cors_origins: frozenset[str] = frozenset()

    @classmethod
    def create(cls, bound_host: str, allow_hosts: list[str] = (), cors_origins: list[str] = ()) -> OriginRules:
        """Rules from the command line's values (each may be comma-separated); ValueError names a bad one."""
        hosts = set()
        for entry in _items(allow_hosts):
            split = split_host(entry)
            if entry == "*" or split is None or split[1] is not None:
                raise ValueError(f"--allow-host {entry!r} is not a host name or address (give it without a port)")
            hosts.add(split[0].rstrip("."))
        origins = set()
        for entry in _items(cors_origins):
            origin = normalize_origin(entry)
            if origin is None:
                raise ValueError(
                    f"--cors-allow-origins {entry!r} is not an origin like http://localhost:3000 "
                    f'("*" and "null" are refused: they would let any web page in)'
                )
            origins.add(origin)
        bound = bound_host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
        return cls(bound, frozenset(hosts), frozenset(origins))

    @property
    def any_host(self) -> bool:
        return self.bound_host in EVERY_ADDRESS

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's Host header names this server (no header: not a browser, nothing to check)."""
        if host is None or self.any_host:
            return True
        split = split_host(host)
        return split is not None and split[0].rstrip(".") in (LOOPBACK_NAMES | self.allowed_hosts | {self.bound_host})

    def origin_kind(self, origin: str | None, scheme: str, host: str | None) -> str:
        """ "none" (no Origin header), "own" (the server's own origin), "listed" (--cors-allow-origins)
        or "foreign" (anything else, "null" included)."""
        if origin is None:
            return "none"
        wanted = normalize_origin(origin)
        if wanted is None:
            return "foreign"
        split = split_host(host) if host is not None else None
        if split is not None and wanted == _spell(scheme.lower(), split[0], split[1]):
            return "own"
        return "listed" if wanted in self.cors_origins else "foreign"


def _items(values: list[str] | str) -> list[str]:
    """Repeated and comma-separated values as one list, blanks dropped."""
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values for item in value.split(",") if item.strip()]
