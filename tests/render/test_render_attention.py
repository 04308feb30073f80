import math
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_rnnviz.probe.records import AttentionRecord
from lightning_rnnviz.render import (
    attention_stats,
    draw_attention,
    figure_to_png,
    figure_to_rgb,
    paint_attention,
    reduce_attention,
)
from lightning_rnnviz.render.attention import is_self_attention


def uniform_over_real_keys(
    key_lengths: list[int], heads: int = 2, queries: int = 3, keys: int = 4
) -> AttentionRecord:
    lengths = torch.tensor(key_lengths)
    real = (torch.arange(keys)[None, :] < lengths[:, None]).float()  # (B, Tk)
    weights = (real / lengths[:, None]).reshape(len(key_lengths), 1, 1, keys).expand(-1, heads, queries, -1)
    return AttentionRecord("attn", "MultiheadAttention", weights.clone(), lengths)


def test_uniform_attention_has_maximal_entropy():
    stats = attention_stats(uniform_over_real_keys([4, 2]))
    assert set(stats) == {f"{s}/head{h}" for s in ("entropy", "entropy_norm", "focus") for h in range(2)}
    assert stats["entropy/head0"] == pytest.approx((math.log(4) + math.log(2)) / 2)
    assert stats["entropy_norm/head1"] == pytest.approx(1.0)
    assert stats["focus/head0"] == pytest.approx((1 / 4 + 1 / 2) / 2)


def test_padded_query_rows_of_self_attention_are_left_out_of_the_statistics():
    """``nn.MultiheadAttention(x, x, x, key_padding_mask=...)``: the rows of padded steps are padding (they are
    cropped from the picture too), so a sequence of 2 real steps in 4 weighs its 2 real queries only."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(4, 1, batch_first=True).eval()
    x = torch.randn(2, 4, 4)
    padding = torch.tensor([[False] * 4, [False, False, True, True]])
    with torch.no_grad():
        weights = attn(x, x, x, key_padding_mask=padding)[1].unsqueeze(1)  # (B, 1, Tq, Tk)
    lengths = torch.tensor([4, 2])
    record = AttentionRecord("attn", "MultiheadAttention", weights, lengths, query_is_key=True)
    stats = attention_stats(record)

    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.clamp_min(1e-30).log()).sum())

    real_rows = [weights[0, 0, q] for q in range(4)] + [weights[1, 0, q] for q in range(2)]
    assert stats["entropy/head0"] == pytest.approx(sum(entropy(p) for p in real_rows) / 6)
    assert stats["focus/head0"] == pytest.approx(sum(float(p.max()) for p in real_rows) / 6)
    # a cross-attention of as many queries as keys keeps every query: its queries are not the padded keys
    cross = attention_stats(AttentionRecord("attn", "MultiheadAttention", weights, lengths, query_is_key=False))
    assert cross["focus/head0"] == pytest.approx(float(weights[:, 0].amax(-1).mean()))


def test_one_hot_and_mixed_heads():
    weights = torch.zeros(1, 2, 2, 3)
    weights[0, 0, :, 1] = 1.0
    weights[0, 1] = torch.tensor([0.5, 0.25, 0.25])
    stats = attention_stats(AttentionRecord("attn", "custom", weights))
    assert (
        stats["entropy/head0"] == 0.0 and stats["entropy_norm/head0"] == 0.0 and stats["focus/head0"] == 1.0
    )
    assert stats["entropy/head1"] == pytest.approx(1.5 * math.log(2))
    assert stats["entropy_norm/head1"] == pytest.approx(1.5 * math.log(2) / math.log(3))
    assert stats["focus/head1"] == pytest.approx(0.5)


def test_padded_keys_are_ignored_and_single_key_rows_are_left_out_of_entropy_norm():
    record = uniform_over_real_keys([4, 1])
    record.attention[1, :, :, 1:] = float("nan")  # junk in padded keys must not leak into the statistics
    stats = attention_stats(record)
    assert stats["entropy/head0"] == pytest.approx(math.log(4) / 2)
    assert stats["entropy_norm/head0"] == pytest.approx(1.0)  # one key: no entropy information
    assert stats["focus/head0"] == pytest.approx((0.25 + 1.0) / 2)
    only_single = attention_stats(uniform_over_real_keys([1, 1]))
    assert math.isnan(only_single["entropy_norm/head0"]) and only_single["entropy/head0"] == 0.0


def causal_uniform(steps: int, heads: int = 1) -> AttentionRecord:
    """Query ``t`` uniform over keys ``0..t``, with the counts the probe records for a causal mask."""
    allowed = torch.ones(steps, steps).tril()
    weights = (allowed / allowed.sum(-1, keepdim=True)).expand(2, heads, steps, steps).clone()
    counts = torch.arange(1, steps + 1).expand(2, 1, steps)
    return AttentionRecord("attn", "MultiheadAttention", weights, key_counts=counts)


def test_entropy_norm_divides_each_query_by_its_own_allowed_keys():
    record = causal_uniform(8, heads=2)
    stats = attention_stats(record)
    assert stats["entropy_norm/head0"] == pytest.approx(1.0, abs=1e-6)
    assert stats["entropy_norm/head1"] == pytest.approx(1.0, abs=1e-6)
    # every query counts for the entropy in nats, the one-key query 0 included
    assert stats["entropy/head0"] == pytest.approx(sum(math.log(t) for t in range(1, 9)) / 8)
    # what dividing by log of the key length read for the same attention
    old = sum(math.log(t) / math.log(8) for t in range(2, 9)) / 8
    assert old < 0.75


def test_key_counts_per_head_and_fully_masked_queries():
    weights = torch.zeros(1, 2, 2, 3)
    weights[0, 0] = torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    weights[0, 1, 0] = float("nan")  # head 1, query 0: no allowed key
    weights[0, 1, 1] = torch.tensor([0.0, 0.0, 1.0])
    counts = torch.tensor([[[2, 3], [0, 3]]])
    stats = attention_stats(AttentionRecord("attn", "MultiheadAttention", weights, key_counts=counts))
    assert stats["entropy_norm/head0"] == pytest.approx(1.0)
    assert stats["entropy_norm/head1"] == 0.0 and stats["entropy/head1"] == 0.0
    assert stats["focus/head1"] == 1.0


@settings(max_examples=30, deadline=None)
@given(
    keys=st.integers(2, 12),
    queries=st.integers(1, 5),
    scale=st.floats(0.0, 20.0),
    seed=st.integers(0, 1000),
)
def test_statistics_bounds(keys, queries, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    weights = (torch.randn(2, 3, queries, keys, generator=generator) * scale).softmax(-1)
    stats = attention_stats(AttentionRecord("attn", "custom", weights))
    for h in range(3):
        assert -1e-9 <= stats[f"entropy/head{h}"] <= math.log(keys) + 1e-6
        assert -1e-9 <= stats[f"entropy_norm/head{h}"] <= 1 + 1e-6
        assert 1 / keys - 1e-6 <= stats[f"focus/head{h}"] <= 1 + 1e-6


def test_reduce_crops_padding_and_caps_heads(attention_record, image_ok):
    record = attention_record(batch=2, heads=12, queries=6, keys=9, key_lengths=[9, 5])
    payload = reduce_attention(record, sample=1)
    assert payload["weights"].shape == (8, 6, 5) and payload["heads"] == 12
    np.testing.assert_allclose(payload["weights"].sum(-1), 1.0, rtol=1e-5)
    fig = draw_attention(payload, step=3)
    assert "showing 8 of 12 heads" in fig.get_suptitle()
    assert [ax.get_title(loc="left") for ax in fig.axes[:8]] == [f"head {h}" for h in range(8)]
    image_ok(figure_to_rgb(fig))
    assert len(figure_to_png(fig)) < 150_000
    assert "showing" not in draw_attention(reduce_attention(record, max_heads=12)).get_suptitle()


def test_token_labels(attention_record):
    record = attention_record(batch=1, heads=2, queries=4, keys=6, key_lengths=[5])
    queries, keys = ["a", "b", "c", "d"], ["<s>", "x", "y", "z", "</s>", "<pad>"]
    payload = reduce_attention(record, query_labels=queries, key_labels=keys)
    assert payload["key_labels"] == keys[:5] and payload["query_labels"] == queries
    fig = draw_attention(payload)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == keys[:5]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == queries
    with pytest.raises(ValueError, match="`query_labels` has 2 entries but 4 steps"):
        reduce_attention(record, query_labels=["a", "b"])


def test_long_axes_are_binned(attention_record, image_ok):
    record = attention_record(batch=1, heads=2, queries=600, keys=700)
    payload = reduce_attention(record, query_labels=[str(i) for i in range(600)])
    assert payload["query_bin"] == 3 and payload["key_bin"] == 3
    assert payload["weights"].shape == (2, 200, 234) and payload["query_labels"] is None
    np.testing.assert_allclose(payload["weights"].sum(-1), 1.0, rtol=1e-4)  # key bins are summed
    assert len(pickle.dumps(payload)) < 500_000
    fig = draw_attention(payload)
    assert fig.axes[0].get_xlabel() == "key (input) step (bins of 3)"
    image_ok(figure_to_rgb(fig))


def test_nan_attention_is_drawn_and_named(attention_record, image_ok, shows_bad_color):
    record = attention_record(batch=1, heads=3, queries=5, keys=5)
    record.attention[0, 1, 2] = float("nan")  # a query with every key masked
    payload = reduce_attention(record)
    fig = draw_attention(payload)
    assert "contains NaN" in fig.get_suptitle()
    rgb = figure_to_rgb(fig)
    image_ok(rgb)
    assert shows_bad_color(rgb)
    assert math.isnan(attention_stats(record)["entropy/head1"])


def test_no_real_keys_draws_a_message(attention_record):
    record = attention_record(batch=2, heads=1, key_lengths=[8, 0])
    figure_to_rgb(draw_attention(reduce_attention(record, sample=1)))


def test_argument_errors(attention_record):
    record = attention_record(batch=2)
    with pytest.raises(ValueError, match=r"`sample`=-1 is out of range"):
        reduce_attention(record, sample=-1)
    with pytest.raises(ValueError, match="`max_heads`=0 must be a positive int"):
        reduce_attention(record, max_heads=0)


def _padded_self_attention(lengths: tuple[int, ...] = (12, 7), heads: int = 2) -> AttentionRecord:
    """``nn.MultiheadAttention`` over one right-padded batch (query is key), as the Probe records it: the
    padded queries' rows attend to the real keys and look like any other row."""
    torch.manual_seed(0)
    steps = max(lengths)
    mha = torch.nn.MultiheadAttention(16, heads, batch_first=True)
    x = torch.randn(len(lengths), steps, 16)
    mask = torch.arange(steps)[None, :] >= torch.tensor(lengths)[:, None]
    _, weights = mha(x, x, x, key_padding_mask=mask, average_attn_weights=False)
    return AttentionRecord("encoder.self_attn", "MultiheadAttention", weights.detach(), torch.tensor(lengths))


def test_self_attention_crops_padded_queries_as_well_as_keys(image_ok):
    record = _padded_self_attention()
    assert is_self_attention(record)
    tokens = [f"w{i}" for i in range(7)]  # the real tokens of sample 1, on both axes
    payload = reduce_attention(record, sample=1, query_labels=tokens, key_labels=tokens)
    assert payload["weights"].shape == (2, 7, 7)
    assert (payload["queries"], payload["keys"], payload["self_attention"]) == (7, 7, True)
    np.testing.assert_allclose(payload["weights"], record.attention[1, :, :7, :7].numpy())
    assert payload["vmax"] == pytest.approx(float(record.attention[1, :, :7, :7].max()))  # padded rows left out
    fig = draw_attention(payload)
    assert fig.axes[0].get_ylim() == (6.5, -0.5)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == tokens
    image_ok(figure_to_rgb(fig))
    full = reduce_attention(record, sample=0)  # the longest sequence has no padding to crop
    assert full["weights"].shape == (2, 12, 12)


def test_padded_query_rows_are_not_painted(shows_bad_color):
    record = _padded_self_attention()
    record.attention[1, :, 7:] = float("nan")  # mark the padded queries' rows
    payload = reduce_attention(record, sample=1)
    assert payload["nonfinite"] == ""
    for rgb in (paint_attention(payload), figure_to_rgb(draw_attention(payload))):
        assert not shows_bad_color(rgb)


def test_cross_attention_keeps_its_queries():
    record = _padded_self_attention()
    payload = reduce_attention(record, sample=1, self_attention=False)  # e.g. source and target both 12 long
    assert payload["weights"].shape == (2, 12, 7) and payload["self_attention"] is False
    fewer = AttentionRecord("dec.attn", "MultiheadAttention", record.attention[:, :, :5], record.key_lengths)
    assert not is_self_attention(fewer)  # 5 queries over 12 keys
    assert reduce_attention(fewer, sample=1)["weights"].shape == (2, 5, 7)
    unknown = AttentionRecord("attn", "MultiheadAttention", record.attention)  # no padding mask known
    assert not is_self_attention(unknown)
    # self-attention with add_zero_attn: one more key than queries, said by the caller
    extra = torch.cat([record.attention, torch.zeros(2, 2, 12, 1)], dim=-1)
    zero_attn = AttentionRecord("attn", "MultiheadAttention", extra, record.key_lengths)
    assert not is_self_attention(zero_attn)
    assert reduce_attention(zero_attn, sample=1, self_attention=True)["weights"].shape == (2, 7, 7)
