"""ZeroMQ helpers shared by the broker and the workers: fast multipart sends, and draining
a worker's socket of decoded messages. common.protocol itself stays free of sockets.

Sends on the hot paths (broker loop, worker job results):

pyzmq's Socket.send_multipart computes `zmq.SNDMORE | flags` as enum arithmetic for every
frame, which costs more than the send itself for small frames. The same sends with the
flags as plain ints take about a third of the time (timeit, frames of a job result).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import zmq

from virtbroker.common import protocol as p

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


def drain(sock: zmq.Socket, version: bytes, log: logging.Logger) -> Iterator[p.Message]:
    """Every message waiting on a worker's DEALER socket, decoded, batches unpacked in order;
    undecodable ones are logged and dropped."""
    while True:
        try:
            frames = sock.recv_multipart(_NOBLOCK)
        except zmq.Again:
            return
        try:
            messages = p.unbatch(p.decode(frames, version))
        except p.ProtocolError as e:
            log.warning("bad message from the broker dropped: %s", e)
            continue
        yield from messages
