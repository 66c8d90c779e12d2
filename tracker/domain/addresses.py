"""Listen addresses as people type them: "127.0.0.1:9464", "[::1]:9464", "localhost:9464"."""

from __future__ import annotations

import ipaddress
import re

_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


def parse_listen_address(text: str) -> tuple[str, int]:
    """("host", port) from "127.0.0.1:9464", "[::1]:9464" or "localhost:9464"."""
    expected = 'expected HOST:PORT such as "127.0.0.1:9464", "[::1]:9464" or "localhost:9464"'
    stripped = text.strip()
    if "://" in stripped:
        raise ValueError(f"invalid listen address {text!r}: give HOST:PORT, not a URL")
    host, separator, port_text = stripped.rpartition(":")
    if not separator or not host or stripped.endswith("]"):
        raise ValueError(f"invalid listen address {text!r}: {expected}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(
                f"invalid listen address {text!r}: unclosed '[' around the IPv6 address"
            )
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"invalid listen address {text!r}: {host!r} is not an IPv6 address"
            ) from None
    elif ":" in host:
        raise ValueError(
            f"invalid listen address {text!r}: write an IPv6 address in brackets, like [::1]:9464"
        )
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(
            f"invalid listen address {text!r}: {host!r} is not a host name or IP address"
        )
    # isdigit alone would accept "²" and int() would accept "+9464" or " 9464".
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(
            f"invalid listen address {text!r}: the port must be a number from 0 to 65535"
        )
    return host, int(port_text)
