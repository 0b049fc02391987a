"""Teacher and student prompts: chat-formatted messages plus an optional assistant prefill.

Every prompt is built the same way, for generation, scoring and training alike:
`ids = tokenize(chat_template(system, user) + generation prompt) + tokenize(prefill)`.
Tokenising the chat part and the prefill separately matches how `generate` appends new tokens, and
keeps the answer's token ids identical between the teacher sequence and the student target.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    for a base model without one, plain text turns."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n\n" for m in messages)


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
