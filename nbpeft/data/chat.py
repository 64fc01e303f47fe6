"""Conversations as training examples: rendered with the chat template, loss on the assistant.

A conversation is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``.
It is rendered with the tokenizer's chat template, and the loss sees every assistant turn
and nothing else, up to and including the template's end-of-turn token (so the model learns
to stop). The assistant spans are found by rendering prefixes of the conversation, never by
searching for the reply's text: turn ``k`` spans from the end of
``render(messages[:k], add_generation_prompt=True)`` to the end of ``render(messages[:k + 1])``.

A tokenizer without a chat template gets :data:`DEFAULT_TEMPLATE`::

    <|system|>
    You answer briefly.</s>
    <|user|>
    Hi!</s>
    <|assistant|>
    Hello.</s>

where ``</s>`` stands for the tokenizer's end-of-sequence token, which ends every turn.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..layers import IGNORE

ROLES = ("system", "user", "assistant", "tool")

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_default_template(tokenizer: Any) -> str | None:
    """Give a tokenizer without a chat template :data:`DEFAULT_TEMPLATE`; returns the one-line note, or None."""
    if has_template(tokenizer):
        return None
    tokenizer.chat_template = DEFAULT_TEMPLATE
    return ("this tokenizer has no chat template; conversations use nbpeft.data.chat.DEFAULT_TEMPLATE, "
            "now set as tokenizer.chat_template so generation matches training")


def added_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt the chat template puts into a conversation that has none, or None.

    A probe conversation is rendered without a system message and with a marker one: where the
    marker sits in the second, the first holds the template's own default (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ..."); a template that adds nothing, or renders system
    messages elsewhere, gives None.
    """
    if not has_template(tokenizer):
        return None
    user, marker = {"role": "user", "content": "\x01probe\x01"}, "\x02system\x02"
    try:
        plain = tokenizer.apply_chat_template([user], tokenize=False)
        marked = tokenizer.apply_chat_template([{"role": "system", "content": marker}, user], tokenize=False)
    except Exception:  # noqa: BLE001 (a template that refuses system messages adds none either)
        return None
    if not isinstance(plain, str) or not isinstance(marked, str) or marked.count(marker) != 1:
        return None
    before, after = marked.split(marker)
    if not (plain.startswith(before) and plain.endswith(after)) or len(plain) <= len(before) + len(after):
        return None
    return plain[len(before):len(plain) - len(after)].strip() or None


def system_prompt_note(tokenizer: Any, kind: str) -> str | None:
    """The one-line note that the template adds its own system prompt to ``kind`` examples, and how to give yours."""
    added = added_system_prompt(tokenizer)
    if added is None:
        return None
    shown = added if len(added) <= 80 else added[:77] + "..."
    fix = ("give rows as {'messages': [{'role': 'system', 'content': ...}, {'role': 'user', ...}, "
           "{'role': 'assistant', ...}]} to train with your own" if kind == "prompt-response"
           else "start a conversation with a {'role': 'system', ...} message to train with your own")
    return f"the chat template adds the system prompt {shown!r} to every example without one; {fix}"


def check_conversation(row: Any, where: str, caller: str) -> list[dict[str, str]]:
    """The row's messages, or a one-line ConfigError naming the row and the fix."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list):
        raise ConfigError(f"{caller}: {where} has no 'messages' list; give every row "
                          "{'messages': [{'role': 'user', 'content': ...}, {'role': 'assistant', 'content': ...}]}")
    if not messages:
        raise ConfigError(f"{caller}: {where} is an empty conversation; give it a user and an assistant turn, or remove it")
    for t, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ConfigError(f"{caller}: {where} turn {t} is not {{'role': ..., 'content': ...}}; fix that turn")
        if turn["role"] not in ROLES:
            raise ConfigError(f"{caller}: {where} turn {t} has role {turn['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(turn["content"], str):
            raise ConfigError(f"{caller}: {where} turn {t} has content of type {type(turn['content']).__name__}, not text; "
                              "make it a string")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise ConfigError(f"{caller}: {where} has no assistant turn, so nothing to learn; add one or remove the row")
    if messages[0]["role"] == "assistant":
        raise ConfigError(f"{caller}: {where} starts with an assistant turn; put a system or user turn first")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str, caller: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template raises its own errors, e.g. for roles it does not accept
        raise ConfigError(f"{caller}: the chat template rejects {where} ({str(err).splitlines()[0]}); "
                          "change the conversation to fit it") from None


def pieces(tokenizer: Any, messages: list[dict[str, str]], where: str = "row 0", caller: str = "train()") -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive (text, is_assistant_turn) pieces."""
    full = render(tokenizer, messages, False, where, caller)
    out: list[tuple[str, bool]] = []
    done = 0
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:k], True, where, caller))
        before = render(tokenizer, messages[:k + 1], False, where, caller)
        if not full.startswith(before) or start < done or start > len(before):
            raise ConfigError(f"{caller}: the chat template renders {where} differently when it is cut after a turn, "
                              "so its assistant turns cannot be found; use a template that renders turn by turn")
        out.append((full[done:start], False))
        out.append((full[start:len(before)], True))
        done = len(before)
    out.append((full[done:], False))
    return [(text, trained) for text, trained in out if text]


def _end_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids | ({eos} if eos is not None else set())


def encode(tokenizer: Any, messages: list[dict[str, str]], where: str = "row 0",
           caller: str = "train()", answer_from: int = 0) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a whole conversation, labels -100 outside the assistant turns.

    Each assistant turn is labelled up to and including its last special token (the
    template's end of turn); what follows it inside the turn (e.g. a newline) is not.
    A turn with no special token gets the end-of-sequence token appended. Assistant turns
    that start before character ``answer_from`` of the rendered text are not labelled (a
    preference pair's prompt may hold earlier assistant turns; only its answer is learnt).
    """
    ends = _end_ids(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    input_ids: list[int] = []
    labels: list[int] = []
    at = 0
    for text, trained in pieces(tokenizer, messages, where, caller):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        trained, at = trained and at >= answer_from, at + len(text)
        if not trained:
            input_ids += ids
            labels += [IGNORE] * len(ids)
            continue
        last = max((i for i, t in enumerate(ids) if t in ends), default=None)
        if last is None:
            if eos is None:
                raise ConfigError(f"{caller}: the chat template ends assistant turns with no special token and the "
                                  "tokenizer has no eos_token; set tokenizer.eos_token")
            ids, last = ids + [eos], len(ids)
        input_ids += ids
        labels += ids[: last + 1] + [IGNORE] * (len(ids) - last - 1)
    return input_ids, labels
