"""The compiled form of one host bucket's routes: a segment trie plus regex lists.

A request path is split once into segments; walking the trie yields every node
whose literal/`{param}` segments match a prefix of the path. Each node holds its
entries pre-sorted by the specificity order (docs/routing.md), so the caller only
has to try candidates in the order `Table.candidates` yields them and stop at the
first whose methods and headers pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tollway.gateway.router import Route

EXACT = 0
PREFIX = 1
REGEX = 2
NO_PATH = 3

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Characters that end the literal head of a regex path (anything not matched verbatim).
_REGEX_META = frozenset(".^$*+?{}[]\\|()")
_QUANTIFIERS = frozenset("*+?{")

# (lower-case header name, accepted lower-case values)
HeaderCond = tuple[bytes, frozenset[bytes]]


@dataclass(frozen=True, slots=True)
class PathPattern:
    """One entry of `RouteConfig.paths`, parsed."""

    kind: int
    # Literal segments, or None where the template has a {param}; trie kinds only.
    segments: tuple[str | None, ...] = ()
    params: tuple[tuple[int, str], ...] = ()
    # "/api/" as a prefix: the path must go on past "/api" (so "/api" itself misses).
    needs_more: bool = False
    regex: re.Pattern[str] | None = None

    @property
    def mask(self) -> tuple[int, ...]:
        """0 for a literal segment, 1 for a {param}: lower sorts first (more specific)."""
        return tuple(0 if s is not None else 1 for s in self.segments)


def parse_path(raw: str) -> PathPattern:
    if raw.startswith("~"):
        regex = re.compile(raw[1:])
        return PathPattern(REGEX, segments=_regex_literal_segments(raw[1:]), regex=regex)
    kind = EXACT if raw.startswith("=") else PREFIX
    parts = raw.removeprefix("=")[1:].split("/")
    needs_more = False
    if kind == PREFIX and parts[-1] == "":
        # A trailing slash on a prefix is a condition, not a segment: it must not
        # become part of the stripped span, so "/api/" strips like "/api".
        parts.pop()
        needs_more = True
    segments: list[str | None] = []
    params: list[tuple[int, str]] = []
    for i, part in enumerate(parts):
        m = _PARAM.match(part)
        if m:
            segments.append(None)
            params.append((i, m.group(1)))
        else:
            segments.append(part)
    return PathPattern(kind, tuple(segments), tuple(params), needs_more)


def _regex_literal_segments(pattern: str) -> tuple[str | None, ...]:
    """Whole path segments every match must start with, so the regex can live in the trie.

    Conservative: any alternation or a leading group/flag gives no segments (the regex
    is then tried at the root, i.e. for every path that reaches regex matching).
    """
    if "|" in pattern:
        return ()
    head = pattern.removeprefix("^")
    end = 0
    while end < len(head) and head[end] not in _REGEX_META:
        end += 1
    if end < len(head) and head[end] in _QUANTIFIERS:
        end -= 1  # the last literal character is optional
    literal = head[:max(end, 0)]
    if not literal.startswith("/"):
        return ()
    # Drop the last, possibly partial, segment: "/api/v" only guarantees "api".
    return tuple(literal[1:].split("/")[:-1])


@dataclass(eq=False, slots=True)
class Entry:
    """One (route, host pattern, path pattern) combination, ready to match."""

    route: Route
    path: PathPattern
    methods: frozenset[str] | None
    headers: tuple[HeaderCond, ...]
    # Order among entries of the same node / regex list / path-less list.
    key: tuple[Any, ...]

    def accepts(self, method: str, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return not self.headers or headers_match(self.headers, headers)


def headers_match(conds: tuple[HeaderCond, ...], headers: list[tuple[bytes, bytes]]) -> bool:
    for name, values in conds:
        for key, value in headers:
            if key == name and value.strip().lower() in values:
                break
        else:
            return False
    return True


@dataclass(eq=False, slots=True)
class Node:
    depth: int
    mask: tuple[int, ...]
    children: dict[str, Node] = field(default_factory=dict)
    param: Node | None = None
    exact: list[Entry] = field(default_factory=list)
    prefix: list[Entry] = field(default_factory=list)
    regex: list[Entry] = field(default_factory=list)
    # Position in the specificity order of nodes (deeper first, literal before param).
    rank: int = 0


def _rank(node: Node) -> int:
    return node.rank


def _key(entry: Entry) -> tuple[Any, ...]:
    return entry.key


# What a candidate carries to build the RouteMatch: entry, end of the matched span,
# and either the path's segments (trie kinds) or the regex match object.
Candidate = tuple[Entry, int, "list[str] | re.Match[str] | None"]


class Table:
    """All entries that share one host pattern (or no host)."""

    __slots__ = ("_nopath", "_root")

    def __init__(self, entries: list[Entry]) -> None:
        self._root = Node(0, ())
        self._nopath: list[Entry] = []
        for entry in entries:
            pattern = entry.path
            if pattern.kind == NO_PATH:
                self._nopath.append(entry)
                continue
            node = self._root
            for seg in pattern.segments:
                node = self._child(node, seg)
            {EXACT: node.exact, PREFIX: node.prefix, REGEX: node.regex}[pattern.kind].append(entry)
        nodes = list(self._walk_all())
        nodes.sort(key=lambda n: (-n.depth, n.mask))
        for rank, node in enumerate(nodes):
            node.rank = rank
            node.exact.sort(key=_key)
            node.prefix.sort(key=_key)
            node.regex.sort(key=_key)
        self._nopath.sort(key=_key)

    @staticmethod
    def _child(node: Node, seg: str | None) -> Node:
        if seg is None:
            if node.param is None:
                node.param = Node(node.depth + 1, (*node.mask, 1))
            return node.param
        child = node.children.get(seg)
        if child is None:
            child = node.children[seg] = Node(node.depth + 1, (*node.mask, 0))
        return child

    def _walk_all(self) -> Iterator[Node]:
        stack = [self._root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
            if node.param is not None:
                stack.append(node.param)

    def candidates(self, path: str) -> Iterator[Candidate]:
        """Entries whose path pattern matches, most specific first."""
        root = self._root
        if path.startswith("/"):
            segs = path[1:].split("/")
            n = len(segs)
            reached: list[Node] = []
            branched = False
            stack = [root]
            while stack:
                node = stack.pop()
                reached.append(node)
                depth = node.depth
                if depth < n:
                    seg = segs[depth]
                    child = node.children.get(seg)
                    if child is not None:
                        stack.append(child)
                    if node.param is not None and seg:
                        stack.append(node.param)
                        branched = True
            # A walk that never took a {param} branch is one chain, shallowest first.
            if branched:
                reached.sort(key=_rank)
            else:
                reached.reverse()
            end = len(path)
            for node in reached:
                if node.exact and node.depth == n:
                    for entry in node.exact:
                        yield entry, end, segs
            for node in reached:
                if node.prefix:
                    depth = node.depth
                    consumed = depth + sum(len(s) for s in segs[:depth])
                    for entry in node.prefix:
                        if not (entry.path.needs_more and consumed == end):
                            yield entry, consumed, segs
            lists = [node.regex for node in reached if node.regex]
        else:
            lists = [root.regex] if root.regex else []
        if lists:
            regexes = lists[0] if len(lists) == 1 else sorted(
                (e for lst in lists for e in lst), key=_key
            )
            for entry in regexes:
                assert entry.path.regex is not None
                m = entry.path.regex.match(path)
                if m is not None:
                    yield entry, m.end(), m
        for entry in self._nopath:
            yield entry, 0, None
