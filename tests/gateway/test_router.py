"""Router behaviour: path syntax, hosts, headers, specificity, forwarded paths, 405.

The property tests compare the compiled router with `reference_match`, a linear scan
written straight from docs/routing.md (regexes instead of a trie).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.config.schema import HTTP_METHODS, HeaderMatch, RewriteConfig, RouteConfig
from tollway.gateway.router import Route, RouteMatch, Router

Headers = list[tuple[bytes, bytes]]


def route(name: str, index: int = 0, **fields: Any) -> Route:
    return Route(name=name, config=RouteConfig(name=name, service="svc", **fields), index=index)


def router(*specs: dict[str, Any]) -> Router:
    return Router([route(f"r{i}", i, **spec) for i, spec in enumerate(specs)])


@dataclass
class FakeService:
    base_path: str


def winner(r: Router, path: str, method: str = "GET", host: str = "api.example.com",
           headers: Headers | None = None) -> str | None:
    found = r.match(method, host, path, headers or [])
    return None if found is None else found.route.name


# --- path syntax ---------------------------------------------------------------------

PATH_CASES = [
    # (route path, request path, matches)
    ("/api", "/api", True),
    ("/api", "/api/", True),
    ("/api", "/api/x/y", True),
    ("/api", "/apix", False),
    ("/api", "/ap", False),
    ("/api", "/", False),
    ("/api/", "/api/", True),
    ("/api/", "/api/x", True),
    ("/api/", "/api", False),
    ("/", "/", True),
    ("/", "/anything/at/all", True),
    ("=/api", "/api", True),
    ("=/api", "/api/", False),
    ("=/api", "/api/x", False),
    ("=/", "/", True),
    ("=/", "/x", False),
    ("/users/{id}/keys", "/users/7/keys", True),
    ("/users/{id}/keys", "/users/7/keys/9", True),
    ("/users/{id}/keys", "/users//keys", False),
    ("/users/{id}/keys", "/users/7/8/keys", False),
    ("/users/{id}/keys", "/users/7/keysx", False),
    ("=/users/{id}", "/users/7", True),
    ("=/users/{id}", "/users/7/keys", False),
    ("/a%2Fb", "/a%2Fb/c", True),
    ("/a/b", "/a%2Fb", False),
    ("~^/v[0-9]+/", "/v2/x", True),
    ("~^/v[0-9]+/", "/x/v2/", False),
    ("~/v[0-9]+$", "/v12", True),
    ("~/v[0-9]+$", "/v12/x", False),
    ("~^/(a|b)/c", "/b/c", True),
    ("~(?i)^/API", "/api/x", True),
]


@pytest.mark.parametrize(("pattern", "path", "matches"), PATH_CASES)
def test_path_syntax(pattern: str, path: str, matches: bool) -> None:
    r = router({"paths": (pattern,)})
    assert (winner(r, path) == "r0") is matches


@pytest.mark.parametrize(
    ("pattern", "path", "params"),
    [
        ("/users/{id}/keys", "/users/7/keys/x", {"id": "7"}),
        ("=/orgs/{org}/users/{user}", "/orgs/acme/users/bo%20b", {"org": "acme", "user": "bo%20b"}),
        ("~^/v(?P<ver>[0-9]+)/(?P<rest>.*)$", "/v3/a/b", {"ver": "3", "rest": "a/b"}),
        ("~^/x(?P<opt>y)?(?P<z>z)", "/xz", {"z": "z"}),
        ("/plain", "/plain/1", {}),
    ],
)
def test_path_params(pattern: str, path: str, params: dict[str, str]) -> None:
    found = router({"paths": (pattern,)}).match("GET", "h", path, [])
    assert found is not None
    assert found.path_params == params


# --- hosts and headers ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "www.example.com", False),
        ("API.Example.com", "api.example.com", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "aexample.com", False),
        ("example.*", "example.com", True),
        ("example.*", "example.co.uk", True),
        ("example.*", "example.", False),
        ("example.*", "www.example.com", False),
    ],
)
def test_hosts(pattern: str, host: str, matches: bool) -> None:
    r = router({"paths": ("/",), "hosts": (pattern,)})
    assert (winner(r, "/x", host=host) == "r0") is matches


def test_route_without_host_matches_any_host() -> None:
    assert winner(router({"paths": ("/",)}), "/", host="whatever.test") == "r0"


HEADERS = (HeaderMatch(name="X-Version", values=("v1", "V2")),
           HeaderMatch(name="x-tier", values=("gold",)))


@pytest.mark.parametrize(
    ("headers", "matches"),
    [
        ([(b"x-version", b"v2"), (b"x-tier", b"GOLD")], True),
        ([(b"x-tier", b"gold"), (b"x-version", b" V1 ")], True),
        ([(b"x-version", b"v3"), (b"x-version", b"v1"), (b"x-tier", b"gold")], True),
        ([(b"x-version", b"v2")], False),
        ([(b"x-version", b"v3"), (b"x-tier", b"gold")], False),
        ([], False),
    ],
)
def test_header_conditions_all_must_hold(headers: Headers, matches: bool) -> None:
    r = router({"paths": ("/",), "headers": HEADERS})
    assert (winner(r, "/", headers=headers) == "r0") is matches


def test_methods_condition() -> None:
    r = router({"paths": ("/",), "methods": ("get", "POST")})
    assert winner(r, "/", "GET") == "r0"
    assert winner(r, "/", "POST") == "r0"
    assert winner(r, "/", "DELETE") is None


def test_route_with_only_hosts_or_methods() -> None:
    r = router({"hosts": ("only.test",)}, {"methods": ("PUT",)})
    assert winner(r, "/x/y", host="only.test") == "r0"
    assert winner(r, "/x/y", "PUT", host="other.test") == "r1"
    assert winner(r, "/x/y", host="other.test") is None


# --- specificity ----------------------------------------------------------------------

# Each case: (less specific route, more specific route, request). Both orders of
# declaration must give the more specific one.
SPECIFICITY = [
    ("exact host beats wildcard",
     {"hosts": ("*.example.com",), "paths": ("=/a",)}, {"hosts": ("api.example.com",)},
     ("GET", "api.example.com", "/a")),
    ("longer wildcard suffix beats shorter",
     {"hosts": ("*.example.com",), "paths": ("=/a",)}, {"hosts": ("*.api.example.com",)},
     ("GET", "x.api.example.com", "/a")),
    ("longer wildcard prefix beats shorter",
     {"hosts": ("api.*",)}, {"hosts": ("api.example.*",)},
     ("GET", "api.example.com", "/a")),
    ("on equal length, leading wildcard beats trailing",
     {"hosts": ("a.x.*",)}, {"hosts": ("*.com",)}, ("GET", "a.x.com", "/a")),
    ("wildcard host beats no host",
     {"paths": ("=/a",)}, {"hosts": ("*.com",)}, ("GET", "api.example.com", "/a")),
    ("exact path beats prefix",
     {"paths": ("/a/b",), "methods": ("GET",)}, {"paths": ("=/a/b",)},
     ("GET", "h", "/a/b")),
    ("exact template beats longer prefix",
     {"paths": ("/a/b",)}, {"paths": ("=/a/{x}",)}, ("GET", "h", "/a/b")),
    ("deeper prefix beats shallower",
     {"paths": ("/a",)}, {"paths": ("/a/b",)}, ("GET", "h", "/a/b/c")),
    ("deeper template beats shallower literal",
     {"paths": ("/a/b",)}, {"paths": ("/a/{x}/{y}",)}, ("GET", "h", "/a/b/c")),
    ("literal beats param at the same position",
     {"paths": ("/a/{x}",)}, {"paths": ("/a/b",)}, ("GET", "h", "/a/b/c")),
    ("earlier literal beats later literal",
     {"paths": ("/a/{x}/c",)}, {"paths": ("/a/b/{y}",)}, ("GET", "h", "/a/b/c")),
    ("trailing slash beats bare prefix",
     {"paths": ("/a",)}, {"paths": ("/a/",)}, ("GET", "h", "/a/x")),
    ("prefix beats regex",
     {"paths": ("~^/a/b/c",), "priority": 9}, {"paths": ("/",)}, ("GET", "h", "/a/b/c")),
    ("regex beats no path",
     {"hosts": ("h",)}, {"paths": ("~.*",), "hosts": ("h",)}, ("GET", "h", "/a")),
    ("method list beats any method",
     {"paths": ("/a",), "priority": 9}, {"paths": ("/a",), "methods": ("GET",)},
     ("GET", "h", "/a")),
    ("more headers beat fewer",
     {"paths": ("/a",), "priority": 9},
     {"paths": ("/a",), "headers": (HeaderMatch(name="x-a", values=("1",)),)},
     ("GET", "h", "/a")),
    ("higher priority wins",
     {"paths": ("/a",)}, {"paths": ("/a",), "priority": 1}, ("GET", "h", "/a")),
    ("priority orders regexes",
     {"paths": ("~^/a",)}, {"paths": ("~^/a/b",), "priority": 1}, ("GET", "h", "/a/b")),
]


@pytest.mark.parametrize(("title", "weaker", "stronger", "request_"), SPECIFICITY,
                         ids=[c[0] for c in SPECIFICITY])
def test_specificity(title: str, weaker: dict[str, Any], stronger: dict[str, Any],
                     request_: tuple[str, str, str]) -> None:
    method, host, path = request_
    headers = [(b"x-a", b"1")]
    for specs in ((weaker, stronger), (stronger, weaker)):
        r = Router([route("weaker" if s is weaker else "stronger", i, **s)
                    for i, s in enumerate(specs)])
        assert winner(r, path, method, host, headers) == "stronger"


def test_declaration_order_breaks_full_ties() -> None:
    r = router({"paths": ("/a",)}, {"paths": ("/a",)})
    assert winner(r, "/a") == "r0"


def test_a_failing_condition_falls_through_to_the_next_route() -> None:
    r = router(
        {"paths": ("/a",)},
        {"paths": ("/a/b",), "methods": ("POST",)},
        {"paths": ("=/a/b",), "headers": (HeaderMatch(name="x-a", values=("1",)),)},
        {"hosts": ("api.example.com",), "paths": ("/z",)},
    )
    assert winner(r, "/a/b", "POST") == "r1"
    assert winner(r, "/a/b", "GET") == "r0"
    assert winner(r, "/a/b", "GET", headers=[(b"x-a", b"1")]) == "r2"
    # The exact host bucket has no route for /a/b, so the any-host routes answer.
    assert winner(r, "/a/b", "GET", host="api.example.com") == "r0"


def test_shuffled_declaration_gives_the_same_winners() -> None:
    specs: list[dict[str, Any]] = [
        {"paths": ("/",)},
        {"paths": ("/api",)},
        {"paths": ("/api/",)},
        {"paths": ("=/api",)},
        {"paths": ("/api/{v}",)},
        {"paths": ("/api/v1",)},
        {"paths": ("/api/v1",), "methods": ("GET",)},
        {"paths": ("/api/v1/{x}/keys",)},
        {"paths": ("~^/api/v[0-9]+/",)},
        {"paths": ("/api",), "hosts": ("*.example.com",)},
        {"paths": ("/api",), "hosts": ("api.example.com",)},
        {"paths": ("/api",), "hosts": ("example.*",)},
        {"paths": ("/api/v1",), "headers": (HeaderMatch(name="x-a", values=("1",)),)},
    ]
    requests = [
        (m, h, p, hd)
        for m in ("GET", "POST")
        for h in ("api.example.com", "x.example.com", "example.org", "other.test")
        for p in ("/", "/api", "/api/", "/api/v1", "/api/v2/x", "/api/v1/7/keys", "/x")
        for hd in ([], [(b"x-a", b"1")])
    ]
    names = [f"s{i}" for i in range(len(specs))]

    def winners(order: list[int]) -> list[str | None]:
        r = Router([route(names[j], i, **specs[j]) for i, j in enumerate(order)])
        return [winner(r, p, m, h, hd) for m, h, p, hd in requests]

    expected = winners(list(range(len(specs))))
    rng = random.Random(1)
    for _ in range(20):
        order = list(range(len(specs)))
        rng.shuffle(order)
        assert winners(order) == expected


# --- forwarded path -------------------------------------------------------------------

UPSTREAM_CASES = [
    # (service base, route path, strip_path, request path, upstream path)
    ("/", "/api/images", True, "/api/images/1", "/1"),
    ("/", "/api/images", True, "/api/images", "/"),
    ("/", "/api/images", True, "/api/images/", "/"),
    ("/v2", "/api/images", True, "/api/images/1", "/v2/1"),
    ("/v2", "/api/images", True, "/api/images", "/v2"),
    ("/v2", "/api/images", True, "/api/images/", "/v2/"),
    ("/v2/", "/api/images", True, "/api/images/1", "/v2/1"),
    ("/v2/", "/api/images", True, "/api/images", "/v2/"),
    ("/v2", "/api/images/", True, "/api/images/1", "/v2/1"),
    ("/", "/api/images", False, "/api/images/1", "/api/images/1"),
    ("/v2", "/api/images", False, "/api/images/1", "/v2/api/images/1"),
    ("/v2/", "/api/images", False, "/api/images", "/v2/api/images"),
    ("/", "/", True, "/x/y", "/x/y"),
    ("/v2", "/", True, "/x", "/v2/x"),
    ("/v2", "=/api/images", True, "/api/images", "/v2"),
    ("/", "/users/{id}", True, "/users/7/keys", "/keys"),
    ("/", "~^/v[0-9]+", True, "/v1/x", "/x"),
    ("/", "~^/v[0-9]", True, "/v12/x", "/2/x"),
    ("/s", "~^/v[0-9]+/", True, "/v1/x", "/s/x"),
    ("/", "/a", True, "/a/b%2Fc%20d", "/b%2Fc%20d"),
    ("/svc", "/hosts-only-placeholder", True, "/hosts-only-placeholder", "/svc"),
]


@pytest.mark.parametrize(("base", "pattern", "strip", "path", "expected"), UPSTREAM_CASES)
def test_upstream_path(base: str, pattern: str, strip: bool, path: str, expected: str) -> None:
    r = route("r", paths=(pattern,), strip_path=strip)
    r.service = FakeService(base)  # type: ignore[assignment]
    found = Router([r]).match("GET", "h", path, [])
    assert found is not None
    assert found.upstream_path == expected


def test_route_without_path_forwards_the_whole_path() -> None:
    r = route("r", hosts=("h",))
    r.service = FakeService("/base")  # type: ignore[assignment]
    found = Router([r]).match("GET", "h", "/a/b", [])
    assert found is not None and found.upstream_path == "/base/a/b"


@pytest.mark.parametrize(
    ("base", "pattern", "strip", "rewrite", "path", "expected"),
    [
        ("/", "/api", True, (r"^/v1/(.*)$", r"/v2/\1"), "/api/v1/x", "/v2/x"),
        ("/", "/api", True, (r"^/$", "/index"), "/api", "/index"),
        ("/s", "/api", True, (r"^/$", "/index"), "/api", "/s/index"),
        ("/", "/api", False, ("^/api", "/internal"), "/api/x", "/internal/x"),
        ("/", "/api", True, ("x", "y"), "/api/x/x", "/y/x"),
        ("/s", "/api", True, ("^/", ""), "/api/x", "/s/x"),
        ("/", "/u/{id}", True, (r"^/(?P<rest>.*)$", r"/r/\g<rest>"), "/u/7/k", "/r/k"),
    ],
)
def test_rewrite(base: str, pattern: str, strip: bool, rewrite: tuple[str, str], path: str,
                 expected: str) -> None:
    r = route("r", paths=(pattern,), strip_path=strip,
              rewrite=RewriteConfig(pattern=rewrite[0], replacement=rewrite[1]))
    r.service = FakeService(base)  # type: ignore[assignment]
    found = Router([r]).match("GET", "h", path, [])
    assert found is not None and found.upstream_path == expected


# --- 405 ------------------------------------------------------------------------------

def test_methods_for_lists_methods_of_routes_that_match_otherwise() -> None:
    r = router(
        {"paths": ("/a",), "methods": ("GET", "HEAD")},
        {"paths": ("/a/b",), "methods": ("POST",)},
        {"paths": ("/a/b",), "methods": ("DELETE",), "hosts": ("other.test",)},
        {"paths": ("/a/b",), "methods": ("PUT",),
         "headers": (HeaderMatch(name="x-a", values=("1",)),)},
        {"paths": ("/z",)},
    )
    assert r.match("PATCH", "h", "/a/b", []) is None
    assert r.methods_for("h", "/a/b", []) == {"GET", "HEAD", "POST"}
    assert r.methods_for("h", "/a/b", [(b"x-a", b"1")]) == {"GET", "HEAD", "POST", "PUT"}
    assert r.methods_for("other.test", "/a/b", []) == {"GET", "HEAD", "POST", "DELETE"}
    assert r.methods_for("h", "/nothing", []) == frozenset()
    assert r.methods_for("h", "/z", []) == HTTP_METHODS


# --- compiled router against a naive reference ----------------------------------------

def _host_key(pattern: str, host: str) -> tuple[int, int, int] | None:
    if pattern.startswith("*."):
        ok = host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
        return (1, -(len(pattern) - 1), 0) if ok else None
    if pattern.endswith(".*"):
        ok = host.startswith(pattern[:-1]) and len(host) > len(pattern) - 1
        return (1, -(len(pattern) - 1), 1) if ok else None
    return (0, 0, 0) if host == pattern else None


def _path_match(pattern: str, path: str) -> tuple[Any, int, dict[str, str], bool] | None:
    """(path key, end of matched span, params, trailing-slash prefix) or None."""
    if pattern.startswith("~"):
        m = re.match(pattern[1:], path)
        if m is None:
            return None
        return (2,), m.end(), {k: v for k, v in m.groupdict().items() if v is not None}, False
    exact = pattern.startswith("=")
    segments = pattern.removeprefix("=")[1:].split("/")
    slash = not exact and segments[-1] == ""
    if slash:
        segments.pop()
    names = [s[1:-1] if s.startswith("{") and s.endswith("}") else None for s in segments]
    body = "".join(
        "/" + ("([^/]+)" if n else re.escape(s)) for s, n in zip(segments, names, strict=True)
    )
    m = re.match("^" + body + ("$" if exact else "(?=/)" if slash else "(?=/|$)"), path)
    if m is None:
        return None
    params = dict(zip([n for n in names if n], m.groups(), strict=True))
    mask = tuple(1 if n else 0 for n in names)
    return (0 if exact else 1, -len(segments), mask), m.end(), params, slash


def _headers_ok(conds: tuple[HeaderMatch, ...], headers: Headers) -> bool:
    got = [(k.decode(), v.decode().strip().lower()) for k, v in headers]
    return all(
        any(k == c.name.lower() and v in [x.lower() for x in c.values] for k, v in got)
        for c in conds
    )


def reference_match(routes: list[Route], method: str, host: str, path: str,
                    headers: Headers, any_method: bool = False) -> list[tuple[Any, ...]]:
    """Every matching (key, route, end, params), best first, by a linear scan."""
    found = []
    for r in routes:
        cfg = r.config
        if not any_method and cfg.methods and method not in cfg.methods:
            continue
        if not _headers_ok(cfg.headers, headers):
            continue
        host_keys = [k for h in cfg.hosts if (k := _host_key(h, host))]
        if not cfg.hosts:
            host_keys = [(2, 0, 0)]
        if not host_keys:
            continue
        for path_index, pattern in enumerate(cfg.paths or (None,)):
            pm = _path_match(pattern, path) if pattern else ((3,), 0, {}, False)
            if pm is None:
                continue
            path_key, end, params, slash = pm
            key = (min(host_keys), path_key, not slash, not cfg.methods, -len(cfg.headers),
                   -cfg.priority, r.index, path_index)
            found.append((key, r, end, params))
    found.sort(key=lambda f: f[0])
    return found


SEGMENTS = st.sampled_from(["a", "b", "{p}", "{q}"])
REGEXES = ["~^/a/(?P<x>[^/]+)$", "~^/b", "~/a", "~^/(?P<y>[ab])/", "~^/a|^/b", "~^/a/b/?",
           "~(?i)^/A"]


@st.composite
def path_patterns(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(REGEXES))
    segs = draw(st.lists(SEGMENTS, max_size=3))
    body = "/" + "/".join(segs)
    trailing_slash = draw(st.booleans())
    if segs and trailing_slash:
        body += "/"
    return ("=" if draw(st.booleans()) else "") + body


HOST_PATTERNS = ["x.com", "a.x.com", "*.x.com", "*.a.x.com", "x.*", "a.*", "a.x.*", "*.com"]
REQUEST_HOSTS = ["x.com", "a.x.com", "b.a.x.com", "x.org", "a.b", "y.com", "a.x.com.au"]
HEADER_CONDS = [HeaderMatch(name="x-a", values=("1", "2")), HeaderMatch(name="x-b", values=("1",))]


def _sometimes(values: st.SearchStrategy[list[Any]]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(st.just(()), st.just(()), values.map(tuple))


@st.composite
def route_sets(draw: st.DrawFn) -> list[Route]:
    routes = []
    for i in range(draw(st.integers(1, 12))):
        paths = tuple(draw(st.lists(path_patterns(), max_size=2)))
        # Mostly unconstrained, so that many routes compete on the path.
        hosts = draw(_sometimes(st.lists(st.sampled_from(HOST_PATTERNS), max_size=2)))
        methods = draw(_sometimes(st.lists(st.sampled_from(["GET", "POST"]), max_size=2)))
        headers = draw(_sometimes(st.lists(st.sampled_from(HEADER_CONDS), max_size=2,
                                           unique=True)))
        if not (paths or hosts or methods or headers):
            paths = ("/",)
        routes.append(route(
            f"r{i}", i, paths=paths, hosts=hosts, methods=methods, headers=headers,
            priority=draw(st.integers(0, 1)),
        ))
    return routes


request_paths = st.lists(st.sampled_from(["a", "b", "c", ""]), max_size=4).map(
    lambda segs: "/" + "/".join(segs)
)
request_headers = st.lists(
    st.sampled_from([(b"x-a", b"1"), (b"x-a", b"3"), (b"x-b", b"1")]), max_size=2
)


def _summary(found: RouteMatch | None) -> tuple[str, str, dict[str, str]] | None:
    return None if found is None else (found.route.name, found.upstream_path, found.path_params)


def _instantiate(pattern: str, fill: list[str]) -> str:
    """A request path that the pattern (if not a regex) is likely to match."""
    segs = pattern.lstrip("=~^")[1:].split("/")
    return "/" + "/".join(fill.pop() if s.startswith("{") and fill else s for s in segs)


@st.composite
def request_lists(draw: st.DrawFn, routes: list[Route]) -> list[tuple[str, str, str, Headers]]:
    """Requests aimed at the declared paths (so that routes overlap), plus random ones."""
    patterns = [p for r in routes for p in r.config.paths if not p.startswith("~")]
    out = []
    for _ in range(draw(st.integers(1, 8))):
        aimed = draw(st.booleans())
        if patterns and aimed:
            fill = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=3, max_size=3))
            path = _instantiate(draw(st.sampled_from(patterns)), fill) + draw(
                st.sampled_from(["", "/", "/c", "/a/b"]))
        else:
            path = draw(request_paths)
        out.append((draw(st.sampled_from(["GET", "POST", "PUT"])),
                    draw(st.sampled_from(REQUEST_HOSTS)), path, draw(request_headers)))
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), routes=route_sets())
def test_compiled_router_agrees_with_linear_scan(data: st.DataObject, routes: list[Route]) -> None:
    requests = data.draw(request_lists(routes))
    r = Router(routes)
    for method, host, path, headers in requests:
        ranked = reference_match(routes, method, host, path, headers)
        expected = None
        if ranked:
            _, best, end, params = ranked[0]
            tail = path[end:]
            expected = (best.name, tail if tail.startswith("/") else "/" + tail, params)
        assert _summary(r.match(method, host, path, headers)) == expected

        allowed = r.methods_for(host, path, headers)
        assert allowed == {m for m in HTTP_METHODS if r.match(m, host, path, headers)}
        everything = reference_match(routes, method, host, path, headers, any_method=True)
        assert allowed == (
            HTTP_METHODS if any(not f[1].config.methods for f in everything)
            else {m for f in everything for m in f[1].config.methods}
        )
