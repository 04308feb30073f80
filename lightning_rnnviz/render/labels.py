"""Which of the ``labels(batch)`` tokens go on which axis of each module's pictures.

``labels(batch)`` returns the tokens of the drawn sequence (batch row ``sample``) in one of three forms:

* a list of str: the input tokens;
* ``{"input": [...], "output": [...]}`` (either may be left out): the source sequence, and the sequence the
  model writes (an encoder-decoder's target);
* either of them with ``"modules"``: ``{module name: choice}`` for modules the rules below get wrong. A
  choice is ``"input"`` or ``"output"`` (a recurrent module's time axis; both axes of an attention map,
  self-attention over that sequence), a list of str (that module's own tokens), ``None`` (no tokens), or for
  an attention module ``{"query": ..., "key": ...}`` (or the pair ``("output", "input")``), each one of the
  above, e.g. ``{"input": src, "output": tgt, "modules": {"decoder.rnn": "output",
  "decoder.cross_attn": {"query": "output", "key": "input"}}}``.

The rules for the modules ``"modules"`` leaves out. A token list goes only on an axis of its length (one
token per real step of row ``sample``); where both lists fit (a source and target of one length), the
module's role decides:

* **Recurrent module** (the time axis): the output tokens for a decoder, the input tokens for an encoder.
  A module whose first call started from another recorded module's final state is a decoder, and that
  module an encoder; a module stepped once per token (a cell called in a loop, or a fused module called
  once per step from its last state) is a decoder; otherwise the last word ``enc``/``encoder`` or
  ``dec``/``decoder`` in its qualified name decides; otherwise the input tokens.
* **Attention module**: self-attention (its queries are steps of the sequence its keys are) or
  cross-attention. ``nn.MultiheadAttention`` called with its query as its key (``attn(x, x, x)``, the
  layers of ``nn.TransformerEncoder``) is self-attention, and called with another key
  (``attn(x, memory, memory)``) cross-attention. For the others (extractors, other libraries' classes),
  more keys than queries, or fewer, is cross-attention; as many is what a word ``self`` or ``cross`` in the
  name says, or else self-attention unless cross-attention's tokens fit (the output tokens the queries and
  the input tokens the keys: a decoder's attention over a source of its own length, one query per call).

  *Self-attention* has the tokens of the sequence it attends over on both axes: the one list that fits
  its real keys; where both fit, the output tokens for a decoder's (a causal mask: each query sees the
  keys up to its own step; or the name's ``dec``/``decoder``), else the input tokens.
  *Cross-attention*: its queries the output tokens, its keys the input tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_rnnviz.probe.records import AttentionRecord, RNNRecord

ROLES = ("input", "output")
_CHOICES = "'input', 'output', a list of str or None"


@dataclass(frozen=True)
class Axes:
    """The tokens of one module's pictures, ``None`` where none fit: ``time`` for a recurrent module's
    time axis; ``query`` and ``key`` for an attention map, with ``self_attention`` whether its queries are
    steps of the keys' sequence (padded queries are cropped with the padded keys)."""

    time: list[str] | None = None
    query: list[str] | None = None
    key: list[str] | None = None
    self_attention: bool | None = None


@dataclass(frozen=True)
class _Named:
    """A ``"modules"`` entry: one choice for both axes, or a ``query``/``key`` pair."""

    query: str | list[str] | None
    key: str | list[str] | None
    pair: bool


def token_axes(tokens: Any, records: Mapping[str, Any], sample: int,
               recording: Mapping[str, Any] | None = None) -> dict[str, Axes] | None:
    """``labels(batch)``'s tokens per module of ``records``: see the module's docstring for the rules.

    Args:
        tokens: what ``labels(batch)`` returned.
        records: the recorded modules whose pictures are drawn, by name.
        sample: the batch row drawn.
        recording: every record of the batch (``records`` by default): which module's final state starts
            which, and the names ``"modules"`` may use.

    Returns:
        ``{module: Axes}``, or ``None`` when ``tokens`` is ``None``.

    Raises:
        ValueError: a wrong form, a token list that fits no time axis, or a ``"modules"`` entry that names
            no recorded module, asks for a list not returned, or does not fit its module's axis.
    """
    if tokens is None:
        return None
    lists, named = _parse(tokens)
    _check_lengths(lists, records, sample)
    recording = records if recording is None else recording
    unknown = sorted(set(named) - set(recording) - set(records))
    if unknown:
        raise ValueError(
            f"`labels(batch)['modules']` names {', '.join(map(repr, unknown))}, not a recorded module; "
            f"use the names of `model.named_modules()` among {', '.join(map(repr, sorted(recording)))}."
        )
    fed = {r.feeds for r in recording.values() if isinstance(r, RNNRecord) and r.feeds}
    out: dict[str, Axes] = {}
    for name, record in records.items():
        if isinstance(record, RNNRecord):
            out[name] = _rnn_axes(name, record, lists, named.get(name), sample, fed)
        elif isinstance(record, AttentionRecord):
            out[name] = _attention_axes(name, record, lists, named.get(name), sample)
    return out


# --- the returned value -------------------------------------------------------------------------------
def _parse(tokens: Any) -> tuple[dict[str, list[str]], dict[str, _Named]]:
    if not isinstance(tokens, Mapping):
        return {"input": _token_list(tokens, "`labels(batch)`")}, {}
    unknown = set(tokens) - {*ROLES, "modules"}
    if unknown:
        raise ValueError(
            f"`labels(batch)` may return the keys 'input', 'output' and 'modules', got "
            f"{', '.join(map(repr, sorted(unknown, key=str)))}; rename them (e.g. 'source' -> 'input', "
            "'target' -> 'output')."
        )
    lists = {k: _token_list(tokens[k], f"`labels(batch)[{k!r}]`") for k in ROLES if k in tokens}
    modules = tokens.get("modules")
    if modules is None:
        return lists, {}
    if not isinstance(modules, Mapping):
        raise ValueError(
            f"`labels(batch)['modules']` must map module names to {_CHOICES} or "
            f"{{'query': ..., 'key': ...}}, got {type(modules).__name__}; e.g. {{'decoder.rnn': 'output'}}."
        )
    named = {}
    for name, value in modules.items():
        if not isinstance(name, str):
            raise ValueError(f"`labels(batch)['modules']` keys are module names (str), got {name!r}.")
        named[name] = _entry(name, value)
    return lists, named


def _token_list(tokens: Any, where: str) -> list[str]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise ValueError(f"{where} must be a list of str (one token per time step), "
                         f"got {type(tokens).__name__}.")
    return [str(t) for t in tokens]


def _entry(name: str, value: Any) -> _Named:
    where = f"`labels(batch)['modules'][{name!r}]`"
    if isinstance(value, Mapping):
        unknown = set(value) - {"query", "key"}
        if unknown or not value:
            raise ValueError(
                f"{where} may have the keys 'query' and 'key', got {sorted(map(str, value)) or 'none'}; e.g. "
                "{'query': 'output', 'key': 'input'} for cross-attention."
            )
        query = _choice(value.get("query"), f"{where}['query']")
        return _Named(query, _choice(value.get("key"), f"{where}['key']"), True)
    if isinstance(value, tuple) and len(value) == 2 and all(v is None or v in ROLES for v in value):
        return _Named(value[0], value[1], True)
    choice = _choice(value, where)
    return _Named(choice, choice, False)


def _choice(value: Any, where: str) -> str | list[str] | None:
    if value is None or value in ROLES:
        return value
    if isinstance(value, str):
        raise ValueError(f"{where} is {value!r}; use {_CHOICES}.")
    if not isinstance(value, Sequence):
        raise ValueError(f"{where} must be {_CHOICES}, got {type(value).__name__}.")
    return [str(t) for t in value]


def _check_lengths(lists: Mapping[str, list[str]], records: Mapping[str, Any], sample: int) -> None:
    """Each list must fit at least one time axis of the drawn row."""
    lengths: set[int] = set()
    for record in records.values():
        if isinstance(record, RNNRecord):
            lengths.add(_time(record, sample))
        elif isinstance(record, AttentionRecord):
            queries, keys = record.attention.shape[-2:]
            lengths.update((queries, _keys(record, sample)))
    for axis, values in lists.items():
        if lengths and len(values) not in lengths:
            raise ValueError(
                f"`labels(batch)` returned {len(values)} {axis} tokens but the recorded sequences have "
                f"{', '.join(str(n) for n in sorted(lengths))} steps; return one token per time step of "
                f"batch row `sample={sample}`."
            )


# --- per module ---------------------------------------------------------------------------------------
def _time(record: RNNRecord, sample: int) -> int:
    return int(record.lengths[min(sample, record.batch - 1)])


def _keys(record: AttentionRecord, sample: int) -> int:
    """Real keys of the drawn row."""
    keys = record.attention.shape[-1]
    if record.key_lengths is None:
        return keys
    return min(keys, int(record.key_lengths[min(sample, record.attention.shape[0] - 1)]))


def _fits(tokens: list[str] | None, length: int) -> bool:
    return tokens is not None and len(tokens) == length


def _name_role(name: str) -> str | None:
    """``"input"`` or ``"output"`` from the last word ``enc``/``encoder...`` or ``dec``/``decoder...``."""
    for word in reversed(re.findall(r"[a-z]+", name.lower())):
        if word == "enc" or word.startswith("encoder"):
            return "input"
        if word == "dec" or word.startswith("decoder"):
            return "output"
    return None


def _name_says_self(name: str) -> bool | None:
    """``True``/``False`` from the last word ``self...``/``cross...`` of the name, else ``None``."""
    for word in reversed(re.findall(r"[a-z]+", name.lower())):
        if word.startswith("self"):
            return True
        if word.startswith("cross"):
            return False
    return None


def _stepwise(record: RNNRecord) -> bool:
    """One call per step: a cell in a loop, or a fused module called once per step from its last state."""
    shown = record.calls[0]
    return record.kind.endswith("Cell") or (len(shown) > 1 and record.call_starts is None)


def _resolve(name: str, choice: str | list[str] | None, lists: Mapping[str, list[str]], length: int,
             axis: str) -> list[str] | None:
    """An explicit choice's tokens, which must fit ``length``."""
    where = f"`labels(batch)['modules'][{name!r}]`"
    if choice is None:
        return None
    if isinstance(choice, str):
        if choice not in lists:
            other = next((r for r in ROLES if r in lists), None)
            fix = f"return them, or choose {other!r}" if other else "return them from `labels(batch)`"
            raise ValueError(f"{where} asks for the {choice!r} tokens, but `labels(batch)` returned no "
                             f"{choice!r} list; {fix}.")
        tokens, what = lists[choice], f"the {len(lists[choice])} {choice!r} tokens"
    else:
        tokens, what = choice, f"{len(choice)} tokens"
    if len(tokens) != length:
        raise ValueError(f"{where} gives {what} to a {axis} of {length} steps (batch row `sample`); give it "
                         "one token per step.")
    return tokens


def _rnn_axes(name: str, record: RNNRecord, lists: Mapping[str, list[str]], named: _Named | None,
              sample: int, fed: set[str]) -> Axes:
    length = _time(record, sample)
    if named is not None:
        if named.pair:
            raise ValueError(f"`labels(batch)['modules'][{name!r}]` gives query and key tokens to a "
                             f"recurrent module; give it {_CHOICES} for its time axis.")
        return Axes(time=_resolve(name, named.query, lists, length, "time axis"))
    fitting = [role for role in ROLES if _fits(lists.get(role), length)]
    if len(fitting) < 2:
        return Axes(time=lists[fitting[0]] if fitting else None)
    if name in fed:
        role = "output"
    elif record.feeds:
        role = "input"
    elif _stepwise(record):
        role = "output"
    else:
        role = _name_role(name) or "input"
    return Axes(time=lists[role])


def _causal(record: AttentionRecord, sample: int, steps: int) -> bool:
    """Whether each of the first ``steps`` queries may attend to the keys up to its own step only."""
    counts = record.key_counts
    if counts is None or steps < 2 or counts.shape[-1] < steps:
        return False
    row = counts[min(sample, counts.shape[0] - 1), :, :steps].cpu()
    return bool((row == (row.new_ones(steps).cumsum(0))).all())


def _attention_axes(name: str, record: AttentionRecord, lists: Mapping[str, list[str]], named: _Named | None,
                    sample: int) -> Axes:
    queries = record.attention.shape[-2]
    keys = _keys(record, sample)
    if named is not None:
        self_attention = named.query == named.key if named.pair else True
        shown = min(queries, keys) if self_attention and record.key_lengths is not None else queries
        return Axes(query=_resolve(name, named.query, lists, shown, "query axis"),
                    key=_resolve(name, named.key, lists, keys, "key axis"), self_attention=self_attention)
    inp, out = lists.get("input"), lists.get("output")
    if record.query_is_key is not None:
        self_attention = record.query_is_key
    elif queries != record.attention.shape[-1]:
        self_attention = False
    else:
        said = _name_says_self(name)
        self_attention = said if said is not None else not (_fits(out, queries) and _fits(inp, keys))
    if not self_attention:
        return Axes(query=out if _fits(out, queries) else None, key=inp if _fits(inp, keys) else None,
                    self_attention=False)
    fitting = [role for role in ROLES if _fits(lists.get(role), keys)]
    if len(fitting) == 2:
        role = "output" if _causal(record, sample, keys) else (_name_role(name) or "input")
    else:
        role = fitting[0] if fitting else None
    tokens = lists[role] if role else None
    shown = min(queries, keys) if record.key_lengths is not None else queries
    return Axes(query=tokens if _fits(tokens, shown) else None, key=tokens, self_attention=True)
