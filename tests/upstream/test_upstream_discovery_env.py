"""TOLLWAY_SERVICE_<NAME>_URL: a service's targets from its environment variable."""

from __future__ import annotations

import pytest

from tollway.upstream.discovery import env_targets, env_var_name
from tollway.upstream.service import Target


def keys(targets: tuple[Target, ...]) -> list[str]:
    return [t.key for t in targets]


@pytest.mark.parametrize(
    ("service", "variable"),
    [
        ("api", "TOLLWAY_SERVICE_API_URL"),
        ("payments-v2", "TOLLWAY_SERVICE_PAYMENTS_V2_URL"),
        ("img.gen~beta_1", "TOLLWAY_SERVICE_IMG_GEN_BETA_1_URL"),
        ("Mixed9", "TOLLWAY_SERVICE_MIXED9_URL"),
    ],
)
def test_the_variable_name_is_the_service_upper_cased_with_underscores(
    service: str, variable: str
) -> None:
    assert env_var_name(service) == variable


def test_unset_or_blank_means_no_override() -> None:
    assert env_targets("api", {}) is None
    assert env_targets("api", {"TOLLWAY_SERVICE_API_URL": ""}) is None
    assert env_targets("api", {"TOLLWAY_SERVICE_API_URL": "   "}) is None
    # Another service's variable is not this one's.
    assert env_targets("api", {"TOLLWAY_SERVICE_BILLING_URL": "http://b:1"}) is None


def test_one_url_gives_one_target_and_its_base_path() -> None:
    env = {"TOLLWAY_SERVICE_API_URL": "http://10.0.0.5:9001/v2/base"}
    result = env_targets("api", env)
    assert result is not None
    targets, base = result
    assert targets == (Target("10.0.0.5", 9001, 100),)
    assert base == "/v2/base"


def test_a_url_without_port_or_path_is_port_80_and_root() -> None:
    result = env_targets("api", {"TOLLWAY_SERVICE_API_URL": "http://API.Internal"})
    assert result == ((Target("api.internal", 80),), "/")


def test_a_list_of_urls_sharing_a_base_path() -> None:
    env = {"TOLLWAY_SERVICE_API_URL": "http://a:1/v1, http://b:2/v1 ,http://[::1]:3/v1"}
    result = env_targets("api", env)
    assert result is not None
    targets, base = result
    assert keys(targets) == ["a:1", "b:2", "::1:3"]
    assert targets[2].authority == b"[::1]:3"
    assert base == "/v1"


def test_a_host_port_list_is_rooted_at_slash() -> None:
    env = {"TOLLWAY_SERVICE_API_URL": "10.0.0.1:8080,10.0.0.2:8080,[fe80::1]:8081,svc_b:9"}
    result = env_targets("api", env)
    assert result is not None
    targets, base = result
    assert keys(targets) == ["10.0.0.1:8080", "10.0.0.2:8080", "fe80::1:8081", "svc_b:9"]
    assert all(t.weight == 100 for t in targets)
    assert base == "/"


def test_host_port_entries_take_the_urls_base_path() -> None:
    env = {"TOLLWAY_SERVICE_API_URL": "http://a:1/base,b:2"}
    assert env_targets("api", env) == ((Target("a", 1), Target("b", 2)), "/base")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("http://a:1/v1,http://b:2/v2", "base path"),
        ("http://a:1/v1,http://b:2", "base path"),
        ("https://a:443", "http://"),
        ("internal:demo", "host:port"),
        ("a:1,,b:2", "entry 2 is empty"),
        ("a:1,", "entry 2 is empty"),
        ("a", "host:port"),
        ("a:0", "port 1-65535"),
        ("a:70000", "port 1-65535"),
        ("a:http", "host:port"),
        ("::1:8080", "brackets"),
        ("[not-v6]:80", "not an IPv6 address"),
        ("bad host:80", "not a host name"),
        ("http://a:99999/", "port"),
        ("http://user:pw@a:1/", "credentials"),
        ("http://a:1/?x=1", "query"),
        ("http://:1/", "host"),
        ("a:1,A:1", "more than once"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(value: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        env_targets("my-api", {"TOLLWAY_SERVICE_MY_API_URL": value})
    message = str(caught.value)
    assert message.startswith("TOLLWAY_SERVICE_MY_API_URL: "), message
    assert fragment in message, message


def test_a_bad_entry_is_named_by_its_position() -> None:
    with pytest.raises(ValueError, match=r"entry 3 \('c:x'\)"):
        env_targets("api", {"TOLLWAY_SERVICE_API_URL": "a:1,b:2,c:x"})
