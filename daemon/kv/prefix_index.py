"""The prefix index: which cached KV holds the longest prefix of a prompt, found by block hashes.

Every full block of `block_tokens` tokens of a cached entry gets a key in a hash chain
(block i's key = H(key of block i-1, block i's tokens), rooted in the model fingerprint),
so a key names a whole prefix, not a block on its own. A prompt walks its own keys as far
as the index knows them; the entries owning the deepest key are the candidates, and their
tokens are compared with the prompt's before one is chosen, so a hash collision can only
cost a lookup, never reuse a wrong prefix.

The index holds ids and keys only; the caller says what an id's tokens are (a hot cache's
or a cache file's header) and which candidates it prefers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterable, Sequence

__all__ = ["Digest", "PrefixIndex", "common_prefix"]

Digest = Callable[[bytes], bytes]
_SCHEME = b"mlxd-prefix-v1\0"


def _blake2b(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixIndex:
    def __init__(
        self, fingerprint: str, block_tokens: int = 256, digest: Digest = _blake2b
    ) -> None:
        self.block_tokens = block_tokens
        self._digest = digest  # a test may pass a colliding one
        self._root = digest(_SCHEME + fingerprint.encode())
        self._owners: dict[bytes, set[str]] = {}
        self._keys: dict[str, list[bytes]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, entry: str) -> bool:
        return entry in self._keys

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        """The chain of keys of `tokens`' full blocks."""
        keys, key, b = [], self._root, self.block_tokens
        for start in range(0, len(tokens) - b + 1, b):
            key = self._digest(key + array("I", tokens[start : start + b]).tobytes())
            keys.append(key)
        return keys

    def add(self, entry: str, tokens: Sequence[int]) -> None:
        """Index `entry` as holding KV for `tokens` (replacing what it held before)."""
        self.remove(entry)
        keys = self.keys(tokens)
        self._keys[entry] = keys
        for key in keys:
            self._owners.setdefault(key, set()).add(entry)

    def remove(self, entry: str) -> None:
        for key in self._keys.pop(entry, ()):
            owners = self._owners.get(key)
            if owners is not None:
                owners.discard(entry)
                if not owners:
                    del self._owners[key]

    def lookup(
        self,
        prompt: Sequence[int],
        tokens_of: Callable[[str], Sequence[int] | None],
        prefer: Callable[[str], float] = lambda entry: 0.0,
        exclude: Iterable[str] = (),
    ) -> tuple[str, int] | None:
        """The entry sharing the longest token prefix with `prompt`, and that length.

        Only entries whose first block matches are considered; the exact common prefix
        (which may run into a partial block) decides, then `prefer` (higher wins).
        `tokens_of` may return None for an entry that is gone or unusable now.
        """
        keys = self.keys(prompt)
        skip = set(exclude)
        depth = 0
        while depth < len(keys) and keys[depth] in self._owners:
            depth += 1
        for d in range(depth, 0, -1):
            best: tuple[int, float, str] | None = None
            for entry in self._owners.get(keys[d - 1], ()):
                tokens = None if entry in skip else tokens_of(entry)
                if tokens is None:
                    continue
                n = common_prefix(tokens, prompt)
                if n < d * self.block_tokens:
                    continue  # a collision: the keys agree, the tokens do not
                rank = (n, prefer(entry), entry)
                if best is None or rank > best:
                    best = rank
            if best is not None:
                return best[2], best[0]
        return None
