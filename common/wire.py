"""Sending multipart messages on the hot paths (broker loop, worker job results).

pyzmq's Socket.send_multipart computes `zmq.SNDMORE | flags` as enum arithmetic for every
frame, which costs more than the send itself for small frames. The same sends with the
flags as plain ints take about a third of the time (measured in docs/BENCHMARKS.md,
"No-op jobs").
"""

from __future__ import annotations

import zmq

_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)


def send_frames(sock: zmq.Socket, frames: list[bytes], noblock: bool = False) -> None:
    """sock.send_multipart(frames, zmq.NOBLOCK if noblock else 0), with int flags.

    Raises zmq.Again, like send_multipart, if noblock and the first frame cannot be
    queued; ZeroMQ queues the rest of a message once its first frame is accepted.
    """
    last = _NOBLOCK if noblock else 0
    more = _MORE | last
    send = sock.send
    for frame in frames[:-1]:
        send(frame, more)
    send(frames[-1], last)
