"""The attention classes of pytorch-forecasting, darts and neuralforecast are recorded without an extractor.

Each library's real class is built directly (small sizes) and run; its record is compared with a reference
computed here step by step from the module's own parameters: for each head, softmax over the keys of
``q_h k_h^T / sqrt(d)`` with the call's mask. The layouts the installed versions return are pinned too:
pytorch-forecasting and darts return ``(batch, T_out, heads, T_in)``, neuralforecast ``(batch, heads, T, T)``.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from lightning_rnnviz import Probe, RNNVizWarning
from lightning_rnnviz.probe.known import LibraryAttention, known_attention
from lightning_rnnviz.probe.targets import is_supported

BATCH, WIDTH = 3, 12


def _per_head_class(library: str) -> type[nn.Module]:
    if library == "pytorch-forecasting":
        module = pytest.importorskip("pytorch_forecasting.models.temporal_fusion_transformer.sub_modules")
        return module.InterpretableMultiHeadAttention
    module = pytest.importorskip("darts.models.components.tft_submodels")
    return module._InterpretableMultiHeadAttention


def _neuralforecast_class() -> type[nn.Module]:
    return pytest.importorskip("neuralforecast.models.tft").InterpretableMultiHeadAttention


def _per_head_reference(module: nn.Module, q: torch.Tensor, k: torch.Tensor, blocked: torch.Tensor | None):
    """``(batch, heads, T_out, T_in)``: one query and one key projection per head (``q_layers``, ``k_layers``)."""
    width = module.d_model // module.n_head
    heads = []
    for h in range(module.n_head):
        wq, bq = module.q_layers[h].weight.detach().double(), module.q_layers[h].bias.detach().double()
        wk, bk = module.k_layers[h].weight.detach().double(), module.k_layers[h].bias.detach().double()
        queries = torch.einsum("btd,ed->bte", q.double(), wq) + bq
        keys = torch.einsum("bsd,ed->bse", k.double(), wk) + bk
        scores = torch.einsum("bte,bse->bts", queries, keys) / math.sqrt(width)
        if blocked is not None:
            scores = scores.masked_fill(blocked, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1))
    return torch.stack(heads, dim=1).float()


def _neuralforecast_reference(module: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    """``(batch, heads, T, T)``: queries, keys (every head) and one value from ``qkv_linears``."""
    heads, width = module.n_head, module.d_head
    weight = module.qkv_linears.weight.detach().double()  # rows: queries of every head, keys of every head, value
    steps = x.shape[1]
    rows = []
    for h in range(heads):
        wq = weight[h * width:(h + 1) * width]
        wk = weight[(heads + h) * width:(heads + h + 1) * width]
        scores = torch.einsum("btd,ed->bte", x.double(), wq) @ torch.einsum("bsd,ed->bse", x.double(), wk).transpose(1, 2)
        scores = scores / math.sqrt(width)
        if causal:
            scores = scores.masked_fill(torch.ones(steps, steps, dtype=torch.bool).triu(1), float("-inf"))
        rows.append(torch.softmax(scores, dim=-1))
    return torch.stack(rows, dim=1).float()


def _counts(blocked: torch.Tensor) -> torch.Tensor:
    return (~blocked).sum(-1).unsqueeze(1)  # (batch, 1, T_out)


def _tft_mask(batch: int, queries: int, encoder: int, lengths: list[int]) -> torch.Tensor:
    """The TFT mask (True = blocked): encoder padding beyond each sequence's length, and no decoder step at
    or after the query (pytorch-forecasting's causal rule)."""
    padded = torch.arange(encoder)[None, :] >= torch.tensor(lengths)[:, None]  # (B, encoder)
    future = torch.arange(queries)[None, :] >= torch.arange(queries)[:, None]  # (queries, queries)
    return torch.cat([padded[:, None, :].expand(batch, queries, encoder),
                      future[None].expand(batch, queries, queries)], dim=2)


@pytest.mark.parametrize("library", ["pytorch-forecasting", "darts"])
@pytest.mark.parametrize(("heads", "queries"), [(3, 4), (4, 4)], ids=["heads!=queries", "heads==queries"])
def test_per_head_classes_are_recorded_in_heads_first_order(library, heads, queries):
    cls = _per_head_class(library)
    torch.manual_seed(0)
    module = cls(n_head=heads, d_model=WIDTH)
    encoder = 6
    q = torch.randn(BATCH, queries, WIDTH)
    k = torch.randn(BATCH, encoder + queries, WIDTH)
    mask = _tft_mask(BATCH, queries, encoder, [6, 4, 5])
    probe = Probe(module, strict=True)
    with probe.record() as rec:
        out, returned = module(q, k, k, mask=mask)
        out.pow(2).sum().backward()
    record = rec[""]
    expected = _per_head_reference(module, q, k, mask)
    # the layout this version returns, pinned: the heads on axis 2
    assert returned.shape == (BATCH, queries, heads, encoder + queries)
    assert record.kind == cls.__name__
    assert record.attention.shape == (BATCH, heads, queries, encoder + queries)
    torch.testing.assert_close(record.attention, expected, rtol=0, atol=1e-6)
    # the weights the module returned, not recomputed: equal bit for bit
    assert torch.equal(record.attention, returned.detach().transpose(1, 2))
    assert torch.equal(record.key_counts, _counts(mask))
    assert record.exact and record.key_lengths is None


@pytest.mark.parametrize("library", ["pytorch-forecasting", "darts"])
def test_per_head_classes_without_mask_and_with_a_few_samples(library):
    cls = _per_head_class(library)
    torch.manual_seed(1)
    module = cls(n_head=2, d_model=WIDTH)
    q, k = torch.randn(BATCH, 3, WIDTH), torch.randn(BATCH, 5, WIDTH)
    with Probe(module, strict=True).record(max_samples=2) as rec:
        module(q, k, k)
    record = rec[""]
    torch.testing.assert_close(record.attention, _per_head_reference(module, q, k, None)[:2], rtol=0, atol=1e-6)
    assert record.key_counts is None


@pytest.mark.parametrize("library", ["pytorch-forecasting", "darts"])
def test_dropout_on_the_returned_weights_is_left_out(library):
    """Neither TFT puts dropout on the weights it returns; where a model does (the scaled dot-product part's
    own ``dropout``), the record is the weights before it, recomputed from the module's parameters."""
    cls = _per_head_class(library)
    torch.manual_seed(2)
    module = cls(n_head=2, d_model=WIDTH)
    module.attention.dropout = nn.Dropout(0.5)
    module.train()
    q, k = torch.randn(BATCH, 4, WIDTH), torch.randn(BATCH, 9, WIDTH)
    mask = _tft_mask(BATCH, 4, 5, [5, 3, 4])
    with Probe(module, strict=True).record(max_samples=2) as rec:
        _, returned = module(q, k, k, mask=mask)
    record = rec[""]
    assert not torch.allclose(returned.transpose(1, 2)[:2], record.attention)  # those were dropped out
    torch.testing.assert_close(record.attention, _per_head_reference(module, q, k, mask)[:2], rtol=0, atol=1e-6)
    assert torch.equal(record.key_counts, _counts(mask)[:2])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_neuralforecast_is_recorded_before_its_attention_dropout(causal, training):
    cls = _neuralforecast_class()
    torch.manual_seed(3)
    steps = 5
    module = cls(n_head=3, hidden_size=WIDTH, example_length=steps, attn_dropout=0.3, dropout=0.1)
    module.train(training)
    x = torch.randn(BATCH, steps, WIDTH)
    with Probe(module, strict=True).record() as rec:
        out, returned = module(x, mask_future_timesteps=causal)
        out.sum().backward()
    record = rec[""]
    assert returned.shape == (BATCH, 3, steps, steps)  # this version's layout, pinned: heads on axis 1
    assert record.kind == "InterpretableMultiHeadAttention"
    assert record.attention.shape == (BATCH, 3, steps, steps)
    torch.testing.assert_close(record.attention, _neuralforecast_reference(module, x, causal), rtol=0, atol=1e-6)
    if training:  # the weights it returned were dropped out; the record is before dropout
        assert not torch.allclose(returned.detach(), record.attention)
    else:
        assert torch.equal(record.attention, returned.detach())
    if causal:
        expected = torch.arange(1, steps + 1).expand(BATCH, 1, steps)
        assert torch.equal(record.key_counts, expected)
    else:
        assert record.key_counts is None


def test_recording_never_changes_the_libraries_outputs_nor_the_generator():
    cls = _neuralforecast_class()
    per_head = _per_head_class("pytorch-forecasting")
    torch.manual_seed(4)
    modules = [cls(n_head=2, hidden_size=WIDTH, example_length=4, attn_dropout=0.3, dropout=0.2),
               per_head(n_head=2, d_model=WIDTH, dropout=0.2)]
    x = torch.randn(BATCH, 4, WIDTH)

    def run(module, probe):
        torch.manual_seed(5)
        args = (x,) if isinstance(module, cls) else (x, x, x)
        if probe is None:
            out = module(*args)
        else:
            with probe.record():
                out = module(*args)
        return out, torch.get_rng_state()

    for module in modules:
        module.train()
        (plain, state), (watched, state_watched) = run(module, None), run(module, Probe(module, strict=True))
        assert torch.equal(plain[0], watched[0]) and torch.equal(plain[1], watched[1])
        assert torch.equal(state, state_watched)


def test_known_classes_are_supported_and_recognised_through_subclasses():
    per_head = _per_head_class("pytorch-forecasting")

    class Renamed(per_head):  # a subclass that keeps the library's forward: read the same way
        pass

    class Changed(per_head):  # its own forward may return anything: not read, and warned
        def forward(self, q, k, v, mask=None):
            return super().forward(q, k, v, mask)

    assert isinstance(per_head(n_head=2, d_model=4), LibraryAttention) and is_supported(Renamed(2, 4))
    assert known_attention(Renamed) is known_attention(per_head) is not None
    assert known_attention(Changed) is None and not isinstance(Changed(2, 4), LibraryAttention)
    assert not isinstance(nn.Linear(2, 2), LibraryAttention)

    model = nn.ModuleDict({"renamed": Renamed(2, WIDTH), "changed": Changed(2, WIDTH), "rnn": nn.GRU(WIDTH, 4)})
    # the whole is named (an attention class by its base), not its scaled dot-product part
    messages = _unreadable_warnings(model)
    assert len(messages) == 1 and "module 'changed' (Changed)" in messages[0]
    with pytest.warns(RNNVizWarning, match="module 'changed'"):
        assert set(Probe(model).targets) == {"renamed", "rnn"}
    assert set(Probe(model, modules=["renamed"]).targets) == {"renamed"}


class AdditiveAttention(nn.Module):
    """Bahdanau attention; returns ``(context, weights (batch, T_in))``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.score = nn.Linear(2 * width, 1)

    def forward(self, query, keys):
        expanded = query[:, None].expand(-1, keys.shape[1], -1)
        weights = torch.softmax(self.score(torch.cat([expanded, keys], -1)).squeeze(-1), dim=-1)
        return (weights[:, :, None] * keys).sum(1), weights


class AttnDecoder(nn.Module):
    """A decoder named for its attention: the attention child is the module to name, not the decoder."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attention = AdditiveAttention(width)
        self.cell = nn.GRUCell(width, width)


class SelfAttentionBlock(nn.Module):
    """A container of readable attention."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(width, 2, batch_first=True)


def _unreadable_warnings(model: nn.Module, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Probe(model, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)]


def test_an_attention_class_nothing_reads_is_warned_once_with_the_extractor_form():
    model = nn.ModuleDict({"decoder": AttnDecoder(4), "block": SelfAttentionBlock(4),
                           "post_attn_gate_norm": nn.Linear(4, 4), "attn": nn.Linear(4, 4)})
    messages = _unreadable_warnings(model)
    assert len(messages) == 1
    assert "'decoder.attention' (AdditiveAttention)" in messages[0]
    form = "`attention={'decoder.attention': lambda module, args, output: <weights (batch, heads, T_out, T_in)>}`"
    assert form in messages[0]
    # read through an extractor, or modules named: no warning
    assert _unreadable_warnings(model, attention={"decoder.attention": lambda m, a, out: out[1]}) == []
    assert _unreadable_warnings(model, modules=["block.mha"]) == []


def test_many_unreadable_attention_modules_make_one_warning():
    model = nn.ModuleDict({"layers": nn.ModuleList([AttnDecoder(4) for _ in range(6)]), "rnn": nn.GRU(4, 4)})
    messages = _unreadable_warnings(model)
    assert len(messages) == 1
    assert "modules 'layers.0.attention' (AdditiveAttention), 'layers.1.attention'" in messages[0]
    assert "'layers.3.attention' (AdditiveAttention) and 2 more" in messages[0]
    assert "a key may be an fnmatch pattern" in messages[0]
    assert _unreadable_warnings(model, attention={"layers.*.attention": lambda m, a, out: out[1]}) == []


def test_a_model_with_only_unreadable_attention_names_it_in_the_error():
    with pytest.raises(ValueError, match=re.escape("e.g. `attention={'attention': lambda module, args, output")):
        Probe(nn.ModuleDict({"attention": AdditiveAttention(4)}))


def test_the_libraries_own_models_warn_of_nothing():
    """pytorch-forecasting's TFT: ``post_attn_gate_norm`` is a GateAddNorm and the scaled dot-product
    module inside ``multihead_attn`` is read with it; darts' and neuralforecast's TFT parts likewise."""
    per_head = _per_head_class("pytorch-forecasting")
    darts_class = _per_head_class("darts")
    nf_class = _neuralforecast_class()
    model = nn.ModuleDict({"pf": per_head(2, WIDTH), "darts": darts_class(2, WIDTH),
                           "nf": nf_class(n_head=2, hidden_size=WIDTH, example_length=3, attn_dropout=0.0, dropout=0.0)})
    assert _unreadable_warnings(model) == []
    assert set(Probe(model).targets) == {"pf", "darts", "nf"}


# --- what an extractor returns, checked against the head count and the known layouts ------------------------


class Heads(nn.Module):
    """A custom attention that reveals its head count; returns ``(context, weights (B, H, T_out, T_in))``."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def forward(self, q, k):
        scores = torch.einsum("bqd,bkd->bqk", q, k)[:, None].expand(-1, self.num_heads, -1, -1)
        weights = torch.softmax(scores / torch.arange(1.0, self.num_heads + 1)[None, :, None, None], dim=-1)
        return weights @ k[:, None], weights


def _check_message(model, extractor, *inputs, match):
    probe = Probe(model, attention={"": extractor})
    with pytest.warns(RNNVizWarning, match=match):
        with probe.record() as rec:
            model(*inputs)
    assert "" not in rec and "" in rec.errors


def test_an_extractor_with_the_heads_on_the_wrong_axis_is_an_error_naming_the_axes():
    torch.manual_seed(6)
    q, k = torch.randn(2, 5, 8), torch.randn(2, 7, 8)

    def heads_second(module, args, output):
        return output[1].transpose(1, 2)

    _check_message(Heads(3), heads_second, q, k, match=(
        r"extractor `.*heads_second` returned shape \(2, 5, 3, 7\) for module '', whose axis 1 has 5 entries, "
        r"but the module has num_heads=3; expected \(batch, heads=3, T_out, T_in\) .*; axis 2 has 3: return "
        r"`weights.transpose\(1, 2\)`"))
    with Probe(Heads(3), attention={"": lambda m, a, out: out[1]}, strict=True).record() as rec:
        Heads(3)(q, k)
    assert rec.errors == {}


@pytest.mark.parametrize("library", ["pytorch-forecasting", "darts"])
@pytest.mark.parametrize("queries", [5, 3], ids=["heads!=queries", "heads==queries"])
def test_the_obvious_extractor_of_the_per_head_libraries_is_an_error(library, queries):
    cls = _per_head_class(library)
    torch.manual_seed(7)
    module = cls(n_head=3, d_model=WIDTH)
    q, k = torch.randn(2, queries, WIDTH), torch.randn(2, 6, WIDTH)

    def second_output(module, args, output):
        return output[1]

    # also where heads and queries are as many, which no shape can tell
    match = (rf"returned shape \(2, {queries}, 3, 6\) for module '' \(`{cls.__qualname__}` of {re.escape(library)}\): "
             r"its weights with the heads on axis 2; expected \(batch, heads=3, T_out, T_in\): return "
             r"`weights.transpose\(1, 2\)`, or leave the module out of `attention=`")
    _check_message(module, second_output, q, k, k, match=match)
    right = Probe(module, attention={"": lambda m, a, out: out[1].transpose(1, 2)}, strict=True)
    with right.record() as rec:
        module(q, k, k)
    assert rec[""].kind == "custom"
    torch.testing.assert_close(rec[""].attention, _per_head_reference(module, q, k, None), rtol=0, atol=1e-6)


def test_neuralforecast_square_weights_transposed_by_an_extractor_are_an_error():
    cls = _neuralforecast_class()
    torch.manual_seed(8)
    module = cls(n_head=4, hidden_size=WIDTH, example_length=4, attn_dropout=0.0, dropout=0.0).eval()
    x = torch.randn(2, 4, WIDTH)
    _check_message(module, lambda m, a, out: out[1].transpose(1, 2), x,
                   match=r"its weights with the heads on axis 2; expected \(batch, heads=4, T_out, T_in\)")
    with Probe(module, attention={"": lambda m, a, out: out[1]}, strict=True).record() as rec:
        module(x)
    torch.testing.assert_close(rec[""].attention, _neuralforecast_reference(module, x, True), rtol=0, atol=1e-6)


# --- a whole model of each library ----------------------------------------------------------------------------


def _tiny_tft():
    """pytorch-forecasting's TFT on a tiny data set whose encoder lengths differ, and one batch of it."""
    pd = pytest.importorskip("pandas")
    forecasting = pytest.importorskip("pytorch_forecasting")
    steps = 30
    frame = pd.DataFrame({"series": [s for s in "abc" for _ in range(steps)],
                          "time_idx": list(range(steps)) * 3,
                          "value": torch.randn(3 * steps, generator=torch.Generator().manual_seed(0)).tolist()})
    frame = frame[~((frame.series == "c") & (frame.time_idx < 24))]  # one short series: 6 steps
    data = forecasting.TimeSeriesDataSet(
        frame, time_idx="time_idx", target="value", group_ids=["series"], min_encoder_length=2,
        max_encoder_length=8, max_prediction_length=4, time_varying_unknown_reals=["value"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own advice on hyperparameters
        model = forecasting.TemporalFusionTransformer.from_dataset(
            data, hidden_size=8, attention_head_size=2, hidden_continuous_size=4, dropout=0.1)
    loader = data.to_dataloader(train=False, batch_size=64, num_workers=0)
    return model, data, loader


def test_pytorch_forecasting_tft_records_its_attention_with_the_encoder_padding():
    model, _, loader = _tiny_tft()
    x, y = next(iter(loader))
    assert len(set(x["encoder_lengths"].tolist())) > 1  # the batch mixes encoder lengths
    assert _unreadable_warnings(model) == []  # post_attn_gate_norm and the scaled dot-product part: no word
    model.train()
    with Probe(model, strict=True).record() as rec:
        out = model(x)
        model.loss(out["prediction"], y).backward()
    record = rec["multihead_attn"]
    batch, encoder, decoder = len(x["encoder_lengths"]), int(x["encoder_lengths"].max()), 4
    assert record.attention.shape == (batch, 2, decoder, encoder + decoder)
    # encoder steps past each sequence's length, and decoder steps at or after the query, are blocked
    expected = x["encoder_lengths"][:, None, None] + torch.arange(decoder)[None, None, :]
    assert torch.equal(record.key_counts, expected)
    # the weights the model itself returns, (batch, T_out, heads, T_in) split at the encoder's end
    returned = torch.cat([out["encoder_attention"], out["decoder_attention"]], dim=-1).detach()
    assert torch.equal(record.attention, returned.transpose(1, 2))
    for b, length in enumerate(x["encoder_lengths"].tolist()):
        assert not record.attention[b, :, :, length:encoder].any()  # padded encoder steps get no weight
    sums = record.attention.sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


def test_rnnviz_draws_the_pytorch_forecasting_tft_attention(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_rnnviz import RNNViz
    from tests.helpers.events import RunEvents

    model, data, _ = _tiny_tft()
    loader = data.to_dataloader(train=True, batch_size=8, num_workers=0)
    trainer = pl.Trainer(max_steps=2, logger=TensorBoardLogger(tmp_path), callbacks=[RNNViz(every_n_steps=1)],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1, limit_val_batches=0, accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader)
    assert [str(w.message) for w in caught if issubclass(w.category, RNNVizWarning)] == []
    images = {tag for run in RunEvents(tmp_path).runs.values() for tag in run.Tags()["images"]}
    assert "rnnviz/attention/multihead_attn" in images
