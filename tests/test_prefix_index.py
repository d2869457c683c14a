"""The prefix index on its own: hash chains, longest match, collisions, removal."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from mlxd.daemon.kv.prefix_index import PrefixIndex, common_prefix

B = 4  # small blocks keep the examples readable


def test_keys_chain_over_full_blocks_only() -> None:
    index = PrefixIndex("fp", block_tokens=B)
    assert index.keys(list(range(3))) == []
    keys = index.keys(list(range(9)))
    assert len(keys) == 2
    # A key names the whole prefix: the same block after another first block differs.
    assert index.keys([9, 9, 9, 9, 4, 5, 6, 7])[1] != keys[1]
    assert PrefixIndex("other", block_tokens=B).keys(list(range(9))) != keys


def test_longest_prefix_wins_and_runs_into_the_partial_block() -> None:
    index = PrefixIndex("fp", block_tokens=B)
    entries = {"a": list(range(6)), "b": [*list(range(10)), 99], "c": [7] * 12}
    for name, tokens in entries.items():
        index.add(name, tokens)
    prompt = [*list(range(10)), 5, 5]
    assert index.lookup(prompt, entries.get) == ("b", 10)
    assert index.lookup([*list(range(6)), 1, 1], entries.get) == ("b", 6)
    assert index.lookup([1, 2, 3], entries.get) is None  # no full block in common
    assert index.lookup([8] * 12, entries.get) is None


def test_prefer_breaks_ties_and_missing_entries_are_skipped() -> None:
    index = PrefixIndex("fp", block_tokens=B)
    entries: dict[str, list[int]] = {"disk": list(range(8)), "hot": list(range(8))}
    for name, tokens in entries.items():
        index.add(name, tokens)
    prompt = list(range(12))
    assert index.lookup(prompt, entries.get, prefer=lambda e: e == "hot") == ("hot", 8)
    assert index.lookup(prompt, entries.get, prefer=lambda e: e == "disk") == ("disk", 8)
    assert index.lookup(prompt, {"disk": entries["disk"]}.get) == ("disk", 8)
    assert index.lookup(prompt, entries.get, exclude=["hot", "disk"]) is None


def test_remove_and_replace() -> None:
    index = PrefixIndex("fp", block_tokens=B)
    entries = {"a": list(range(8))}
    index.add("a", entries["a"])
    assert "a" in index and len(index) == 1
    entries["a"] = [5] * 8
    index.add("a", entries["a"])  # the entry now holds other tokens
    assert index.lookup([*list(range(8)), 0], entries.get) is None
    assert index.lookup([5] * 9, entries.get) == ("a", 8)
    index.remove("a")
    index.remove("a")
    assert len(index) == 0 and index.lookup([5] * 9, entries.get) is None
    assert not index._owners  # no key left behind


def test_a_forced_collision_never_reuses_a_wrong_prefix() -> None:
    # Every block hashes alike: all entries look like a match at every depth.
    index = PrefixIndex("fp", block_tokens=B, digest=lambda data: b"same")
    entries = {"wrong": [1] * 12, "right": [2] * 4 + [3] * 4}
    for name, tokens in entries.items():
        index.add(name, tokens)
    assert index.lookup([2] * 4 + [3] * 4 + [4] * 4, entries.get) == ("right", 8)
    assert index.lookup([9] * 12, entries.get) is None
    assert index.lookup([1] * 8 + [0] * 4, entries.get) == ("wrong", 8)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), min_size=0, max_size=14), min_size=1, max_size=6),
    st.lists(st.integers(0, 2), min_size=0, max_size=14),
)
def test_lookup_agrees_with_a_scan(cached: list[list[int]], prompt: list[int]) -> None:
    index = PrefixIndex("fp", block_tokens=B)
    entries = {f"e{i}": tokens for i, tokens in enumerate(cached)}
    for name, tokens in entries.items():
        index.add(name, tokens)
    best = max((common_prefix(t, prompt) for t in entries.values()), default=0)
    found = index.lookup(prompt, entries.get)
    if best < B:
        assert found is None
    else:
        assert found is not None and found[1] == best
        assert common_prefix(entries[found[0]], prompt) == best


def test_many_entries_stay_consistent_after_random_removals() -> None:
    rng = random.Random(7)
    index = PrefixIndex("fp", block_tokens=B)
    entries = {f"e{i}": [rng.randrange(3) for _ in range(rng.randrange(20))] for i in range(50)}
    for name, tokens in entries.items():
        index.add(name, tokens)
    for name in rng.sample(sorted(entries), 40):
        index.remove(name)
        del entries[name]
    owners = {e for owned in index._owners.values() for e in owned}
    assert owners <= set(entries)
    assert len(index) == len(entries)
