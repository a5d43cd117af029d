"""Read tollway.yaml into a validated `GatewayConfig`, or raise one `ConfigError`
that lists every problem by its place in the file (`routes[2].paths[0]: ...`).

Steps: YAML (duplicate keys refused) -> `${ENV}` interpolation on the parsed tree
-> pydantic schema -> cross-references and plugin configs. The cross-reference
checks run on the raw tree even when the schema fails, so that one run of
`tollway check` reports everything at once.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tollway.config.errors import ConfigError, ConfigIssue
from tollway.config.schema import GatewayConfig

# `$${X}` is the escape for a literal `${X}`; otherwise `${NAME}` or `${NAME:-default}`.
_PLACEHOLDER = re.compile(
    r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$\{"
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
# Validators that check list items report `paths[0]: message`; that prefix belongs
# in the path. Only a prefix carrying an index qualifies, so a message that merely
# contains a colon ("invalid regex: ...") is left alone.
_MESSAGE_PATH = re.compile(
    r"^(?P<path>[A-Za-z_]\w*(?:\[\d+\]|\.[A-Za-z_]\w*)*\[\d+\](?:\[\d+\]|\.[A-Za-z_]\w*)*): "
    r"(?P<message>.+)$",
    re.DOTALL,
)
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")

PathPart = str | int


# ---------------------------------------------------------------- paths


def render_path(parts: tuple[PathPart, ...] | list[PathPart]) -> str:
    """('routes', 2, 'paths', 0) -> 'routes[2].paths[0]'."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENTIFIER.match(part):
            out += f".{part}" if out else part
        else:
            # Keys such as header names may hold dots; quote them so that the
            # path still reads back unambiguously.
            out += f"[{part!r}]"
    return out


def _join(path: str, suffix: str) -> str:
    if not path or not suffix:
        return path or suffix
    return path + suffix if suffix.startswith("[") else f"{path}.{suffix}"


# ---------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping.

    PyYAML silently keeps the last value, which hides copy-paste mistakes such as
    two `paths:` in one route.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        # Checked before merge keys (`<<`) are flattened: overriding a merged key
        # is the point of a merge, not a duplicate.
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f'duplicate key "{key}" (first on line {first.line + 1})',
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_issue(exc: yaml.YAMLError) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return ConfigIssue("", f"{where}: {problem}")
    return ConfigIssue("", f"invalid YAML: {problem}")


def parse_yaml(text: str) -> Any:
    """Parse with duplicate keys refused; raises ConfigError on bad YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_issue(exc)]) from exc


# ---------------------------------------------------------------- interpolation


def _interpolate_str(
    value: str, env: Mapping[str, str], path: str, issues: list[ConfigIssue]
) -> str:
    def replace(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole == "$${":
            return "${"
        name = m.group("name")
        if name is None:
            issues.append(
                ConfigIssue(
                    path,
                    'malformed "${...}": write ${NAME} or ${NAME:-default}, '
                    'or $${ for a literal "${"',
                )
            )
            return whole
        if name in env:
            return env[name]
        default = m.group("default")
        if default is not None:
            return default
        issues.append(ConfigIssue(path, f"environment variable {name} is not set"))
        return whole

    return _PLACEHOLDER.sub(replace, value) if "${" in value else value


def _interpolate(node: Any, env: Mapping[str, str], path: str, issues: list[ConfigIssue]) -> Any:
    if isinstance(node, str):
        return _interpolate_str(node, env, path, issues)
    if isinstance(node, dict):
        return {
            k: _interpolate(
                v, env, _join(path, render_path([k if isinstance(k, str) else str(k)])), issues
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, env, f"{path}[{i}]", issues) for i, v in enumerate(node)]
    return node


def interpolate(tree: Any, env: Mapping[str, str]) -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in every string scalar of a parsed tree.

    Done after parsing rather than on the raw text so that a value holding quotes,
    colons or newlines cannot change the YAML structure. Only values are touched,
    never keys. Raises ConfigError naming every unset variable with its path.
    """
    issues: list[ConfigIssue] = []
    result = _interpolate(tree, env, "", issues)
    if issues:
        raise ConfigError(issues)
    return result


# ---------------------------------------------------------------- schema errors


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field annotation holds, through Optional/tuple/Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is None:
        return None
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _model_in(args[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in args:
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple[PathPart, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _clean_message(message: str) -> str:
    for prefix in _PYDANTIC_PREFIXES:
        if message.startswith(prefix):
            return message.removeprefix(prefix)
    return message


def issues_from_validation(
    exc: ValidationError, root: type[BaseModel], prefix: str = ""
) -> list[ConfigIssue]:
    """pydantic errors -> issues with file paths, `prefix` put before each path."""
    issues: list[ConfigIssue] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _join(prefix, render_path(loc)) if loc else prefix
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            hint = _suggest(str(loc[-1]), _field_names(parent)) if parent else ""
            issues.append(ConfigIssue(path, f"unknown field{hint}"))
            continue
        if kind == "missing":
            issues.append(ConfigIssue(path, "is required"))
            continue
        message = _clean_message(err["msg"])
        if m := _MESSAGE_PATH.match(message):
            inner = m.group("path")
            # A field validator on `paths` says "paths[0]: ..." while the loc
            # already ends in "paths": name the field once.
            if loc and isinstance(loc[-1], str) and re.match(rf"{re.escape(loc[-1])}\b", inner):
                path = _join(prefix, render_path(loc[:-1]))
            path = _join(path, inner)
            message = m.group("message")
        issues.append(ConfigIssue(path, message))
    return issues


# ---------------------------------------------------------------- cross-references


def _items(tree: Mapping[str, Any], key: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """The mapping items of a top-level list, skipping what the schema already refused."""
    value = tree.get(key)
    if not isinstance(value, list):
        return
    for i, item in enumerate(value):
        if isinstance(item, dict):
            yield i, item


def _names(
    tree: Mapping[str, Any], key: str, field: str, kind: str, issues: list[ConfigIssue]
) -> set[str]:
    names: set[str] = set()
    for i, item in _items(tree, key):
        name = item.get(field)
        if not isinstance(name, str):
            continue
        if name in names:
            issues.append(ConfigIssue(f"{key}[{i}].{field}", f'duplicate {kind} name "{name}"'))
        names.add(name)
    return names


def _plugin_registry() -> Mapping[str, type[BaseModel]]:
    """Plugin name -> its config schema."""
    from tollway.plugins import base

    try:
        base.load_builtin_plugins()
    except ModuleNotFoundError as exc:
        # The bundled plugins may be absent from a partial build; the registry
        # still holds whatever was registered by other means.
        if exc.name != "tollway.plugins.builtin":
            raise
    return {name: cls.Config for name, cls in base.PLUGINS.items()}


def _check_plugins(
    tree: Mapping[str, Any],
    scopes: Mapping[str, set[str]],
    issues: list[ConfigIssue],
) -> None:
    registry = _plugin_registry()
    attached: dict[tuple[str, str, str], int] = {}
    for i, entry in _items(tree, "plugins"):
        here = f"plugins[{i}]"
        name = entry.get("name")
        targets = [
            (k, v) for k in ("service", "route", "consumer") if isinstance(v := entry.get(k), str)
        ]
        schema = registry.get(name) if isinstance(name, str) else None
        if isinstance(name, str) and schema is None:
            issues.append(
                ConfigIssue(f"{here}.name", f'unknown plugin "{name}"{_suggest(name, registry)}')
            )
        for kind, target in targets:
            if target not in scopes[kind]:
                hint = _suggest(target, scopes[kind])
                issues.append(ConfigIssue(f"{here}.{kind}", f'unknown {kind} "{target}"{hint}'))
        if not isinstance(name, str) or schema is None:
            continue
        # Two entries of one plugin on one scope would leave "which config wins" open.
        scope = targets[0] if len(targets) == 1 else ("global", "")
        if (name, *scope) in attached:
            where = "globally" if scope[0] == "global" else f'to {scope[0]} "{scope[1]}"'
            first = attached[(name, *scope)]
            issues.append(
                ConfigIssue(
                    f"{here}.name",
                    f'plugin "{name}" is already attached {where} (plugins[{first}])',
                )
            )
        elif len(targets) <= 1:
            attached[(name, *scope)] = i
        config = entry.get("config")
        if config is None:
            config = {}
        if isinstance(config, dict):
            try:
                schema.model_validate(config)
            except ValidationError as exc:
                issues.extend(issues_from_validation(exc, schema, f"{here}.config"))


def check_references(tree: Mapping[str, Any]) -> list[ConfigIssue]:
    """Names unique, references resolvable, plugin names known, plugin configs valid."""
    issues: list[ConfigIssue] = []
    services = _names(tree, "services", "name", "service", issues)
    routes = _names(tree, "routes", "name", "route", issues)
    consumers = _names(tree, "consumers", "username", "consumer", issues)
    # A plugin may name a consumer by its username or by its id.
    consumers |= {c["id"] for _, c in _items(tree, "consumers") if isinstance(c.get("id"), str)}
    for i, route in _items(tree, "routes"):
        service = route.get("service")
        if isinstance(service, str) and service not in services:
            issues.append(
                ConfigIssue(
                    f"routes[{i}].service",
                    f'unknown service "{service}"{_suggest(service, services)}',
                )
            )
    _check_plugins(tree, {"service": services, "route": routes, "consumer": consumers}, issues)
    return issues


# ---------------------------------------------------------------- entry points

_SECTION = re.compile(r"^(?P<section>[A-Za-z_]\w*)(?:\[(?P<index>\d+)\])?")


def _in_file_order(issues: list[ConfigIssue], tree: Mapping[str, Any]) -> list[ConfigIssue]:
    """Schema and cross-reference issues interleaved as the reader meets them."""
    sections = {key: rank for rank, key in enumerate(tree)}

    def key(issue: ConfigIssue) -> tuple[int, int]:
        m = _SECTION.match(issue.path)
        if m is None:
            return (-1, -1)
        index = m.group("index")
        return (sections.get(m.group("section"), len(sections)), int(index) if index else -1)

    return sorted(issues, key=key)


def load_config_text(
    text: str,
    source: str = "<string>",
    env: Mapping[str, str] | None = None,
    allow_empty: bool = True,
) -> GatewayConfig:
    """Validate config text; raises one ConfigError listing every issue.

    `allow_empty=False` refuses a document with nothing in it: on a reload an empty
    file is a half-written or truncated one far more often than a wish to drop
    every route.
    """
    try:
        tree = parse_yaml(text)
        if tree is None:
            if not allow_empty:
                raise ConfigError([ConfigIssue("", "the file is empty")])
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(
                [ConfigIssue("", "the top level must be a mapping (services:, routes:, ...)")]
            )
        tree = interpolate(tree, os.environ if env is None else env)
    except ConfigError as exc:
        raise ConfigError(exc.issues, source) from None

    issues: list[ConfigIssue] = []
    config: GatewayConfig | None = None
    try:
        config = GatewayConfig.model_validate(tree)
    except ValidationError as exc:
        issues.extend(issues_from_validation(exc, GatewayConfig))
    issues.extend(check_references(tree))
    if issues or config is None:
        raise ConfigError(_in_file_order(issues, tree), source)
    return config


def load_config(
    path: Path, env: Mapping[str, str] | None = None, allow_empty: bool = True
) -> GatewayConfig:
    """Read and validate a tollway.yaml; `env` defaults to the process environment."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read: {exc.strerror or exc}")], str(path)
        ) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue("", f"not UTF-8 text: {exc.reason}")], str(path)) from None
    return load_config_text(text, str(path), env, allow_empty)
