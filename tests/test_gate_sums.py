"""The fused gate prefix sums and gate gradient (templates/triton/gate_sums.py) against the torch
functions they replace on CUDA (gfwagen.gate), in the Triton interpreter, tiny shapes.

Both sides sum in float64 but in different orders, so float64 results agree to rounding and
float32 ones to one float32 rounding. (Sums of float32 inputs are usually exact in float64, and
then the two agree bit for bit; the float64 and wide-range cases below are where they do not.)
"""

import os

import pytest
import torch
from conftest import make_inputs

import gfwagen
from gfwagen import gate_sums
from gfwagen.gate import GATE_BOUND, GATE_CHUNK, chunked_prefix_sums, gate_grad_from_sums
from gfwagen.gate_sums import chunked_prefix_sums_fused, gate_grad_from_sums_fused
from gfwagen.varlen import segment_bounds

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton interpreter (CPU only)"
)

F32_EPS = torch.finfo(torch.float32).eps


def _log_gate(B, T, H, kind, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    if kind == "near0":  # ~ -0.1: long memory, |c| grows slowly
        lg = -0.1 * torch.exp(0.3 * x)
    elif kind == "deep":  # ~ -20
        lg = -20.0 + 2.0 * x
    elif kind == "mixed":  # realistic logsigmoid gates, a few at the clamp floor
        lg = torch.nn.functional.logsigmoid(x + 3.0)
        lg[torch.rand(B, T, H, generator=g) < 0.05] = -GATE_BOUND
    else:
        raise ValueError(kind)
    return lg.to(dtype)


def _check_fwd(lg, splits=None):
    local, base = chunked_prefix_sums_fused(lg, splits=splits)
    ref_local, ref_base = chunked_prefix_sums(lg)
    assert local.dtype == torch.float32 and local.shape == ref_local.shape
    assert base.dtype == torch.float64 and base.shape == ref_base.shape
    assert local.is_contiguous() and base.is_contiguous()
    scale = ref_base.abs().amax(-1, keepdim=True).clamp_min(1.0)
    assert ((base - ref_base).abs() <= 1e-13 * scale).all()
    assert (base[..., 0] == 0).all()
    # local is one float32 rounding of a float64 value both sides agree on to ~1e-13
    tol = F32_EPS * ref_local.double().abs() + 1e-12 * scale
    assert ((local.double() - ref_local.double()).abs() <= tol).all()
    return local, base


@pytest.mark.parametrize("B,T,H", [(1, 1, 1), (2, 255, 3), (1, 256, 2), (2, 257, 5), (1, 1000, 2)])
@pytest.mark.parametrize("kind", ["near0", "deep", "mixed"])
def test_prefix_sums_match_torch(B, T, H, kind):
    lg = _log_gate(B, T, H, kind, seed=T + H)
    _check_fwd(lg)


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
def test_prefix_sums_any_split(splits):
    """One launch (one split: the running base is carried in the first kernel) and two (the
    chunk totals scanned by the second), with splits that do not divide the chunk count."""
    lg = _log_gate(2, 5 * GATE_CHUNK + 17, 3, "mixed", seed=splits)
    _check_fwd(lg, splits=splits)


def test_prefix_sums_strided_and_half():
    lg = _log_gate(3, 300, 4, "near0", seed=7)
    # a [B, H, T] tensor seen as [B, T, H] (the layout the fused kernel writes) and a slice
    _check_fwd(lg.transpose(1, 2).contiguous().transpose(1, 2))
    _check_fwd(_log_gate(2, 300, 8, "mixed", seed=8)[:, 1::2, ::3])
    _check_fwd(lg.to(torch.float16))


@pytest.mark.parametrize("T", [600, 4 * GATE_CHUNK])
def test_prefix_sums_spare_entries_are_zero(T):
    """splits None takes the one-launch kernel here (a power-of-two chunk count puts the
    spare past its padded chunks)."""
    lg = _log_gate(1, T, 2, "deep")
    outs = [chunked_prefix_sums_fused(lg, spare=1, splits=s) for s in (1, 2, None)]
    ref_local, ref_base = chunked_prefix_sums(lg)
    for local, b in outs:
        assert b.shape[-1] == ref_base.shape[-1] + 1 and (b[..., -1] == 0).all()
        assert torch.allclose(b[..., :-1], ref_base, rtol=1e-14, atol=0)
        assert torch.equal(local, outs[0][0])


@pytest.mark.parametrize("chunks", [32, 33])
def test_prefix_sums_one_launch_up_to_its_limit(chunks):
    """The one-launch kernel holds up to WHOLE_MAX_CHUNKS chunks; one more takes the split
    path. Both match torch, ragged T included."""
    from gfwagen.template_loader import load_template

    assert load_template("triton", "gate_sums").WHOLE_MAX_CHUNKS == 32
    _check_fwd(_log_gate(1, (chunks - 1) * GATE_CHUNK + 77, 2, "mixed", seed=chunks))


def test_prefix_sums_keep_precision_far_from_zero():
    """|c| ~ 1.4e5 in log2 units (what T = 2^20 gates of -0.1 reach) after three chunks at the
    clamp floor: base carries it to float64 rounding, and local, the chunks' own sums, keeps
    float32 accuracy relative to the chunk, not to |c|."""
    lg = _log_gate(1, 4 * GATE_CHUNK + 100, 2, "near0", seed=3)
    lg[:, : 3 * GATE_CHUNK] = -GATE_BOUND
    for splits in (1, 3, None):
        local, base = _check_fwd(lg, splits=splits)
        assert base[..., 3].abs().min() > 1.4e5
        assert local[..., 3 * GATE_CHUNK :].abs().max() < 100


@pytest.mark.parametrize("splits", [1, 2, None])
def test_prefix_sums_clamp_on_load(splits):
    """bound: the sums of the clamped gate (gate.sanitize_log_gate) without a clamp launch:
    -inf and gates past the bound clamp, gates inside stay, NaN stays NaN."""
    from gfwagen.gate import sanitize_log_gate

    lg = _log_gate(2, 2 * GATE_CHUNK + 9, 3, "mixed", seed=11)
    lg[0, 5, 0], lg[0, 300, 1], lg[1, 7, 2] = -float("inf"), -1e4, float("inf")
    lg[1, 100, 1] = 3 * GATE_BOUND
    local, base = chunked_prefix_sums_fused(lg, splits=splits, bound=GATE_BOUND)
    ref_local, ref_base = chunked_prefix_sums(sanitize_log_gate(lg))
    assert torch.isfinite(local).all() and torch.isfinite(base).all()
    torch.testing.assert_close(base, ref_base, rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(local, ref_local, rtol=1e-6, atol=1e-4)
    lg[1, 3, 0] = float("nan")
    local, _ = chunked_prefix_sums_fused(lg, splits=splits, bound=GATE_BOUND)
    assert local[1, 0, 3:GATE_CHUNK].isnan().all() and not local[1, 0, :3].isnan().any()


@pytest.mark.parametrize("T,block_n", [(1, 64), (128, 128), (300, 128), (77, 16)])
@pytest.mark.parametrize("kind", ["near0", "deep", "mixed"])
def test_tile_records_match_torch(T, block_n, kind):
    """tile_records_fused (what TVM's pingpong forward reads) against gate.tile_records: each tile's
    sums start again (float32 of a sum over one tile), the scale divides, the clamp applies
    on load, NaN stays NaN, the padding is zero; strided and half gates too."""
    from gfwagen.gate import sanitize_log_gate, tile_records
    from gfwagen.gate_sums import tile_records_fused

    lg = _log_gate(2, T, 3, kind, seed=T)
    lg[0, T // 2, 1] = -float("inf")
    for g, scale in ((lg, 0.125), (lg.transpose(1, 2).contiguous().half().transpose(1, 2), -2.0)):
        rec = tile_records_fused(g, block_n, scale, bound=GATE_BOUND)
        ref = tile_records(sanitize_log_gate(g.float()), block_n, scale)
        assert rec.dtype == torch.float32 and rec.shape == ref.shape and rec.is_contiguous()
        # one float32 sum over a tile: a few float32 roundings of the tile's magnitude
        mag = ref.view(2, 3, -1, block_n + 4).abs().amax(-1, keepdim=True)
        err = (rec - ref).view(2, 3, -1, block_n + 4).abs()
        assert (err <= 4 * block_n * F32_EPS * mag + 1e-30).all()
        assert (rec.view(2, 3, -1, block_n + 4)[..., block_n + 1:] == 0).all()
    lg[1, 0, 2] = float("nan")
    rec = tile_records_fused(lg, block_n, 1.0, bound=GATE_BOUND).view(2, 3, -1, block_n + 4)
    assert rec[1, 2, 0, :block_n + 1].isnan().all() and not rec[1, :2].isnan().any()
    assert tile_records_fused(lg[:, :0], block_n, 1.0).shape == (2, 3, 0)
    with pytest.raises(ValueError, match="scale"):
        tile_records_fused(lg, block_n, 0.0)


def _table_biases(rec: torch.Tensor, block_n: int) -> torch.Tensor:
    """The keys' float32 biases of bias-table records [..., floats a record]: each key's three
    bfloat16 pieces, at (key // 8) * 24 + piece * 8 + key % 8 of the table, summed."""
    from gfwagen.gate import key_table_bytes

    tab = rec[..., :key_table_bytes(block_n) // 4].contiguous().view(torch.bfloat16).float()
    j = torch.arange(block_n)
    return sum(tab[..., (j // 8) * 24 + p * 8 + j % 8] for p in range(3))


@pytest.mark.parametrize("T,block_n", [(300, 128), (64, 64), (77, 16)])
@pytest.mark.parametrize("kind", ["near0", "deep", "mixed"])
def test_tile_tables_hold_the_biases_in_three_bf16_pieces(T, block_n, kind):
    """tile_tables (TVM's forward with bias_mma): each key's three bfloat16 pieces, read at
    (key // 8) * 24 + piece * 8 + key % 8, sum to tile_records' float32 bias within a few
    units of its last place; the table's tail is zero; the total and padding follow. The
    fused launch (integer rounding, no bfloat16 in the kernel) writes the same pieces up to
    its float32 sum's rounding."""
    from gfwagen.gate import key_table_bytes, sanitize_log_gate, tile_records, tile_tables
    from gfwagen.gate_sums import tile_records_fused

    lg = sanitize_log_gate(_log_gate(2, T, 3, kind, seed=T))
    lg[0, T // 2, 1] = -GATE_BOUND
    n, halves = -(-T // block_n), key_table_bytes(block_n) // 2
    plain = tile_records(lg, block_n, 0.125).view(2, 3, n, block_n + 4)
    for rec in (tile_tables(lg, block_n, 0.125),
                tile_records_fused(lg, block_n, 0.125, bound=GATE_BOUND, table=True)):
        rec = rec.view(2, 3, n, halves // 2 + 4)
        tab = rec[..., :halves // 2].contiguous().view(torch.bfloat16).float()
        bias = _table_biases(rec, block_n)
        mag = plain[..., :block_n].abs().amax(-1, keepdim=True)
        assert ((bias - plain[..., :block_n]).abs() <= 4 * block_n * F32_EPS * mag).all()
        assert (tab[..., (block_n // 8) * 24:] == 0).all()
        torch.testing.assert_close(rec[..., halves // 2:], plain[..., block_n:],
                                   rtol=1e-6, atol=1e-6)
    # a NaN gate: NaN pieces from that key on in its tile (as the records' biases), whatever
    # its payload
    lg[1, 0, 2] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)
    rec = tile_records_fused(lg, block_n, 1.0, bound=GATE_BOUND, table=True)
    tab = rec.view(2, 3, n, halves // 2 + 4)[1, 2, 0, :halves // 2].contiguous()
    j = torch.arange(block_n)
    bias = tab.view(torch.bfloat16).float()[(j // 8) * 24 + j % 8]  # the hi pieces
    assert bias.isnan().all() and not rec.view(2, 3, n, -1)[1, :2].isnan().any()


@pytest.mark.parametrize("heads", [1, 2])
def test_tile_tables_by_any_heads_a_program(heads):
    """launch_gate_tile_tables' grid (heads a program, benchmarks/records_grid.py) changes
    only the sums' order: the same records as the default grid's to float32 rounding, also
    where the heads a program do not divide H (3 heads, 2 a program)."""
    from gfwagen.gate import key_table_bytes, sanitize_log_gate
    from gfwagen.template_loader import load_template

    lg = sanitize_log_gate(_log_gate(2, 300, 3, "mixed", seed=5))
    tb = key_table_bytes(128)
    biases, tails = [], []
    for h in (None, heads):
        rec = torch.zeros(2, 3, 3 * (tb // 4 + 4))
        load_template("triton", "gate_sums").launch_gate_tile_tables(
            lg, rec, rec.view(torch.int16), 128, 0.125, tb, bound=GATE_BOUND, heads=h)
        rec = rec.view(2, 3, 3, -1)
        biases.append(_table_biases(rec, 128))
        tails.append(rec[..., tb // 4:])  # the total and its padding
    assert biases[0].abs().amax() > 0
    torch.testing.assert_close(biases[1], biases[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(tails[1], tails[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,block_n", [(1, 64), (128, 64), (300, 128), (77, 16)])
@pytest.mark.parametrize("kind", ["near0", "deep", "mixed"])
def test_key_bias_matches_torch(T, block_n, kind):
    """key_bias_fused (what the Triton forward's bias_mma path reads) against gate.key_bias:
    each tile's biases start again, the pieces add up to the bias to float32 accuracy, the
    columns past the third and the pad after the table are zero, the shifts are the previous
    tiles' last biases negated (0 first), the clamp applies on load, NaN stays within its
    tile and the next shift."""
    from gfwagen.gate import KEY_BIAS_ROW, key_bias, sanitize_log_gate
    from gfwagen.gate_sums import key_bias_fused
    from gfwagen.template_loader import load_template

    assert load_template("triton", "key_bias").WIDTH == KEY_BIAS_ROW

    lg = _log_gate(2, T, 3, kind, seed=T)
    lg[0, T // 2, 1] = -float("inf")
    n = -(-T // block_n)
    for g, dt in ((lg, torch.float32), (lg.transpose(1, 2).contiguous().half().transpose(1, 2),
                                        torch.float16)):
        pieces, shifts = key_bias_fused(g, block_n, 0.125, dt, bound=GATE_BOUND)
        ref_p, ref_s = key_bias(sanitize_log_gate(g.float()), block_n, 0.125, dt)
        assert pieces.shape == ref_p.shape == (6, n * block_n, 8) and pieces.dtype == dt
        assert shifts.shape == ref_s.shape == (6, n + 1) and shifts.is_contiguous()
        bias = ref_p[..., :3].double().sum(-1)
        mag = bias.view(6, n, block_n).abs().amax(-1, keepdim=True)
        # one float32 sum over a tile: a few roundings of the tile's magnitude; fp16's pieces
        # also lose what falls under its smallest subnormal
        tol = 4 * block_n * F32_EPS * mag + (6e-8 if dt == torch.float16 else 1e-30)
        assert ((pieces[..., :3].double().sum(-1) - bias).view(6, n, block_n).abs()
                <= tol).all()
        assert (pieces[..., 3:] == 0).all() and (shifts[:, 0] == 0).all()
        # the forward's last 16-wide read runs 8 past the table, into zeros of its own
        whole = torch.empty(0, dtype=dt).set_(pieces.untyped_storage())
        assert whole.numel() == pieces.numel() + 8 and (whole[-8:] == 0).all()
        assert torch.allclose(shifts, ref_s, rtol=4 * block_n * F32_EPS, atol=1e-6)
        if dt == torch.float32:  # the pieces hold the float32 bias itself
            assert (pieces[..., 1:3] == 0).all()
            torch.testing.assert_close(shifts[:, 1:], -pieces.view(6, n, block_n, 8)[
                :, :, -1, 0], rtol=0, atol=0)
    lg[1, 0, 2] = float("nan")
    pieces, shifts = key_bias_fused(lg, block_n, 1.0, torch.float32, bound=GATE_BOUND)
    assert pieces[5, :block_n, 0].isnan().all() and shifts[5, 1].isnan()
    assert not pieces[:5].isnan().any() and not pieces[5, block_n:].isnan().any()
    assert key_bias_fused(lg[:, :0], block_n, 1.0, torch.float32)[0].shape == (6, 0, 8)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale"):
            key_bias_fused(lg, block_n, bad, torch.float32)


def test_prefix_sums_empty():
    local, base = chunked_prefix_sums_fused(torch.zeros(2, 0, 3), spare=1)
    assert local.shape == (2, 3, 0) and base.shape == (2, 3, 1) and (base == 0).all()


def _sums(B, H, T, dtype, seed, layout="bht"):
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(B, H, T, generator=g, dtype=torch.float64)
    col = torch.randn(B, H, T, generator=g, dtype=torch.float64)
    # Real row and column sums of dS cancel over a sequence; make dc = row - col do so too,
    # with a wide range of sizes so that the float64 sums round.
    row = row * torch.exp(3.0 * torch.randn(B, H, T, generator=g, dtype=torch.float64))
    col = col + (row - col).sum(-1, keepdim=True) / T
    if layout == "stacked":  # the backend's two views of one [2, B, H, T] buffer
        both = torch.stack([row, col]).to(dtype)
        return both[0], both[1]
    if layout == "strided":
        return (
            row.transpose(1, 2).contiguous().transpose(1, 2).to(dtype),
            col.to(dtype).repeat(1, 1, 2)[..., ::2],
        )
    return row.to(dtype), col.to(dtype)


def _check_bwd(row, col, seg_end=None, splits=None):
    got = gate_grad_from_sums_fused(row, col, seg_end, splits=splits)
    ref = gate_grad_from_sums(row, col, seg_end)
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.is_contiguous()
    # float64 rounding of sums of |dc| (per (b, h)), then one float32 rounding when narrowed
    bound = 1e-13 * (row.double() - col.double()).abs().sum(-1)[:, None, :]
    if got.dtype == torch.float32:
        bound = bound + F32_EPS * ref.double().abs()
    assert ((got.double() - ref.double()).abs() <= bound).all()
    # the zeros are exact, not rounding residue
    first = torch.zeros(row.shape[-1], dtype=torch.bool, device=row.device)
    first[:1] = True
    if seg_end is not None:
        first[1:] = seg_end[1:] != seg_end[:-1]
    assert (got[:, first] == 0).all()
    return got


@pytest.mark.parametrize("B,H,T", [(1, 1, 1), (2, 3, 255), (1, 2, 256), (2, 5, 257), (1, 2, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_grad_matches_torch(B, H, T, dtype):
    row, col = _sums(B, H, T, dtype, seed=T)
    _check_bwd(row, col)


@pytest.mark.parametrize("splits", [1, 2, 3, 64])
@pytest.mark.parametrize("layout", ["stacked", "strided"])
def test_gate_grad_any_split_and_layout(splits, layout):
    row, col = _sums(2, 3, 4 * 256 + 9, torch.float64, seed=splits, layout=layout)
    _check_bwd(row, col, splits=splits)


VARLEN = [
    [0, 300],
    [0, 1, 1, 50, 256, 257, 257, 300],  # 1-token and empty sequences, a chunk-sized one
    [0, 0, 299, 300],  # empty first, 1-token last
    [0, 100, 200, 300, 300],  # empty last
]


@pytest.mark.parametrize("cu", VARLEN, ids=lambda cu: "-".join(map(str, cu)))
@pytest.mark.parametrize("splits", [None, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_grad_varlen_restarts(cu, splits, dtype):
    T = 300
    _, seg_end = segment_bounds(torch.tensor(cu), T)
    row, col = _sums(1, 3, T, dtype, seed=len(cu))
    got = _check_bwd(row, col, seg_end, splits=splits)
    # the restart: each sequence's gradient is that of the sequence alone
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            alone = gate_grad_from_sums(row[..., a:b], col[..., a:b])
            assert torch.allclose(got[:, a:b], alone, rtol=1e-6, atol=1e-9 * row.abs().max())


def test_gate_grad_varlen_int64_and_empty():
    _, seg_end = segment_bounds(torch.tensor([0, 3, 3, 7]), 7)
    row, col = _sums(1, 2, 7, torch.float64, seed=0)
    _check_bwd(row, col, seg_end.long())
    out = gate_grad_from_sums_fused(row[..., :0], col[..., :0])
    assert out.shape == (1, 0, 2)


def test_backend_takes_fused_path(monkeypatch):
    """The Triton backend with the fused kernels forced on (on the CPU they are off): the same
    output and gradients as with the torch functions, packed sequences included."""
    q, k, v, lg = make_inputs(1, 40, 2, 2, 16, 16, torch.float32, True, seed=0)
    # gates past the clamp: the fused sums clamp on load, the torch path clamps before
    lg[0, 3, 1], lg[0, 20, 0], lg[0, 30, 1] = -float("inf"), -1e3, 2 * GATE_BOUND
    cu = torch.tensor([0, 13, 13, 40])
    calls = []

    def run(fused):
        monkeypatch.setattr(gate_sums, "use_fused", lambda t: calls.append(fused) or fused)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, lg)]
        o = gfwagen.attention(*leaves, window=9, backend="triton", cu_seqlens=cu)
        return (o, *torch.autograd.grad(o, leaves, torch.ones_like(o)))

    fused, plain = run(True), run(False)
    assert True in calls and False in calls
    for a, b in zip(fused, plain):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind", ["near0", "deep", "mixed"])
def test_whole_prefix_sums_match_torch(kind, splits):
    """prefix_sums_fused (the TVM backend's gate sums on CUDA) against gate.prefix_sums: float64
    throughout, so equal to float64 rounding of |c|; the clamp applied on load."""
    from gfwagen.gate import prefix_sums, sanitize_log_gate
    from gfwagen.gate_sums import prefix_sums_fused

    lg = _log_gate(2, 3 * GATE_CHUNK + 41, 3, kind, seed=splits)
    lg[1, 9, 2] = -float("inf")
    c = prefix_sums_fused(lg, splits=splits, bound=GATE_BOUND)
    ref = prefix_sums(sanitize_log_gate(lg))
    assert c.dtype == torch.float64 and c.shape == ref.shape and c.is_contiguous()
    torch.testing.assert_close(c, ref, rtol=1e-13, atol=1e-10)
    assert prefix_sums_fused(lg[:, :0]).shape == (2, 3, 0)


@pytest.mark.parametrize("chunks", [1, 32, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_grad_one_launch_up_to_its_limit(chunks, dtype):
    """splits None takes the one-launch backward up to WHOLE_MAX_CHUNKS chunks (ragged T, row
    and column sums as the backend's two views of one buffer); one more takes the split
    path. Both match torch, and the one launch matches a forced split path to rounding."""
    from gfwagen.template_loader import load_template

    tpl = load_template("triton", "gate_sums")
    T = (chunks - 1) * 256 + 77
    assert (tpl.bwd_splits(2, 3, T) == 1) == (chunks <= tpl.WHOLE_MAX_CHUNKS)
    if chunks > 1:  # packed sequences keep the split path
        assert tpl.bwd_splits(2, 3, T, packed=True) > 1
    row, col = _sums(2, 3, T, dtype, seed=chunks, layout="stacked")
    whole = _check_bwd(row, col)
    split = _check_bwd(row, col, splits=3)
    bound = 1e-13 * (row.double() - col.double()).abs().sum(-1)[:, None, :]
    if dtype == torch.float32:
        bound = bound + 2 * F32_EPS * split.double().abs()
    assert ((whole.double() - split.double()).abs() <= bound).all()


@pytest.mark.parametrize("chunks", [1, 32, 33])
def test_whole_prefix_sums_one_launch_up_to_its_limit(chunks):
    """prefix_sums_fused with splits None: one launch up to WHOLE_MAX_CHUNKS chunks (the
    absolute float64 sums straight from gate_sums_whole_kernel), three past it."""
    from gfwagen.gate import prefix_sums, sanitize_log_gate
    from gfwagen.gate_sums import prefix_sums_fused

    lg = _log_gate(2, (chunks - 1) * GATE_CHUNK + 77, 3, "mixed", seed=chunks)
    lg[0, 5, 1] = -float("inf")
    c = prefix_sums_fused(lg, bound=GATE_BOUND)
    ref = prefix_sums(sanitize_log_gate(lg))
    assert c.dtype == torch.float64 and c.shape == ref.shape and c.is_contiguous()
    torch.testing.assert_close(c, ref, rtol=1e-13, atol=1e-10)
