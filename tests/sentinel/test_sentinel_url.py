"""Sentinel URLs, passwords kept out of messages, and the settings of a Sentinel deployment: plain data, no Redis."""

from __future__ import annotations

import pytest

from service.config import ConfigError, SentinelTarget, Settings, parse_sentinel_url, redact

PARSED = [
    ("redis+sentinel://s1:26379,s2:26380,s3:26381/mymaster",
     SentinelTarget((("s1", 26379), ("s2", 26380), ("s3", 26381)), "mymaster")),
    ("redis+sentinel://s1/mymaster/3", SentinelTarget((("s1", 26379),), "mymaster", 3)),
    ("redis+sentinel://s1:1,s2/mymaster/", SentinelTarget((("s1", 1), ("s2", 26379)), "mymaster")),
    ("redis+sentinel://:pa%40ss@s1:26379/m", SentinelTarget((("s1", 26379),), "m", 0, None, "pa@ss")),
    ("redis+sentinel://app:secret@s1:26379/m/1?sentinel_password=s%26pw",
     SentinelTarget((("s1", 26379),), "m", 1, "app", "secret", "s&pw")),
    ("redis+sentinel://[::1]:26379,[fe80::2]/m", SentinelTarget((("::1", 26379), ("fe80::2", 26379)), "m")),
    ("redis+sentinel://10.0.0.1:26379, 10.0.0.2:26379/m", SentinelTarget((("10.0.0.1", 26379), ("10.0.0.2", 26379)),
                                                                        "m")),
]


@pytest.mark.parametrize(("url", "expected"), PARSED)
def test_sentinel_urls_parse(url: str, expected: SentinelTarget) -> None:
    assert parse_sentinel_url(url) == expected


BAD = [
    ("redis+sentinel://s1:26379", "<service name>"),  # no service
    ("redis+sentinel:///mymaster", "<service name>"),  # no sentinel
    ("redis+sentinel://s1:26379/m/x", "<service name>"),  # db not a number
    ("redis+sentinel://s1:26379/m/0/extra", "<service name>"),
    ("redis+sentinel://s1:port/m", "'s1:port'"),
    ("redis+sentinel://s1:70000/m", "'s1:70000'"),
    ("redis+sentinel://:/m", "':'"),
    ("redis+sentinel://[::1]x/m", "'[::1]x'"),
    ("redis+sentinel://s1/m?sentinel_pasword=x", "'sentinel_pasword'"),
]


@pytest.mark.parametrize(("url", "said"), BAD)
def test_malformed_sentinel_urls_are_refused_with_the_expected_form(url: str, said: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_sentinel_url(url)
    assert said in str(err.value)


def test_messages_about_a_bad_url_never_quote_its_passwords() -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"REDIS_URL": "redis+sentinel://user:hunter2@s1:bad/m?sentinel_password=opensesame"})
    assert "REDIS_URL" in str(err.value)
    assert "hunter2" not in str(err.value) and "opensesame" not in str(err.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis+sentinel://user:hunter2@s1:26379,s2:26379/m/0?sentinel_password=opensesame",
     "redis+sentinel://user:***@s1:26379,s2:26379/m/0?sentinel_password=***"),
    ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
    ("rediss://default:hunter2@cache:6380/0?ssl_cert_reqs=none&password=x",
     "rediss://default:***@cache:6380/0?ssl_cert_reqs=none&password=***"),
    ("redis://cache:6379/0", "redis://cache:6379/0"),
    ("unix:///var/run/redis.sock?db=1", "unix:///var/run/redis.sock?db=1"),
])
def test_redact_hides_every_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_settings_check_sentinel_urls_at_start() -> None:
    good = "redis+sentinel://s1:26379,s2:26379,s3:26379/persona"
    s = Settings.from_env({"REDIS_URL": good, "QUEUE_REDIS_URL": good + "/1"})
    assert (s.redis_url, s.queue_redis_url) == (good, good + "/1")
    with pytest.raises(ConfigError, match="QUEUE_REDIS_URL"):
        Settings.from_env({"REDIS_URL": good, "QUEUE_REDIS_URL": "redis+sentinel://s1:26379"})
    with pytest.raises(ConfigError, match="REDIS_CLUSTER=true with a redis\\+sentinel"):
        Settings.from_env({"REDIS_URL": good, "REDIS_CLUSTER": "true", "QUEUE_REDIS_URL": "redis://q:6379"})
    with pytest.raises(ConfigError, match="only redis\\+sentinel://"):
        Settings.from_env({"REDIS_URL": "rediss+sentinel://s1:26379/persona"})


def test_wait_settings() -> None:
    assert (Settings.from_env({}).state_wait_replicas, Settings.from_env({}).state_wait_timeout) == (0, 1.0)
    s = Settings.from_env({"STATE_WAIT_REPLICAS": "1", "STATE_WAIT_TIMEOUT": "250ms"})
    assert (s.state_wait_replicas, s.state_wait_timeout) == (1, 0.25)
    for env, said in [({"STATE_WAIT_REPLICAS": "-1"}, "at least 0"), ({"STATE_WAIT_REPLICAS": "one"}, "whole number"),
                      ({"STATE_WAIT_TIMEOUT": "5s"}, "from 10ms to 3s"), ({"STATE_WAIT_TIMEOUT": "1ms"}, "10ms"),
                      ({"STATE_WAIT_REPLICAS": "1", "REDIS_CLUSTER": "true", "QUEUE_REDIS_URL": "redis://q:6379"},
                       "not supported with REDIS_CLUSTER")]:
        with pytest.raises(ConfigError, match=said):
            Settings.from_env(env)
