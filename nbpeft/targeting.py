"""Which modules of a model an adapter goes on.

``targets`` is a list of module names or name suffixes (``"q_proj"`` matches every
``...self_attn.q_proj``), a regex string matched against the full module path, or
``"all-linear"`` (every linear layer except the output head).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

from torch import nn

from .errors import ConfigError
from .layers import innermost

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "pooler.dense")


def linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        types += (Conv1D,)
    except ImportError:
        pass
    return types


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2), a linear layer that stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of ``nn.Linear`` or ``Conv1D``."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module paths as they are in the model without adapters.

    An adapter wrapper stands for the module it wraps; its own parts are skipped.
    """
    out: dict[str, nn.Module] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        module = innermost(module)
        out[prefix] = module
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return out


def head_names(model: nn.Module) -> set[str]:
    """Paths of output heads: the output embedding and the usual task heads."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for path, module in base_modules(model).items():
        if out_emb is not None and (module is out_emb or module is innermost(out_emb)):
            heads.add(path)
        elif path in _HEAD_NAMES or path.rsplit(".", 1)[-1] in ("lm_head", "score", "classifier"):
            heads.add(path)
    # a head with layers of its own (RoBERTa's classifier.dense, classifier.out_proj) is a head throughout
    return heads | {p for p in base_modules(model) if any(p.startswith(h + ".") for h in heads)}


def match(path: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def resolve(model: nn.Module, targets: str | list[str], kinds: tuple[type, ...], method: str) -> list[str]:
    """Module paths matched by ``targets`` whose type is one of ``kinds``.

    Raises ConfigError naming close matches when a target matches nothing, and when a
    target matches only modules of a type the method cannot adapt.
    """
    modules = base_modules(model)
    if targets == ALL_LINEAR:
        heads = head_names(model)
        chosen = [p for p, m in modules.items() if isinstance(m, linear_types()) and p not in heads]
        chosen = [p for p in chosen if isinstance(modules[p], kinds)]
        if not chosen:
            raise ConfigError(f"{method}: targets='all-linear' found no linear layer in this model")
        return chosen
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ConfigError(f"{method}: targets={targets!r} is not a valid regex ({err})") from None
        matched = [p for p in modules if p and match(p, targets)]
        if not matched:
            raise ConfigError(f"{method}: the regex targets={targets!r} matched no module; {_examples(modules)}")
        chosen = [p for p in matched if isinstance(modules[p], kinds)]
        if not chosen:
            raise ConfigError(f"{method}: targets={targets!r} matched only {_types(modules, matched)}, which {method} cannot adapt")
        return chosen
    chosen: list[str] = []
    for target in targets:
        matched = [p for p in modules if p and match(p, [target])]
        if not matched:
            raise ConfigError(f"{method}: no module matched targets=[{target!r}]{_suggest(modules, target)}")
        adaptable = [p for p in matched if isinstance(modules[p], kinds)]
        if not adaptable:
            raise ConfigError(
                f"{method}: target {target!r} matched only {_types(modules, matched)}, which {method} cannot adapt"
            )
        chosen += [p for p in adaptable if p not in chosen]
    order = {p: i for i, p in enumerate(modules)}
    return sorted(chosen, key=order.__getitem__)


def leaf_counts(model: nn.Module) -> Counter:
    """How many modules share each leaf name, e.g. ``q_proj: 30``."""
    return Counter(p.rsplit(".", 1)[-1] for p in base_modules(model) if p)


def _suggest(modules: dict[str, nn.Module], target: str) -> str:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in modules if p})
    close = difflib.get_close_matches(target.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "; " + _examples(modules)


def _examples(modules: dict[str, nn.Module]) -> str:
    linear = sorted({p.rsplit(".", 1)[-1] for p, m in modules.items() if isinstance(m, linear_types())})
    return "linear layers here: " + ", ".join(linear[:12]) if linear else "this model has no linear layer"


def _types(modules: dict[str, nn.Module], paths: list[str]) -> str:
    names = sorted({type(modules[p]).__name__ for p in paths})
    return " and ".join(names) + " modules"


def compact_targets(model: nn.Module, chosen: list[str]) -> str | list[str]:
    """The shortest description of ``chosen`` for adapter_config.json.

    Leaf names when they select exactly these modules, else an exact-path regex.
    """
    modules = base_modules(model)
    leaves = sorted({p.rsplit(".", 1)[-1] for p in chosen})
    if sorted(p for p in modules if p and match(p, leaves)) == sorted(chosen):
        return leaves
    return "^(" + "|".join(re.escape(p) for p in chosen) + ")$"


def pattern_key(patterns: dict[str, object], path: str) -> str | None:
    """The first key of ``patterns`` (a regex) that matches the end of ``path`` at a name boundary, or None.

    ``"v_proj"`` matches ``model.layers.0.self_attn.v_proj``; ``"layers.0.self_attn.v_proj"`` only that
    block's; a key may be a regex such as ``"layers\\.[0-3]\\..*q_proj"``. The first match wins.
    """
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", path)), None)


def layer_index(path: str, layers_pattern: str | list[str] | None = None) -> int | None:
    """The block number in ``path`` (``model.layers.3.mlp.up_proj`` -> 3), or None if it has none.

    The first number that follows a name after at least one other name counts, so an expert
    number deeper down (``layers.1.experts.0``) is not mistaken for the block. With
    ``layers_pattern`` only a number right after one of those names counts (``h`` in GPT-2).
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", path)
    else:
        names = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        found = next((m for n in names if (m := re.match(rf"(?:^|.*?\.){n}\.(\d+)\.", path))), None)
    return int(found[1]) if found else None


def excluded(path: str, exclude: str | list[str] | None) -> bool:
    """Whether ``exclude`` (names or suffixes, or a regex over the whole path) names ``path``."""
    if not exclude:
        return False
    return match(path, exclude)


def narrow(model: nn.Module, chosen: list[str], targets: str | list[str], method: str, *,
           layers: int | list[int] | None = None, layers_pattern: str | list[str] | None = None,
           exclude: str | list[str] | None = None) -> list[str]:
    """``chosen`` kept to the blocks numbered in ``layers`` and without the modules ``exclude`` names.

    A module named by its full path in ``targets`` stays whatever its block.
    """
    if exclude:
        named = [p for p in base_modules(model) if p and excluded(p, exclude)]
        if not named:
            shown = exclude if isinstance(exclude, str) else exclude[0]
            raise ConfigError(f"{method}: exclude={exclude!r} names no module of this model{_suggest(base_modules(model), shown)}")
        chosen = [p for p in chosen if not excluded(p, exclude)]
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        exact = set(targets) if isinstance(targets, list) else set()
        numbered = [p for p in chosen if layer_index(p, layers_pattern) is not None]
        if not numbered and not exact & set(chosen):
            how = f"after layers_pattern={layers_pattern!r}" if layers_pattern else "in their paths"
            raise ConfigError(f"{method}: layers={layers!r} needs block numbers, but the targeted modules have none {how} "
                              f"(e.g. {chosen[0]!r}); pass layers_pattern='<name of the block list>'")
        chosen = [p for p in chosen if p in exact or layer_index(p, layers_pattern) in wanted]
    if not chosen:
        raise ConfigError(f"{method}: no module is left to adapt after layers={layers!r} and exclude={exclude!r}; "
                          "widen targets or loosen those")
    return chosen
