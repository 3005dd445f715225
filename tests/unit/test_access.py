"""Who may reach /admin without an admin key: this machine only, judged on the connection's
addresses and the Host header (DNS rebinding)."""

from __future__ import annotations

import pytest

from mlxrouter.access import check_access
from mlxrouter.errors import Forbidden


def scope(client: str, server: str, host: str) -> dict:
    return {"type": "http", "path": "/admin/status", "method": "GET",
            "client": (client, 50000), "server": (server, 8800),
            "headers": [(b"host", host.encode())]}


@pytest.mark.parametrize("client, server, host", [
    ("127.0.0.1", "127.0.0.1", "127.0.0.1:8800"),
    ("::1", "::1", "[::1]:8800"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1", "127.0.0.1:8800"),  # IPv4 client of a "::" socket
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1", "localhost:8800"),
])
def test_this_machine_reaches_admin(client: str, server: str, host: str) -> None:
    check_access(scope(client, server, host), [], None)


@pytest.mark.parametrize("client, server, host", [
    ("192.0.2.7", "192.0.2.2", "192.0.2.2:8800"),  # another machine
    ("::ffff:192.0.2.7", "::ffff:192.0.2.2", "192.0.2.2:8800"),
    # the daemon's own address: also where a reverse proxy on this machine connects from,
    # for every remote client behind it
    ("192.0.2.2", "192.0.2.2", "192.0.2.2:8800"),
    ("127.0.0.1", "127.0.0.1", "evil.example"),
])
def test_others_do_not(client: str, server: str, host: str) -> None:
    with pytest.raises(Forbidden) as info:
        check_access(scope(client, server, host), [], None)
    assert info.value.status == 403
