"""tollway.yaml loading: every problem reported at once, by its place in the file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest
from pydantic import field_validator

from tollway.config.errors import ConfigError
from tollway.config.loader import interpolate, load_config, load_config_text
from tollway.config.schema import GatewayConfig
from tollway.plugins.base import PLUGINS, Plugin, PluginConfig


class DummyConfig(PluginConfig):
    origins: tuple[str, ...] = ("*",)
    max_age: int = 0

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, origin in enumerate(v):
            if origin != "*" and "://" not in origin:
                raise ValueError(f"origins[{i}]: must be * or scheme://host")
        return v


class DummyPlugin(Plugin[DummyConfig]):
    name = "dummy-cors"
    priority = 1
    Config = DummyConfig


@pytest.fixture(autouse=True)
def dummy_plugin() -> Iterator[None]:
    PLUGINS[DummyPlugin.name] = DummyPlugin
    yield
    PLUGINS.pop(DummyPlugin.name, None)


def load(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return load_config_text(dedent(text), "tollway.yaml", env or {})


def issues_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    assert info.value.source == "tollway.yaml"
    return [str(issue) for issue in info.value.issues]


VALID = """
    _format_version: "1"
    services:
      - name: images
        url: ${IMAGES_URL}
        read_timeout: 2s
      - name: text
        url: ${TEXT_URL:-http://127.0.0.1:9001}
    routes:
      - name: images
        service: images
        paths: ["/images"]
      - name: text
        service: text
        paths: ["/text"]
    consumers:
      - username: alice
        id: c-1
    plugins:
      - name: dummy-cors
        config:
          origins: ["https://app.example"]
      - name: dummy-cors
        route: images
      - name: dummy-cors
        consumer: c-1
"""


def test_a_valid_file_loads_with_environment_values() -> None:
    config = load(VALID, {"IMAGES_URL": "http://images:8080"})

    assert [s.url for s in config.services] == ["http://images:8080", "http://127.0.0.1:9001"]
    assert config.services[0].read_timeout == 2.0
    assert [r.name for r in config.routes] == ["images", "text"]
    assert config.plugins[0].config == {"origins": ["https://app.example"]}


def test_an_empty_file_is_an_empty_config() -> None:
    for text in ("", "# nothing yet\n"):
        config = load(text)
        assert config.services == () and config.routes == () and config.plugins == ()


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text(dedent(VALID))

    config = load_config(path, {"IMAGES_URL": "http://images:8080"})

    assert len(config.services) == 2


def test_a_missing_file_is_one_issue_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert info.value.source == str(path)
    assert [i.message for i in info.value.issues] == ["cannot read: No such file or directory"]


# ---------------------------------------------------------------- interpolation


def test_interpolation_defaults_escapes_and_leaves_other_scalars_alone() -> None:
    tree = {
        "a": "${X}",
        "b": "${MISSING:-fallback}",
        "c": "$${X} stays literal",
        "d": ["x=${X}", 5, True, None],
        "e": "${EMPTY:-unused}",
    }
    assert interpolate(tree, {"X": "1", "EMPTY": ""}) == {
        "a": "1",
        "b": "fallback",
        "c": "${X} stays literal",
        "d": ["x=1", 5, True, None],
        "e": "",
    }


def test_interpolated_values_cannot_change_the_yaml_structure() -> None:
    # Substituted after parsing: quotes, colons and newlines stay inside the value.
    config = load(
        """
        services:
          - name: s
            url: http://127.0.0.1:1
            tags: ["${TAG}"]
        """,
        {"TAG": 'a": b\n- c'},
    )
    assert config.services[0].tags == ('a": b\n- c',)


def test_every_unset_variable_is_reported_with_its_path() -> None:
    assert issues_of(
        """
        services:
          - name: images
            url: ${IMAGES_URL}
            tags: [ok, "${TAG_A}"]
        """
    ) == [
        "services[0].url: environment variable IMAGES_URL is not set",
        "services[0].tags[1]: environment variable TAG_A is not set",
    ]


def test_a_malformed_placeholder_is_an_error() -> None:
    [issue] = issues_of("_format_version: '${1x}'\n")
    assert issue.startswith("_format_version: malformed")


# ---------------------------------------------------------------- YAML


def test_a_duplicate_key_names_both_lines() -> None:
    assert issues_of(
        """\
        routes:
          - name: a
            service: s
            paths: ["/a"]
            paths: ["/b"]
        """
    ) == ['line 5, column 5: duplicate key "paths" (first on line 4)']


def test_merge_keys_may_override_without_being_duplicates() -> None:
    config = load(
        """
        services:
          - &base
            name: a
            url: http://127.0.0.1:1
          - <<: *base
            name: b
        """
    )
    assert [s.name for s in config.services] == ["a", "b"]


def test_a_syntax_error_gives_line_and_column() -> None:
    [issue] = issues_of("services:\n  - name: [a\n")
    assert issue.startswith("line 3, column 1: ")


def test_the_top_level_must_be_a_mapping() -> None:
    assert issues_of("- a\n- b\n") == ["the top level must be a mapping (services:, routes:, ...)"]


# ---------------------------------------------------------------- schema


def test_schema_errors_name_the_path_in_the_file() -> None:
    assert issues_of(
        """
        _format_version: 1
        services:
          - name: s
            url: ftp://x
            pathz: /
        routes:
          - name: a
            service: s
            paths: ["/a"]
          - name: b
            service: s
            paths: ["/b"]
          - name: c
            service: s
            paths: ["c", "/d", "e"]
            methods: [GET, FETCH]
          - service: s
            paths: ["/f"]
        """
    ) == [
        "_format_version: Input should be a valid string",
        'services[0].url: must be an http:// URL or "internal:<name>"',
        'services[0].pathz: unknown field (did you mean "path"?)',
        'routes[2].paths[0]: must start with "/"',
        "routes[2].methods[1]: unknown method 'FETCH'",
        "routes[3].name: is required",
    ]


# ---------------------------------------------------------------- cross-references


def test_cross_reference_problems_are_all_reported() -> None:
    assert issues_of(
        """
        services:
          - name: images
            url: http://127.0.0.1:1
          - name: images
            url: http://127.0.0.1:2
        routes:
          - name: r
            service: images
            paths: ["/a"]
          - name: r2
            service: imagez
            paths: ["/b"]
          - name: r
            service: nope
            paths: ["/c"]
        consumers:
          - username: alice
          - username: alice
        plugins:
          - name: dummy-cors
            service: ghost
          - name: dummy-cors
            route: r2
          - name: dummy-cors
            route: r2
          - name: dummy-cors
            consumer: bob
          - name: dummy-corz
        """
    ) == [
        'services[1].name: duplicate service name "images"',
        'routes[1].service: unknown service "imagez" (did you mean "images"?)',
        'routes[2].name: duplicate route name "r"',
        'routes[2].service: unknown service "nope"',
        'consumers[1].username: duplicate consumer name "alice"',
        'plugins[0].service: unknown service "ghost"',
        'plugins[2].name: plugin "dummy-cors" is already attached to route "r2" (plugins[1])',
        'plugins[3].consumer: unknown consumer "bob"',
        'plugins[4].name: unknown plugin "dummy-corz" (did you mean "dummy-cors"?)',
    ]


def test_plugin_config_is_validated_against_the_plugin_schema() -> None:
    assert issues_of(
        """
        plugins:
          - name: dummy-cors
            config:
              origins: ["*", "nope"]
              max_age: soon
              colour: blue
        """
    ) == [
        "plugins[0].config.origins[1]: must be * or scheme://host",
        "plugins[0].config.max_age: "
        "Input should be a valid integer, unable to parse string as an integer",
        "plugins[0].config.colour: unknown field",
    ]


def test_schema_and_cross_reference_issues_come_together_in_file_order() -> None:
    issues = issues_of(
        """
        services:
          - name: s
            url: ${S_URL}
        routes:
          - name: r
            service: t
            paths: ["x"]
        """
    )
    assert issues == ["services[0].url: environment variable S_URL is not set"]

    issues = issues_of(
        """
        routes:
          - name: r
            service: t
            paths: ["x"]
        services:
          - name: s
            url: http://127.0.0.1:1
            read_timeout: forever
        """
    )
    assert issues == [
        'routes[0].paths[0]: must start with "/"',
        'routes[0].service: unknown service "t"',
        "services[0].read_timeout: must be a duration such as 2s, 500ms or 1m",
    ]


ROUTE_WITH = """
    services:
      - {{name: s, url: "http://127.0.0.1:1"}}
    routes:
      - {{name: r, service: s, {field}}}
"""


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        # Requests are routed normalized: these could never match as written.
        ("paths: [/files/%7Euser]",
         'routes[0].paths[0]: requests are matched normalized; write "/files/~user"'),
        ("paths: [/a%2fb]", 'routes[0].paths[0]: requests are matched normalized; write "/a%2Fb"'),
        ("paths: [=/x/../y]", 'routes[0].paths[0]: requests are matched normalized; write "=/y"'),
        ("hosts: [api.example.com:8080]",
         "routes[0].hosts[0]: no port here: routes match the host name alone"),
    ],
)
def test_routes_that_could_never_match_are_refused(field: str, expected: str) -> None:
    assert issues_of(ROUTE_WITH.format(field=field)) == [expected]


def test_a_bracketed_ipv6_host_is_accepted() -> None:
    config = load(ROUTE_WITH.format(field='hosts: ["[::1]"]'))
    assert config.routes[0].hosts == ("[::1]",)


@pytest.mark.parametrize("value", [".nan", ".inf", "-1s"])
def test_durations_must_be_finite_and_not_negative(value: str) -> None:
    issues = issues_of(f"""
        services:
          - {{name: s, url: "http://127.0.0.1:1", read_timeout: {value}}}
    """)
    assert len(issues) == 1 and issues[0].startswith("services[0].read_timeout:")


def test_empty_file_is_refused_when_asked() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text("# only a comment\n", "tollway.yaml", {}, allow_empty=False)
    assert [str(i) for i in info.value.issues] == ["the file is empty"]
    assert load_config_text("", "tollway.yaml", {}) == GatewayConfig()
