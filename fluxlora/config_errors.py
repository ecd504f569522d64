"""How config problems are reported: every one at once, each with its field path, the bad value and the
fix (closest valid key, every bound of the field). Works on any pydantic model tree; imports no torch."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError


@dataclass
class Problem:
    where: str
    value: str | None
    message: str
    fix: str

    def __str__(self) -> str:
        value = "" if self.value is None else f" = {self.value}"
        return f"  - {self.where}{value}: {self.message} -> fix: {self.fix}"


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        n = len(problems)
        super().__init__(f"config {source}: {n} problem{'s' if n != 1 else ''}\n"
                         + "\n".join(map(str, problems)))


def section_fields(root: type[BaseModel], path: tuple) -> dict[str, Any] | None:
    """Field map of the model at ``path`` under ``root`` (None when the path does not lead to a model)."""
    model = root
    for key in path:
        field = model.model_fields.get(key)
        sub = getattr(field, "annotation", None) if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model.model_fields


def did_you_mean(key: str, fields) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"valid keys here: {', '.join(fields)}"


def _fix_for(root: type[BaseModel], err: dict) -> str:
    loc, kind = tuple(str(p) for p in err["loc"] if isinstance(p, str)), err["type"]
    if kind == "extra_forbidden":
        fields = section_fields(root, loc[:-1]) or {}
        return f"remove it or correct the spelling; {did_you_mean(loc[-1], fields)}"
    if kind == "missing":
        desc = (section_fields(root, loc[:-1]) or {}).get(loc[-1])
        return f"add `{loc[-1]}`" + (f" ({desc.description})" if desc and desc.description else "")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of the expected type ({err['msg'].lower()})"
    desc = (section_fields(root, loc[:-1]) or {}).get(loc[-1]) if loc else None
    what = f" ({desc.description})" if desc is not None and desc.description else ""
    bounds = _bounds(desc) if desc is not None else ""
    return f"use a value {bounds}{what}" if bounds else f"use a value that satisfies this{what}"


_BOUND_WORDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "a multiple of"))


def _bounds(field) -> str:
    """Every limit of a field in words (">= 16, <= 4096, a multiple of 16"): pydantic names only the first
    one broken, and fixing one at a time costs a run per limit."""
    return ", ".join(f"{word} {getattr(m, attr)}" for m in field.metadata for attr, word in _BOUND_WORDS
                     if getattr(m, attr, None) is not None)


def problems_from(root: type[BaseModel], e: ValidationError) -> list[Problem]:
    """One Problem per failing location of a validation of ``root``."""
    out = []
    for err in e.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        where = where or "(top level)"
        value = None if err["type"] == "missing" else repr(err.get("input"))
        if value is not None and len(value) > 80:
            value = value[:77] + "..."
        msg = err["msg"].removeprefix("Value error, ")
        head, sep, own_fix = msg.rpartition(" -> ")  # a validator that names its own fix: use it
        out.append(Problem(where, value, head, own_fix.removeprefix("fix: ")) if sep else
                   Problem(where, value, msg, _fix_for(root, err)))
    return _dedupe(out)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    # A union field (e.g. init: str | list) reports one error per branch: keep one per location.
    seen, out = set(), []
    for p in problems:
        key = p.where.split(".str")[0].split(".list")[0]
        if key not in seen:
            seen.add(key)
            out.append(Problem(key, p.value, p.message, p.fix))
    return out
