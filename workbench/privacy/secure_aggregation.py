"""Secure aggregation of client updates by pairwise and self masks (Bonawitz et al., CCS 2017, Figure 4):
the server learns the sum of the surviving clients' vectors and nothing about any single one.

What is simulated, and how faithfully
-------------------------------------
The semi-honest protocol of Figure 4 without its signatures and without Round 3 (the consistency check),
over real cryptography: X25519 key agreement, HKDF-SHA256 key derivation, ChaCha20 as the PRG, AES-GCM for
the share channel, Shamir t-of-n sharing. Each round is an explicit method call; the server object sees
only what it would see on the wire (public keys, ciphertexts it cannot read, masked vectors, the shares the
survivors reveal in the unmasking round). Names of the sets follow the paper's order, renumbered without the
consistency round:

    paper U1 (sent public keys)      -> `SecAggServer.collect_keys`
    paper U2 (sent encrypted shares) -> `SecAggServer.relay_shares`; the clients that mask together
    paper U3 (sent a masked input)   -> `SecAggServer.collect_masked`; the survivors. Clients of U2 that
                                        did not send are the dropped ones (U2 \\ U3)
    paper U5 (sent unmasking shares) -> `SecAggServer.unmask`

Arithmetic is in the ring Z_{2^64} (numpy's uint64 wraps), inputs are fixed-point (`quantize`); the
paper's Z_R with R = 2^64.

Threshold
---------
Shares of b_u and of s_sk_u are t-of-n. Against an honest-but-curious server, any t above the number of
colluding clients protects individual inputs (Bonawitz et al. 2017, Sec. 6). A server that *lies* about
who dropped could ask one group of honest clients for the shares of b_v ("v survived") and another for the
shares of s_sk_v ("v dropped"); each client refuses to reveal both for the same v, so the two groups are
disjoint, and both can reach t only if 2t <= n. Hence `threshold_for` recommends t > n/2 (the paper's
signatures and consistency round, not simulated, are what defend against actively malicious parties).

Key material is not seeded from the experiment seed: the seed is logged with the run's parameters, and
anyone holding it could regenerate every mask and read every client's update. Randomness therefore comes
from `random_bytes` (default `os.urandom`); pass a seeded byte source only in tests. Reproducibility of
experiments is unaffected: the ring sum is exactly the sum of the quantized inputs, whatever the masks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RandomBytes = Callable[[int], bytes]

#: The Mersenne prime 2^521 - 1: a 32-byte secret (a seed, an X25519 private key) is one field element.
SHAMIR_PRIME = (1 << 521) - 1
_FIELD_BYTES = 66  # ceil(521 / 8)
_SECRET_BYTES = 32
DEFAULT_SCALE_BITS = 24

# distinct HKDF `info` strings, so that the mask seed and the channel key of a pair never coincide
_MASK_INFO = b"fl-workbench secure aggregation v1: pairwise mask seed"
_CHANNEL_INFO = b"fl-workbench secure aggregation v1: share channel key"
_NONCE_BYTES = 12
_PRG_CHUNK = bytes(1 << 16)  # zeros that ChaCha20 encrypts chunk by chunk into the output buffer


class SecureAggregationAborted(RuntimeError):
    """Fewer than `threshold` clients remained at some round: no sum is returned rather than a wrong one."""


class ProtocolViolation(ValueError):
    """A message breaks the protocol's rules (e.g. a request for both kinds of share of one peer)."""


# --------------------------------------------------------------------------------------------- quantization

def quantization_error_bound(num_clients: int, scale_bits: int) -> float:
    """Worst-case |dequantized ring sum - real sum| of `num_clients` vectors, per coordinate.

    Each coordinate of each client rounds to the nearest multiple of 2^-s, off by at most 2^-(s+1), so the
    sum of n clients is within n * 2^-(s+1) of the real-valued sum (before any division by the caller).
    `dequantize`'s int64 -> float64 conversion adds at most 2^-53 relative where |sum| * 2^s exceeds 2^53;
    `secure_sum` adds that term to the bound it reports."""
    _check_scale_bits(scale_bits)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    return num_clients * 2.0 ** -(scale_bits + 1)


def quantize(x: np.ndarray, scale_bits: int = DEFAULT_SCALE_BITS, *, num_clients: int = 1) -> np.ndarray:
    """round(x * 2^s) as int64, reinterpreted as uint64 (two's complement), an element of Z_{2^64}^d.

    Refuses inputs whose sum over `num_clients` clients could wrap around the ring (max|x| * 2^s * n >=
    2^63): the signed sum would then be read back wrong. Rounding error per coordinate <= 2^-(s+1)
    (`quantization_error_bound`); multiplying by 2^s is exact in float64."""
    x = np.asarray(x, dtype=np.float64)
    check_quantizable(x, scale_bits, num_clients)
    return np.rint(x * 2.0 ** scale_bits).astype(np.int64).view(np.uint64)


def check_quantizable(x: np.ndarray, scale_bits: int, num_clients: int) -> None:
    """Raise ValueError unless every entry of x is finite and max|x| * 2^s * num_clients < 2^63."""
    _check_scale_bits(scale_bits)
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
    if x.size == 0:
        return
    if not np.isfinite(x).all():
        raise ValueError(f"secure aggregation input has {int((~np.isfinite(x)).sum())} non-finite values "
                         f"(NaN or inf); they cannot be quantized (check the client's update for divergence)")
    max_abs = float(np.abs(x).max())
    if max_abs * 2.0 ** scale_bits * num_clients >= 2.0 ** 63:
        limit = 2.0 ** (63 - scale_bits) / num_clients
        raise ValueError(
            f"secure aggregation input max|x| = {max_abs!r} is too large for scale_bits = {scale_bits} with "
            f"{num_clients} clients: the sum would wrap around Z_2^64 (rule: max|x| * 2^scale_bits * "
            f"num_clients < 2^63, i.e. max|x| < {limit:.6g}); lower scale_bits (each bit less halves the "
            f"precision and doubles the range) or clip the updates")


def dequantize(q_sum: np.ndarray, scale_bits: int = DEFAULT_SCALE_BITS) -> np.ndarray:
    """A ring element read as a signed int64, divided by 2^s, as float64."""
    _check_scale_bits(scale_bits)
    q_sum = np.asarray(q_sum)
    if q_sum.dtype != np.uint64:
        raise TypeError(f"dequantize needs a uint64 ring element, got dtype {q_sum.dtype} "
                        f"(pass the output of quantize or of the protocol's ring sum)")
    return q_sum.view(np.int64).astype(np.float64) / 2.0 ** scale_bits


def _check_scale_bits(scale_bits: int) -> None:
    if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or not 0 <= scale_bits <= 62:
        raise ValueError(f"scale_bits must be an int in [0, 62], got {scale_bits!r} "
                         f"(the default {DEFAULT_SCALE_BITS} keeps 2^-25 precision per coordinate)")


# ------------------------------------------------------------------------------------- PRG, key agreement

def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom elements of Z_{2^64}: the ChaCha20 keystream under the 32-byte `seed`, read as
    little-endian uint64. The nonce is fixed (all zero) because every seed in the protocol is fresh per round
    and used for one stream only; the 32-bit block counter allows 2^32 * 64 bytes (2^35 elements) per seed."""
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != _SECRET_BYTES:
        raise ValueError(f"prg seed must be {_SECRET_BYTES} bytes, got "
                         f"{len(seed) if isinstance(seed, (bytes, bytearray)) else type(seed).__name__}")
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= 1 << 35:
        raise ValueError(f"prg length must be an int in [0, 2^35], got {length!r}")
    out = np.empty(length, dtype="<u8")
    view = memoryview(out).cast("B")
    encryptor = Cipher(algorithms.ChaCha20(bytes(seed), bytes(16)), mode=None).encryptor()
    total, chunk = 8 * length, len(_PRG_CHUNK)
    zeros = memoryview(_PRG_CHUNK)
    # encrypting a reused zero chunk straight into the output avoids allocating 8 * length zero bytes
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        encryptor.update_into(zeros[:stop - start], view[start:stop])
    return out.view(np.uint64)


def agree(private_key: X25519PrivateKey, peer_public_key: bytes, info: bytes) -> bytes:
    """KA.agree of the paper: X25519 shared secret, hashed to 32 bytes by HKDF-SHA256 under `info`."""
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_seed(private_key: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """s_{u,v}: the pairwise mask seed, the same from either side of the pair."""
    return agree(private_key, peer_public_key, _MASK_INFO)


def channel_key(private_key: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    """The AES-256-GCM key of the share channel between two clients, the same from either side."""
    return agree(private_key, peer_public_key, _CHANNEL_INFO)


def _public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


# --------------------------------------------------------------------------------------- Shamir sharing

def shamir_split(secret: bytes, threshold: int, holders: Sequence[int], *,
                 random_bytes: RandomBytes = os.urandom) -> dict[int, int]:
    """Shamir's t-of-n sharing (Shamir 1979) over GF(2^521 - 1): holder h gets f(h + 1), where f has
    degree t - 1, f(0) = the secret read big-endian, and the other coefficients are uniform field elements
    drawn from `random_bytes` (key material: see the module docstring for why it is not the experiment seed).
    Any `threshold` shares determine the secret; fewer reveal nothing about it."""
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) < _FIELD_BYTES:
        raise ValueError(f"shamir secret must be 1 to {_FIELD_BYTES - 1} bytes, got "
                         f"{len(secret) if isinstance(secret, (bytes, bytearray)) else type(secret).__name__}")
    for h in holders:
        _check_client_id(h, "shamir holder")
    holders = [int(h) for h in holders]
    if len(set(holders)) != len(holders):
        raise ValueError(f"shamir holders must be distinct, got {sorted(holders)}")
    _check_threshold(threshold, len(holders), "shamir_split")
    coefficients = [int.from_bytes(secret, "big")] + [_random_field_element(random_bytes)
                                                      for _ in range(threshold - 1)]
    shares = {}
    for h in holders:
        x, y = h + 1, 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % SHAMIR_PRIME
        shares[h] = y
    return shares


def shamir_combine(shares: Mapping[int, int], threshold: int, *, secret_bytes: int = _SECRET_BYTES) -> bytes:
    """The secret f(0), by Lagrange interpolation at 0 of the given shares (holder h's point is x = h + 1).

    Raises ValueError with fewer than `threshold` shares, and when the interpolated value does not fit in
    `secret_bytes` bytes (wrong shares, or a threshold lower than the one used to split)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ValueError(f"shamir_combine threshold must be an int >= 1, got {threshold!r}")
    if len(shares) < threshold:
        raise ValueError(f"shamir_combine needs at least threshold = {threshold} shares, got {len(shares)} "
                         f"(from holders {sorted(shares)}); fewer shares reveal nothing about the secret")
    holders = sorted(shares)[:threshold]
    coefficients = lagrange_coefficients_at_zero(holders)
    value = sum(c * shares[h] for c, h in zip(coefficients, holders)) % SHAMIR_PRIME
    if value >= 1 << (8 * secret_bytes):
        raise ValueError(f"shares of holders {holders} do not interpolate to a {secret_bytes}-byte secret "
                         f"(wrong shares, or fewer than the threshold used to split them)")
    return value.to_bytes(secret_bytes, "big")


def lagrange_coefficients_at_zero(holders: Sequence[int]) -> list[int]:
    """lambda_j = prod_{m != j} x_m / (x_m - x_j) mod p, with x = holder + 1; f(0) = sum_j lambda_j f(x_j).
    The server computes these once per unmasking round: all reconstructions use the same responders."""
    xs = [h + 1 for h in holders]
    if len(set(xs)) != len(xs):
        raise ValueError(f"lagrange interpolation needs distinct holders, got {sorted(holders)}")
    coefficients = []
    for j, xj in enumerate(xs):
        numerator, denominator = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                numerator = numerator * xm % SHAMIR_PRIME
                denominator = denominator * (xm - xj) % SHAMIR_PRIME
        coefficients.append(numerator * pow(denominator, -1, SHAMIR_PRIME) % SHAMIR_PRIME)
    return coefficients


def _random_field_element(random_bytes: RandomBytes) -> int:
    # rejection sampling keeps the coefficient exactly uniform; only 2^521 - 1 itself is ever rejected
    while True:
        value = int.from_bytes(random_bytes(_FIELD_BYTES), "big") & ((1 << 521) - 1)
        if value < SHAMIR_PRIME:
            return value


def _check_client_id(client_id: int, what: str = "client_id") -> None:
    if isinstance(client_id, bool) or not isinstance(client_id, (int, np.integer)) or client_id < 0:
        raise ValueError(f"{what} must be a non-negative int, got {client_id!r}")


def _check_threshold(threshold: int, num_clients: int, where: str) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= num_clients:
        raise ValueError(f"{where}: threshold must be an int in [1, {num_clients}] (the number of clients), "
                         f"got {threshold!r} (use threshold_for(num_clients, fraction))")


def threshold_for(num_clients: int, fraction: float) -> int:
    """max(2, ceil(fraction * n)), capped at n: the Shamir threshold for a cohort of n clients.

    fraction > 1/2 keeps a server that lies about dropouts from collecting both kinds of share of one
    client (module docstring; Bonawitz et al. 2017, Sec. 6); a higher fraction tolerates fewer dropouts
    (more than n - t dropouts abort the round)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per round, got num_clients = "
                         f"{num_clients!r} (no pairwise mask exists for one client; raise "
                         f"federation.clients_per_round)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"threshold fraction must be in (0, 1], got {fraction!r} "
                         f"(> 0.5 resists a server that lies about dropouts; 0.6-0.7 is typical)")
    return min(num_clients, max(2, math.ceil(fraction * num_clients)))


# --------------------------------------------------------------------------------------- wire messages

@dataclass(frozen=True)
class PublicKeys:
    """Round 0: a client's advertised X25519 public keys (raw 32 bytes each)."""

    client_id: int
    c_pk: bytes  # share channel
    s_pk: bytes  # pairwise masks


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1: the sender's shares of its b_u and s_sk_u for one recipient, AES-GCM encrypted under their
    channel key; (sender, recipient) is authenticated as associated data, as the paper's u || v prefix."""

    sender: int
    recipient: int
    nonce: bytes
    ciphertext: bytes

    @property
    def associated_data(self) -> bytes:
        return f"secagg share {self.sender}->{self.recipient}".encode()


@dataclass(frozen=True)
class UnmaskingShares:
    """Round 4: what one surviving client reveals: shares of b_v (v survived) and of s_sk_v (v dropped)."""

    client_id: int
    b_shares: dict[int, int]
    s_sk_shares: dict[int, int]


def _encode_shares(b_share: int, s_sk_share: int) -> bytes:
    return b_share.to_bytes(_FIELD_BYTES, "big") + s_sk_share.to_bytes(_FIELD_BYTES, "big")


def _decode_shares(plaintext: bytes) -> tuple[int, int]:
    if len(plaintext) != 2 * _FIELD_BYTES:
        raise ProtocolViolation(f"a decrypted share message has {len(plaintext)} bytes, "
                                f"expected {2 * _FIELD_BYTES}")
    return (int.from_bytes(plaintext[:_FIELD_BYTES], "big"), int.from_bytes(plaintext[_FIELD_BYTES:], "big"))


def _pair_sign(u: int, v: int) -> int:
    """+1 if u < v else -1: the two masks of a pair cancel in the sum (the paper's Delta_{u,v}, mirrored)."""
    return 1 if u < v else -1


# -------------------------------------------------------------------------------------------- the client

class SecAggClient:
    """One client's side of one round of the protocol: its key pairs, self-mask seed and the ciphertexts
    it holds for its peers. A new object per round: reusing keys or b_u across rounds would let the server
    subtract two rounds' masked inputs."""

    def __init__(self, client_id: int, *, random_bytes: RandomBytes = os.urandom) -> None:
        _check_client_id(client_id)
        self.client_id = int(client_id)
        self._random_bytes = random_bytes
        # from_private_bytes instead of generate(): all key material flows from random_bytes
        self._c_sk = X25519PrivateKey.from_private_bytes(random_bytes(_SECRET_BYTES))
        self._s_sk = X25519PrivateKey.from_private_bytes(random_bytes(_SECRET_BYTES))
        self._b: bytes | None = None
        self._threshold: int | None = None
        self._roster: dict[int, PublicKeys] = {}
        self._own_shares: tuple[int, int] | None = None
        self._inbox: dict[int, EncryptedShare] = {}
        self._peers: tuple[int, ...] | None = None  # paper U2 minus self: the clients this one masks with
        self._has_sent_masked_input = False
        self._has_unmasked = False

    def advertise_keys(self) -> PublicKeys:
        """Round 0."""
        return PublicKeys(self.client_id, _public_bytes(self._c_sk), _public_bytes(self._s_sk))

    def share_keys(self, roster: Mapping[int, PublicKeys], threshold: int) -> list[EncryptedShare]:
        """Round 1: draw b_u, t-of-n share b_u and s_sk_u among the roster (the clients that advertised
        keys, self included), and encrypt each peer's shares for it. The own share is kept, not sent."""
        if self._b is not None:
            raise ProtocolViolation(f"client {self.client_id} already shared its keys this round")
        if self.client_id not in roster:
            raise ProtocolViolation(f"client {self.client_id} is missing from the roster {sorted(roster)}")
        if len(roster) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients per round, got {len(roster)} "
                             f"(no pairwise mask exists for one client; raise federation.clients_per_round)")
        _check_threshold(threshold, len(roster), "share_keys")
        keys = [k for keys in roster.values() for k in (keys.c_pk, keys.s_pk)]
        if len(set(keys)) != len(keys):  # Figure 4, Round 1: "assert that all the public key pairs are different"
            raise ProtocolViolation("the roster holds repeated public keys; refusing to share")
        for client_id, keys in roster.items():
            if keys.client_id != client_id:
                raise ProtocolViolation(f"roster entry {client_id} carries the keys of client {keys.client_id}")
        self._roster, self._threshold = dict(roster), threshold
        self._b = self._random_bytes(_SECRET_BYTES)
        holders = sorted(roster)
        b_shares = shamir_split(self._b, threshold, holders, random_bytes=self._random_bytes)
        s_sk_shares = shamir_split(self._s_sk.private_bytes_raw(), threshold, holders,
                                   random_bytes=self._random_bytes)
        self._own_shares = (b_shares[self.client_id], s_sk_shares[self.client_id])
        messages = []
        for v in holders:
            if v == self.client_id:
                continue
            message = EncryptedShare(self.client_id, v, self._random_bytes(_NONCE_BYTES), b"")
            ciphertext = AESGCM(channel_key(self._c_sk, roster[v].c_pk)).encrypt(
                message.nonce, _encode_shares(b_shares[v], s_sk_shares[v]), message.associated_data)
            messages.append(EncryptedShare(message.sender, v, message.nonce, ciphertext))
        return messages

    def masked_input(self, x: np.ndarray, relayed: Sequence[EncryptedShare],
                     scale_bits: int = DEFAULT_SCALE_BITS) -> np.ndarray:
        """Round 2: keep the ciphertexts relayed to this client (their senders are the peers it masks with)
        and send y_u = q(x_u) + PRG(b_u) + sum_{v != u} sign(u, v) PRG(s_uv) mod 2^64."""
        if self._b is None:
            raise ProtocolViolation(f"client {self.client_id} must share its keys (round 1) before masking")
        if self._has_sent_masked_input:
            raise ProtocolViolation(f"client {self.client_id} already sent its masked input this round; "
                                    f"a second one under the same masks would leak the difference")
        inbox = {}
        for message in relayed:
            if message.recipient != self.client_id:
                raise ProtocolViolation(f"client {self.client_id} was relayed a share for {message.recipient}")
            if message.sender not in self._roster or message.sender == self.client_id:
                raise ProtocolViolation(f"client {self.client_id} was relayed a share from {message.sender}, "
                                        f"not a peer of the roster {sorted(self._roster)}")
            if message.sender in inbox:
                raise ProtocolViolation(f"client {self.client_id} was relayed two shares from {message.sender}")
            inbox[message.sender] = message
        if len(inbox) + 1 < self._threshold:
            raise SecureAggregationAborted(
                f"client {self.client_id}: only {len(inbox) + 1} clients shared their keys, fewer than the "
                f"threshold {self._threshold}")
        x = _as_vector(x, f"client {self.client_id}'s input")
        y = quantize(x, scale_bits, num_clients=len(self._roster))
        y += prg(self._b, y.size)
        for v in sorted(inbox):
            mask = prg(mask_seed(self._s_sk, self._roster[v].s_pk), y.size)
            if _pair_sign(self.client_id, v) > 0:
                y += mask
            else:
                y -= mask
        self._inbox, self._peers = inbox, tuple(sorted(inbox))
        self._has_sent_masked_input = True
        return y

    def unmask(self, survivors: Collection[int], dropped: Collection[int]) -> UnmaskingShares:
        """Round 4: reveal the shares of b_v for v in `survivors` and of s_sk_v for v in `dropped`.

        Refuses (ProtocolViolation) to reveal both kinds for one peer, in one call or across calls (once
        answered, it answers no more): with both, the server could unmask v's input (Figure 4's safety rule).
        Also refuses lists that are not a split of the clients it masked with, and fewer than t survivors."""
        survivors, dropped = set(survivors), set(dropped)
        if not self._has_sent_masked_input:
            raise ProtocolViolation(f"client {self.client_id} sent no masked input; it takes no part in "
                                    f"unmasking")
        if self._has_unmasked:
            raise ProtocolViolation(f"client {self.client_id} already revealed its shares this round; asking "
                                    f"again could obtain both the b and the s_sk share of one peer")
        both = survivors & dropped
        if both:
            raise ProtocolViolation(f"client {self.client_id} refuses: clients {sorted(both)} are listed both "
                                    f"as survivors and as dropped; revealing both shares of a client lets the "
                                    f"server unmask its input")
        expected = set(self._peers) | {self.client_id}
        if survivors | dropped != expected or self.client_id not in survivors:
            raise ProtocolViolation(f"client {self.client_id} refuses: survivors {sorted(survivors)} and dropped "
                                    f"{sorted(dropped)} are not a split of the clients it masked with "
                                    f"{sorted(expected)}, itself among the survivors")
        if len(survivors) < self._threshold:
            raise SecureAggregationAborted(f"client {self.client_id}: {len(survivors)} survivors, fewer than "
                                           f"the threshold {self._threshold}")
        self._has_unmasked = True
        b_shares, s_sk_shares = {self.client_id: self._own_shares[0]}, {}
        for v in sorted((survivors | dropped) - {self.client_id}):
            message = self._inbox[v]
            try:
                plaintext = AESGCM(channel_key(self._c_sk, self._roster[v].c_pk)).decrypt(
                    message.nonce, message.ciphertext, message.associated_data)
            except InvalidTag as error:
                raise ProtocolViolation(f"client {self.client_id} could not authenticate the share message "
                                        f"from client {v}") from error
            b_share, s_sk_share = _decode_shares(plaintext)
            if v in survivors:
                b_shares[v] = b_share
            else:
                s_sk_shares[v] = s_sk_share
        return UnmaskingShares(self.client_id, b_shares, s_sk_shares)


# -------------------------------------------------------------------------------------------- the server

class SecAggServer:
    """The server's side of one round: it collects, relays and finally unmasks, holding only what it
    received on the wire. Call its methods in round order."""

    def __init__(self, threshold: int, scale_bits: int = DEFAULT_SCALE_BITS) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
            raise ValueError(f"secure aggregation threshold must be an int >= 2, got {threshold!r} (with t = 1 "
                             f"one share is the secret itself; use threshold_for(num_clients, fraction))")
        _check_scale_bits(scale_bits)
        self.threshold, self.scale_bits = threshold, scale_bits
        self.roster: dict[int, PublicKeys] = {}
        self.sharers: tuple[int, ...] = ()  # paper U2
        self.masked: dict[int, np.ndarray] = {}  # paper U3 -> y_u
        self.dropped: tuple[int, ...] = ()  # U2 \ U3

    def _require(self, num_clients: int, stage: str) -> None:
        if num_clients < self.threshold:
            raise SecureAggregationAborted(f"secure aggregation aborted at {stage}: {num_clients} clients "
                                           f"remained, fewer than the threshold {self.threshold}; no sum is "
                                           f"returned (lower the threshold fraction or expect fewer dropouts)")

    def collect_keys(self, keys: Sequence[PublicKeys]) -> dict[int, PublicKeys]:
        """Round 0: the roster (paper U1) that the server broadcasts back to every client."""
        roster = {}
        for k in keys:
            if k.client_id in roster:
                raise ProtocolViolation(f"client {k.client_id} advertised keys twice")
            roster[k.client_id] = k
        if len(roster) < 2:
            raise ValueError(f"secure aggregation needs at least 2 clients per round, got {len(roster)} (no "
                             f"pairwise mask exists for one client; raise federation.clients_per_round)")
        self._require(len(roster), "round 0 (advertise keys)")
        self.roster = roster
        return dict(roster)

    def relay_shares(self, sent: Mapping[int, Sequence[EncryptedShare]]) -> dict[int, list[EncryptedShare]]:
        """Round 1: ciphertexts from each client that sent (paper U2), sorted into one mailbox per sender
        of U2; the server cannot read them."""
        for sender, messages in sent.items():
            if sender not in self.roster:
                raise ProtocolViolation(f"client {sender} sent shares but advertised no keys")
            if any(m.sender != sender for m in messages):
                raise ProtocolViolation(f"client {sender} sent share messages under another sender's name")
        self.sharers = tuple(sorted(sent))
        self._require(len(self.sharers), "round 1 (share keys)")
        mailboxes: dict[int, list[EncryptedShare]] = {v: [] for v in self.sharers}
        for messages in sent.values():
            for m in messages:
                if m.recipient in mailboxes:
                    mailboxes[m.recipient].append(m)
        return mailboxes

    def collect_masked(self, masked: Mapping[int, np.ndarray]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Round 2: masked inputs from whoever sends them. Returns (survivors, dropped) for round 4."""
        for u, y in masked.items():
            if u not in self.sharers:
                raise ProtocolViolation(f"client {u} sent a masked input but did not share its keys")
            if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.ndim != 1:
                raise ProtocolViolation(f"client {u}'s masked input must be a 1-D uint64 array")
        lengths = {y.size for y in masked.values()}
        if len(lengths) > 1:
            raise ProtocolViolation(f"masked inputs have different lengths {sorted(lengths)}")
        self.masked = {u: masked[u] for u in sorted(masked)}
        self.dropped = tuple(v for v in self.sharers if v not in masked)
        self._require(len(self.masked), "round 2 (masked input)")
        return tuple(self.masked), self.dropped

    def unmask(self, responses: Sequence[UnmaskingShares]) -> np.ndarray:
        """Round 4: from at least t survivors' shares, rebuild b_v of each survivor and s_sk_v of each dropped
        client, remove the self-masks and the dropped clients' pairwise masks, and return the ring sum of the
        survivors' quantized inputs (uint64; `dequantize` reads it)."""
        responses = [r for r in responses if r.client_id in self.masked]
        self._require(len(responses), "round 4 (unmasking)")
        responders = sorted(r.client_id for r in responses)[:self.threshold]
        by_id = {r.client_id: r for r in responses}
        coefficients = lagrange_coefficients_at_zero(responders)

        def reconstruct(v: int, kind: str) -> bytes:
            shares = [(by_id[h].b_shares if kind == "b" else by_id[h].s_sk_shares).get(v) for h in responders]
            if any(s is None for s in shares):
                raise ProtocolViolation(f"a responder withheld its {kind} share of client {v}")
            value = sum(c * s for c, s in zip(coefficients, shares)) % SHAMIR_PRIME
            if value >= 1 << (8 * _SECRET_BYTES):
                raise ProtocolViolation(f"the {kind} shares of client {v} do not reconstruct a 32-byte secret")
            return value.to_bytes(_SECRET_BYTES, "big")

        length = next(iter(self.masked.values())).size
        total = np.zeros(length, dtype=np.uint64)
        for y in self.masked.values():
            total += y
        for u in self.masked:
            total -= prg(reconstruct(u, "b"), length)
        for v in self.dropped:
            s_sk = X25519PrivateKey.from_private_bytes(reconstruct(v, "s_sk"))
            if _public_bytes(s_sk) != self.roster[v].s_pk:
                raise ProtocolViolation(f"the reconstructed s_sk of dropped client {v} does not match its s_pk")
            for u in self.masked:
                # y_u holds sign(u, v) PRG(s_uv); v's own y, which would cancel it, never arrived
                mask = prg(mask_seed(s_sk, self.roster[u].s_pk), length)
                if _pair_sign(u, v) > 0:
                    total -= mask
                else:
                    total += mask
        return total


# ---------------------------------------------------------------------------------- the convenience call

@dataclass(frozen=True)
class SecureSum:
    """The outcome of one secure aggregation round."""

    total: np.ndarray  # float64: the survivors' sum, dequantized
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    masked: dict[int, np.ndarray]  # what the server received from each survivor (uint64)
    #: per coordinate, |total - real sum of the survivors' vectors| <= this: survivors * 2^-(s+1), plus
    #: the float64 conversion of the ring sum (2^-53 relative to max|total|)
    quantization_error_bound: float
    ring_sum: np.ndarray  # uint64: the exact ring sum of the survivors' quantized inputs


def secure_sum(vectors: Mapping[int, np.ndarray], *, threshold: int, scale_bits: int = DEFAULT_SCALE_BITS,
               dropped_after_sharing: Collection[int] = (),
               random_bytes: RandomBytes = os.urandom) -> SecureSum:
    """Run one round of the protocol over a cohort: every client of `vectors` advertises keys and shares
    them; those in `dropped_after_sharing` then fail to send their masked input; the server recovers the sum
    of the others. `vectors` holds every client of the cohort, dropped ones too (flat float vectors of one
    length; torch tensors are converted). Raises SecureAggregationAborted when fewer than `threshold` remain."""
    if not isinstance(vectors, Mapping):
        raise TypeError(f"secure_sum vectors must be a mapping client id -> vector, got {type(vectors).__name__}")
    if len(vectors) < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients per round, got {len(vectors)} (no "
                         f"pairwise mask exists for one client; raise federation.clients_per_round)")
    for client_id in vectors:
        _check_client_id(client_id)
    dropped = set(dropped_after_sharing)
    unknown = dropped - set(vectors)
    if unknown:
        raise ValueError(f"dropped_after_sharing names clients {sorted(unknown)} that are not in the cohort "
                         f"{sorted(vectors)}")
    _check_threshold(threshold, len(vectors), "secure_sum")
    arrays = {u: _as_vector(x, f"vectors[{u}]") for u, x in vectors.items()}
    lengths = {x.size for x in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"secure_sum vectors must all have one length, got lengths {sorted(lengths)} "
                         f"(flatten each client's update the same way)")
    for u, x in arrays.items():  # refuse before any key is made, naming the client
        try:
            check_quantizable(x, scale_bits, len(arrays))
        except ValueError as error:
            raise ValueError(f"client {u}: {error}") from None

    server = SecAggServer(threshold, scale_bits)
    clients = {u: SecAggClient(u, random_bytes=random_bytes) for u in sorted(arrays)}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    mailboxes = server.relay_shares({u: c.share_keys(roster, threshold) for u, c in clients.items()})
    survivors, lost = server.collect_masked({u: c.masked_input(arrays[u], mailboxes[u], scale_bits)
                                             for u, c in clients.items() if u not in dropped})
    ring_sum = server.unmask([clients[u].unmask(survivors, lost) for u in survivors])
    total = dequantize(ring_sum, scale_bits)
    max_abs = float(np.abs(total).max()) if total.size else 0.0
    bound = quantization_error_bound(len(survivors), scale_bits) + max_abs * 2.0 ** -53
    return SecureSum(total=total, survivors=survivors, dropped=lost, masked=dict(server.masked),
                     quantization_error_bound=bound, ring_sum=ring_sum)


def _as_vector(x: object, what: str) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":  # a torch.Tensor, on any device
        x = x.detach().to("cpu").double().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a flat (1-D) vector, got shape {array.shape} "
                         f"(flatten the model's update first)")
    return array
