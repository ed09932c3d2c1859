"""Config: derived defaults and refused values."""

import pytest

from virtbroker.common.config import MAX_SOCKET_PATH_BYTES, Config, default_client_url
from virtbroker.common.errors import ConfigError


def test_endpoints_default_to_the_state_dir(tmp_path):
    config = Config(state_dir=str(tmp_path))
    assert config.client_url == f"ipc://{tmp_path}/client.sock"
    assert config.local_url == f"unix://{tmp_path}/local.sock"


def test_clients_default_to_the_local_endpoint(tmp_path, monkeypatch):
    monkeypatch.delenv("VIRTBROKER_URL", raising=False)
    monkeypatch.setenv("VIRTBROKER_STATE_DIR", str(tmp_path))
    assert default_client_url() == f"unix://{tmp_path}/local.sock"
    monkeypatch.setenv("VIRTBROKER_URL", "tcp://10.0.0.1:5640")
    assert default_client_url() == "tcp://10.0.0.1:5640"


@pytest.mark.parametrize(
    "local_url, message",
    [
        ("ipc:///tmp/x.sock", "must be unix:///ABSOLUTE/PATH"),
        ("unix://relative/x.sock", "must be unix:///ABSOLUTE/PATH"),
        ("unix:///" + "d" * MAX_SOCKET_PATH_BYTES, "over 107 bytes"),
    ],
    ids=["scheme", "relative", "too-long"],
)
def test_a_bad_local_url_is_refused(tmp_path, local_url, message):
    with pytest.raises(ConfigError, match=message):
        Config.load(state_dir=str(tmp_path), local_url=local_url)


def test_a_local_path_at_the_limit_is_accepted(tmp_path):
    path = "/" + "d" * (MAX_SOCKET_PATH_BYTES - 1)
    assert Config(state_dir=str(tmp_path), local_url=f"unix://{path}").local_url == f"unix://{path}"
