"""Safe YAML loading with the guards PyYAML's safe_load lacks: duplicate keys and alias bombs refused.

Every problem is raised as ``YamlProblem`` with a 1-based line/column, so the config layer can report
it like any other field error.
"""

from __future__ import annotations

import yaml

MAX_ALIASES = 100  # a real config uses a handful; "billion laughs" documents use thousands
MAX_NODES = 100_000  # values after alias expansion: a few aliases can still expand exponentially
_NO_ALIASES = "write the values out instead of repeating &anchors through *aliases"


class YamlProblem(Exception):
    def __init__(self, message: str, line: int | None = None, column: int | None = None,
                 fix: str = "fix the YAML at that position"):
        super().__init__(message)
        self.message, self.line, self.column, self.fix = message, line, column, fix


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and caps alias use."""

    def __init__(self, stream):
        super().__init__(stream)
        self.alias_count = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YamlProblem(f"more than {MAX_ALIASES} YAML aliases (an alias bomb?) - refused",
                                  mark.line + 1, mark.column + 1, _NO_ALIASES)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise YamlProblem(f"duplicate key {key!r} (first on line {seen[key]})",
                                  key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                  f"keep one `{key}:` and delete the other")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def expanded_size(obj, memo: dict | None = None) -> int:
    """Number of values ``obj`` holds once shared (aliased) parts are counted at every use."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    memo[id(obj)] = 1 + sum(expanded_size(c, memo) for c in children)
    return memo[id(obj)]


def load_yaml(text: str):
    """Parse one YAML document safely; raises YamlProblem with line/column on any problem."""
    data = _load(text)
    if expanded_size(data) > MAX_NODES:
        raise YamlProblem(f"the document expands to more than {MAX_NODES:,} values through aliases "
                          "(an alias bomb?) - refused", fix=_NO_ALIASES)
    return data


def _load(text: str):
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
    except YamlProblem:
        raise
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise YamlProblem(f"unsupported YAML tag ({e.problem}); only plain values, lists and mappings "
                          "are allowed", mark and mark.line + 1, mark and mark.column + 1,
                          "remove the !!tag and write a plain value") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise YamlProblem(f"YAML syntax error: {e.problem}", mark and mark.line + 1,
                          mark and mark.column + 1) from None
    except yaml.YAMLError as e:
        raise YamlProblem(f"YAML error: {e}") from None
