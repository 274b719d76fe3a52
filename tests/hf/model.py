"""The model of the transformers tests: a seeded random-weight Llama built from a small
config (no download: none is possible here, and none is needed), left-padded integer
prompts, and greedy decoding. Imported by the tests and by their worker subprocesses
(``tests/hf/worker.py``), so every process builds the very same weights."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

NEW_TOKENS = 64
VOCAB = 256
#: Prompt lengths of the batch-4 runs (left-padded to the longest, with a mask).
PROMPT_LENGTHS = (12, 7, 20, 3)

# One intra-op thread: this model's matrices are tiny, and on a loaded 2-core machine
# two spinning OpenMP threads made a 64-token generation take 5 s instead of 0.3 s.
torch.set_num_threads(1)


def tiny_model(device: str = "cpu", seed: int = 0) -> LlamaForCausalLM:
    """2 layers, grouped-query attention (4 query heads, 2 K/V heads), float32, no EOS:
    greedy generation never stops early."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=None, bos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().to(device)


def prompts(batch: int, device: str = "cpu", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts of ``PROMPT_LENGTHS`` (batch 1: the first), left-padded with 0,
    and their attention mask."""
    lengths = PROMPT_LENGTHS[:batch]
    width = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids.to(device), mask.to(device)


def generate(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[list, torch.Tensor]:
    """Greedy ``NEW_TOKENS`` tokens after ``ids`` (the cache may hold a prefix of them
    already): the new tokens, and the logits of the first one."""
    out = model.generate(
        ids, attention_mask=mask, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :].tolist(), out.logits[0].float().cpu()
