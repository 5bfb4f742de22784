"""Socket tuning shared by the listener and the sender."""

import copy
import socket

from pynetdicom import evt
from pynetdicom.presentation import PresentationContext

DUL_POLL_SECONDS = 0.0002


def tune_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle (small PDUs otherwise wait ~40 ms for delayed ACKs) and poll faster."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The DUL polls its socket and sleeps this long between empty polls (default 1 ms, paid on every PDU).
    event.assoc.dul._run_loop_delay = DUL_POLL_SECONDS


class _CheapCopyContext(PresentationContext):
    """pynetdicom deep-copies the server's contexts for every association (~70 ms for all storage SOP classes x
    all transfer syntaxes, mostly re-validating UIDs). UIDs are immutable strings, so copying the one list
    attribute is a faithful deep copy."""

    def __deepcopy__(self, memo: dict) -> PresentationContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone


def cheap_copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    out = []
    for context in contexts:
        clone = copy.copy(context)
        clone.__class__ = _CheapCopyContext
        out.append(clone)
    return out
