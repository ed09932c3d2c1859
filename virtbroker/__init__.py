"""virtbroker: a VM control plane for busy libvirt hosts.

The repository keeps one folder per part (broker/, workers/, common/, client/, launcher/);
setup.cfg installs them as subpackages of this one (virtbroker.broker, ...), so the only
top-level name an install adds is `virtbroker`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("virtbroker")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from virtbroker.client.api import Client  # noqa: E402  (after __version__, which the client may report)

__all__ = ["Client", "__version__"]
