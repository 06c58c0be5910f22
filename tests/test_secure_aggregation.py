"""Secure aggregation (Bonawitz et al. 2017): exact sums, dropout recovery, aborts, refusals, uniform masks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from scipy.stats import chisquare

from workbench.privacy.secure_aggregation import (SHAMIR_PRIME, ProtocolViolation, SecAggClient,
                                                  SecAggServer, SecureAggregationAborted, channel_key,
                                                  dequantize, mask_seed, prg, quantization_error_bound,
                                                  quantize, secure_sum, shamir_combine, shamir_split,
                                                  threshold_for)


def _cohort(num_clients: int, length: int, seed: int) -> dict[int, np.ndarray]:
    """Unequal clients: ids not 0..n-1, scales from 1e-3 to 1e3, means of both signs."""
    rng = np.random.default_rng(seed)
    ids = [3 * k + 1 for k in range(num_clients)][::-1]
    return {u: 10.0 ** (k - num_clients // 2) * rng.normal(loc=(-1) ** k * k, scale=1.0 + k, size=length)
            for k, u in enumerate(ids)}


def _ring_sum_of_quantized(vectors: list[np.ndarray], scale_bits: int) -> np.ndarray:
    """Independent of the module: exact integer rounding summed in Python ints, then reduced mod 2^64."""
    total = [0] * vectors[0].size
    for x in vectors:
        for i, value in enumerate(np.round(x * 2.0 ** scale_bits).astype(np.int64).tolist()):
            total[i] += value
    return np.array([t % 2 ** 64 for t in total], dtype=np.uint64)


def _run_rounds(vectors: dict[int, np.ndarray], threshold: int, random_bytes, dropped=()):
    """The protocol, round by round, as secure_sum runs it, returning its parts for inspection."""
    server = SecAggServer(threshold, 24)
    clients = {u: SecAggClient(u, random_bytes=random_bytes) for u in vectors}
    roster = server.collect_keys([c.advertise_keys() for c in clients.values()])
    sent = {u: c.share_keys(roster, threshold) for u, c in clients.items()}
    mailboxes = server.relay_shares(sent)
    masked = {u: c.masked_input(vectors[u], mailboxes[u], 24) for u, c in clients.items() if u not in dropped}
    survivors, lost = server.collect_masked(masked)
    return server, clients, roster, sent, masked, survivors, lost


def test_unmasked_sum_equals_the_float_sum_within_the_stated_bound():
    vectors = _cohort(10, 5_000, seed=0)
    result = secure_sum(vectors, threshold=7, random_bytes=np.random.default_rng(1).bytes)
    plain = np.sum(np.stack(list(vectors.values())), axis=0)
    error = float(np.abs(result.total - plain).max())
    bound = quantization_error_bound(10, 24)
    assert bound == 10 * 2.0 ** -25
    assert result.survivors == tuple(sorted(vectors)) and result.dropped == ()
    # the float64 conversion term is tiny next to 10 * 2^-25 at these magnitudes
    assert bound <= result.quantization_error_bound < 1.001 * bound
    assert 0.25 * bound < error < bound  # attained to within a small factor: the bound is not loose
    np.testing.assert_array_equal(result.ring_sum, _ring_sum_of_quantized(list(vectors.values()), 24))


def test_a_masked_update_looks_uniform_while_the_plain_quantized_one_does_not():
    vectors = _cohort(4, 20_000, seed=2)
    result = secure_sum(vectors, threshold=3, random_bytes=np.random.default_rng(3).bytes)
    some_client = sorted(vectors)[1]

    def top_byte_p_value(q: np.ndarray) -> float:
        counts = np.bincount((q >> np.uint64(56)).astype(np.int64), minlength=256)
        return float(chisquare(counts).pvalue)

    assert top_byte_p_value(result.masked[some_client]) > 1e-3
    assert top_byte_p_value(quantize(vectors[some_client], 24)) < 1e-10


def test_three_of_ten_drop_out_after_sharing_and_the_sum_of_the_other_seven_is_exact():
    vectors = _cohort(10, 5_000, seed=4)
    gone = sorted(vectors)[2:5]
    result = secure_sum(vectors, threshold=7, dropped_after_sharing=gone,
                        random_bytes=np.random.default_rng(5).bytes)
    kept = [u for u in sorted(vectors) if u not in gone]
    assert result.survivors == tuple(kept) and result.dropped == tuple(gone)
    assert sorted(result.masked) == kept and all(y.dtype == np.uint64 for y in result.masked.values())
    np.testing.assert_array_equal(result.ring_sum, _ring_sum_of_quantized([vectors[u] for u in kept], 24))
    plain = np.sum(np.stack([vectors[u] for u in kept]), axis=0)
    assert np.abs(result.total - plain).max() < result.quantization_error_bound
    assert result.quantization_error_bound < 1.001 * 7 * 2.0 ** -25


def test_fewer_survivors_than_the_threshold_abort_without_a_sum():
    vectors = _cohort(10, 50, seed=6)
    with pytest.raises(SecureAggregationAborted, match="6 clients remained, fewer than the threshold 7"):
        secure_sum(vectors, threshold=7, dropped_after_sharing=sorted(vectors)[:4],
                   random_bytes=np.random.default_rng(7).bytes)
    assert issubclass(SecureAggregationAborted, RuntimeError)


def test_a_client_refuses_to_reveal_both_kinds_of_share_of_one_peer():
    vectors = _cohort(3, 20, seed=8)
    server, clients, _, _, _, survivors, lost = _run_rounds(vectors, 2, np.random.default_rng(9).bytes)
    u, v, w = survivors
    with pytest.raises(ProtocolViolation, match=rf"clients \[{v}\] are listed both"):
        clients[u].unmask(survivors, [v])
    # an honest request is answered, and afterwards the other story about w is refused
    clients[u].unmask(survivors, lost)
    with pytest.raises(ProtocolViolation, match="already revealed"):
        clients[u].unmask([u, v], [w])
    ring_sum = server.unmask([clients[c].unmask(survivors, lost) for c in (v, w)])
    np.testing.assert_array_equal(ring_sum, _ring_sum_of_quantized(list(vectors.values()), 24))


def test_shamir_any_t_shares_reconstruct_and_t_minus_one_do_not():
    secret = bytes(range(7, 39))
    holders = [0, 3, 7, 11, 20, 42]
    shares = shamir_split(secret, 4, holders, random_bytes=np.random.default_rng(10).bytes)
    assert sorted(shares) == holders
    for subset in itertools.combinations(holders, 4):
        assert shamir_combine({h: shares[h] for h in subset}, 4) == secret
    for subset in itertools.combinations(holders, 3):
        few = {h: shares[h] for h in subset}
        with pytest.raises(ValueError, match="at least threshold = 4 shares, got 3"):
            shamir_combine(few, 4)
        try:
            assert shamir_combine(few, 3) != secret
        except ValueError as error:  # the interpolated value does not even fit in 32 bytes
            assert "do not interpolate" in str(error)


def test_shamir_share_of_holder_h_is_the_polynomial_at_h_plus_one():
    secret = (987654321).to_bytes(32, "big")
    slope = 12345
    shares = shamir_split(secret, 2, [0, 5, 9], random_bytes=lambda n: slope.to_bytes(n, "big"))
    assert shares == {h: (987654321 + slope * (h + 1)) % SHAMIR_PRIME for h in (0, 5, 9)}


def test_the_server_relays_only_aes_gcm_ciphertexts_it_cannot_read():
    vectors = _cohort(4, 30, seed=11)
    server, clients, roster, sent, _, survivors, lost = _run_rounds(vectors, 3, np.random.default_rng(12).bytes)
    messages = [m for ms in sent.values() for m in ms]
    assert len(messages) == 4 * 3
    eavesdropper = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    for m in messages:
        assert len(m.ciphertext) == 2 * 66 + 16  # two field elements and the GCM tag
        with pytest.raises(InvalidTag):
            AESGCM(bytes(32)).decrypt(m.nonce, m.ciphertext, m.associated_data)
        with pytest.raises(InvalidTag):  # the server's own key agreement with the sender
            AESGCM(channel_key(eavesdropper, roster[m.sender].c_pk)).decrypt(
                m.nonce, m.ciphertext, m.associated_data)
    # the recipients themselves can read them: unmasking succeeds
    ring_sum = server.unmask([clients[u].unmask(survivors, lost) for u in survivors])
    np.testing.assert_array_equal(ring_sum, _ring_sum_of_quantized(list(vectors.values()), 24))


def test_two_clients_masks_cancel_with_plus_for_the_smaller_id():
    x = {8: np.array([0.5, -1.25, 3.0, 1e-7]), 2: np.array([-2.0, 0.75, 1e3, -4e-6])}
    draws: list[bytes] = []
    rng = np.random.default_rng(13)

    def recording_bytes(n: int) -> bytes:
        draws.append(rng.bytes(n))
        return draws[-1]

    server, clients, roster, _, y, survivors, lost = _run_rounds(x, 2, recording_bytes)
    responses = [clients[u].unmask(survivors, lost) for u in survivors]
    b = {v: shamir_combine({r.client_id: r.b_shares[v] for r in responses}, 2) for v in (2, 8)}
    q = {u: quantize(x[u], 24) for u in x}
    np.testing.assert_array_equal(y[2] + y[8] - prg(b[2], 4) - prg(b[8], 4), q[2] + q[8])
    # the direction: client 2 (the smaller id) adds PRG(s_{2,8}), client 8 subtracts it
    s_sk_2 = next(X25519PrivateKey.from_private_bytes(d) for d in draws if len(d) == 32 and
                  X25519PrivateKey.from_private_bytes(d).public_key().public_bytes_raw() == roster[2].s_pk)
    pairwise = prg(mask_seed(s_sk_2, roster[8].s_pk), 4)
    np.testing.assert_array_equal(y[2], q[2] + prg(b[2], 4) + pairwise)
    np.testing.assert_array_equal(y[8], q[8] + prg(b[8], 4) - pairwise)
    np.testing.assert_array_equal(server.unmask(responses), q[2] + q[8])


def test_prg_is_the_chacha20_keystream():
    # RFC 7539, Appendix A.1, test vector 1: all-zero key, nonce and counter
    keystream = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")
    np.testing.assert_array_equal(prg(bytes(32), 4), np.frombuffer(keystream, dtype="<u8"))
    seed = bytes(range(32))
    np.testing.assert_array_equal(prg(seed, 20_000)[:8_193], prg(seed, 8_193))  # across the 64 KiB chunk
    assert prg(seed, 0).shape == (0,)


def test_quantize_round_trip_and_overflow_refusal():
    x = np.array([1.5, -1.0, 0.0, 2.0 ** -24, -3.25e4])
    q = quantize(x, 24)
    assert q.dtype == np.uint64
    assert int(q[1]) == 2 ** 64 - 2 ** 24  # two's complement of -2^24
    np.testing.assert_array_equal(dequantize(q, 24), x)  # on the 2^-24 grid: exact
    noisy = np.random.default_rng(14).normal(scale=5.0, size=1_000)
    assert np.abs(dequantize(quantize(noisy, 24), 24) - noisy).max() <= 2.0 ** -25
    with pytest.raises(ValueError, match=r"max\|x\| = 100000000000\.0 is too large for scale_bits = 24 "
                                         r"with 10 clients.*lower scale_bits"):
        quantize(np.array([3.0, -1e11]), 24, num_clients=10)  # 1e11 * 2^24 * 10 = 1.7e19 >= 2^63
    assert int(quantize(np.array([-1e11]), 24, num_clients=1)[0]) == 2 ** 64 - 10 ** 11 * 2 ** 24  # alone: fits
    with pytest.raises(ValueError, match=r"client 4: .*max\|x\| = 300000000000\.0"):
        secure_sum({4: np.array([3e11]), 5: np.array([1.0])}, threshold=2)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([np.nan]), 24)


def test_one_client_is_refused_and_thresholds_follow_the_fraction():
    with pytest.raises(ValueError, match="at least 2 clients per round.*federation.clients_per_round"):
        secure_sum({3: np.ones(4)}, threshold=1)
    with pytest.raises(ValueError, match="at least 2 clients per round"):
        threshold_for(1, 0.6)
    assert [threshold_for(10, f) for f in (0.1, 0.5, 0.51, 0.66, 1.0)] == [2, 5, 6, 7, 10]
    assert threshold_for(2, 0.6) == 2 and threshold_for(3, 0.6) == 2
    with pytest.raises(ValueError, match="threshold fraction must be in"):
        threshold_for(10, 0.0)


def test_torch_vectors_are_summed_like_numpy_ones():
    a, b = torch.tensor([0.25, -1.0], dtype=torch.float32), np.array([2.0, 0.5])
    result = secure_sum({0: a, 1: b}, threshold=2, random_bytes=np.random.default_rng(15).bytes)
    np.testing.assert_array_equal(result.total, [2.25, -0.5])
