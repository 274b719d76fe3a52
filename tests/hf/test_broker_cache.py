"""``BrokerCache`` in one process, against a real daemon: greedy generation is
token-for-token that of transformers' own ``DynamicCache`` (batch 1, and batch 4 with
left padding and a mask), also across growth; keys and values are views of the broker's
memory; the hand-off refuses what it cannot honour; the core client never imports
transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, MistralConfig

from kvbroker_client import BrokerClient, CacheNotFound, InvalidRequest, PreconditionFailed
from kvbroker_client.transformers import BrokerCache, prefill

from tests.hf.conftest import DEVICES
from tests.hf.model import generate, prompts, tiny_model
from tests.support.daemon import ROOT, child_env

MODEL: dict[str, torch.nn.Module] = {}


def model_on(device: str) -> torch.nn.Module:
    if device not in MODEL:
        MODEL[device] = tiny_model(device)
    return MODEL[device]


@pytest.fixture
def client(broker):
    with BrokerClient(broker.target) as client:
        yield client
        assert client.list_caches() == [], "every test frees what it allocated"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_tokens_are_those_of_dynamic_cache(client, device, batch):
    model = model_on(device)
    ids, mask = prompts(batch, device)
    expected, expected_logits = generate(model, ids, mask, DynamicCache(config=model.config))
    with BrokerCache(client, config=model.config) as cache:
        tokens, logits = generate(model, ids, mask, cache)
        assert cache.storage is not None and cache.storage.device.type == device
        assert [c.cache_id for c in client.list_caches()] == [cache.cache_id]
    assert tokens == expected
    # Strided views against contiguous tensors: the host computes the same bits here;
    # a GPU may pick another attention kernel for them (float32 throughout).
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_growth_keeps_every_token_and_one_cache(client, device):
    model = model_on(device)
    ids, mask = prompts(4, device)
    expected, _ = generate(model, ids, mask, DynamicCache(config=model.config))
    with BrokerCache(client, config=model.config, capacity=4) as cache:
        prefill(model, ids, mask, cache)  # 19 tokens: the first forward's length wins over 4
        first_id = cache.cache_id
        assert cache.storage.capacity == 19
        cache.crop(-cache.get_seq_length())
        tokens, _ = generate(model, ids, mask, cache)
        # 20 prompt tokens, then 63 fed back (the 64th is never fed): 83 tokens grown
        # in doublings 19 -> 38 -> 76 -> 152.
        assert cache.storage.capacity == 152 and cache.cache_id != first_id
        assert [c.cache_id for c in client.list_caches()] == [cache.cache_id], "each growth freed the old cache"
    assert tokens == expected


@pytest.mark.parametrize("device", DEVICES)
def test_keys_and_values_are_views_of_broker_memory(client, device):
    model = model_on(device)
    ids, mask = prompts(1, device)
    with BrokerCache(client, config=model.config) as cache:
        prefill(model, ids, mask, cache)
        whole = cache.storage.tensor
        layer = cache.layers[1]
        keys, values = layer.keys, layer.values
        assert keys.shape == (1, 2, ids.shape[1] - 1, 16)
        assert keys.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        assert keys.data_ptr() == whole[1, 0].data_ptr() and values.data_ptr() == whole[1, 1].data_ptr()
        whole[1, 0, 0, 0, 0, 0] = 12345.0  # a write to the broker's bytes is seen through the view
        assert keys[0, 0, 0, 0].item() == 12345.0
        assert client.list_caches()[0].shape == list(whole.shape)


def test_the_hand_off_refuses_what_it_cannot_honour(client):
    model = model_on("cpu")
    ids, mask = prompts(1)
    with BrokerCache(client, config=model.config) as empty:
        with pytest.raises(ValueError, match="run a forward"):
            empty.export()
    with BrokerCache(client, config=model.config, retain=False) as unretained:
        prefill(model, ids, mask, unretained)
        with pytest.raises(PreconditionFailed, match="retain=True"):
            unretained.export()
    cache = BrokerCache(client, config=model.config)
    prefill(model, ids, mask, cache)
    exported = cache.export()
    with pytest.raises(PreconditionFailed, match="exported"):
        generate(model, ids, mask, cache)  # the sender may not write any more
    cache.close()  # drops the sender's hold only: the retained cache waits for a receiver
    assert [c.cache_id for c in client.list_caches()] == [exported["cache_id"]]
    bad = [
        {**exported, "format": "other/1"},
        {**exported, "layout": "batch,layers"},
        {**exported, "cache_id": ""},
        {**exported, "shape": [2, 3, 1, 2, 16, 16]},
        {**exported, "shape": [2, 2, 1, 2, 16]},
        {**exported, "dtype": "complex64"},
        {**exported, "lengths": [5]},
        {**exported, "lengths": [5, 10**6]},
        {**exported, "shape": [2, 2, 64, 2, 4096, 16]},  # more bytes than the cache has
    ]
    for broken in bad:
        with pytest.raises(InvalidRequest):
            BrokerCache.attach(client, broken)
    with pytest.raises(CacheNotFound):
        BrokerCache.attach(client, {**exported, "cache_id": "no-such-cache"})
    with pytest.raises(ValueError, match="layers"):
        BrokerCache.attach(client, exported, tiny_model_config(num_hidden_layers=3))
    with BrokerCache.attach(client, exported) as received:
        assert received.get_seq_length() == ids.shape[1] - 1
    assert client.list_caches() == [], "the receiver's close freed it"


def tiny_model_config(**changes):
    config = model_on("cpu").config.to_dict()
    config.update(changes)
    return type(model_on("cpu").config).from_dict(config)


def test_layers_other_than_full_attention_are_refused(client):
    with pytest.raises(ValueError, match="full-attention"):
        BrokerCache(client, config=MistralConfig(num_hidden_layers=2, sliding_window=8))
    with pytest.raises(ValueError, match="num_layers"):
        BrokerCache(client)


def test_the_core_client_does_not_import_transformers():
    code = (
        "import sys, kvbroker_client, kvbroker_client.sync, kvbroker_client.aio, kvbroker_client.kv_storage\n"
        "assert 'transformers' not in sys.modules, sorted(m for m in sys.modules if 'transformers' in m)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
