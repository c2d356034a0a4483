"""Fixed dependencies for the handshake cores: the documented test vector and tests that
need known ephemeral values inject these, as the shells inject the real ones."""

from __future__ import annotations

import crypt


def randomness(*values: bytes, ecdh_scalar: int | None = None) -> crypt.Randomness:
    """`random(n)` hands out `values` in order, each of them exactly n bytes (a core
    drawing more, or other sizes, fails loudly); `ecdh_key()` derives from `ecdh_scalar`
    when given, else is fresh."""
    queue = list(values)

    def random(n: int) -> bytes:
        assert queue, "the core drew more random values than the test fixed"
        value = queue.pop(0)
        assert len(value) == n, f"asked for {n} random bytes, the fixed value has {len(value)}"
        return value

    return crypt.Randomness(random=random,
                            ecdh_key=lambda: crypt.ecdh_generate(ecdh_scalar))


class FixedKEM:
    """ML-KEM-1024 with a fixed key seed (the client side) and, when given, a fixed
    encapsulation (the server side: (shared secret, ciphertext)).  It runs no FIPS 203
    key check of its own: the server core must check the key whatever the provider."""

    name = "fixed"

    def __init__(self, seed: bytes | None = None,
                 encapsulation: tuple[bytes, bytes] | None = None) -> None:
        self._real = crypt.CryptographyKEM()
        self._seed = seed
        self._encapsulation = encapsulation

    def generate(self):
        return self._real.generate(self._seed)

    def encapsulate(self, ek: bytes) -> tuple[bytes, bytes]:
        if self._encapsulation is None:
            return self._real.encapsulate(ek)
        return self._encapsulation

    def decapsulate(self, private, ct: bytes) -> bytes:
        return self._real.decapsulate(private, ct)
