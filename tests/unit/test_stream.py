"""The local stream transport's client side on a descriptor above 1,023, where select() cannot go."""

from __future__ import annotations

import contextlib
import os
import resource
import socket

import pytest

from virtbroker.common import stream

HIGH_FD = 1100  # select.select() refuses any descriptor from FD_SETSIZE (1,024) up


@pytest.fixture
def low_descriptors_taken():
    """Every descriptor below HIGH_FD is open, so the next socket gets one above it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HIGH_FD + 100:
        if hard != resource.RLIM_INFINITY and hard < HIGH_FD + 100:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {HIGH_FD + 100}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH_FD + 100, hard))
    fillers = []
    try:
        while not fillers or fillers[-1] < HIGH_FD:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_stream_socket_polls_and_receives_on_a_descriptor_above_1023(tmp_path, low_descriptors_taken):
    path = str(tmp_path / "local.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        client = stream.StreamSocket(stream.SCHEME + path)
        try:
            frames = [b"VBC1", b"ping", b"\x80"]
            client.send_multipart(frames)  # connects here
            assert client.sock.fileno() > 1023
            server, _ = listener.accept()
            with server:
                assert not client.poll(50)  # nothing sent yet: a timeout, not an error
                received = stream.unpacker(1 << 20)
                while True:
                    received.feed(server.recv(65536))
                    message = next(iter(received), None)
                    if message is not None:
                        break
                assert stream.check_message(message) == frames
                server.sendall(stream.encode_message([b"VBC1", b"reply", b"\x81"]))
                assert client.poll(5000)
                assert client.recv_multipart() == [b"VBC1", b"reply", b"\x81"]
        finally:
            with contextlib.suppress(OSError):
                client.close()
