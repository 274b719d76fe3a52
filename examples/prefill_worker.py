"""Prefill worker: run the prompt through the model into a cache that lives in the
broker, hand it off, and exit. Prints the hand-off (one JSON line) for the decode worker.

    python examples/prefill_worker.py [TARGET] > handoff.json

The cache is retained, so it survives this process (even a SIGKILL) until the decode
worker attaches it: nothing here waits for the decoder.
"""

from __future__ import annotations

import json
import sys

from demo_model import demo_model, demo_prompt

from kvbroker_client import BrokerClient
from kvbroker_client.transformers import BrokerCache, prefill


def main(target: str | None) -> None:
    model, prompt = demo_model(), demo_prompt()
    with BrokerClient(target) as client:
        cache = BrokerCache(client, config=model.config, model_name="demo-llama")
        prefill(model, prompt, None, cache)  # every prompt token but the last
        exported = cache.export()  # {"cache_id", "shape", "dtype", "lengths", ...}
        print(json.dumps(exported), flush=True)
        print(f"prefill worker: {exported['lengths'][0]} tokens in cache {exported['cache_id']}", file=sys.stderr)
    # Leaving the client drops this process's hold; the retained cache waits for the decoder.


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
