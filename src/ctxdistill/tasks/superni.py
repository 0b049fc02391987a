"""Super-NaturalInstructions task files: Definition, Positive/Negative Examples, Instances.

The format (allenai/natural-instructions `tasks/*.json`): `Definition` is a list of strings (older
files: a string); examples carry `input`, `output`, `explanation`; each instance has `id`, `input` and a
list `output` of acceptable references.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ctxdistill.core.errors import UserError


@dataclass
class SuperNITask:
    name: str
    definition: str
    positive: list[dict]
    negative: list[dict]
    instances: list[dict]  # {"id", "input", "reference": [str, ...]}


def load(path: str | Path) -> SuperNITask:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Super-NaturalInstructions task file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))  # Python's json accepts the NaN some files hold
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object with Definition and Instances")
    for key in ("Definition", "Instances"):
        if key not in raw:
            raise UserError(f"{path}: missing field '{key}'")
    definition = raw["Definition"]
    definition = " ".join(definition) if isinstance(definition, list) else str(definition)
    instances = []
    for i, inst in enumerate(raw["Instances"]):
        if not isinstance(inst, dict) or "input" not in inst or "output" not in inst:
            raise UserError(f"{path}: Instances[{i}] needs 'input' and 'output'")
        refs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        instances.append({"id": inst.get("id", f"{path.stem}-{i}"), "input": inst["input"],
                          "reference": [str(r) for r in refs]})
    if not instances:
        raise UserError(f"{path}: no Instances")
    return SuperNITask(name=path.stem, definition=definition, positive=list(raw.get("Positive Examples", [])),
                       negative=list(raw.get("Negative Examples", [])), instances=instances)


def split(task: SuperNITask, n_eval: int, n_train: int = 0, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic split: shuffle instances with `seed`; the first n_eval are held out, the rest train.

    Inputs that also appear among the task's own examples are kept out of eval, since the teacher
    context may show them.
    """
    shown = {e.get("input") for e in task.positive + task.negative}
    pool = [i for i in task.instances]
    random.Random(seed).shuffle(pool)
    eval_rows = [i for i in pool if i["input"] not in shown][:n_eval]
    if len(eval_rows) < n_eval:
        raise UserError(f"{task.name}: only {len(eval_rows)} instances available for n_eval={n_eval}")
    held = {i["input"] for i in eval_rows}
    train_rows = [{"id": i["id"], "input": i["input"]} for i in pool if i["input"] not in held]
    if n_train:
        train_rows = train_rows[:n_train]
    return train_rows, eval_rows


def instructions(task: SuperNITask, *, definition: bool = True, n_positive: int = 2, n_negative: int = 2,
                 explanations: bool = False) -> str:
    """The teacher's context in the Super-NaturalInstructions prompt format, each part switchable:

        Definition: ...

        Positive Example 1 -
        Input: ... / Output: ... / Explanation: ...     (explanation only with `explanations`)

        Negative Example 1 - ...

        Now complete the following example -

    The task input follows as 'Input: {input}\\nOutput:' (see `task_input`). Asking for more examples
    than the task has is an error that states how many exist.
    """
    for kind, n, have in (("positive", n_positive, task.positive), ("negative", n_negative, task.negative)):
        if n < 0 or n > len(have):
            raise UserError(f"{task.name}: asked for {n} {kind} examples, the task has {len(have)}")
    parts = [f"Definition: {task.definition}"] if definition else []
    for kind, examples in (("Positive", task.positive[:n_positive]), ("Negative", task.negative[:n_negative])):
        for i, ex in enumerate(examples, 1):
            lines = [f"{kind} Example {i} -", f"Input: {ex.get('input', '')}", f"Output: {ex.get('output', '')}"]
            if explanations and ex.get("explanation"):
                lines.append(f"Explanation: {ex['explanation']}")
            parts.append("\n".join(lines))
    parts.append("Now complete the following example -")
    return "\n\n".join(parts) + "\n"


TASK_INPUT = "Input: {input}\nOutput:"


def teacher_template(task: SuperNITask, task_id: str = "", **parts) -> str:
    """A teacher user-message template: the instructions (braces escaped), the task id line if any
    (e.g. 'Task 3', for distilling several tasks behind ids), then the task input."""
    head = f"{task_id}\n" if task_id else ""
    return instructions(task, **parts).replace("{", "{{").replace("}", "}}") + head + TASK_INPUT
