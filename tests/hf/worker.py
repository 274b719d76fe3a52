"""The two processes of the hand-off tests, each a fresh interpreter (not a fork):

    python -m tests.hf.worker prefill TARGET BATCH DEVICE [--stay]
        prefill the tiny model's prompts into a BrokerCache, print its export (one JSON
        line); then exit (closing the client), or with --stay wait on stdin (the test
        SIGKILLs it there).
    python -m tests.hf.worker decode TARGET BATCH DEVICE   (the export on stdin)
        attach, decode greedily, print {"tokens": ..., "logits": first token's logits}.
"""

from __future__ import annotations

import json
import sys

from kvbroker_client import BrokerClient
from kvbroker_client.transformers import BrokerCache, prefill

from tests.hf.model import generate, prompts, tiny_model


def main(role: str, target: str, batch: str, device: str, *flags: str) -> None:
    model = tiny_model(device)
    ids, mask = prompts(int(batch), device)
    client = BrokerClient(target)
    if role == "prefill":
        cache = BrokerCache(client, config=model.config)
        prefill(model, ids, mask, cache)
        print(json.dumps(cache.export()), flush=True)
        if "--stay" in flags:
            sys.stdin.readline()  # the test kills this process here
        client.close()
        return
    cache = BrokerCache.attach(client, json.loads(sys.stdin.readline()))
    tokens, logits = generate(model, ids, mask, cache)
    cache.close()
    client.close()
    print(json.dumps({"tokens": tokens, "logits": logits.tolist()}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
