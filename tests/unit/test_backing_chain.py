"""Backing chains read from qcow2 headers, confined to the storage roots."""

import subprocess

from common.resources import Resource
from workers.security.service import qcow2_backing_file, with_backing_files


def qcow2(path, backing=None):
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        cmd += ["-b", backing, "-F", "qcow2"]
    subprocess.run(cmd + [str(path), "1M"], check=True)
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
