"""Eviction policies: victim order, pin handling, the registry, and hit ratios on traces."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbroker.core.errors import InvalidArgument
from kvbroker.core.eviction import (
    POLICIES,
    AdaptivePolicy,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    SizeAwareLRUPolicy,
    make_policy,
)

ALL_POLICIES = sorted(POLICIES)


def filled(name: str, sizes: Mapping[str, int]) -> EvictionPolicy:
    policy = make_policy(name)
    for cache_id, nbytes in sizes.items():
        policy.on_insert(cache_id, nbytes)
    return policy


def ids(n: int) -> dict[str, int]:
    return {f"c{i}": 100 for i in range(n)}


# --- registry ---------------------------------------------------------------------------


def test_registry_builds_each_policy_fresh() -> None:
    assert ALL_POLICIES == ["adaptive", "lfu", "lru", "size_aware_lru"]
    for name in ALL_POLICIES:
        policy = make_policy(name)
        assert policy.name == name
        assert policy is not make_policy(name)
        assert list(policy.victims(0)) == []


def test_unknown_policy_names_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidArgument) as err:
        make_policy("fifo")
    assert err.value.field == "eviction_policy"
    assert str(err.value) == (
        "eviction_policy: unknown policy 'fifo'; "
        "choose one of: adaptive, lfu, lru, size_aware_lru"
    )


# --- contract shared by every policy ----------------------------------------------------


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_duplicate_insert_is_a_bug(name: str) -> None:
    policy = filled(name, ids(2))
    with pytest.raises(RuntimeError, match="inserted twice"):
        policy.on_insert("c0", 100)
    policy.on_pin("c1")
    with pytest.raises(RuntimeError, match="inserted twice"):
        policy.on_insert("c1", 100)


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_unknown_ids_raise_key_error(name: str) -> None:
    policy = filled(name, ids(1))
    for hook in (policy.on_access, policy.on_pin, policy.on_unpin, policy.on_remove):
        with pytest.raises(KeyError):
            hook("nope")
    policy.on_remove("c0")
    for hook in (policy.on_access, policy.on_pin, policy.on_unpin, policy.on_remove):
        with pytest.raises(KeyError):
            hook("c0")
    with pytest.raises(KeyError):
        policy.on_unpin("c0")  # never pinned


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_pin_excludes_and_unpin_readmits(name: str) -> None:
    policy = filled(name, ids(4))
    policy.on_pin("c1")
    policy.on_pin("c3")
    assert set(policy.victims(0)) == {"c0", "c2"}
    policy.on_access("c1")  # a pinned cache is still known
    policy.on_unpin("c1")
    assert set(policy.victims(0)) == {"c0", "c1", "c2"}
    policy.on_remove("c3")  # removing a pinned cache needs no unpin
    assert set(policy.victims(0)) == {"c0", "c1", "c2"}


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_removing_each_victim_while_iterating(name: str) -> None:
    policy = filled(name, ids(100))
    taken = []
    for cache_id in policy.victims(100):
        taken.append(cache_id)
        policy.on_remove(cache_id)
    assert sorted(taken) == sorted(ids(100))
    assert list(policy.victims(0)) == []


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_other_mutations_during_iteration_never_repeat_an_id(name: str) -> None:
    policy = filled(name, {f"c{i}": 10 * (i % 7) for i in range(100)})
    seen = []
    for cache_id in policy.victims(35):
        seen.append(cache_id)
        policy.on_access(cache_id)  # reorders what is being walked
        if len(seen) % 3 == 0:
            policy.on_pin(cache_id)
    assert len(seen) == len(set(seen))
    assert set(seen) <= {f"c{i}" for i in range(100)}


@pytest.mark.parametrize("name", ALL_POLICIES)
def test_each_victims_call_starts_from_the_current_state(name: str) -> None:
    policy = filled(name, ids(10))
    first = next(iter(policy.victims(0)))
    assert next(iter(policy.victims(0))) == first  # nothing consumed, nothing changed
    policy.on_remove(first)
    assert first not in set(policy.victims(0))


# --- per-policy order -------------------------------------------------------------------


def test_lru_order_follows_last_use_and_unpin_counts_as_use() -> None:
    policy = filled("lru", ids(4))
    policy.on_access("c0")
    policy.on_access("c2")
    assert list(policy.victims(0)) == ["c1", "c3", "c0", "c2"]
    policy.on_pin("c1")
    policy.on_unpin("c1")
    assert list(policy.victims(0)) == ["c3", "c0", "c2", "c1"]


def test_lfu_orders_by_count_then_recency() -> None:
    policy = filled("lfu", ids(4))
    for cache_id in ("c0", "c0", "c1", "c3", "c3", "c3"):
        policy.on_access(cache_id)
    # counts: c0=3, c1=2, c2=1, c3=4; then c1 and c2 both at 2 with c2 the more recent.
    assert list(policy.victims(0)) == ["c2", "c1", "c0", "c3"]
    policy.on_access("c2")
    assert list(policy.victims(0)) == ["c1", "c2", "c0", "c3"]


def test_lfu_gives_a_newcomer_a_fair_chance_against_stale_favourites() -> None:
    # Three caches used twice long ago; one eviction raises the age to their key (2).
    # Plain LFU would take the newcomer (one use) before the two stale favourites (two
    # uses each); with dynamic aging it enters at age + 1 = 3, above them.
    policy = filled("lfu", ids(3))
    for cache_id in ("c0", "c1", "c2"):
        policy.on_access(cache_id)
    (first, *_) = policy.victims(0)
    policy.on_remove(first, evicted=True)
    assert first == "c0" and policy.age == 2
    policy.on_insert("new", 100)
    assert policy.key("new") == 3
    assert list(policy.victims(0)) == ["c1", "c2", "new"]
    # A favourite that is used again climbs above the newcomer (age 2 + 3 uses).
    policy.on_access("c2")
    assert list(policy.victims(0)) == ["c1", "new", "c2"]
    # A release is no eviction: the age stays.
    policy.on_remove("c1")
    assert policy.age == 2


def test_lfu_age_only_rises() -> None:
    policy = filled("lfu", ids(2))
    for _ in range(5):
        policy.on_access("c1")  # key 6
    policy.on_remove("c1", evicted=True)
    assert policy.age == 6
    policy.on_remove("c0", evicted=True)  # key 1: below the age, which stays
    assert policy.age == 6


def test_lfu_counts_accesses_while_pinned() -> None:
    policy = filled("lfu", ids(3))
    policy.on_pin("c0")
    for _ in range(3):
        policy.on_access("c0")
    policy.on_access("c1")
    policy.on_unpin("c0")
    assert list(policy.victims(0)) == ["c2", "c1", "c0"]


def test_size_aware_prefers_one_victim_big_enough() -> None:
    sizes = {"small1": 10, "big1": 100, "small2": 10, "huge": 4000, "exact": 64, "just_under": 63}
    policy = filled("size_aware_lru", sizes)
    assert list(policy.victims(64)) == ["big1", "huge", "exact", "small1", "small2", "just_under"]
    policy.on_access("big1")
    assert list(policy.victims(64))[:3] == ["huge", "exact", "big1"]
    assert list(policy.victims(1000))[:2] == ["huge", "small1"]
    # Nothing big enough: plain LRU.
    lru_order = ["small1", "small2", "huge", "exact", "just_under", "big1"]
    assert list(policy.victims(10_000)) == lru_order
    assert list(policy.victims(0)) == list(policy.victims(10_000))


def test_size_aware_remove_during_iteration_keeps_the_preference() -> None:
    policy = filled("size_aware_lru", {"a": 8, "b": 200, "c": 300, "d": 8})
    taken = []
    for cache_id in policy.victims(150):
        taken.append(cache_id)
        policy.on_remove(cache_id)
    assert taken == ["b", "c", "a", "d"]


def test_adaptive_promotes_on_second_use_and_evicts_t1_first() -> None:
    policy = filled("adaptive", ids(4))
    policy.on_access("c0")  # c0 -> T2
    assert list(policy.victims(0)) == ["c1", "c2", "c3", "c0"]  # p = 0: T1 first


def test_adaptive_ghost_hits_move_the_target() -> None:
    policy = AdaptivePolicy()
    for cache_id in ids(4):
        policy.on_insert(cache_id, 100)
    policy.on_access("c3")  # T1 = c0 c1 c2, T2 = c3
    policy.on_remove("c0")  # ghost in B1
    assert policy.target_t1 == 0
    policy.on_insert("c0", 100)  # B1 hit: T1 was too small
    assert policy.target_t1 == 1
    # c0 went to T2. T1 = c1 c2 is above p = 1 until the caller keeps c1; then T2, then T1.
    assert list(policy.victims(0)) == ["c1", "c3", "c0", "c2"]
    policy.on_remove("c3")  # ghost in B2
    policy.on_insert("c3", 100)  # B2 hit: T2 was too small
    assert policy.target_t1 == 0


def test_adaptive_ghost_lists_stay_bounded() -> None:
    policy = AdaptivePolicy()
    simulate(policy, (f"once{i}" for i in range(5000)), capacity=10)
    # Ghosts are ids only, but a daemon that never forgets one leaks: at most 2c of them.
    assert len(policy._b1) + len(policy._b2) <= 20
    assert list(policy.victims(0)) == [f"once{i}" for i in range(4990, 5000)]


def test_adaptive_takes_from_t2_once_t1_is_within_target() -> None:
    policy = filled("adaptive", ids(3))
    policy.on_access("c2")  # T1 = c0 c1, T2 = c2
    policy.on_remove("c0")
    policy.on_insert("c0", 100)  # B1 hit: p = 1, c0 -> T2 = c2 c0
    taken = []
    for cache_id in policy.victims(0):
        taken.append(cache_id)
        policy.on_remove(cache_id)
    # |T1| = 1 is not above p = 1, so T2 goes first, then the rest of T1.
    assert taken == ["c2", "c0", "c1"]


def test_protocol_is_satisfied_by_every_policy() -> None:
    policies: list[EvictionPolicy] = [
        LRUPolicy(),
        LFUPolicy(),
        SizeAwareLRUPolicy(),
        AdaptivePolicy(),
    ]
    assert [p.name for p in policies] == ["lru", "lfu", "size_aware_lru", "adaptive"]


# --- property: victims is exactly the unpinned, unremoved set ---------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "access", "pin", "unpin", "remove", "evict"]),
        st.integers(0, 11),
        st.integers(0, 5000),
    ),
    max_size=80,
)


@pytest.mark.parametrize("name", ALL_POLICIES)
@settings(max_examples=100, deadline=None)
@given(ops=OPS)
def test_victims_match_the_candidate_set(name: str, ops: list[tuple[str, int, int]]) -> None:
    policy = make_policy(name)
    live: dict[str, bool] = {}  # cache id -> pinned
    sizes: dict[str, int] = {}
    for op, key, number in ops:
        cache_id = f"c{key}"
        if op == "insert" and cache_id not in live:
            policy.on_insert(cache_id, number)
            live[cache_id] = False
            sizes[cache_id] = number
        elif cache_id not in live or op == "insert":
            continue
        elif op == "access":
            policy.on_access(cache_id)
        elif op == "pin" and not live[cache_id]:
            policy.on_pin(cache_id)
            live[cache_id] = True
        elif op == "unpin" and live[cache_id]:
            policy.on_unpin(cache_id)
            live[cache_id] = False
        elif op == "remove":
            policy.on_remove(cache_id)
            del live[cache_id]
        elif op == "evict":  # take victims for `number` bytes, evicting every other one
            for i, victim in enumerate(policy.victims(number)):
                assert live.get(victim) is False
                if i % 2 == 0:
                    policy.on_remove(victim, evicted=True)
                    del live[victim]
        victims = list(policy.victims(number))
        assert len(victims) == len(set(victims))
        assert set(victims) == {c for c, pinned in live.items() if not pinned}
        if name == "size_aware_lru":  # every big-enough victim before every other one
            big_enough = [sizes[v] >= number for v in victims]
            assert big_enough == sorted(big_enough, reverse=True)


# --- simulation: hit ratios on synthetic traces -----------------------------------------


def simulate(
    policy: EvictionPolicy,
    trace: Iterable[str],
    capacity: int,
    sizes: Mapping[str, int] | None = None,
) -> float:
    """Replay ``trace`` against a cache of ``capacity`` (entries, or bytes with ``sizes``).

    A hit calls ``on_access``; a miss evicts ``victims()`` until the new cache fits, then
    calls ``on_insert``. Returns hits / accesses.
    """
    resident: dict[str, int] = {}
    used = hits = accesses = 0
    for cache_id in trace:
        accesses += 1
        nbytes = sizes[cache_id] if sizes is not None else 1
        if cache_id in resident:
            hits += 1
            policy.on_access(cache_id)
            continue
        if used + nbytes > capacity:
            for victim in policy.victims(used + nbytes - capacity):
                policy.on_remove(victim, evicted=True)
                used -= resident.pop(victim)
                if used + nbytes <= capacity:
                    break
        assert used + nbytes <= capacity, "the trace holds a cache larger than the capacity"
        policy.on_insert(cache_id, nbytes)
        resident[cache_id] = nbytes
        used += nbytes
    return hits / accesses


def scan_with_hot_set(seed: int) -> Iterator[str]:
    """A hot set of 25 used in bursts, between one-time scans of 150 caches (capacity 50)."""
    rng = random.Random(seed)
    hot = [f"hot{i}" for i in range(25)]
    for burst in range(40):
        for _ in range(100):
            yield rng.choice(hot)
        for i in range(150):
            yield f"scan{burst}.{i}"


def shifting_working_set(seed: int) -> Iterator[str]:
    """Working set A (40 caches) hot for 4000 uses, then B (40 others) for 4000 (capacity 50)."""
    rng = random.Random(seed)
    for phase in ("a", "b"):
        working_set = [f"{phase}{i}" for i in range(40)]
        for _ in range(4000):
            yield rng.choice(working_set)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adaptive_resists_scans_that_flush_lru(seed: int) -> None:
    lru = simulate(make_policy("lru"), scan_with_hot_set(seed), capacity=50)
    adaptive = simulate(make_policy("adaptive"), scan_with_hot_set(seed), capacity=50)
    assert adaptive > lru, f"adaptive {adaptive:.3f} vs lru {lru:.3f}"
    assert adaptive > 0.39 > 0.31 > lru, f"adaptive {adaptive:.3f} vs lru {lru:.3f}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adaptive_and_aged_lfu_follow_a_shift(seed: int) -> None:
    # Plain LFU (no aging) scores below 0.7 here: the old working set keeps its counts.
    lfu = simulate(make_policy("lfu"), shifting_working_set(seed), capacity=50)
    adaptive = simulate(make_policy("adaptive"), shifting_working_set(seed), capacity=50)
    assert adaptive > lfu, f"adaptive {adaptive:.3f} vs lfu {lfu:.3f}"
    assert adaptive > 0.95 and lfu > 0.85, f"adaptive {adaptive:.3f} vs lfu {lfu:.3f}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_aged_lfu_resists_scans_like_adaptive(seed: int) -> None:
    lru = simulate(make_policy("lru"), scan_with_hot_set(seed), capacity=50)
    lfu = simulate(make_policy("lfu"), scan_with_hot_set(seed), capacity=50)
    assert lfu > 0.38 > 0.31 > lru, f"lfu {lfu:.3f} vs lru {lru:.3f}"


def test_simulate_in_bytes_with_size_aware_policy() -> None:
    sizes = {"a": 40, "b": 40, "big": 60, "c": 20}
    # Capacity 100. `big` needs 40 more bytes: `a` goes (least recent of those >= 40); `b`
    # hits; `c` needs 20 more: `big` goes (less recent than `b`, and big enough).
    policy = make_policy("size_aware_lru")
    ratio = simulate(policy, ["a", "b", "big", "b", "c"], 100, sizes)
    assert ratio == pytest.approx(1 / 5)
    assert list(policy.victims(0)) == ["b", "c"]
