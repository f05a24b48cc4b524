"""Our batch-first Transformer layers compute exactly what torch.nn's layers compute, with the same weights."""

import pytest
import torch
from torch import nn

from missrec.nn.layers import ByteDropout, DecoderLayer, EncoderLayer, key_mask


def _masks():
    x_len = torch.tensor([7, 3, 1, 5, 2])
    m_len = torch.tensor([4, 1, 2, 3, 4])
    x_pad = torch.arange(7)[None] >= x_len[:, None]
    m_pad = torch.arange(4)[None] >= m_len[:, None]
    return x_pad, m_pad


def test_encoder_layer_matches_torch():
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, 48, 0.5, activation="gelu", batch_first=True).eval()
    ours = EncoderLayer(32, 4, 48, 0.5).eval()
    ours.load_state_dict(ref.state_dict())  # same parameter names and shapes
    _, m_pad = _masks()
    x = torch.randn(5, 4, 32)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=m_pad)
        got = ours(x, key_mask(~m_pad))
    assert torch.allclose(expected[~m_pad], got[~m_pad], atol=1e-5)


def test_decoder_layer_matches_torch():
    torch.manual_seed(1)
    ref = nn.TransformerDecoderLayer(32, 4, 48, 0.5, activation="gelu", batch_first=True).eval()
    ours = DecoderLayer(32, 4, 48, 0.5).eval()
    ours.load_state_dict(ref.state_dict())
    x_pad, m_pad = _masks()
    x, mem = torch.randn(5, 7, 32), torch.randn(5, 4, 32)
    with torch.no_grad():
        expected = ref(x, mem, tgt_key_padding_mask=x_pad, memory_key_padding_mask=m_pad)
        got = ours(x, mem, key_mask(~x_pad), key_mask(~m_pad))
    assert torch.allclose(expected[~x_pad], got[~x_pad], atol=1e-5)


def test_causal_encoder_matches_torch():
    torch.manual_seed(2)
    ref = nn.TransformerEncoderLayer(32, 2, 48, 0.0, activation="gelu", batch_first=True).eval()
    ours = EncoderLayer(32, 2, 48, 0.0).eval()
    ours.load_state_dict(ref.state_dict())
    x_pad, _ = _masks()
    x = torch.randn(5, 7, 32)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = ref(x, src_mask=~causal, src_key_padding_mask=x_pad)
        got = ours(x, causal[None, None] & key_mask(~x_pad))
    assert torch.allclose(expected[~x_pad], got[~x_pad], atol=1e-5)


def test_byte_dropout_is_unbiased_and_identity_in_eval():
    torch.manual_seed(0)
    drop = ByteDropout(0.5)
    x = torch.ones(200_000)
    y = drop(x)
    assert set(torch.unique(y).tolist()) == {0.0, 2.0}
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    drop.eval()
    assert torch.equal(drop(x), x)
    odd = ByteDropout(0.3)
    assert odd(x).mean().item() == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError):
        ByteDropout(1.0)


def test_decoder_last_query_equals_full_output_at_that_position():
    torch.manual_seed(3)
    ref = nn.TransformerDecoderLayer(32, 4, 48, 0.5, activation="gelu", batch_first=True).eval()
    ours = DecoderLayer(32, 4, 48, 0.5).eval()
    ours.load_state_dict(ref.state_dict())
    x_pad, m_pad = _masks()
    lengths = (~x_pad).sum(1)
    x, mem = torch.randn(5, 7, 32), torch.randn(5, 4, 32)
    with torch.no_grad():
        full = ref(x, mem, tgt_key_padding_mask=x_pad, memory_key_padding_mask=m_pad)
        expected = full[torch.arange(5), lengths - 1]
        got = ours(x, mem, key_mask(~x_pad), key_mask(~m_pad), query_index=(lengths - 1)[:, None])
    assert got.shape == (5, 1, 32)
    assert torch.allclose(got[:, 0], expected, atol=1e-5)
