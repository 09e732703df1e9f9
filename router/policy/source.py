"""YAML to plain Python values, remembering where every key and value stands in the file.

PyYAML's constructors forget positions and silently keep the last of two equal keys, so the document is
composed into nodes (which carry marks) and converted here, one node at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .errors import PolicyError, PolicyIssue

FieldPath = tuple[str | int, ...]

ROOT_PATH_NAME = "(document)"
MAX_DEPTH = 64
# aliases let a tiny file expand into billions of values; no sensible policy gets anywhere near this
MAX_NODES = 100_000
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_UNREADABLE = object()  # a scalar PyYAML could not construct (the issue is recorded already)


def format_path(path: FieldPath) -> str:
    """``("rules", 2, "run_on")`` -> ``"rules[2].run_on"``; keys that are not plain names are quoted."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.isidentifier():
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or ROOT_PATH_NAME


@dataclass(frozen=True)
class Location:
    line: int  # 1-based
    column: int  # 1-based

    @classmethod
    def of(cls, mark: yaml.Mark | None) -> Location:
        if mark is None:
            return cls(1, 1)
        return cls(mark.line + 1, mark.column + 1)


class SourceMap:
    """Where each value (and each mapping key) of a document starts, by field path."""

    def __init__(self, filename: str):
        self.filename = filename
        self._values: dict[FieldPath, Location] = {}
        self._keys: dict[FieldPath, Location] = {}

    def record(self, path: FieldPath, value: Location, key: Location | None = None) -> None:
        self._values[path] = value
        if key is not None:
            self._keys[path] = key

    def value_at(self, path: FieldPath) -> Location:
        """The value's position, or its nearest recorded ancestor's for a field that is missing."""
        for length in range(len(path), -1, -1):
            location = self._values.get(path[:length])
            if location is not None:
                return location
        return Location(1, 1)

    def key_at(self, path: FieldPath) -> Location:
        return self._keys.get(path) or self.value_at(path)

    def issue(
        self, path: FieldPath, message: str, *, severity: str = "error", at_key: bool = False
    ) -> PolicyIssue:
        location = self.key_at(path) if at_key else self.value_at(path)
        return PolicyIssue(
            self.filename, location.line, location.column, format_path(path), message, severity
        )


@dataclass
class YamlDocument:
    value: Any
    source: SourceMap
    issues: list[tuple[FieldPath, PolicyIssue]]  # problems that still let the rest be checked, by field
    rejected: set[FieldPath]  # values replaced by None because of those problems: not to be judged again


def load_yaml(text: str, filename: str) -> YamlDocument:
    """The document's value with its source map and non-fatal issues (duplicate keys, bad scalars, ...).

    Raises PolicyError for text that is not one YAML document.
    """
    source = SourceMap(filename)
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks for forbidden characters already
        node = loader.get_single_node()
        if node is None:
            raise PolicyError(
                [source.issue((), "the file is empty; a policy needs at least 'version' and 'rules'")]
            )
        converter = _Converter(loader, source)
        value = converter.convert(node, (), 0)
        return YamlDocument(value, source, converter.issues, converter.rejected)
    except yaml.MarkedYAMLError as error:
        raise PolicyError([_syntax_issue(error, filename)]) from None
    except yaml.YAMLError as error:  # ReaderError: a character YAML does not allow, marked by position only
        position = getattr(error, "position", 0) or 0
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        raise PolicyError(
            [PolicyIssue(filename, line, column, ROOT_PATH_NAME, f"invalid YAML: {error}")]
        ) from None
    except RecursionError:
        raise PolicyError([source.issue((), "invalid YAML: nested too deeply")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _syntax_issue(error: yaml.MarkedYAMLError, filename: str) -> PolicyIssue:
    mark = error.problem_mark or error.context_mark
    location = Location.of(mark)
    message = f"invalid YAML: {error.problem or error.context or 'syntax error'}"
    if error.context and error.problem and error.context_mark is not None:
        context_at = Location.of(error.context_mark)
        message += f" ({error.context} at line {context_at.line}, column {context_at.column})"
    return PolicyIssue(filename, location.line, location.column, ROOT_PATH_NAME, message)


class _Converter:
    def __init__(self, loader: yaml.SafeLoader, source: SourceMap):
        self.loader = loader
        self.source = source
        self.issues: list[tuple[FieldPath, PolicyIssue]] = []
        self.rejected: set[FieldPath] = set()
        self.nodes_seen = 0
        self.open_nodes: set[int] = set()  # ids of the nodes being converted: an alias to one is a cycle

    def convert(self, node: yaml.Node, path: FieldPath, depth: int, key_node: yaml.Node | None = None) -> Any:
        self.nodes_seen += 1
        if self.nodes_seen > MAX_NODES:
            raise PolicyError([self.source.issue(path, f"document too large (more than {MAX_NODES} values)")])
        self.source.record(
            path, Location.of(node.start_mark), Location.of(key_node.start_mark) if key_node else None
        )
        if isinstance(node, yaml.ScalarNode):
            value = self._scalar(node, path)
            return None if value is _UNREADABLE else value
        if depth >= MAX_DEPTH:
            return self._reject(path, f"nested more than {MAX_DEPTH} levels deep")
        if id(node) in self.open_nodes:
            return self._reject(path, "an alias refers to a value that contains it")
        self.open_nodes.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                self._check_tag(node, _SEQ_TAG, path)
                return [
                    self.convert(item, (*path, index), depth + 1) for index, item in enumerate(node.value)
                ]
            self._check_tag(node, _MAP_TAG, path)
            return self._mapping_items(node, path, depth)
        finally:
            self.open_nodes.discard(id(node))

    def _reject(self, path: FieldPath, message: str) -> None:
        self.issues.append((path, self.source.issue(path, message)))
        self.rejected.add(path)

    def _scalar(self, node: yaml.ScalarNode, path: FieldPath, *, is_key: bool = False) -> Any:
        """The scalar's value, or _UNREADABLE after an issue (for a key, one that leaves the mapping checked)."""
        try:
            return self.loader.construct_object(node)
        except yaml.MarkedYAMLError as error:  # a tag the safe loader refuses, such as !!python/object
            message = f"invalid YAML: {error.problem}"
        except Exception as error:
            # PyYAML's scalar constructors raise bare errors: "2020-13-01" resolves as a timestamp and fails
            # in datetime, "!!float abc" in float()
            message = f"invalid {_tag_name(node.tag)} {node.value!r}: {error}"
        if is_key:
            self._note(node, path, message)
        else:
            self._reject(path, message)
        return _UNREADABLE

    def _check_tag(self, node: yaml.Node, expected: str, path: FieldPath) -> None:
        if node.tag != expected:
            self.issues.append((path, self.source.issue(path, f"unsupported YAML tag {node.tag!r}")))

    def _mapping_items(self, node: yaml.MappingNode, path: FieldPath, depth: int) -> dict[str, Any]:
        own_count = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        self.loader.flatten_mapping(node)  # puts the pairs of "<<" merges first, as PyYAML's loader does
        merged_count = len(node.value) - own_count
        items: dict[str, Any] = {}
        first_seen: dict[str, yaml.Node] = {}
        for position, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, yaml.ScalarNode):
                self._note(key_node, path, "keys must be strings, got a collection")
                continue
            key = self._scalar(key_node, path, is_key=True)
            if key is _UNREADABLE:
                continue
            if not isinstance(key, str):
                self._note(key_node, path, f"keys must be strings, got {key!r}; quote the key")
                continue
            if position >= merged_count:  # a key written here may override a merged one, not another one here
                if key in first_seen:
                    first = Location.of(first_seen[key].start_mark)
                    self._note(
                        key_node, (*path, key), f"duplicate key {key!r} (first defined at line {first.line})"
                    )
                    continue
                first_seen[key] = key_node
            items[key] = self.convert(value_node, (*path, key), depth + 1, key_node)
        return items

    def _note(self, node: yaml.Node, path: FieldPath, message: str) -> None:
        """An issue at ``node``'s own position (a key's, say), named by ``path``."""
        location = Location.of(node.start_mark)
        issue = PolicyIssue(self.source.filename, location.line, location.column, format_path(path), message)
        self.issues.append((path, issue))


def _tag_name(tag: str) -> str:
    return tag.rsplit(":", 1)[-1]
