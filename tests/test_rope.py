"""Rotary embeddings: inverse frequencies and the cos/sin factor of every scaling type equal
transformers' (ROPE_INIT_FUNCTIONS) for the same config.json."""
from __future__ import annotations

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from vllm_jax.models.base import rope_from_hf

BASE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            num_hidden_layers=2, intermediate_size=512, vocab_size=128,
            max_position_embeddings=32768)
CASES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
             "original_max_position_embeddings": 8192},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1,
                    "original_max_position_embeddings": 4096},
    "longrope_partial": {"rope_type": "longrope", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.75,
                         "short_factor": list(np.linspace(1.0, 1.5, 24)),
                         "long_factor": list(np.linspace(1.0, 30.0, 24)),
                         "original_max_position_embeddings": 4096},
}


@pytest.mark.parametrize("case", list(CASES))
def test_inverse_frequencies_and_factor_match_transformers(case):
    params = CASES[case]
    config = transformers.LlamaConfig(**BASE, rope_parameters=dict(params))
    kind = params["rope_type"]
    fn = ROPE_INIT_FUNCTIONS.get(kind)
    rope = rope_from_hf(config.to_dict(), BASE["head_dim"])
    lengths = [None, 4096, 32768] if kind == "longrope" else [None]
    for seq_len in lengths:  # LongRoPE: the long factors only past the original context
        if fn is None:  # the default type has no init function of its own
            inv, factor = config.rope_parameters["rope_theta"], 1.0
            dim = BASE["head_dim"]
            want = 1.0 / inv ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        else:
            want, factor = fn(config, "cpu", seq_len=seq_len)
            want = want.numpy()
        np.testing.assert_allclose(rope.inv_freq(seq_len), want, rtol=1e-6)
        assert rope.attention_factor() == pytest.approx(factor, rel=1e-6)
    if kind == "longrope":
        assert not np.allclose(rope.inv_freq(4096), rope.inv_freq(4097))
