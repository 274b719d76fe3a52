"""Decode worker: attach the cache a prefill worker handed off (its JSON on stdin) and
continue generating from it, without recomputing the prompt's keys and values.

    python examples/decode_worker.py [TARGET] < handoff.json
"""

from __future__ import annotations

import json
import sys
import time

from demo_model import NEW_TOKENS, demo_model, demo_prompt

from transformers import DynamicCache

from kvbroker_client import BrokerClient
from kvbroker_client.transformers import BrokerCache


def main(target: str | None) -> None:
    model, prompt = demo_model(), demo_prompt()
    exported = json.loads(sys.stdin.readline())
    with BrokerClient(target) as client:
        start = time.perf_counter()
        with BrokerCache.attach(client, exported, model.config) as cache:  # zero-copy; freed on exit
            print(f"decode worker: attached {cache.get_seq_length()} cached tokens from {exported['cache_id']}")
            out = model.generate(prompt, cache=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = out[0, prompt.shape[1] :].tolist()
        print(f"decode worker: {len(tokens)} tokens in {time.perf_counter() - start:.2f} s: {tokens}")
    # The proof: one process recomputing the prompt (transformers' own cache) decodes the same.
    alone = model.generate(prompt, cache=DynamicCache(config=model.config), max_new_tokens=NEW_TOKENS, do_sample=False)
    same = alone[0, prompt.shape[1] :].tolist() == tokens
    print(f"decode worker: same tokens as one process doing both: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
