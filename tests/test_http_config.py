"""The `[http]` section of the settings tree: defaults, checks naming the dotted key, the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import HttpSettings
from proxy.config import load
from proxy.main import _load


def test_off_by_default() -> None:
    assert HttpSettings.from_mapping(load(None, environ={}).http).listen == ""


@pytest.mark.parametrize(("section", "key"), [
    ('listen = "nowhere"', "http.listen"),
    ('listen = "127.0.0.1:99999"', "http.listen"),
    ("max_n = 0", "http.max_n"),
    ("max_tokens = true", "http.max_tokens"),
    ('api_keys = ["k"]', "http.api_keys"),
    ("colour = 1", "http.colour"),
])
def test_bad_values_name_their_key(tmp_path: Path, section: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[http]\n{section}\n")
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    assert err.value.key == key


def test_api_keys_name_known_users(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proxy]\nauth_method = "md5"\nusers = {"app" = "pw"}\n'
                    '[http]\napi_keys = {"k1" = "app", "k2" = "ghost"}\n')
    with pytest.raises(ConfigError) as err:
        load(path, environ={})
    assert err.value.key == "http.api_keys" and "ghost" in str(err.value)


def test_the_flag_sets_listen(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[http]\napi_keys = {"k" = "postgres"}\n')
    config = _load(str(path), {}, "127.0.0.1:8123")
    settings = HttpSettings.from_mapping(config.http)
    assert (settings.host, settings.port, dict(settings.api_keys)) == ("127.0.0.1", 8123, {"k": "postgres"})
    with pytest.raises(ConfigError):
        _load(str(path), {}, "bad")
