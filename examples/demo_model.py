"""The model of the hand-off example: a seeded random-weight Llama built from a small
config, so the example runs offline in seconds. Both workers build it with the same
seed, so they hold the same weights; a real deployment loads a checkpoint instead:

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", torch_dtype=torch.float16)
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PROMPT_TOKENS = 48
NEW_TOKENS = 32


def demo_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
        initializer_range=0.1,  # wider than the default 0.02, whose random model repeats one token
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def demo_prompt() -> torch.Tensor:
    """Token ids standing in for a tokenized prompt (no tokenizer needed)."""
    return torch.randint(1, 1000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
