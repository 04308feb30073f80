"""Which modules of a model a probe watches: supported types, qualified names and fnmatch patterns."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase

from torch import nn

from lightning_rnnviz.probe.known import KNOWN, LibraryAttention, says_attention

FUSED_TYPES = (nn.RNN, nn.LSTM, nn.GRU)
CELL_TYPES = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)
# ``LibraryAttention`` is virtual: the known attention classes of other libraries, told by name (known.py)
ATTENTION_TYPES = (nn.MultiheadAttention, LibraryAttention)
SUPPORTED_TYPES = FUSED_TYPES + CELL_TYPES + ATTENTION_TYPES
SUPPORTED_NAMES = ", ".join(
    [f"`nn.{t.__name__}`" for t in FUSED_TYPES + CELL_TYPES + (nn.MultiheadAttention,)]
    + [entry.label for entry in KNOWN.values()]
)


def is_supported(module: nn.Module) -> bool:
    """Whether a module can be recorded without an extractor (``nn.Transformer*Layer`` contain one)."""
    return isinstance(module, SUPPORTED_TYPES)


def extractor_form(name: str) -> str:
    """How to record a module through an extractor, for messages."""
    return f"`attention={{{name!r}: lambda module, args, output: <weights (batch, heads, T_out, T_in)>}}`"


def unreadable_attention(model: nn.Module, readable: Iterable[str]) -> list[str]:
    """Modules whose class name (or a base class's) says attention (``...Attention...``, ``...Attn...``) but
    that nothing reads.

    Left out: a module that is readable itself (``readable``: the names recorded as attention, by type or
    through an extractor), lies inside a readable module or contains one; a part of another such module
    whose class ends in ``Attention``/``Attn`` (the scaled dot-product part of a multi-head class: the
    whole is named); a module that contains another one named (a decoder class named for its attention
    gives way to its attention child).

    Returns:
        Qualified names, in ``named_modules()`` order.
    """
    readable = set(readable)
    named = dict(model.named_modules())

    def within(name: str, outer: str) -> bool:
        return name != outer and (outer == "" or name.startswith(f"{outer}."))

    found = [n for n, m in named.items() if says_attention(type(m)) and n not in readable
             and not any(within(n, r) or within(r, n) for r in readable)]
    found = [n for n in found
             if not any(within(n, o) and o != "" and says_attention(type(named[o]), at_end=True) for o in found)]
    return [n for n in found if not any(within(inner, n) for inner in found)]


def _is_pattern(name: str) -> bool:
    return any(ch in name for ch in "*?[")


def _available(named: Mapping[str, nn.Module]) -> str:
    names = [f"{n!r} ({type(m).__name__})" for n, m in named.items() if n]
    return ", ".join(names) if names else "none"


def _match(named: Mapping[str, nn.Module], entry: str, argument: str) -> list[str]:
    if _is_pattern(entry):
        found = [n for n in named if fnmatchcase(n, entry)]
    else:
        found = [entry] if entry in named else []
    if not found:
        raise ValueError(
            f"`{argument}` entry {entry!r} matches no module of the model. "
            f"Use a qualified name from `model.named_modules()` or an fnmatch pattern; available: "
            f"{_available(named)}."
        )
    return found


def resolve_targets(
    model: nn.Module,
    modules: Iterable[str] | None = None,
    attention: Mapping[str, object] | None = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Resolve the modules to watch.

    Args:
        model: the model.
        modules: qualified names or fnmatch patterns; ``None`` for every supported module.
        attention: names or patterns of modules recorded through a custom extractor.

    Returns:
        ``(targets, extractor_keys)``: name -> module in ``named_modules()`` order, and for each
        module recorded through an extractor, the key of ``attention`` it came from.

    Raises:
        ValueError: an entry matches nothing (the message lists what exists), a name given explicitly
            is of an unsupported type, or the model contains no supported module at all.
    """
    if isinstance(modules, str):
        modules = [modules]
    named = dict(model.named_modules())
    extractor_keys: dict[str, str] = {}
    for key in attention or {}:
        for name in _match(named, key, "attention"):
            extractor_keys.setdefault(name, key)

    chosen: set[str] = set(extractor_keys)
    if modules is None:
        chosen.update(n for n, m in named.items() if is_supported(m))
    else:
        for entry in modules:
            found = _match(named, entry, "modules")
            supported = [n for n in found if is_supported(named[n]) or n in extractor_keys]
            if not supported:
                kinds = ", ".join(sorted({type(named[n]).__name__ for n in found}))
                raise ValueError(
                    f"`modules` entry {entry!r} names only modules of unsupported type ({kinds}). "
                    f"Supported: {SUPPORTED_NAMES}; record any other module with "
                    f"`attention={{{entry!r}: extractor}}`."
                )
            chosen.update(supported)

    if not chosen:
        unread = unreadable_attention(model, ())
        hint = f", e.g. {extractor_form(unread[0])}" if unread else ""
        raise ValueError(
            f"The model has no module lightning_rnnviz can record. Supported: {SUPPORTED_NAMES} "
            "(also inside `nn.TransformerEncoderLayer`/`DecoderLayer`); custom attention modules "
            f"need `attention={{name: extractor}}`{hint}."
        )
    targets = {n: m for n, m in named.items() if n in chosen}
    return targets, extractor_keys
