"""The master's API socket: one per address, handed to api children as copies."""

from __future__ import annotations

import socket

from pulsed.listener import ApiListener


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def _free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return _address(probe)


def test_every_child_gets_a_copy_of_one_socket_that_outlives_the_copies() -> None:
    listener = ApiListener()
    address = _free_address()
    first = listener.for_child(address)
    assert first is not None and _address(first) == address
    first.close()  # the first api child left
    second = listener.for_child(address)
    assert second is not None
    with socket.create_connection(second.getsockname()[:2], timeout=5):
        connection, _ = second.accept()  # queued for whichever child accepts
        connection.close()
    second.close()
    listener.close()


def test_a_child_that_loses_the_race_for_a_connection_does_not_block() -> None:
    listener = ApiListener()
    copy = listener.for_child(_free_address())
    assert copy is not None and copy.gettimeout() == 0.0
    try:
        copy.accept()
        raise AssertionError("accept() without a connection returned")
    except BlockingIOError:
        pass
    copy.close()
    listener.close()


def test_a_new_address_rebinds_and_closing_frees_the_port() -> None:
    listener = ApiListener()
    old, new = _free_address(), _free_address()
    listener.for_child(old).close()
    listener.for_child(new).close()
    _bind(old)  # the old address is free again
    listener.close()
    _bind(new)


def _bind(address: str) -> None:
    """Bind and listen where a listener was: refused (EADDRINUSE) while one
    still listens there. SO_REUSEADDR, as any server sets it: without it, a
    connection of some other process that the kernel gave this ephemeral
    port as its local one would refuse the bind too (a flake in CI)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", int(address.rsplit(":", 1)[1])))
        other.listen()


def test_an_address_in_use_gives_no_socket_so_the_child_reports_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert ApiListener().for_child(_address(taken)) is None
