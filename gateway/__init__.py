"""libvirt's remote protocol, served by virtbroker: virsh, libvirt-python and virt-install talk to it unchanged."""
