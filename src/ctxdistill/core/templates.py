"""Teacher and student prompts: chat-formatted messages plus an optional assistant prefill.

Every prompt is built the same way, for generation, scoring and training alike:
`ids = tokenize(chat_template(system, user) + generation prompt) + tokenize(prefill)`.
Tokenising the chat part and the prefill separately matches how `generate` appends new tokens, and
keeps the answer's token ids identical between the teacher sequence and the student target.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctxdistill.core.errors import UserError


@dataclass(frozen=True)
class Template:
    user: str
    system: str = ""
    prefill: str = ""
    shots: tuple = ()  # (user, assistant) pairs: worked examples as earlier turns, literal text

    def messages(self, x: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system.format(input=x)}] if self.system else []
        for user, assistant in self.shots:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return msgs + [{"role": "user", "content": self.user.format(input=x)}]

    def chat_ids(self, tok, x: str) -> list[int]:
        """Token ids of the conversation up to where the assistant starts writing."""
        return encode(tok, chat_text(tok, self.messages(x)))

    def render(self, tok, x: str) -> tuple[list[int], str]:
        """Token ids of the whole prompt (chat part + prefill) and the rendered prefill text."""
        prefill = self.prefill.format(input=x)
        return self.chat_ids(tok, x) + encode(tok, prefill), prefill


def chat_text(tok, messages: list[dict]) -> str:
    """The conversation as text, up to where the assistant starts writing: the tokenizer's chat template, or
    for a base model without one, plain text turns.

    A template with no system role (Gemma 2 refuses one, older Mistral templates too) gets the system prompt the
    way Gemma 3's own template folds it in: at the start of the first user turn, followed by a blank line."""
    if getattr(tok, "chat_template", None):
        if messages and messages[0]["role"] == "system" and not takes_system(tok):
            messages = fold_system(messages)
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n\n" for m in messages)


_SYSTEM_ROLE: dict[str, bool] = {}


def takes_system(tok) -> bool:
    """Whether the tokenizer's chat template renders a system message as given (it may raise, or drop it)."""
    template = tok.chat_template if isinstance(tok.chat_template, str) else repr(tok.chat_template)
    if template not in _SYSTEM_ROLE:
        probe = "Zq7 system text."
        try:
            text = tok.apply_chat_template([{"role": "system", "content": probe}, {"role": "user", "content": "Hi"}],
                                           tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - jinja's TemplateError, raised by the template itself ("System role not supported")
            text = ""
        _SYSTEM_ROLE[template] = probe in text
        if not _SYSTEM_ROLE[template]:
            from ctxdistill.core.progress import log

            log("model: its chat template has no system role; the system prompt (the context) opens the first user "
                "turn, followed by a blank line, as Gemma 3's template does")
    return _SYSTEM_ROLE[template]


def fold_system(messages: list[dict]) -> list[dict]:
    """The system message put at the start of the first user message ("system\n\nuser"), for a template
    with no system role. A conversation with no user message keeps the system text as a user message."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": system}] + rest
    first["content"] = f"{system}\n\n{first['content']}" if first["content"] else system
    return rest


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` with no BOS/EOS added (chat templates already carry their special tokens)."""
    if not text:
        return []
    return list(tok(text, add_special_tokens=False)["input_ids"])


def teacher_template(task) -> Template:
    return Template(user=task.teacher, system=task.teacher_system, prefill=task.teacher_prefill,
                    shots=tuple(tuple(s) for s in task.teacher_shots))


def student_template(task) -> Template:
    return Template(user=task.student, system=task.student_system, prefill=task.student_prefill)


def fit_prompt(tpl: Template, tok, x: str, *, window: int, max_new_tokens: int, truncate: bool,
               what: str) -> tuple[list[int], str, bool]:
    """Render `tpl` for x so that the prompt plus `max_new_tokens` fit in `window`: fail with both lengths
    named, or (only when asked) shorten x. Returns the prompt ids, the input used, whether it was shortened."""
    budget = window - max_new_tokens
    ids, _ = tpl.render(tok, x)
    if len(ids) <= budget:
        return ids, x, False
    if not truncate:
        raise UserError(f"{what} prompt for input {x[:40]!r} is {len(ids)} tokens; with max_new_tokens "
                        f"{max_new_tokens} it needs {len(ids) + max_new_tokens}, over the model window of {window} "
                        "tokens (nothing is truncated silently: shorten it or set teach.truncate = true)")
    x_ids = encode(tok, x)
    over = len(ids) - budget
    while over > 0 and x_ids:
        x_ids = x_ids[:max(0, len(x_ids) - over)]
        x = tok.decode(x_ids)
        ids, _ = tpl.render(tok, x)
        over = len(ids) - budget
    if over > 0:
        raise UserError(f"{what} template alone is {len(ids)} tokens; with max_new_tokens {max_new_tokens} it "
                        f"does not fit the model window of {window} tokens")
    return ids, x, True
