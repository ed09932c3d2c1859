"""find_resources() and emulator_path() on libvirt's own test domains and on small hand-made ones."""

from pathlib import Path

import pytest

from virtbroker.common.errors import InvalidError
from virtbroker.common.resources import Resource, emulator_path, find_resources

FIXTURES = Path(__file__).parents[1] / "fixtures" / "domains"
# The full corpus of libvirt test domains, when a checkout of it sits beside the repository.
CORPUS = Path(__file__).parents[2].parent / "shared" / "corpus" / "libvirt-domains"


def ro(path: str, kind: str, shared: bool = False) -> Resource:
    return Resource(path, readonly=True, shared=shared, kind=kind)


def rw(path: str, kind: str, shared: bool = False, may_be_absent: bool = False) -> Resource:
    return Resource(path, readonly=False, shared=shared, kind=kind, may_be_absent=may_be_absent)


EXPECTED = {
    "arm-vexpressa9-basic.xml": [
        ro("/arm.kernel", "kernel"),
        ro("/arm.initrd", "initrd"),
        ro("/arm.dtb", "dtb"),
        rw("/arm.raw", "disk"),
    ],
    "bios-nvram.xml": [
        ro("/usr/share/OVMF/OVMF_CODE.fd", "loader"),
        rw("/usr/share/OVMF/OVMF_VARS.fd", "nvram"),
        rw("/dev/HostVG/QEMUGuest1", "disk"),
    ],
    "bios-nvram-file.xml": [
        ro("/usr/share/OVMF/OVMF_CODE.fd", "loader"),
        rw("/var/lib/libvirt/nvram/guest_VARS.fd", "nvram"),
    ],
    # Network layers (gluster, nbd, rbd) have no host path; the local layers below them do.
    "disk-backing-chains.xml": [
        ro("/tmp/missing-backing-store.qcow", "backing"),
        ro("/dev/HostVG/QEMUGuest1", "backing"),
        ro("/tmp/image2.qcow", "backing"),
        ro("/tmp/image3.qcow", "backing"),
        ro("/tmp/image4.qcow", "backing"),
        ro("/tmp/image5.qcow", "backing"),
        ro("/tmp/Fedora-17-x86_64-Live-KDE.iso", "backing"),
        ro("/tmp/image.qcow", "backing"),
        rw("/dev/HostVG/QEMUGuest11", "disk"),
    ],
    # Two of the three cdroms are empty.
    "disk-cdrom.xml": [
        rw("/dev/HostVG/QEMUGuest1", "disk"),
        ro("/root/boot.iso", "cdrom"),
    ],
    "disk-shared.xml": [
        rw("/dev/HostVG/QEMUGuest1", "disk", shared=True),
        ro("/dev/HostVG/QEMUGuest2", "cdrom"),
        rw("/dev/scsi", "disk", shared=True),
        rw("/dev/virtio", "disk", shared=True),
    ],
    "fs9p.xml": [
        rw("/export/to/guest", "filesystem"),
        rw("/export/to/guest2", "filesystem"),
        rw("/export/to/guest3", "filesystem"),
    ],
    # The only disk says <seclabel model='dac' relabel='no'/>.
    "seclabel-device-multiple.xml": [],
    "seclabel-none.xml": [],
    # The console repeats the first serial's socket; the bind socket is QEMU's to create.
    "serial-unix-chardev.xml": [
        rw("/tmp/serial.sock", "serial"),
        rw("/tmp/serial-server.sock", "serial", may_be_absent=True),
    ],
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_domains(name):
    xml = (FIXTURES / name).read_bytes()
    assert find_resources(xml) == EXPECTED[name]


def test_every_fixture_is_checked():
    assert sorted(p.name for p in FIXTURES.glob("*.xml")) == sorted(EXPECTED)


def test_accepts_a_parsed_root_and_reports_the_emulator():
    from virtbroker.common.domxml import parse

    root = parse((FIXTURES / "bios-nvram.xml").read_bytes())
    assert find_resources(root) == EXPECTED["bios-nvram.xml"]
    assert emulator_path(root) == "/usr/bin/qemu-system-x86_64"
    assert emulator_path("<domain type='kvm'><devices/></domain>") is None


def domain(devices: str = "", os_extra: str = "", extra: str = "") -> str:
    return (
        "<domain type='kvm'><name>t</name><os><type>hvm</type>" + os_extra + "</os>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>" + devices + "</devices>" + extra + "</domain>"
    )


def test_read_write_use_wins_and_shared_sticks():
    xml = domain(
        "<disk type='file' device='cdrom'><source file='/img/a'/><readonly/></disk>"
        "<disk type='file' device='disk'><source file='/img/a'/><shareable/></disk>"
        "<disk type='file' device='disk'><source file='/img/b'/></disk>"
        "<disk type='file' device='disk'><source file='/img/c'/><backingStore type='file'>"
        "<source file='/img/b'/></backingStore></disk>"
    )
    assert find_resources(xml) == [
        rw("/img/a", "disk", shared=True),
        rw("/img/b", "disk"),
        rw("/img/c", "disk"),
    ]


def test_per_source_relabel_no():
    xml = domain(
        # On the disk's own source: the whole chain is left alone, as libvirt's DAC does.
        "<disk type='file'><source file='/img/top'><seclabel relabel='no'/></source>"
        "<backingStore type='file'><source file='/img/base1'/></backingStore></disk>"
        # On a backing layer: that layer only.
        "<disk type='file'><source file='/img/top2'/>"
        "<backingStore type='file'><source file='/img/mid'><seclabel model='dac' relabel='no'/></source>"
        "<backingStore type='file'><source file='/img/base2'/></backingStore></backingStore></disk>"
        # Another model's seclabel does not count for dac.
        "<disk type='file'><source file='/img/other'><seclabel model='selinux' relabel='no'/></source></disk>"
    )
    assert find_resources(xml) == [
        rw("/img/top2", "disk"),
        ro("/img/base2", "backing"),
        rw("/img/other", "disk"),
    ]
    # A seclabel without a model counts for every model.
    assert [r.path for r in find_resources(xml, model="selinux")] == ["/img/top2", "/img/mid", "/img/base2"]


def test_domain_level_seclabels():
    disk = "<disk type='file'><source file='/img/a'/></disk>"
    assert find_resources(domain(disk, extra="<seclabel type='none' model='dac'/>")) == []
    assert find_resources(domain(disk, extra="<seclabel type='none' model='selinux'/>")) == [rw("/img/a", "disk")]
    # virtbroker itself adds this to every definition it gives libvirt: not a "don't label".
    static = "<seclabel type='static' model='dac' relabel='no'><label>+107:+107</label></seclabel>"
    assert find_resources(domain(disk, extra=static)) == [rw("/img/a", "disk")]


def test_os_files_chardevs_filesystems_and_devices():
    xml = domain(
        "<serial type='file'><source path='/var/log/s.log'/><log file='/var/log/ignored.log'/></serial>"
        "<serial type='pty'/>"
        "<parallel type='dev'><source path='/dev/parport0'/></parallel>"
        "<channel type='unix'><source mode='connect' path='/run/x.sock'/></channel>"
        "<channel type='pipe'><source path='/run/pipe'/></channel>"
        "<filesystem type='mount'><source dir='/srv/share'/><readonly/></filesystem>"
        "<filesystem type='ram'><source usage='1024'/></filesystem>"
        "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"
        "<memory model='nvdimm'><source><path>/srv/nvdimm</path></source><target><size>1</size></target></memory>"
        "<input type='passthrough' bus='virtio'><source evdev='/dev/input/event1'/></input>"
        "<disk type='network'><source protocol='nbd' name='x'><host name='h'/></source></disk>"
        "<disk type='volume'><source pool='p' volume='v'/></disk>",
        os_extra="<loader readonly='no' type='pflash'>/fw/code.fd</loader>"
        "<nvram type='network'><source protocol='iscsi' name='n'><host name='h'/></source></nvram>",
    )
    assert find_resources(xml) == [
        rw("/fw/code.fd", "loader"),
        rw("/var/log/s.log", "serial"),
        rw("/dev/parport0", "parallel"),
        rw("/run/x.sock", "channel"),
        ro("/srv/share", "filesystem"),
        rw("/dev/tpm0", "tpm"),
        rw("/srv/nvdimm", "nvdimm"),
        rw("/dev/input/event1", "input"),
    ]


def test_relative_path_is_invalid():
    with pytest.raises(InvalidError, match="not absolute"):
        find_resources(domain("<disk type='file'><source file='images/a.img'/></disk>"))


def test_bad_xml_is_invalid():
    with pytest.raises(InvalidError):
        find_resources("<domain type='kvm'><devices>")


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.xml")) if CORPUS.is_dir() else []


@pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"libvirt corpus not present at {CORPUS}; the fixtures in tests/fixtures/domains still run"
)
@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: p.name)
def test_whole_corpus(path):
    resources = find_resources(path.read_bytes())
    assert all(r.path.startswith("/") for r in resources)
    assert len({r.path for r in resources}) == len(resources)
