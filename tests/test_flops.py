"""core/flops: MACs checked against hand-computed formulas (attention products included)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

from mlops_cli.core import zoo
from mlops_cli.core.flops import attention_macs, count_macs, profile_forward

BATCH, SEQ = 2, 16


def text_inputs(vocab: int, batch: int = BATCH, seq: int = SEQ) -> dict[str, np.ndarray]:
    """Numpy inputs with real padding in the mask (MACs do not depend on it: kernels are dense)."""
    rng = np.random.default_rng(0)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[1, seq // 2:] = 0
    return {"input_ids": rng.integers(5, vocab, (batch, seq)), "attention_mask": mask}


def bert_macs(config: Any, batch: int, seq: int, with_attention: bool = True) -> int:
    """Hand count for BertForSequenceClassification: embeddings are lookups (0 MACs)."""
    hidden, inter, labels = config.hidden_size, config.intermediate_size, config.num_labels
    tokens = batch * seq
    projections = 4 * tokens * hidden * hidden  # query, key, value, attention output
    attention = 2 * batch * seq * seq * hidden  # q·kᵀ and attention·v over all heads
    ffn = 2 * tokens * hidden * inter
    per_layer = projections + ffn + (attention if with_attention else 0)
    pooler = batch * hidden * hidden  # first token only
    classifier = batch * hidden * labels
    return config.num_hidden_layers * per_layer + pooler + classifier


def gpt2_macs(config: Any, batch: int, seq: int) -> int:
    """Hand count for GPT2LMHeadModel: c_attn (3 projections), attention, c_proj, MLP (4x), lm_head."""
    embed, tokens = config.n_embd, batch * seq
    per_layer = (3 * tokens * embed * embed + 2 * batch * seq * seq * embed + tokens * embed * embed
                 + 2 * tokens * embed * 4 * embed)
    return config.n_layer * per_layer + tokens * embed * config.vocab_size


def convnet_macs(batch: int) -> int:
    """The zoo ConvNet on 1x28x28: conv 1->16 (3x3) at 28x28, conv 16->32 (3x3) at 14x14, then 1568-128-64-10."""
    conv1 = 16 * 28 * 28 * (1 * 3 * 3)
    conv2 = 32 * 14 * 14 * (16 * 3 * 3)
    linear = 32 * 7 * 7 * 128 + 128 * 64 + 64 * 10
    return batch * (conv1 + conv2 + linear)


@pytest.fixture(scope="module")
def bert() -> Any:
    return zoo.build("tiny-bert")[0]


@pytest.fixture(scope="module")
def gpt2() -> Any:
    return zoo.build("tiny-gpt2")[0]


def test_bert_total_matches_hand_count_with_attention(bert: Any) -> None:
    result = count_macs(bert, text_inputs(bert.config.vocab_size))
    assert bert.config._attn_implementation == "sdpa"
    assert result.macs == bert_macs(bert.config, BATCH, SEQ) == 592_000
    assert result.flops == 2 * result.macs
    assert result.attention_macs == bert.config.num_hidden_layers * 2 * BATCH * SEQ * SEQ * bert.config.hidden_size


def test_torch_flop_counter_misses_attention_and_we_do_not(bert: Any) -> None:
    """The trap: FlopCounterMode reports BERT as if it had no attention products on CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = {k: torch.from_numpy(v) for k, v in text_inputs(bert.config.vocab_size).items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        bert(**inputs)
    assert counter.get_total_flops() // 2 == bert_macs(bert.config, BATCH, SEQ, with_attention=False)
    assert count_macs(bert, inputs).macs == bert_macs(bert.config, BATCH, SEQ, with_attention=True)


def test_bert_eager_attention_and_inference_mode_count_the_same(bert: Any) -> None:
    inputs = text_inputs(bert.config.vocab_size, batch=3, seq=8)
    expected = bert_macs(bert.config, 3, 8)
    with torch.inference_mode():  # SDPA reaches the dispatcher whole here
        assert count_macs(bert, inputs).macs == expected
    bert.config._attn_implementation = "eager"  # explicit matmul + softmax instead of SDPA
    try:
        eager = count_macs(bert, inputs)
    finally:
        bert.config._attn_implementation = "sdpa"
    assert eager.macs == expected
    assert eager.attention_macs == 0  # counted as plain matmuls


def test_bert_per_module_totals(bert: Any) -> None:
    config = bert.config
    result = count_macs(bert, text_inputs(config.vocab_size))
    layers = config.num_hidden_layers
    per_layer = (bert_macs(config, BATCH, SEQ) - BATCH * config.hidden_size * (config.hidden_size + 2)) // layers
    assert result.by_module[""] == result.macs
    assert result.by_module["bert.encoder.layer.0"] == result.by_module["bert.encoder.layer.1"] == per_layer
    assert result.by_module["bert.encoder.layer.0.attention.self.query"] == BATCH * SEQ * 32 * 32
    assert result.by_module["bert.pooler"] == BATCH * 32 * 32
    assert result.by_module["classifier"] == BATCH * 32 * 2
    assert "bert.embeddings" not in result.by_module  # lookups only
    without = count_macs(bert, text_inputs(config.vocab_size), by_module=False)
    assert without.by_module == {} and without.macs == result.macs


def test_gpt2_total_matches_hand_count(gpt2: Any) -> None:
    result = count_macs(gpt2, text_inputs(gpt2.config.vocab_size))
    assert result.macs == gpt2_macs(gpt2.config, BATCH, SEQ)
    assert result.by_module["lm_head"] == BATCH * SEQ * gpt2.config.n_embd * gpt2.config.vocab_size
    assert result.attention_macs == gpt2.config.n_layer * 2 * BATCH * SEQ * SEQ * gpt2.config.n_embd


@pytest.mark.parametrize("batch", [1, 3])
def test_convnet_total_matches_hand_count(batch: int) -> None:
    model = zoo.build("convnet")[0]
    result = count_macs(model, {"x": np.zeros((batch, 1, 28, 28), np.float32)})
    assert result.macs == convnet_macs(batch)
    assert result.by_module["conv1"] == batch * 16 * 28 * 28 * 9
    assert result.by_module["out"] == batch * 64 * 10


def test_grouped_query_and_causal_attention() -> None:
    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = torch.randn(2, 8, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 24)
    expected = 2 * 8 * 12 * 12 * 16 + 2 * 8 * 12 * 12 * 24
    assert attention_macs(q, k, v) == expected
    assert count_macs(Attention(), {"q": q, "k": k, "v": v}).macs == expected


def test_fused_multi_head_attention_and_encoder_layer_fast_paths() -> None:
    """nn.MultiheadAttention / TransformerEncoderLayer take fused kernels in eval: same MACs as the slow path."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    inputs = {"src": torch.randn(2, 10, 32)}
    batch, length, embed, hidden = 2, 10, 32, 64
    expected = 2 * (4 * batch * length * embed * embed + 2 * batch * length * length * embed
                    + 2 * batch * length * embed * hidden)
    fused = count_macs(encoder.eval(), inputs)
    assert set(fused.by_op) == {"aten._transformer_encoder_layer_fwd"}
    assert fused.macs == expected
    assert count_macs(encoder.train(), inputs).macs == expected  # decomposed: linear + SDPA


def test_profile_records_shapes_calls_and_activation_memory(bert: Any) -> None:
    profile = profile_forward(bert, text_inputs(bert.config.vocab_size), record_shapes=True, track_memory=True)
    assert profile.modules[""].output_shapes == ((BATCH, 2),)
    assert profile.modules["bert"].output_shapes == ((BATCH, SEQ, 32), (BATCH, 32))
    assert profile.modules["bert.encoder.layer.1.intermediate.dense"].output_shapes == ((BATCH, SEQ, 64),)
    assert profile.modules["bert.encoder.layer.0"].calls == 1
    hidden_bytes = BATCH * SEQ * 32 * 4
    # at least a hidden state and the FFN activation are alive at once; everything produced is far more
    assert 2 * hidden_bytes <= profile.activation_peak_bytes < profile.activation_total_bytes
    assert profile.activation_total_bytes > 2 * 10 * hidden_bytes  # >= 10 hidden-sized tensors per layer


def test_shared_module_called_twice_counts_both_calls() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(torch.relu(self.proj(x)))

    profile = profile_forward(Twice(), {"x": torch.randn(4, 8)}, record_shapes=True)
    assert profile.macs.macs == 2 * 4 * 8 * 8
    assert profile.modules["proj"].calls == 2
    assert profile.macs.by_module["proj"] == 2 * 4 * 8 * 8


def test_ops_that_cannot_be_counted_are_named_not_silently_zero() -> None:
    """With a padding mask, nn.TransformerEncoder switches to nested tensors: its fused op is reported."""
    torch.manual_seed(0)
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 1).eval()

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.encoder(x, src_key_padding_mask=mask)

    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 6:] = True
    with warnings.catch_warnings():  # torch: "nested tensors are a prototype"
        warnings.simplefilter("ignore")
        result = count_macs(Masked().eval(), {"x": torch.randn(2, 10, 32), "mask": mask})
    assert result.uncounted == ("aten._transformer_encoder_layer_fwd",)
