"""Where the shared cache lives, from the environment: REDIS_URL, TLS files, Sentinel."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings


def test_no_redis_means_the_in_process_cache() -> None:
    assert Settings(redis_url=None).redis is None


def test_tls_files_reach_the_connection_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://cache.internal:6380/2")
    monkeypatch.setenv("FERRULE_REDIS_TLS_CA_FILE", "/etc/ferrule/redis-ca.pem")
    monkeypatch.setenv("FERRULE_REDIS_TLS_CERT_FILE", "/etc/ferrule/client.pem")
    monkeypatch.setenv("FERRULE_REDIS_TLS_KEY_FILE", "/etc/ferrule/client.key")
    redis = Settings().redis
    assert redis is not None
    assert redis.tls
    assert (redis.tls_ca_file, redis.tls_cert_file, redis.tls_key_file) == (
        "/etc/ferrule/redis-ca.pem",
        "/etc/ferrule/client.pem",
        "/etc/ferrule/client.key",
    )
    assert redis.describe() == "cache.internal:6380"


def test_sentinels_name_the_master(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRULE_REDIS_SENTINELS", "10.0.0.1:26380, sentinel-b")
    monkeypatch.setenv("FERRULE_REDIS_SENTINEL_SERVICE", "ferrule-cache")
    monkeypatch.setenv("FERRULE_REDIS_SENTINEL_PASSWORD", "s3cret")
    settings = Settings(ferrule_workers=2)  # Sentinel alone is a shared cache
    redis = settings.redis
    assert redis is not None
    assert redis.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379))
    assert (redis.sentinel_service, redis.sentinel_password) == ("ferrule-cache", "s3cret")
    assert "s3cret" not in redis.describe()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_URL": "memcached://127.0.0.1"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/cache"}, "database number"),
        ({"FERRULE_REDIS_SENTINELS": "127.0.0.1:26379"}, "service"),
        ({"FERRULE_REDIS_SENTINELS": "127.0.0.1:port"}, "host:port"),
        (
            {"REDIS_URL": "rediss://127.0.0.1", "FERRULE_REDIS_TLS_CERT_FILE": "/c.pem"},
            "certificate and key go together",
        ),
    ],
)
def test_bad_redis_settings_stop_the_process_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()
