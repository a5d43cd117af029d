"""Compiling a config into a snapshot: errors, sharing, and plugin precedence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from tollway.config.errors import ConfigError
from tollway.config.loader import load_config_text
from tollway.config.schema import GatewayConfig, RouteConfig, ServiceConfig
from tollway.config.snapshot import build_snapshot
from tollway.gateway.context import RequestContext, Response
from tollway.gateway.pipeline import active_chain
from tollway.plugins.base import PLUGINS, Plugin, PluginConfig, register


class TagConfig(PluginConfig):
    tag: str


@register
class Tag(Plugin[TagConfig]):
    """Records which attachment ran, so precedence is visible."""

    name: ClassVar[str] = "test-tag"
    priority: ClassVar[int] = 10
    Config: ClassVar[type[PluginConfig]] = TagConfig

    def access(self, ctx: RequestContext) -> Response | None:
        ctx.vars.setdefault("tags", []).append(self.config.tag)  # type: ignore[attr-defined]
        return None


class AuthConfig(PluginConfig):
    pass


@dataclass
class Consumer:
    id: str
    username: str


@register
class FakeAuth(Plugin[AuthConfig]):
    """Identifies the consumer named in the X-User header, as an auth plugin would."""

    name: ClassVar[str] = "test-auth"
    priority: ClassVar[int] = 1000
    Config: ClassVar[type[PluginConfig]] = AuthConfig

    def access(self, ctx: RequestContext) -> Response | None:
        user = ctx.header(b"x-user")
        if user is not None:
            ctx.consumer = Consumer(id="c-" + user.decode(), username=user.decode())
        return None


def teardown_module() -> None:
    PLUGINS.pop("test-tag", None)
    PLUGINS.pop("test-auth", None)


CONFIG = """
services:
  - {name: s1, url: "http://127.0.0.1:9001"}
  - {name: s2, url: "http://127.0.0.1:9002"}
routes:
  - {name: r1, service: s1, paths: [/one]}
  - {name: r2, service: s1, paths: [/two]}
  - {name: r3, service: s2, paths: [/three]}
consumers:
  - {username: alice}
plugins:
  - {name: test-auth}
  - {name: test-tag, config: {tag: global}}
  - {name: test-tag, service: s1, config: {tag: service}}
  - {name: test-tag, route: r1, config: {tag: route}}
  - {name: test-tag, consumer: alice, config: {tag: consumer}}
"""


def run(snapshot: Any, path: str, user: str | None = None) -> list[str]:
    headers = [(b"host", b"x")] + ([(b"x-user", user.encode())] if user else [])
    ctx = RequestContext(method="GET", path=path, query=b"", http_version="1.1",
                         headers=headers, peer_ip="127.0.0.1", client_ip="127.0.0.1",
                         host="x")
    match = snapshot.router.match("GET", "x", path, headers)
    chain = match.route.chain
    assert chain.run_access(ctx) is None
    active_chain(ctx, chain)  # the chain whose response/log hooks apply
    return list(ctx.vars.get("tags", []))


def test_most_specific_attachment_wins() -> None:
    snapshot = build_snapshot(load_config_text(CONFIG))
    assert run(snapshot, "/one") == ["route"]
    assert run(snapshot, "/two") == ["service"]
    assert run(snapshot, "/three") == ["global"]


def test_consumer_attachment_beats_route_once_auth_identifies_the_consumer() -> None:
    snapshot = build_snapshot(load_config_text(CONFIG))
    assert run(snapshot, "/one", user="alice") == ["consumer"]
    assert run(snapshot, "/three", user="alice") == ["consumer"]
    assert run(snapshot, "/one", user="bob") == ["route"]


def test_chains_and_plugins_are_shared_between_routes() -> None:
    config = GatewayConfig(
        services=(ServiceConfig(name="s", url="http://127.0.0.1:1"),),
        routes=tuple(RouteConfig(name=f"r{i}", service="s", paths=(f"/p{i}",))
                     for i in range(500)),
        plugins=load_config_text("plugins: [{name: request-id}]").plugins,
    )
    snapshot = build_snapshot(config)
    assert len({id(r.chain) for r in snapshot.routes}) == 1
    assert len(snapshot.plugins) == 1


def test_config_built_in_code_gets_the_loader_errors() -> None:
    config = GatewayConfig(
        services=(ServiceConfig(name="s", url="http://127.0.0.1:1"),),
        routes=(RouteConfig(name="r", service="nope", paths=("/x",)),),
    )
    with pytest.raises(ConfigError) as err:
        build_snapshot(config)
    assert [str(i) for i in err.value.issues] == ['routes[0].service: unknown service "nope"']


def test_consumer_attached_by_username_applies_when_auth_knows_only_the_id() -> None:
    """API-key consumers arrive with their UUID and email; the file may name either."""
    config = CONFIG.replace("  - {username: alice}", '  - {username: alice, id: "c-carol"}')
    snapshot = build_snapshot(load_config_text(config))
    # The test auth plugin gives user "carol" the id "c-carol": only the id matches.
    assert run(snapshot, "/one", user="carol") == ["consumer"]


def test_consumer_may_be_named_by_email() -> None:
    config = CONFIG.replace("{username: alice}", "{username: alice@example.com}").replace(
        "consumer: alice,", "consumer: alice@example.com,"
    )
    snapshot = build_snapshot(load_config_text(config))
    assert run(snapshot, "/one", user="alice@example.com") == ["consumer"]
