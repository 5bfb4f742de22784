"""Socket tuning shared by the listener and the sender."""

import socket

from pynetdicom import evt


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle; small PDUs otherwise wait for delayed ACKs (~40 ms each)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
