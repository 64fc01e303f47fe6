"""Turn training data into batches: padded, or packed into full rows.

Accepted examples: strings (causal LM), ``{"prompt", "response"}`` (loss on the response
only), ``{"messages": [...]}`` conversations (loss on every assistant turn, see
:mod:`nbpeft.data.chat`), ``{"text", "label"}`` (classification), rows tokenised already
(``{"input_ids": [...]}``, as ``datasets.map(tokenizer)`` leaves them: lists of ids or 1-D
tensors, with optional ``attention_mask`` and ``labels``), or whole batches (dicts of 2-D
tensors with ``input_ids``, or a DataLoader). The forms they come in (lists,
``datasets``, DataFrames, files) are read by :mod:`nbpeft.data.sources`.

Examples longer than ``max_length`` are cut; one that loses every labelled token is
dropped. :class:`Batches` counts both and :meth:`Batches.report` says so in one line.

Packing (``packing=True``) fills rows of ``max_length`` with whole examples. Each example's
``position_ids`` restart at 0 and no ``attention_mask`` is passed, so transformers' causal
mask keeps attention inside each example (its packed-sequence support); the first label
of every example is masked, since the token before it belongs to another example. The loss
is then the same mean over the same labelled tokens as without packing. On SDPA models the
training loss runs attention example by example instead of through that mask
(``fast.fast_attention``): a row costs the attention of its examples, not of its full width.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..layers import IGNORE
from . import chat, layouts, sources

KINDS = ("text", "prompt-response", "chat", "classification", "features", "tokens")
_FIELDS = {"prompt-response": ("prompt", "response"), "chat": ("messages",), "classification": ("text", "label")}
_FORMS = ("strings, {'prompt': ..., 'response': ...}, {'messages': [...]}, {'text': ..., 'label': ...}, "
          "{'input_ids': [...]} or {'pixel_values' or 'input_features': ..., 'labels': ...}")


# ---------------------------------------------------------------- the tokenizer that goes with a model

_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class MissingTokenizer(ConfigError):
    """No tokenizer was given and none belongs to the model; ``fix`` is said in the caller's syntax."""

    def __init__(self, caller: str, fix: str) -> None:
        self.caller = caller
        super().__init__(self.with_fix(fix))

    def with_fix(self, fix: str) -> str:
        """The same message with another fix, e.g. ``'pass --tokenizer NAME'`` for a magic."""
        return f"{self.caller}: text data needs a tokenizer and none belongs to this model; {fix}"


def remember_tokenizer(model: Any, tokenizer: Any) -> None:
    """Record ``tokenizer`` as the one that belongs to ``model`` (``load_model`` does this)."""
    _TOKENIZERS[model] = tokenizer


def tokenizer_for(model: Any, tokenizer: Any = None, *, caller: str = "train()",
                  fix: str = "pass tokenizer=tokenizer") -> Any:
    """The tokenizer to use with ``model``.

    The one given; else the one ``load_model`` returned with this model; else the one in
    the local folder named by ``model.config._name_or_path`` (loaded offline, without
    network); else :class:`MissingTokenizer`, whose message ends with ``fix``.
    """
    if tokenizer is not None:
        return tokenizer
    try:
        found = _TOKENIZERS.get(model) if model is not None else None
    except TypeError:  # not weak-referenceable
        found = None
    if found is not None:
        return found
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path:
        try:
            from transformers import AutoTokenizer

            found = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # not a local folder or cached hub id: no tokenizer belongs to it
            found = None
    if found is None:
        raise MissingTokenizer(caller, fix)
    if found.pad_token is None:
        found.pad_token = found.eos_token
    remember_tokenizer(model, found)
    return found


# ---------------------------------------------------------------- one example


def kind_of_example(ex: Any) -> str | None:
    if isinstance(ex, str):
        return "text"
    if isinstance(ex, dict):
        if FEATURES & ex.keys():
            return "features"
        if "input_ids" in ex:
            return "tokens"
        if "messages" in ex:
            return "chat"
        if {"prompt", "response"} <= ex.keys():
            return "prompt-response"
        if {"text", "label"} <= ex.keys():
            return "classification"
    return None


def check_example(ex: Any, kind: str, where: str, caller: str = "train()") -> None:
    """A one-line ConfigError naming the row and the fix when ``ex`` is not a ``kind`` example."""
    if kind == "text":
        if not isinstance(ex, str):
            raise ConfigError(f"{caller}: {where} is a {type(ex).__name__}, but row 0 is a string; make every row a string")
        return
    if kind == "chat":
        chat.check_conversation(ex, where, caller)
        return
    if kind == "features":
        check_features(ex, where, caller)
        return
    if kind == "tokens":
        token_row(ex, where, caller)
        return
    needed = _FIELDS[kind]
    if not isinstance(ex, dict):
        raise ConfigError(f"{caller}: {where} is a {type(ex).__name__}; every row must be a dict with "
                          f"{' and '.join(map(repr, needed))}")
    missing = [k for k in needed if k not in ex]
    if missing:
        has = ", ".join(map(str, ex)) or "nothing"
        raise ConfigError(f"{caller}: {where} has no {missing[0]!r} (it has {has}); give every row "
                          f"{' and '.join(map(repr, needed))}, or map yours with columns={{{missing[0]!r}: 'your_name'}}")
    for key in ("prompt", "response", "text"):
        if key in needed and not isinstance(ex[key], str):
            raise ConfigError(f"{caller}: {where} has {key!r} of type {type(ex[key]).__name__}, not text; make it a string")
    if kind == "classification":
        try:
            int(ex["label"])
        except (TypeError, ValueError):
            raise ConfigError(f"{caller}: {where} has label {ex['label']!r}; labels must be integers 0, 1, ...") from None


def kind_of(data: Any) -> str:
    """'text', 'prompt-response', 'chat', 'classification' or 'batches' (for a list of examples or batches)."""
    source = sources.read(data)
    if source.batches:
        return "batches"
    rows = source.rows if isinstance(source.rows, list) else [next(iter(source.rows))]
    kind = _kind_of_rows(rows, source.where, "train()")
    for i, ex in enumerate(rows):  # every row of the same form, as training will require
        check_example(ex, kind, source.where(i))
    return kind


def _kind_of_rows(rows: list[Any], where: Any, caller: str) -> str:
    if not rows:
        raise ConfigError(f"{caller}: data is empty; pass at least one example")
    kind = kind_of_example(rows[0])
    if kind is None:
        seen = f"; its columns are {', '.join(map(str, rows[0]))}: name them with columns=, e.g. " \
               f"columns={{{str(next(iter(rows[0]), 'question'))!r}: 'prompt'}}" if isinstance(rows[0], dict) else ""
        raise ConfigError(f"{caller}: cannot read examples like {str(rows[0])[:60]!r} ({where(0)}); use {_FORMS}{seen}")
    return kind


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it at generation time (chat template if it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _id_list(value: Any) -> list[int] | None:
    """A row's ids as a list of ints (from a list or a 1-D tensor or array), or None when they are not that."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def token_row(ex: Any, where: str, caller: str = "train()") -> dict[str, Any]:
    """A pre-tokenised row as input_ids and labels (given ones kept, else the inputs with padding masked).

    ``attention_mask`` zeros (a row padded when it was tokenised) are kept as padding: masked in
    attention and, when the row brings no labels, in the loss.
    """
    if not isinstance(ex, dict) or "input_ids" not in ex:
        raise ConfigError(f"{caller}: {where} has no 'input_ids', but row 0 has; give every row its input_ids")
    ids = _id_list(ex["input_ids"])
    if not ids:
        raise ConfigError(f"{caller}: {where} has input_ids that are not a non-empty list of token ids (one row's, "
                          "not a batch's); give each row a list of ints or a 1-D tensor")
    mask = _id_list(ex["attention_mask"]) if ex.get("attention_mask") is not None else [1] * len(ids)
    if mask is None or len(mask) != len(ids):
        raise ConfigError(f"{caller}: {where} has an attention_mask that does not match its {len(ids)} input_ids")
    labels = ex.get("labels", ex.get("label"))
    if labels is None:
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    elif hasattr(labels, "ndim") and labels.ndim == 0 or isinstance(labels, int):
        labels = int(labels)  # one label per row: a classifier's
    elif (labels := _id_list(labels)) is None or len(labels) != len(ids):
        raise ConfigError(f"{caller}: {where} has labels that do not match its {len(ids)} input_ids; give one label "
                          "per token (-100 where the loss does not look), or leave labels out to learn every token")
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def tokenize(example: Any, kind: str, tokenizer: Any, where: str = "row 0", caller: str = "train()") -> dict[str, Any]:
    """One example as input_ids and labels (-100 where the loss does not look), before truncation."""
    if kind == "tokens":
        return token_row(example, where, caller)
    eos = tokenizer.eos_token or ""
    if kind == "text":
        ids = tokenizer(example)["input_ids"] + _ids(tokenizer, eos)
        return {"input_ids": ids, "labels": list(ids)}
    if kind == "classification":
        return {"input_ids": tokenizer(example["text"])["input_ids"], "labels": int(example["label"])}
    if kind == "chat":
        ids, labels = chat.encode(tokenizer, chat.check_conversation(example, where, caller), where, caller)
        return {"input_ids": ids, "labels": labels}
    prompt = chat_prompt(tokenizer, example["prompt"])
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["response"]}],
            tokenize=False,
        )
        answer = full[len(prompt):] if full.startswith(prompt) else example["response"] + eos
    else:
        answer = example["response"] + eos
    prompt_ids, answer_ids = _ids(tokenizer, prompt), _ids(tokenizer, answer)
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def encode(example: Any, kind: str, tokenizer: Any, max_length: int) -> dict[str, Any]:
    """One example as input_ids and labels (prompt tokens masked with -100), cut to ``max_length``."""
    enc = tokenize(example, kind, tokenizer)
    if kind == "classification":
        return {"input_ids": enc["input_ids"][:max_length], "labels": enc["labels"]}
    return {"input_ids": enc["input_ids"][:max_length], "labels": enc["labels"][:max_length]}


# Batches are padded to a multiple of this many tokens (never past max_length): a handful of
# widths instead of one per length. CPU bf16 matmuls (oneDNN) cache a primitive per shape, and
# one per length grew the chat notebook's peak by 0.24 GiB over 24 steps (1.63 -> 1.39 GiB with
# the cache capped); compiled steps likewise recompile per new shape.
PAD_MULTIPLE = 16


def collate(examples: list[dict[str, Any]], pad_id: int, multiple: int = 1, limit: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, rounded up to ``multiple`` (at most ``limit`` when that is
    longer); padding is masked in attention and labels."""
    longest = max(len(e["input_ids"]) for e in examples)
    width = -(-longest // multiple) * multiple
    if limit is not None:
        width = min(width, max(longest, limit))
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention[i, : len(e["input_ids"])] = torch.tensor(e["attention_mask"]) if "attention_mask" in e else 1
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if isinstance(examples[0]["labels"], int):
        batch["labels"] = torch.tensor([e["labels"] for e in examples])
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        batch["labels"] = labels
    return batch


# ---------------------------------------------------------------- packing


# How far ahead of a row's first example packing looks for examples to fill the row with.
PACK_LOOKAHEAD = 64


def pack(examples: list[dict[str, Any]], max_length: int) -> list[list[dict[str, Any]]]:
    """Rows of whole examples, each row at most ``max_length`` tokens, in the examples' order.

    Each row starts with the first example not yet placed and is filled, from the next
    ``PACK_LOOKAHEAD`` unplaced examples, with the subset whose lengths come closest to
    ``max_length`` (earlier examples preferred among equal fills): an exact subset sum, so
    rows end up nearly full. On the shipped chat data (59-107 tokens, rows of 256) rows are
    3.6% padding this way, against 7.7% when each example goes to the first row it fits.
    """
    left = list(examples)
    rows: list[list[dict[str, Any]]] = []
    while left:
        first = left.pop(0)
        room = max_length - len(first["input_ids"])
        window = left[:PACK_LOOKAHEAD]
        chosen = _best_fill([len(e["input_ids"]) for e in window], room)
        rows.append([first] + [window[i] for i in chosen])
        for i in reversed(chosen):
            del left[i]
    return rows


def _best_fill(lengths: list[int], room: int) -> list[int]:
    """Indices (ascending) of the subset of ``lengths`` with the largest sum at most ``room``, earliest preferred."""
    if room <= 0:
        return []
    limit = (1 << (room + 1)) - 1
    reachable = [1]  # bit s of reachable[i]: some subset of lengths[:i] sums to s
    for n in lengths:
        reachable.append((reachable[-1] | (reachable[-1] << n)) & limit)
    total = reachable[-1].bit_length() - 1
    chosen = []
    for i in range(len(lengths), 0, -1):  # walk back, taking an example only where the sum needs it
        if not reachable[i - 1] >> total & 1:
            total -= lengths[i - 1]
            chosen.append(i - 1)
    return chosen[::-1]


def collate_packed(rows: list[list[dict[str, Any]]], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Packed rows as ``input_ids``, ``labels`` and ``position_ids`` (restarting per example), no attention mask.

    Rows are as wide as the fullest, rounded up to ``multiple``. Trailing padding forms one more
    short sequence of its own (positions from 0, labels -100), so it never attends to, or is
    attended by, a real token.
    """
    width = layouts.packed_width(rows, multiple)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            input_ids[r, at:at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1:at + n] = torch.tensor(e["labels"][1:])  # no example predicts another's first token
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


# ---------------------------------------------------------------- images, audio: examples of tensors

# Model inputs that are not token ids: an image's pixels, an audio clip's features.
FEATURES = {"pixel_values", "input_features"}


def check_features(ex: Any, where: str, caller: str = "train()") -> None:
    """A one-line ConfigError unless ``ex`` has the same input key as row 0's kind and a ``labels``/``label``."""
    if not isinstance(ex, dict) or not FEATURES & ex.keys():
        raise ConfigError(f"{caller}: {where} has no 'pixel_values' or 'input_features'; give every row the same inputs")
    if "labels" not in ex and "label" not in ex:
        raise ConfigError(f"{caller}: {where} has no 'labels'; give every image or audio example its labels")


def encode_features(ex: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One image or audio example as tensors (arrays and lists are converted; ``label`` becomes ``labels``)."""
    out = {("labels" if k == "label" else k): torch.as_tensor(v) for k, v in ex.items()}
    for key in FEATURES & out.keys():
        if not out[key].is_floating_point():
            out[key] = out[key].float()
    return out


def collate_features(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Examples of equal shapes stacked into one batch."""
    shapes = {k: {tuple(e[k].shape) for e in examples} for k in examples[0]}
    uneven = [k for k, found in shapes.items() if len(found) > 1]
    if uneven:
        raise ConfigError(f"train(): {uneven[0]!r} differs in shape between examples ({sorted(shapes[uneven[0]])}); "
                          "resize or pad them to one shape first")
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


# ---------------------------------------------------------------- encoder-decoders: prompt in, response out


def encode_seq2seq(example: dict[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    """A ``{"prompt", "response"}`` example for an encoder-decoder: the prompt is the encoder's input,
    the response the decoder's labels (each with the tokenizer's special tokens, cut to ``max_length``).

    The labels end with the end token (added when the tokenizer does not add it), so the model learns to stop.
    """
    labels = tokenizer(example["response"])["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not labels or labels[-1] != eos):
        labels = labels + [eos]
    return {"input_ids": tokenizer(example["prompt"])["input_ids"][:max_length], "labels": labels[:max_length]}


def collate_seq2seq(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Encoder inputs and decoder labels, each right-padded to its own longest (labels with -100)."""
    width = max(len(e["input_ids"]) for e in examples)
    label_width = max(len(e["labels"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), label_width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        attention[i, : len(e["input_ids"])] = 1
        labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# ---------------------------------------------------------------- the batch stream


class Batches:
    """An endless, reshuffled-every-epoch stream of batches, plus its epoch length.

    ``truncated`` counts the examples cut by ``max_length`` and ``dropped`` those that lost
    every labelled token to it (not trained on); ``notes`` holds one-line remarks to show
    at the start of training (truncation, a default chat template).

    ``batching`` lays out each batch of ``batch_size`` examples (see :mod:`nbpeft.data.layouts`):
    ``"padded"``, ``"grouped"``, ``"packed"``, or ``"auto"``, the one with least padding on this
    data (packed only where ``can_pack``: the model attends example by example inside a row).
    ``layout`` is the one used and ``batching_line`` says so for the start banner.
    ``packing=True`` instead fills rows of ``max_length`` with whole examples, ``batch_size`` rows a batch.
    """

    def __init__(self, data: Any, tokenizer: Any, batch_size: int, max_length: int, seed: int, *,
                 model: Any = None, columns: dict[str, str] | None = None, packing: bool = False,
                 batching: str = "padded", can_pack: bool = False, caller: str = "train()") -> None:
        if not isinstance(packing, bool):
            raise ConfigError(f"{caller}: packing={packing!r} must be True or False")
        if batching not in layouts.LAYOUTS:
            raise ConfigError(f"{caller}: batching={batching!r} is not known; use one of {', '.join(layouts.LAYOUTS)}")
        self.batch_size, self.max_length, self.packing, self.caller = batch_size, max_length, packing, caller
        self.layout, self.batching_line = "rows" if packing else "padded", ""
        self.generator = torch.Generator().manual_seed(seed)
        self.truncated = self.dropped = 0
        self._counting = True  # a stream is counted on its first pass only
        self.first_dropped: str | None = None
        self.notes: list[str] = []
        source = sources.read(data, columns, caller)
        if source.batches:
            if packing:
                raise ConfigError(f"{caller}: packing=True needs examples, not ready batches; pack them yourself or pass packing=False")
            self.kind = "batches"
            self.source = source.rows
            self.examples: list[dict[str, Any]] = []
            self.per_epoch = source.length
            return
        self.where = source.where
        self.stream = source.rows if source.length is None else None
        first = next(iter(source.rows), None) if self.stream is not None else None
        self.kind = _kind_of_rows(source.rows if self.stream is None else [first] if first is not None else [],
                                  source.where, caller)
        if packing and self.kind in ("classification", "features"):
            raise ConfigError(f"{caller}: packing=True applies to text, prompt-response and conversations, "
                              f"not {self.kind} examples; pass packing=False")
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if self.seq2seq and self.kind not in ("prompt-response", "features"):
            raise ConfigError(f"{caller}: an encoder-decoder model trains on {{'prompt': ..., 'response': ...}} examples "
                              f"(the prompt goes to the encoder, the response is the target), not {self.kind} examples")
        if self.seq2seq and packing:
            raise ConfigError(f"{caller}: packing=True is for decoder-only models; pass packing=False")
        if self.kind == "features":
            self.tokenizer, self.pad_id = None, 0
        elif self.kind == "tokens":  # ids need no tokenizer; its pad id when there is one
            try:
                self.tokenizer = tokenizer_for(model, tokenizer, caller=caller)
            except MissingTokenizer:
                self.tokenizer = None
            self.pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        else:
            self.tokenizer = tokenizer_for(model, tokenizer, caller=caller)
            self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.stream is not None:  # an IterableDataset: encoded as it is read, counted as it goes
            self.examples, self.per_epoch = [], None
            self._template_note()
            return
        for i, ex in enumerate(source.rows):
            check_example(ex, self.kind, source.where(i), caller)
        self._template_note(source.rows)
        encoded = [self._encode(i, ex) for i, ex in enumerate(source.rows)]
        self.examples = [e for e in encoded if e is not None]
        if not self.examples:
            raise ConfigError(f"{caller}: every example lost its labelled tokens to max_length={max_length} "
                              f"(e.g. {self.first_dropped}); raise max_length")
        report = self.report()
        if report:
            self.notes.append(report)
        rows = len(pack(self.examples, max_length)) if packing else len(self.examples)
        self.per_epoch = -(-rows // batch_size)
        if not packing:
            self._choose_layout(batching, can_pack, seed)

    def _choose_layout(self, batching: str, can_pack: bool, seed: int) -> None:
        """``layout`` and ``batching_line`` for ``batching`` ("auto": the least padding on these examples)."""
        if self.kind == "features":  # images, audio: no token lengths to lay out
            if batching not in ("auto", "padded"):
                raise ConfigError(f"{self.caller}: batching={batching!r} lays out token sequences, not {self.kind} "
                                  "examples (images, audio); use batching='auto'")
            self.layout, self.batching_line = "padded", ""
            return
        packable = self.kind in ("text", "prompt-response", "chat") or self.kind == "tokens" and all(
            all(e.get("attention_mask", [1])) for e in self.examples)
        if batching == "packed" and (not packable or self.seq2seq):
            raise ConfigError(f"{self.caller}: batching='packed' applies to text, prompt-response and conversations "
                              f"for decoder-only models, not {self.kind} examples; use batching='grouped' or 'auto'")
        args = (self.batch_size, PAD_MULTIPLE, self.max_length, seed)
        if batching == "auto":
            self.layout, shares = layouts.choose(self.examples, *args, can_pack and packable and not self.seq2seq)
        else:
            self.layout = batching
            shares = {name: layouts.padding_share(self.examples, name, *args) for name in {"padded", batching}}
        self.batching_line = layouts.describe(self.layout, shares, batching)

    def _template_note(self, rows: list[Any] | None = None) -> None:
        notes = [chat.use_default_template(self.tokenizer)] if self.kind == "chat" else []
        # the template's own system prompt goes silently into rows that give none: say so
        without_system = self.kind == "prompt-response" or self.kind == "chat" and (rows is None or any(
            not any(turn.get("role") == "system" for turn in row["messages"]) for row in rows))
        if without_system and not self.seq2seq:
            notes.append(chat.system_prompt_note(self.tokenizer, self.kind))
        self.notes += [note for note in notes if note]

    def _encode(self, i: int, ex: Any) -> dict[str, Any] | None:
        """One row encoded and cut to max_length, or None (counted) when no labelled token survives."""
        where = self.where(i)
        if self.kind == "features":
            return encode_features(ex)
        if self.seq2seq:
            return encode_seq2seq(ex, self.tokenizer, self.max_length)
        enc = tokenize(ex, self.kind, self.tokenizer, where, self.caller)
        if len(enc["input_ids"]) <= self.max_length:
            return enc
        self.truncated += self._counting
        enc["input_ids"] = enc["input_ids"][: self.max_length]
        if "attention_mask" in enc:
            enc["attention_mask"] = enc["attention_mask"][: self.max_length]
        if isinstance(enc["labels"], int):  # a classifier's one label per row
            return enc
        enc["labels"] = enc["labels"][: self.max_length]
        # the first label is never predicted (nothing comes before it)
        if all(t == IGNORE for t in enc["labels"][1:]):
            if self.kind == "chat":  # a conversation is the user's own unit: refuse rather than drop it
                raise ConfigError(f"{self.caller}: {where}: max_length={self.max_length} cuts off every assistant "
                                  "turn of this conversation; raise max_length= or shorten its earlier turns")
            self.dropped += self._counting
            self.first_dropped = self.first_dropped or where
            return None
        return enc

    def report(self) -> str:
        """One line on what max_length cut and dropped ('' when nothing)."""
        if not self.truncated:
            return ""
        total = len(self.examples) + self.dropped if self.stream is None else None
        of = f" of {total}" if total is not None else ""
        line = f"max_length={self.max_length} cut {self.truncated}{of} examples"
        if self.dropped:
            line += (f" and dropped {self.dropped} of them whose labelled tokens were all past it "
                     f"(e.g. {self.first_dropped})")
        return line + "; raise max_length= to keep more"

    def _batches(self, examples: Iterable[dict[str, Any]], shuffled: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        if isinstance(examples, list) and self.layout in ("grouped", "packed"):
            if self.layout == "packed":
                groups = layouts.chunks(examples, self.batch_size)
            elif shuffled:
                groups = layouts.grouped(examples, self.batch_size, self.generator)
            else:  # one pass (evaluation): the order does not matter, similar lengths together
                groups = layouts.chunks(sorted(examples, key=layouts.length), self.batch_size)
            for group in groups:
                yield self._collate(group)
            return
        if not self.packing:
            group: list[dict[str, Any]] = []
            for e in examples:
                group.append(e)
                if len(group) == self.batch_size:
                    yield self._collate(group)
                    group = []
            if group:
                yield self._collate(group)
            return
        if isinstance(examples, list):
            rows = pack(examples, self.max_length)
            for i in range(0, len(rows), self.batch_size):
                yield collate_packed(rows[i:i + self.batch_size], self.pad_id)
            return
        rows, row, used = [], [], 0  # a stream: fill one row at a time
        for e in examples:
            if used + len(e["input_ids"]) > self.max_length:
                rows.append(row)
                row, used = [], 0
                if len(rows) == self.batch_size:
                    yield collate_packed(rows, self.pad_id)
                    rows = []
            row.append(e)
            used += len(e["input_ids"])
        if row:
            rows.append(row)
        if rows:
            yield collate_packed(rows, self.pad_id)

    def _collate(self, group: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.layout == "packed":
            return collate_packed(layouts.pack_batch(group, PAD_MULTIPLE, self.max_length), self.pad_id, PAD_MULTIPLE)
        if self.kind == "features":
            return collate_features(group)
        if self.seq2seq:
            return collate_seq2seq(group, self.pad_id)
        return collate(group, self.pad_id, PAD_MULTIPLE, self.max_length)

    def _read_stream(self) -> Iterator[dict[str, Any]]:
        for i, ex in enumerate(self.stream):
            check_example(ex, self.kind, self.where(i), self.caller)
            enc = self._encode(i, ex)
            if enc is not None:
                yield enc
        self._counting = False

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if self.kind == "batches":
                yielded = False
                for batch in self.source:
                    yielded = True
                    yield batch
                if not yielded:
                    raise ConfigError(f"{self.caller}: the DataLoader yielded no batch")
                continue
            if self.stream is not None:
                yielded = False
                for batch in self._batches(self._read_stream()):
                    yielded = True
                    yield batch
                if not yielded:
                    raise ConfigError(f"{self.caller}: the data stream yielded no example with labelled tokens")
                continue
            order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            yield from self._batches([self.examples[j] for j in order], shuffled=True)

    def once(self) -> Iterator[dict[str, torch.Tensor]]:
        """One pass in order, for evaluation."""
        if self.kind == "batches":
            yield from self.source
        elif self.stream is not None:
            yield from self._batches(self._read_stream())
        else:
            yield from self._batches(self.examples)
