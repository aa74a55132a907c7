"""The references of METHODS.md §2–§4 against independent transcriptions of the papers' equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from subspace_ops import reference as ref

f64 = dict(dtype=torch.float64)


# ---------------------------------------------------------------- §2 SVD basis
def test_svd_delta_is_a_sum_of_rank_one_terms():
    w, u, v, d = torch.randn(5, 4, **f64), torch.randn(5, 3, **f64), torch.randn(4, 3, **f64), torch.randn(3, **f64)
    expected = w.clone()
    for j in range(3):
        expected += d[j] * torch.outer(u[:, j], v[:, j])
    torch.testing.assert_close(ref.svd_delta_weight(w, u, v, d), expected)
    x = torch.randn(2, 4, **f64)
    torch.testing.assert_close(ref.svd_delta_linear(x, w, u, v, d), x @ expected.T)


def test_sam_parser_and_svdiff_start_at_w():
    w = torch.randn(6, 4, **f64)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    v = vh.T
    # SAM-PARSER: s initialized to σ, so d = 0 and U Σ* Vᵀ = W.
    torch.testing.assert_close(ref.svd_delta_weight(w, u, v, ref.sam_parser_delta(sigma.clone(), sigma)), w)
    # SVDiff: s = 0 gives relu(σ) − σ = 0.
    torch.testing.assert_close(ref.svd_delta_weight(w, u, v, ref.svdiff_delta(torch.zeros(4, **f64), sigma)), w)
    # SVDiff clips: s = −2σ makes every value relu(−σ) = 0, so W' = U·0·Vᵀ = 0.
    torch.testing.assert_close(ref.svd_delta_weight(w, u, v, ref.svdiff_delta(-2 * sigma, sigma)), torch.zeros_like(w))
    # SAM-PARSER with s = 2σ doubles W.
    torch.testing.assert_close(ref.svd_delta_weight(w, u, v, ref.sam_parser_delta(2 * sigma, sigma)), 2 * w)


@pytest.mark.parametrize(
    "perc,criterion,k",
    [(0.95, "variance", 1), (0.8, "variance", 2), (1.0, "variance", 0), (0.5, "variance", 3),
     (0.95, "magnitude", 0), (0.9, "magnitude", 1), (0.6, "magnitude", 2)],
)
def test_siva_rank_on_known_singular_values(perc, criterion, k):
    # σ = 4, 3, 2, 1: σ² shares 16/30, 25/30, 29/30, 1; σ shares 0.4, 0.7, 0.9, 1.
    w = torch.diag(torch.tensor([2.0, 4.0, 1.0, 3.0], **f64))
    sigma = torch.linalg.svdvals(w)
    assert ref.siva_select_rank(sigma, perc, criterion=criterion) == k


def test_siva_rank_errors():
    with pytest.raises(ValueError, match="perc"):
        ref.siva_select_rank(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="criterion"):
        ref.siva_select_rank(torch.ones(3), 0.5, criterion="energy")


# ---------------------------------------------------------------- §3 head mixing
def head_mixing_loops(q, k, v, mix, keep, scale):
    """003's layer written out: per head g and query i a softmax over allowed keys, then the mix."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    probs = torch.zeros(B, H, Nq, Nk, **f64)
    for b in range(B):
        for g in range(H):
            for i in range(Nq):
                allowed = [j for j in range(Nk) if keep[b, g, i, j]]
                if not allowed:
                    continue
                logits = torch.stack([scale * torch.dot(q[b, g, i], k[b, g, j]) for j in allowed])
                p = torch.exp(logits - logits.max())
                for j, value in zip(allowed, p / p.sum()):
                    probs[b, g, i, j] = value
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            mixed = sum(mix[h, g] * probs[b, g] for g in range(H))
            out[b, h] = mixed @ v[b, h]
    return out


@pytest.mark.parametrize("nq,nk,causal,mask_kind", [(5, 5, False, None), (5, 5, True, None), (4, 6, False, "bool"),
                                                    (6, 4, False, "additive")])
def test_head_mixing_matches_loops(nq, nk, causal, mask_kind):
    B, H, d = 2, 3, 4
    q, k, v = torch.randn(B, H, nq, d, **f64), torch.randn(B, H, nk, d, **f64), torch.randn(B, H, nk, d, **f64)
    mix = torch.eye(H, **f64) + 0.3 * torch.randn(H, H, **f64)
    keep = torch.ones(B, H, nq, nk, dtype=torch.bool)
    mask = None
    if causal:
        keep &= torch.ones(nq, nk, dtype=torch.bool).tril()
    if mask_kind == "bool":  # key padding: the last two keys of batch 1 are padding
        mask = torch.ones(B, 1, 1, nk, dtype=torch.bool)
        mask[1, ..., -2:] = False
        keep &= mask
    if mask_kind == "additive":
        mask = torch.zeros(B, 1, nq, nk, **f64)
        mask[0, 0, :, 0] = float("-inf")
        keep &= torch.isfinite(mask)
    got = ref.head_mixing_attention(q, k, v, mix, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(got, head_mixing_loops(q, k, v, mix, keep, 1 / math.sqrt(d)))


def test_head_mixing_identity_is_sdpa_and_fully_masked_rows_are_zero():
    q, k, v = (torch.randn(2, 4, 7, 8, **f64) for _ in range(3))
    eye = torch.eye(4, **f64)
    torch.testing.assert_close(ref.head_mixing_attention(q, k, v, eye), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(ref.head_mixing_attention(q, k, v, eye, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[3] = False  # query 3 may attend to nothing
    out = ref.head_mixing_attention(q, k, v, eye + 0.1, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_coeff_mix():
    alpha = torch.randn(3, 3, **f64)
    torch.testing.assert_close(ref.coeff_mix(torch.zeros(3, 3, **f64)), torch.eye(3, **f64))
    torch.testing.assert_close(ref.coeff_mix(alpha, 0.5, training=False), torch.eye(3, **f64) + alpha)


# ---------------------------------------------------------------- §4 low rank, DoRA, adapters, MPC
@pytest.mark.parametrize("g_kind", ["lora", "diagonal", "flora"])
def test_lowrank_linear(g_kind):
    N, K, r = 5, 6, 3
    x, w, a, b = torch.randn(4, K, **f64), torch.randn(N, K, **f64), torch.randn(N, r, **f64), torch.randn(r, K, **f64)
    g = {"lora": None, "diagonal": torch.randn(r, **f64), "flora": torch.randn(r, r, **f64)}[g_kind]
    g_full = torch.eye(r, **f64) if g is None else (torch.diag(g) if g.dim() == 1 else g)
    delta = torch.zeros(N, K, **f64)
    for i in range(r):
        for j in range(r):
            delta += g_full[i, j] * torch.outer(a[:, i], b[j])
    torch.testing.assert_close(ref.lowrank_delta_weight(a, g, b, 0.5), 0.5 * delta)
    torch.testing.assert_close(ref.lowrank_linear(x, w, a, g, b, scaling=0.5), x @ (w + 0.5 * delta).T)


def test_dora_at_init_is_the_base_layer_and_scales_rows():
    x, w, bias = torch.randn(3, 6, **f64), torch.randn(4, 6, **f64), torch.randn(4, **f64)
    a, b = torch.randn(4, 2, **f64), torch.zeros(2, 6, **f64)
    m = w.norm(dim=1)
    torch.testing.assert_close(ref.dora_linear(x, w, a, b, m, bias), x @ w.T + bias)
    b = torch.randn(2, 6, **f64)
    merged = w + a @ b
    rows = torch.stack([2.0 * merged[n] / torch.sqrt((merged[n] ** 2).sum()) for n in range(4)])
    torch.testing.assert_close(ref.dora_linear(x, w, a, b, torch.full((4,), 2.0, **f64)), x @ rows.T)


def test_adapters():
    h, down, up = torch.randn(3, 6, **f64), torch.randn(2, 6, **f64), torch.randn(6, 2, **f64)
    expected = torch.stack([up @ torch.relu(down @ h[i]) for i in range(3)])
    torch.testing.assert_close(ref.parallel_adapter(h, down, up), expected)
    torch.testing.assert_close(ref.sequential_adapter(h, down, up, torch.relu), h + expected)


def test_spectral_adapter_eq32_equals_eq33():
    w = torch.randn(6, 5, **f64)
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    v, r = vh.T, 2
    a, b = torch.randn(6, r, **f64), torch.randn(5, r, **f64)
    s_r = torch.diag(sigma[:r])
    eq33 = w + a @ s_r @ v[:, :r].T + u[:, :r] @ s_r @ b.T + a @ s_r @ b.T
    torch.testing.assert_close(ref.spectral_adapter_weight(u, sigma, v, a, b), eq33)
    torch.testing.assert_close(ref.spectral_adapter_weight(u, sigma, v, 0 * a, 0 * b), w)


def test_mpc_regularizers():
    # Ours: a [N, r] the up projection, b [r, K] the down projection (nn.Linear convention). 001 writes
    # eq. 20-21 with its A [in, r] the down and B [r, out] the up projection (001 Table 1): A = bᵀ, B = aᵀ.
    up, _ = torch.linalg.qr(torch.randn(8, 3, **f64))  # orthonormal columns
    rows, _ = torch.linalg.qr(torch.randn(7, 3, **f64))
    down = rows.T  # [3, 7] with orthonormal rows
    norms = torch.diag(torch.tensor([1.0, 2.0, 3.0], **f64))
    assert ref.mpc_orthogonal(up, down).item() == pytest.approx(0.0, abs=1e-20)
    # MPC_d lets the up projection's columns have any norms, not the down projection's rows.
    assert ref.mpc_diagonal(up @ norms, down).item() == pytest.approx(0.0, abs=1e-20)
    assert ref.mpc_diagonal(up, norms @ down).item() == pytest.approx(0 + 9 + 64)  # (4-1)² + (9-1)²
    assert ref.mpc_orthogonal(up @ norms, down).item() == pytest.approx(0 + 9 + 64)
    a, b = torch.randn(5, 2, **f64), torch.randn(2, 4, **f64)
    paper_a, paper_b = b.T, a.T  # 001's down [in, r] and up [r, out]
    ata, bbt = paper_a.T @ paper_a, paper_b @ paper_b.T
    expected_o = sum((ata[i, j] - float(i == j)) ** 2 + (bbt[i, j] - float(i == j)) ** 2 for i in range(2) for j in range(2))
    expected_d = sum((ata[i, j] - float(i == j)) ** 2 + (bbt[i, j] if i != j else 0) ** 2 for i in range(2) for j in range(2))
    assert ref.mpc_orthogonal(a, b).item() == pytest.approx(float(expected_o), rel=1e-12)
    assert ref.mpc_diagonal(a, b).item() == pytest.approx(float(expected_d), rel=1e-12)
