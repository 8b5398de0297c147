"""The local stack's port range: below the kernel's ephemeral range, and never a port that a
client connection holds as its local port (a connect test alone misses those)."""

import socket

from services.runtime import stack


def test_free_base_ports_leave_the_ephemeral_range_to_clients():
    low = stack._ephemeral_low()
    for _ in range(20):
        base = stack.free_base_port()
        assert max(stack._ports(base)) < low


def test_a_port_held_by_a_client_connection_is_not_bindable():
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())
        client_port = client.getsockname()[1]  # nobody listens there, yet a bind would fail
        assert not stack._port_open(client_port)
        assert not stack._port_bindable(client_port)
        assert not stack._port_bindable(server.getsockname()[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert stack._port_bindable(free)
