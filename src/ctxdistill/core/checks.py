"""Rule checks: reference-free pass/fail tests of a reply, from `[task] checks`.

A check is a table with a name and one test:

    {name = "signs off", regex = "Best regards, Mia"}                 re.search on the reply
    {name = "json answer", python = "'answer' in json.loads(reply)"}  a Python expression

A grounded check, {name = "no invented specifics", grounded = true}, passes a reply when every number,
price, time, phone number, address and capitalised name it states also occurs in the context or the user's
message (core/specifics.py); a reply that states none passes. The teacher pass uses the same rule to choose
among candidate samples (teach.samples, `select_score`).

A Python check is one expression of `reply` (the system's answer) and `input` (the user message), with
the modules `json` and `re` in scope; it passes when it is truthy and fails when it is falsy or raises
(a reply that is not JSON simply fails `json.loads`). Each check is scored, as the share of held-out
inputs that pass, for the base model, the teacher and the student (evaluate.py).
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from dataclasses import dataclass
from typing import Callable

from ctxdistill.core.errors import UserError


@dataclass(frozen=True)
class Check:
    name: str
    test: Callable[[str, str], bool]  # (reply, input) -> passed


def compile_checks(raw: list, context: str = "") -> list[Check]:
    """Checks from their config tables; a bad table, regex or expression is a UserError naming task.checks[i].
    `context`: the text a grounded check looks specifics up in (with the input)."""
    out, names = [], set()
    for i, c in enumerate(raw):
        where = f"task.checks[{i}]"
        if not isinstance(c, dict):
            raise UserError(f"{where}: expected a table {{name = ..., regex = ...}} or {{name = ..., python = ...}}, "
                            f"got {type(c).__name__} {c!r}")
        unknown = sorted(set(c) - {"name", "regex", "python", "grounded"})
        if unknown:
            raise UserError(f"{where}.{unknown[0]}: unknown field (known: name, regex, python, grounded)")
        kinds = [k for k in ("regex", "python", "grounded") if k in c]
        if len(kinds) != 1:
            raise UserError(f"{where}: give exactly one of regex, python or grounded")
        kind, src = kinds[0], c[kinds[0]]
        if kind == "grounded":
            if src is not True:
                raise UserError(f"{where}.grounded: must be true")
            name = c.get("name", "grounded")
        elif not isinstance(src, str) or not src.strip():
            raise UserError(f"{where}.{kind}: must be a non-empty string")
        name = c.get("name", src) if kind != "grounded" else name
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}.name: must be a non-empty string")
        if name in names:
            raise UserError(f"{where}.name: duplicate check name {name!r}")
        names.add(name)
        test = {"regex": _regex, "python": _python}[kind](src, where) if kind != "grounded" else grounded_test(context)
        out.append(Check(name, test))
    return out


def grounded_test(context: str) -> Callable[[str, str], bool]:
    """(reply, input) -> whether every specific the reply states occurs in the context or the input."""
    from ctxdistill.core.specifics import ungrounded

    return lambda reply, input: not ungrounded(reply, [context, input])


def select_score(reply: str, input: str, checks: list[Check], context: str, rules: list[str]) -> tuple[int, int]:
    """How the teacher pass ranks candidate samples of one input (teach.select): (rules passed, grounded
    specifics stated). 'checks' counts each rule check passed; 'grounded' adds one when every specific of the
    reply occurs in the context or the input (a candidate that invents a price or a name loses to one that
    does not). Ties go to the reply that states more grounded specifics: more of the context's facts."""
    from ctxdistill.core.specifics import specifics, ungrounded

    passed = sum(c.test(reply, input) for c in checks) if "checks" in rules else 0
    stated = specifics(reply)
    bad = ungrounded(reply, [context, input]) if "grounded" in rules else []
    return passed + ("grounded" in rules and not bad), len(stated) - len(bad)


def _regex(pattern: str, where: str) -> Callable[[str, str], bool]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}.regex: invalid regex {pattern!r}: {e}") from None
    return lambda reply, _input: rx.search(reply) is not None


def _python(expr: str, where: str) -> Callable[[str, str], bool]:
    try:
        tree = ast.parse(expr, mode="eval")
        code = compile(tree, f"<{where}>", "eval")
    except SyntaxError as e:
        raise UserError(f"{where}.python: not a Python expression {expr!r}: {e.msg}") from None
    # Free names (not attributes, not names bound inside the expression): a typo such as `replly` would
    # otherwise fail every reply silently.
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.Lambda) for a in ast.walk(n.args) if isinstance(a, ast.arg)}
    free = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound
    unknown = sorted(free - {"reply", "input", "json", "re"} - set(dir(builtins)))
    if unknown:
        raise UserError(f"{where}.python: unknown name {unknown[0]!r} in {expr!r} (the expression sees reply, input, "
                        "json, re and Python's builtins)")

    def test(reply: str, input: str) -> bool:
        try:
            return bool(eval(code, {"json": json, "re": re}, {"reply": reply, "input": input}))  # noqa: S307 - the user's own config
        except Exception:  # noqa: BLE001 - a reply the predicate cannot handle fails the check
            return False
    return test


def score_checks(checks: list[Check], replies: list[str], inputs: list[str]) -> dict[str, list[bool]]:
    """Per check name, whether each reply passes."""
    return {c.name: [c.test(r, x) for r, x in zip(replies, inputs)] for c in checks}
