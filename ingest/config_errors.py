"""Config validation errors in a user's words.

pydantic reports where and what in its own terms: ``endpoints[0].params.per_page.str: Input
should be a valid string (3 more)``, ``Input tag 'Bearer' found using 'style' does not match any
of the expected tags``. This module turns a :class:`~pydantic.ValidationError` into one line
that names the endpoint by its name, says what is expected in plain words, and suggests the
nearest known key or value for a typo (``paginaton`` -> ``pagination``).

It reads the models only to list the keys a table accepts (for the suggestions); it never
validates anything itself.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

#: How many problems one message names before it says "and N more".
SHOWN = 3

#: pydantic's names for the members of a plain union (``str | int | float | bool``).
_UNION_MEMBERS = {
    "str": "a string",
    "int": "a number",
    "float": "a number",
    "bool": "true/false",
}

#: What each pydantic error type expects, in words.
_EXPECTED = {
    "string_type": "a string (in quotes)",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "tuple_type": 'a list, such as ["id"]',
    "list_type": 'a list, such as ["id"]',
    "dict_type": "a table (key = value pairs)",
    "model_type": "a table (key = value pairs)",
    "model_attributes_type": "a table (key = value pairs)",
}


def explain(error: ValidationError, data: Mapping[str, Any], model: type[BaseModel]) -> str:
    """One line for every problem in ``error`` (``data`` is what was validated against
    ``model``), the first :data:`SHOWN` spelled out."""
    problems: list[str] = []
    grouped: dict[tuple[Any, ...], list[Any]] = {}
    for item in error.errors():
        location = tuple(item["loc"])
        if location and location[-1] in _UNION_MEMBERS:  # one problem, one error per member
            grouped.setdefault(location[:-1], []).append(item)
            continue
        problems.append(_one(item, location, data, model))
    for location, items in grouped.items():
        kinds = list(dict.fromkeys(_UNION_MEMBERS[item["loc"][-1]] for item in items))
        expected = ", ".join(kinds[:-1]) + f" or {kinds[-1]}" if len(kinds) > 1 else kinds[0]
        got = _got(items[0].get("input"))
        problems.append(f"{_where(location, data)}: expected {expected}{got}")
    unique = list(dict.fromkeys(problems))
    shown = "; ".join(unique[:SHOWN])
    more = len(unique) - SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def _one(item: Any, location: tuple[Any, ...], data: Mapping[str, Any], model: type) -> str:
    kind = item["type"]
    context = item.get("ctx") or {}
    where = _where(location, data)
    if kind == "extra_forbidden":
        key = str(location[-1])
        known = _known_keys(model, location[:-1])
        parent = _where(location[:-1], data)
        prefix = f"{parent}: " if parent else ""
        return prefix + f"unknown key {key!r}" + _suggest(key, known, listing=True)
    if kind == "missing":
        parent = _where(location[:-1], data)
        prefix = f"{parent}: " if parent else ""
        return prefix + f"missing required key {str(location[-1])!r}"
    if kind in {"union_tag_invalid", "union_tag_not_found"}:
        key = str(context.get("discriminator", "'style'")).strip("'")
        options = _tags(model, location, key)
        field = f"{where}.{key}" if where else key
        if kind == "union_tag_not_found":
            return f"{field}: missing; expected one of: {', '.join(options)}"
        tag = str(context.get("tag"))
        return f"{field}: unknown {key} {tag!r}; expected one of: {', '.join(options)}" + _suggest(
            tag, options
        )
    if kind == "literal_error":
        options = [option.strip().strip("'") for option in _split_or(str(context["expected"]))]
        value = item.get("input")
        suggestion = _suggest(str(value), options) if isinstance(value, str) else ""
        return f"{where}: expected one of: {', '.join(options)}{_got(value)}{suggestion}"
    if kind in _EXPECTED:
        return f"{where}: expected {_EXPECTED[kind]}{_got(item.get('input'))}"
    message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message.replace("Input should be ", "must be ", 1)
    return f"{where}: {message}" if where else message


def _split_or(text: str) -> list[str]:
    """``'a', 'b' or 'c'`` -> the three options."""
    head, _, last = text.rpartition(" or ")
    return [*(part for part in head.split(",") if part.strip()), last] if head else [last]


def _got(value: Any) -> str:
    if isinstance(value, bool):
        return f", got {str(value).lower()}"
    if isinstance(value, str | int | float):
        return f", got {value!r}"
    if isinstance(value, Mapping):
        return ", got a table"
    if isinstance(value, list | tuple):
        return ", got a list"
    return ""


def _suggest(word: str, known: Sequence[str], *, listing: bool = False) -> str:
    """`` (did you mean 'x'?)`` for a near miss (case-insensitive first), else the known keys."""
    lowered = {option.lower(): option for option in known}
    if word.lower() in lowered and lowered[word.lower()] != word:
        return f" (did you mean {lowered[word.lower()]!r}?)"
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    if listing and known:
        return f" (known: {', '.join(sorted(known))})"
    return ""


def _where(location: Sequence[Any], data: Mapping[str, Any]) -> str:
    """``endpoints[0].table.mode`` -> ``endpoint users: table.mode`` (the endpoint's name when
    it has one); pydantic's union branch names (``page_number``, ``bearer``) are dropped."""
    parts: list[str] = []
    prefix = ""
    node: Any = data
    for index, item in enumerate(location):
        if index == 1 and location[0] == "endpoints" and isinstance(item, int):
            name = _get(node, item, "name")
            prefix = f"endpoint {name}" if isinstance(name, str) and name else f"endpoints[{item}]"
            node = _get(node, item)
            parts = []
            continue
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            node = _get(node, item)
            continue
        if _is_branch(node, item):
            continue
        parts.append(str(item))
        node = _get(node, item)
    path = ".".join(parts)
    if prefix:
        return f"{prefix}: {path}" if path else prefix
    return path


def _is_branch(node: Any, item: Any) -> bool:
    """A discriminated union's branch in a location: the tag of the value, not one of its keys."""
    return (
        isinstance(node, Mapping)
        and item not in node
        and any(node.get(key) == item for key in ("style",))
    )


def _get(node: Any, key: Any, *more: Any) -> Any:
    for step in (key, *more):
        if isinstance(node, Mapping):
            node = node.get(step)
        elif isinstance(node, list | tuple) and isinstance(step, int) and step < len(node):
            node = node[step]
        else:
            return None
    return node


def _known_keys(model: Any, location: Sequence[Any]) -> list[str]:
    """The keys the table at ``location`` accepts, following the models' annotations."""
    candidates: list[Any] = [model]
    for item in location:
        following: list[Any] = []
        for candidate in candidates:
            following.extend(_step(candidate, item))
        candidates = following
    keys: list[str] = []
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            keys += [info.alias or name for name, info in candidate.model_fields.items()]
    return list(dict.fromkeys(keys))


def _step(annotation: Any, item: Any) -> list[Any]:
    """The types a location step leads to from ``annotation`` (unions fan out)."""
    results: list[Any] = []
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if isinstance(item, str):
                for name, info in member.model_fields.items():
                    if item in {name, info.alias}:
                        results.append(info.annotation)
                style = member.model_fields.get("style")
                if style is not None and item in typing.get_args(style.annotation):
                    results.append(member)  # a branch of a discriminated union
            continue
        origin = typing.get_origin(member)
        arguments = typing.get_args(member)
        if origin in {tuple, list} and isinstance(item, int) and arguments:
            results.append(arguments[0])
        elif origin is dict and len(arguments) == 2:
            results.append(arguments[1])
    return results


def _tags(model: Any, location: Sequence[Any], key: str) -> list[str]:
    """The values the discriminator ``key`` may take for the union at ``location``."""
    candidates: list[Any] = [model]
    for item in location:
        candidates = [found for candidate in candidates for found in _step(candidate, item)]
    tags: list[str] = []
    for candidate in candidates:
        for member in _members(candidate):
            if isinstance(member, type) and issubclass(member, BaseModel):
                field = member.model_fields.get(key)
                if field is not None:
                    tags += [str(tag) for tag in typing.get_args(field.annotation)]
    return list(dict.fromkeys(tags))


def _members(annotation: Any) -> list[Any]:
    """A union's members (Optional, ``A | B``, Annotated unwrapped), else the annotation."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in {typing.Union, types.UnionType}:
        return [inner for arg in typing.get_args(annotation) for inner in _members(arg)]
    return [annotation]
