"""Backing chains read from qcow2 headers, confined to the storage roots."""

import os
import subprocess
import threading

import pytest

from virtbroker.common.errors import SecurityError
from virtbroker.common.resources import Resource
from virtbroker.workers.security.service import qcow2_backing_file, with_backing_files


def qcow2(path, backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [str(path), "1M"], check=True, timeout=60)
    return path


def test_chain_with_relative_and_absolute_backing_names(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    mid = qcow2(tmp_path / "mid.qcow2", "base.qcow2")  # relative to the image's folder
    top = qcow2(tmp_path / "top.qcow2", str(mid))
    assert qcow2_backing_file(str(top)) == str(mid)
    assert qcow2_backing_file(str(mid)) == str(base)
    assert qcow2_backing_file(str(base)) is None
    found = with_backing_files([Resource(str(top), False, False, "disk")], [str(tmp_path)])
    assert [(r.path, r.readonly, r.kind) for r in found] == [
        (str(top), False, "disk"), (str(mid), True, "backing"), (str(base), True, "backing"),
    ]


def test_images_outside_the_roots_are_not_read(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    outside_base = qcow2(tmp_path / "outside.qcow2")
    top = qcow2(inside / "top.qcow2", str(outside_base))
    found = with_backing_files([Resource(str(top), False, False, "disk")], [str(inside)])
    # The outside base is listed (the DAC driver then refuses it by path) but never opened.
    assert [r.path for r in found] == [str(top), str(outside_base)]
    assert with_backing_files([Resource(str(top), False, False, "disk")], ["/nowhere"]) == [
        Resource(str(top), False, False, "disk")
    ]


def test_raw_and_missing_files_have_no_backing(tmp_path):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * 4096)
    assert qcow2_backing_file(str(raw)) is None
    assert qcow2_backing_file(str(tmp_path / "missing.qcow2")) is None


def _in_thread(fn, timeout_s: float = 10.0):
    """fn() in a daemon thread: a probe that blocks (a FIFO opened without O_NONBLOCK) fails
    the test after timeout_s instead of hanging it."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"probe still blocked after {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_a_fifo_in_the_chain_is_refused_without_blocking(tmp_path):
    fifo = qcow2(tmp_path / "base.qcow2")
    top = qcow2(tmp_path / "top.qcow2", str(fifo))
    # Made a FIFO only now: qemu-img itself would block opening it.
    fifo.unlink()
    os.mkfifo(fifo)
    try:
        with pytest.raises(SecurityError, match="FIFO"):
            _in_thread(lambda: with_backing_files([Resource(str(top), False, False, "disk")], [str(tmp_path)]))
        with pytest.raises(SecurityError, match=f"{fifo}.*FIFO"):
            _in_thread(lambda: qcow2_backing_file(str(fifo)))
    finally:
        # Unblocks a probe that opened the FIFO for reading, should one ever do so again.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else None
        if fd is not None:
            os.close(fd)


def _has_reader(fifo) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        return True
    except OSError:  # ENXIO: nobody has it open for reading
        return False


def test_a_symlink_in_the_chain_is_refused(tmp_path):
    base = qcow2(tmp_path / "base.qcow2")
    link = tmp_path / "link.qcow2"
    link.symlink_to(base)
    top = qcow2(tmp_path / "top.qcow2", str(link))
    with pytest.raises(SecurityError, match=f"{link}.*symbolic link"):
        with_backing_files([Resource(str(top), False, False, "disk")], [str(tmp_path)])
    # A disk named through a symlink is still probed at its target (the driver resolves it too).
    top_link = tmp_path / "top-link.qcow2"
    top_link.symlink_to(qcow2(tmp_path / "plain.qcow2", str(base)))
    found = with_backing_files([Resource(str(top_link), False, False, "disk")], [str(tmp_path)])
    assert [r.path for r in found] == [str(top_link), str(base)]


def test_dotdot_in_a_backing_name_is_resolved_by_the_filesystem(tmp_path):
    # images/link -> deep/er: "../base.qcow2" from images/link is deep/base.qcow2 to the
    # kernel (and QEMU), not images/base.qcow2 as a lexical normpath would say.
    images = tmp_path / "images"
    (images / "deep" / "er").mkdir(parents=True)
    (images / "link").symlink_to(images / "deep" / "er")
    real_base = qcow2(images / "deep" / "base.qcow2")
    decoy = qcow2(images / "base.qcow2")
    top = qcow2(images / "deep" / "er" / "top.qcow2", "../base.qcow2")
    assert qcow2_backing_file(str(images / "link" / "top.qcow2")) == str(real_base)
    found = with_backing_files([Resource(str(images / "link" / "top.qcow2"), False, False, "disk")], [str(images)])
    assert [r.path for r in found] == [str(images / "link" / "top.qcow2"), str(real_base)]
    assert str(decoy) not in [r.path for r in found] and top.exists()
