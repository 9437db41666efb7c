"""The gate's prefix sums (forward) and their gradient (backward), Triton template: the fused
versions of gfwagen.gate.chunked_prefix_sums and gfwagen.gate.gate_grad_from_sums.

Forward, from log_gate [B, T, H] (any strides, any float dtype):

    local [B, H, T] float32    = log2(e) * (sum of the gates of t's CHUNK-chunk up to t)
    base  [B, H, n_base] float64: base[n] = log2(e) * (sum of the gates of chunks < n), and
                                  0 in the spare entries past the last chunk

Backward, from the attention's row and column sums of dS ([B, H, T], float32 or float64) and,
for packed sequences, seg_end [T] (one past the end of each position's sequence):

    dc = row - col (float64);  rev[t] = sum_{s >= t} dc_s
    dlog_gate[t] = rev[t] - rev[seg_end[t]]  (rev[T] = 0), and exactly 0 at t = 0 and wherever
                   seg_end changes (the first position of a sequence)

Every sum runs in float64: |c| reaches 1e5 at a million tokens, and dc sums to zero over a
sequence, so the suffix sums are differences of large partial sums.

A sequence of up to WHOLE_MAX_CHUNKS chunks takes one launch each way: a program per (batch,
head) holds all of it (gate_sums_whole_kernel, gate_sums_bwd_whole_kernel). Longer ones, and
packed sequences backward, cut T into splits, one program per (batch, block of heads, split),
so that a single long sequence still fills the GPU. A program walks its split one tile at a
time carrying a float64 total. With one split the walk covers T and one launch does
everything; with more, the sums that cross splits come from a second launch (the forward scans
the chunk totals the first launch left in base; the backward's first launch stores each
split's total and the second adds those of the later splits). This file imports nothing from
gfwagen.
"""

import triton
import triton.language as tl

from .common import cdiv, heads_per_program, launcher, next_pow2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def gate_sums_fwd_kernel(
    g_ptr,
    local_ptr,
    base_ptr,
    T,
    H,
    NC,
    N_BASE,
    stride_b,
    stride_t,
    stride_h,
    chunks_per_split,
    BLOCK_H: tl.constexpr,
    CHUNK: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    BOUND: tl.constexpr,
    LOCAL_F64: tl.constexpr = False,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    k0 = tl.program_id(2) * chunks_per_split
    k1 = tl.minimum(k0 + chunks_per_split, NC)
    rows = (pid_b * H + offs_h).to(tl.int64)
    g_row = g_ptr + pid_b * stride_b + offs_h.to(tl.int64) * stride_h
    base_row = base_ptr + rows * N_BASE
    running = tl.zeros([BLOCK_H], dtype=tl.float64)
    for kc in tl.range(k0, k1):
        offs_t = kc * CHUNK + tl.arange(0, CHUNK)
        m = (offs_t < T)[:, None] & h_in[None, :]
        x = tl.load(g_row[None, :] + offs_t.to(tl.int64)[:, None] * stride_t, mask=m, other=0.0)
        if BOUND > 0:
            # gfwagen.gate.sanitize_log_gate's clamp, applied on load rather than as a launch
            # of its own; NaN stays NaN as there.
            x = tl.clamp(x, -BOUND, BOUND, propagate_nan=tl.PropagateNan.ALL)
        x = x.to(tl.float64)
        # The chunk-local sum in float64, narrowed once: float32 only ever holds the sum over
        # one chunk, as the attention kernels assume.
        loc = tl.cumsum(x, axis=0)
        if LOCAL_F64:
            # natural units, float64 (gate_sums_absolute_kernel then adds the base)
            tl.store(local_ptr + rows[None, :] * T + offs_t[:, None], loc, mask=m)
        else:
            loc = loc * LOG2E
            tl.store(local_ptr + rows[None, :] * T + offs_t[:, None], loc.to(tl.float32), mask=m)
        total = tl.sum(x, axis=0)
        if ONE_SPLIT:
            tl.store(base_row + kc, running * LOG2E, mask=h_in)
            running += total
        else:
            # Shifted by one so that gate_sums_scan_kernel's inclusive scan is base itself;
            # the last chunk's total feeds no base.
            tl.store(base_row + kc + 1, total, mask=h_in & (kc + 1 < NC))
    if ONE_SPLIT:
        # The spare entries (a kernel's gate prefetch may read one past the last chunk).
        for n in tl.range(NC, N_BASE):
            tl.store(base_row + n, tl.zeros([BLOCK_H], dtype=tl.float64), mask=h_in)


@triton.jit
def gate_sums_whole_kernel(
    g_ptr,
    local_ptr,
    base_ptr,
    T,
    H,
    NC,
    N_BASE,
    stride_b,
    stride_t,
    stride_h,
    CHUNK: tl.constexpr,
    NC_PAD: tl.constexpr,
    BOUND: tl.constexpr,
    ABSOLUTE: tl.constexpr = False,
):
    """gate_sums_fwd_kernel's outputs in one launch for a sequence that fits one program
    (T <= NC_PAD * CHUNK): a program per (batch, head) holds all of it as [chunk, position]
    and scans both levels at once, where the split path takes a second launch for the chunk
    bases and a single split walks the chunks one after another. ABSOLUTE: local is float64
    and receives the whole prefix sums in natural units (what the split path's third launch,
    gate_sums_absolute_kernel, makes); base is not written."""
    row = tl.program_id(0).to(tl.int64)  # b * H + h: local's and base's row
    b = row // H
    h = row % H
    offs_c = tl.arange(0, NC_PAD)
    offs_t = offs_c[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    m = offs_t < T
    x = tl.load(
        g_ptr + b * stride_b + h * stride_h + offs_t.to(tl.int64) * stride_t, mask=m, other=0.0
    )
    if BOUND > 0:  # as gate_sums_fwd_kernel
        x = tl.clamp(x, -BOUND, BOUND, propagate_nan=tl.PropagateNan.ALL)
    x = x.to(tl.float64)
    total = tl.sum(x, axis=1)
    before = tl.cumsum(total, axis=0) - total  # exclusive: the chunks before each
    if ABSOLUTE:
        tl.store(local_ptr + row * T + offs_t, tl.cumsum(x, axis=1) + before[:, None], mask=m)
    else:
        loc = tl.cumsum(x, axis=1) * LOG2E
        tl.store(local_ptr + row * T + offs_t, loc.to(tl.float32), mask=m)
        base_row = base_ptr + row * N_BASE
        tl.store(base_row + offs_c, tl.where(offs_c < NC, before * LOG2E, 0.0),
                 mask=offs_c < N_BASE)
        for n in tl.range(NC_PAD, N_BASE):  # spare entries past the padded chunks
            tl.store(base_row + n, 0.0)


@triton.jit
def key_tile_gates(g_ptr, stride_b, stride_t, stride_h, T, H, BLOCK_N: tl.constexpr,
                   BLOCK_H: tl.constexpr, BOUND: tl.constexpr):
    """The gates of a per-key-tile launch's program (grid: key tile, batch, block of heads:
    the tiles on x, the one extent CUDA does not cap at 65535), float32 [BLOCK_N, BLOCK_H]
    (a sum over one tile only, as the TVM kernel's own scan keeps it), clamped to [-BOUND,
    BOUND] when BOUND > 0 as gate_sums_fwd_kernel does; positions past T read 0. Returns
    them, the batch, the tile, the heads and which heads exist."""
    kt = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    offs_t = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(g_ptr + pid_b * stride_b + offs_h.to(tl.int64)[None, :] * stride_h
                + offs_t[:, None] * stride_t, mask=(offs_t < T)[:, None] & h_in[None, :],
                other=0.0)
    if BOUND > 0:
        x = tl.clamp(x, -BOUND, BOUND, propagate_nan=tl.PropagateNan.ALL)
    return x.to(tl.float32), pid_b, kt, offs_h, h_in


@triton.jit
def gate_tile_records_kernel(
    g_ptr,
    rec_ptr,
    T,
    H,
    NKT,
    stride_b,
    stride_t,
    stride_h,
    neg_rscale,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BOUND: tl.constexpr,
):
    """Key tile kt's records for a block of heads (launch_gate_tile_records): each program
    sums one tile, so no sum crosses programs. Positions past T count as gate 0; the
    attention masks their keys."""
    x, pid_b, kt, offs_h, h_in = key_tile_gates(g_ptr, stride_b, stride_t, stride_h, T, H,
                                                BLOCK_N, BLOCK_H, BOUND)
    loc = tl.cumsum(x, axis=0)
    rec = rec_ptr + ((pid_b * H + offs_h.to(tl.int64)) * NKT + kt) * (BLOCK_N + 4)
    tl.store(rec[None, :] + tl.arange(0, BLOCK_N)[:, None], loc * neg_rscale, mask=h_in[None, :])
    tot = tl.sum(x, axis=0) * LOG2E
    zero = tl.zeros([BLOCK_H], dtype=tl.float32)
    tl.store(rec + BLOCK_N, tot, mask=h_in)
    for e in tl.static_range(1, 4):
        tl.store(rec + BLOCK_N + e, zero, mask=h_in)


@triton.jit
def _bf16_bits(x):
    """float32 -> its nearest bfloat16 (ties to even) as the 16 bits in an int32, and that
    value back as float32: integer math, which Triton's interpreter runs (it has no bf16).
    NaN gives the quiet NaN: the rounding add would carry some payloads into the sign."""
    u = x.to(tl.int32, bitcast=True)
    r = tl.where(x != x, 0x7FC0, (u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return r & 0xFFFF, (r << 16).to(tl.float32, bitcast=True)


@triton.jit
def gate_tile_tables_kernel(
    g_ptr,
    rec_ptr,
    tab_ptr,
    T,
    H,
    NKT,
    stride_b,
    stride_t,
    stride_h,
    neg_rscale,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BOUND: tl.constexpr,
    REC: tl.constexpr,
    TABLE: tl.constexpr,
    TAIL_BLOCK: tl.constexpr,
):
    """gate_tile_records_kernel's records in the bias-table form (launch_gate_tile_tables):
    each key's bias as three bfloat16 pieces (hi, mid, lo: their sum is the float32 bias to
    about 2^-24), written as 16-bit integers through tab_ptr (rec_ptr's memory) at
    (key // 8) * 24 + piece * 8 + key % 8, the rest of the table's TABLE halves zero; then
    the total and three zeros (REC floats a record). A kernel of its own, not a switch of
    gate_tile_records_kernel: that one feeds every gated pingpong forward as checked on the
    GPU."""
    x, pid_b, kt, offs_h, h_in = key_tile_gates(g_ptr, stride_b, stride_t, stride_h, T, H,
                                                BLOCK_N, BLOCK_H, BOUND)
    bias = tl.cumsum(x, axis=0) * neg_rscale
    rec = ((pid_b * H + offs_h.to(tl.int64)) * NKT + kt) * REC  # in floats
    j = tl.arange(0, BLOCK_N)
    tab = tab_ptr + 2 * rec[None, :] + ((j // 8) * 24 + j % 8)[:, None]
    rest = bias
    for piece in tl.static_range(3):
        bits, val = _bf16_bits(rest)
        tl.store(tab + piece * 8, bits.to(tl.int16), mask=h_in[None, :])
        rest = rest - val
    # The rest of the record, the table's zero tail, then the total (its float32 bits as two
    # halves) and three zero floats, in one contiguous store a head (16-byte vectors): stored
    # a half at a time, each head's records far apart, it took 68 of the kernel's 74 store
    # instructions, each lane its own sector (offline sm_90 PTX, session 43)
    tot = (tl.sum(x, axis=0) * LOG2E).to(tl.int32, bitcast=True)
    z0 = (BLOCK_N // 8) * 24
    c = tl.arange(0, TAIL_BLOCK)[None, :]
    tail = tl.where(c == TABLE - z0, (tot & 0xFFFF)[:, None], 0)
    tail = tl.where(c == TABLE - z0 + 1, ((tot >> 16) & 0xFFFF)[:, None], tail)
    tl.store(tab_ptr + 2 * rec[:, None] + z0 + c, tail.to(tl.int16),
             mask=h_in[:, None] & (c < TABLE - z0 + 8))


@triton.jit
def gate_sums_scan_kernel(base_ptr, NC, N_BASE, BLOCK: tl.constexpr):
    """base[row, n] <- log2(e) * sum_{0 < m <= n} base[row, m] in place (the chunk totals that
    gate_sums_fwd_kernel stored shifted by one), base[row, 0] = 0, spares 0."""
    ptr = base_ptr + tl.program_id(0).to(tl.int64) * N_BASE
    carry = tl.zeros([1], dtype=tl.float64)
    for j in tl.range(0, tl.cdiv(N_BASE, BLOCK)):
        idx = j * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(ptr + idx, mask=(idx >= 1) & (idx < NC), other=0.0).to(tl.float64)
        c = tl.cumsum(x, axis=0) + carry
        tl.store(ptr + idx, tl.where(idx < NC, c * LOG2E, 0.0), mask=idx < N_BASE)
        carry += tl.sum(x, axis=0)


@triton.jit
def gate_sums_absolute_kernel(c_ptr, base_ptr, T, N_BASE, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """c[row, t] += ln(2) * base[row, t // CHUNK] in place: float64 chunk-local sums (natural
    units) into the whole prefix sums, for kernels that take those (the TVM templates)."""
    row = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)  # b * H + h
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < T
    base = tl.load(base_ptr + row * N_BASE + offs // CHUNK, mask=m, other=0.0)
    c = tl.load(c_ptr + row * T + offs, mask=m, other=0.0)
    tl.store(c_ptr + row * T + offs, c + base * LN2, mask=m)


@triton.jit
def _dc_tile(row_ptr, col_ptr, offs_t, m, rs_t, cs_t):
    r = tl.load(row_ptr + offs_t.to(tl.int64)[:, None] * rs_t, mask=m, other=0.0)
    c = tl.load(col_ptr + offs_t.to(tl.int64)[:, None] * cs_t, mask=m, other=0.0)
    return r.to(tl.float64) - c.to(tl.float64)


@triton.jit
def gate_sums_bwd_kernel(
    row_ptr,
    col_ptr,
    tot_ptr,
    out_ptr,
    T,
    H,
    n_split,
    tiles_per_split,
    rs_b,
    rs_h,
    rs_t,
    cs_b,
    cs_h,
    cs_t,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
    TOTALS: tl.constexpr,
    FROM_TOTALS: tl.constexpr,
    RAW_REV: tl.constexpr,
):
    """TOTALS: tot[b, h, split] = sum of dc over the split. Otherwise the reverse sums of the
    split, plus those of the later splits read from tot when FROM_TOTALS, into out ([B, T, H]):
    rev itself in float64 when RAW_REV (gate_sums_restart_kernel finishes it), else the
    gradient with its first position zeroed, in out's dtype."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < H
    split = tl.program_id(2)
    j0 = split * tiles_per_split
    j1 = tl.minimum(j0 + tiles_per_split, tl.cdiv(T, BLOCK_T))
    r_row = row_ptr + pid_b * rs_b + offs_h.to(tl.int64)[None, :] * rs_h
    c_row = col_ptr + pid_b * cs_b + offs_h.to(tl.int64)[None, :] * cs_h
    tot_row = tot_ptr + (pid_b * H + offs_h).to(tl.int64) * n_split
    if TOTALS:
        acc = tl.zeros([BLOCK_H], dtype=tl.float64)
        for j in tl.range(j0, j1):
            offs_t = j * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (offs_t < T)[:, None] & h_in[None, :]
            acc += tl.sum(_dc_tile(r_row, c_row, offs_t, m, rs_t, cs_t), axis=0)
        tl.store(tot_row + split, acc, mask=h_in)
    else:
        carry = tl.zeros([BLOCK_H], dtype=tl.float64)
        if FROM_TOTALS:
            for s0 in tl.range(split + 1, n_split, SPLIT_BLOCK):
                s = s0 + tl.arange(0, SPLIT_BLOCK)
                tm = (s < n_split)[:, None] & h_in[None, :]
                carry += tl.sum(tl.load(tot_row[None, :] + s[:, None], mask=tm, other=0.0), 0)
        for i in tl.range(0, j1 - j0):
            offs_t = (j1 - 1 - i) * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (offs_t < T)[:, None] & h_in[None, :]
            dc = _dc_tile(r_row, c_row, offs_t, m, rs_t, cs_t)
            rev = tl.cumsum(dc, axis=0, reverse=True) + carry[None, :]
            carry += tl.sum(dc, axis=0)
            out = out_ptr + (pid_b * T + offs_t)[:, None] * H + offs_h[None, :]
            if RAW_REV:
                tl.store(out, rev, mask=m)
            else:
                # dc sums to zero over the sequence: the gate at t = 0 has no gradient, and
                # rev there is rounding residue.
                rev = tl.where((offs_t == 0)[:, None], 0.0, rev)
                tl.store(out, rev.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_sums_bwd_whole_kernel(
    row_ptr, col_ptr, out_ptr, T, H, rs_b, rs_h, rs_t, cs_b, cs_h, cs_t,  # as gate_sums_bwd_kernel
    CHUNK: tl.constexpr,
    NC_PAD: tl.constexpr,
):
    """gate_sums_bwd_kernel's gradient (no packed sequences) in one launch for a sequence that
    fits one program, as gate_sums_whole_kernel does forward: a program per (batch, head)
    holds dc as [chunk, position] and takes the reverse sums within the chunks and across
    them at once. The split path takes two launches (the splits' totals, then the sums), and
    a single split walks the tiles one after another."""
    row = tl.program_id(0).to(tl.int64)  # b * H + h
    b = row // H
    h = row % H
    offs_t = tl.arange(0, NC_PAD)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
    m = offs_t < T
    t64 = offs_t.to(tl.int64)
    r = tl.load(row_ptr + b * rs_b + h * rs_h + t64 * rs_t, mask=m, other=0.0)
    c = tl.load(col_ptr + b * cs_b + h * cs_h + t64 * cs_t, mask=m, other=0.0)
    dc = r.to(tl.float64) - c.to(tl.float64)
    total = tl.sum(dc, axis=1)
    after = tl.cumsum(total, axis=0, reverse=True) - total  # the chunks after each
    rev = tl.cumsum(dc, axis=1, reverse=True) + after[:, None]
    # as gate_sums_bwd_kernel: no gradient at t = 0, where rev is rounding residue
    rev = tl.where(offs_t == 0, 0.0, rev)
    tl.store(out_ptr + (b * T + t64) * H + h, rev.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def gate_sums_restart_kernel(
    rev_ptr, end_ptr, out_ptr, T, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr
):
    """out[b, t, h] = rev[b, t, h] - rev[b, seg_end[t], h] (rev past T is 0), exactly 0 at the
    first position of each sequence; rev and out [B, T, H]."""
    pid_b = tl.program_id(1).to(tl.int64)  # positions in x: CUDA caps y and z at 65535
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_in = offs_t < T
    m = t_in[:, None] & (offs_h < H)[None, :]
    end = tl.load(end_ptr + offs_t, mask=t_in, other=0).to(tl.int64)
    prev = tl.load(end_ptr + offs_t - 1, mask=t_in & (offs_t >= 1), other=0).to(tl.int64)
    first = (offs_t == 0) | (end != prev)
    rev = tl.load(rev_ptr + (pid_b * T + offs_t)[:, None] * H + offs_h[None, :], mask=m)
    # Subtracting the tail past the sequence's end, rather than restarting the sum there,
    # keeps gfwagen.gate.gate_grad_from_sums' arithmetic (and stays in bounds whatever
    # seg_end holds).
    in_range = (end >= 0) & (end < T)
    tail = tl.load(
        rev_ptr + (pid_b * T + end)[:, None] * H + offs_h[None, :],
        mask=m & in_range[:, None],
        other=0.0,
    )
    out = tl.where(first[:, None], 0.0, rev - tail)
    tl.store(
        out_ptr + (pid_b * T + offs_t)[:, None] * H + offs_h[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m,
    )


# ---------------------------------------------------------------------------------------------
# Launchers: the caller allocates; these pick the launch shape from the shapes alone (no
# device reads, so they run inside CUDA graphs).

# Programs to aim for when splitting T: a few waves on a large GPU; a split never gets less
# than one tile.
TARGET_PROGRAMS = 512
SCAN_BLOCK = 1024
# Chunks a gate_sums_whole_kernel or gate_sums_bwd_whole_kernel program holds at most: 8192
# positions at chunk 256, 32 float64 values per thread at eight warps.
WHOLE_MAX_CHUNKS = 32


def _split(tiles, lanes, splits):
    """(splits, tiles per split) for `tiles` tiles per lane and `lanes` (batch, head block)
    pairs; splits=None picks enough to reach TARGET_PROGRAMS."""
    if splits is None:
        splits = cdiv(TARGET_PROGRAMS, max(lanes, 1))
    per = cdiv(tiles, max(1, min(int(splits), tiles)))
    return cdiv(tiles, per), per


def launch_gate_sums_fwd(
    log_gate, local, base, chunk, splits=None, num_warps=4, bound=0.0, absolute=False
):
    """log_gate [B, T, H] (T >= 1), clamped to [-bound, bound] on load when bound > 0;
    local [B, H, T] float32 and base [B, H, n_base] float64, n_base >= ceil(T / chunk), both
    contiguous. absolute: local is float64 and receives the whole prefix sums in natural
    units (base is then scratch)."""
    B, T, H = log_gate.shape
    nc = cdiv(T, chunk)
    n_base = base.shape[-1]
    # both forward kernels' leading parameters
    args = (log_gate, local, base, T, H, nc, n_base, *log_gate.stride())
    if splits is None and nc <= WHOLE_MAX_CHUNKS:
        launcher(gate_sums_whole_kernel)[(B * H,)](
            *args,
            CHUNK=chunk,
            NC_PAD=next_pow2(nc),
            BOUND=float(bound),
            ABSOLUTE=absolute,
            num_warps=8,
        )
        return
    bh = heads_per_program(H)
    hb = cdiv(H, bh)
    n_split, per = _split(nc, B * hb, splits)
    launcher(gate_sums_fwd_kernel)[(B, hb, n_split)](
        *args,
        per,
        BLOCK_H=bh,
        CHUNK=chunk,
        ONE_SPLIT=n_split == 1,
        BOUND=float(bound),
        LOCAL_F64=absolute,
        num_warps=num_warps,
    )
    if n_split > 1:
        blk = min(SCAN_BLOCK, next_pow2(n_base))
        launcher(gate_sums_scan_kernel)[(B * H,)](base, nc, n_base, BLOCK=blk, num_warps=4)
    if absolute:
        blk = 1024
        launcher(gate_sums_absolute_kernel)[(cdiv(T, blk), H, B)](
            local,
            base,
            T,
            n_base,
            CHUNK=chunk,
            BLOCK=blk,
            num_warps=4,
        )


def launch_gate_tile_records(log_gate, rec, block_n, scale, bound=0.0, num_warps=4):
    """log_gate [B, T, H] (any strides), clamped to [-bound, bound] on load when bound > 0 ->
    rec [B, H, ceil(T / block_n) * (block_n + 4)] float32 contiguous: per key tile, each
    key's -(sum of the tile's gates up to it) / scale, the tile's total times log2(e), three
    zeros (templates/tvm/fwd_wgmma.py's "tiles" gate input)."""
    B, T, H = log_gate.shape
    nkt = cdiv(T, block_n)
    bh = min(heads_per_program(H), max(1, 2048 // block_n))
    launcher(gate_tile_records_kernel)[(nkt, B, cdiv(H, bh))](
        log_gate, rec, T, H, nkt, *log_gate.stride(), -1.0 / scale,
        BLOCK_N=block_n, BLOCK_H=bh, BOUND=float(bound), num_warps=num_warps)


def launch_gate_tile_tables(log_gate, rec, tab, block_n, scale, table_bytes, bound=0.0,
                            num_warps=4, heads=None):
    """launch_gate_tile_records' records in the bias-table form (gate_tile_tables_kernel):
    rec [B, H, ceil(T / block_n) * (table_bytes / 4 + 4)] float32 contiguous, tab the same
    memory viewed as int16. heads: heads a program (a power of two; None: as many as fit
    2048 gates)."""
    B, T, H = log_gate.shape
    nkt = cdiv(T, block_n)
    bh = heads or min(heads_per_program(H), max(1, 2048 // block_n))
    launcher(gate_tile_tables_kernel)[(nkt, B, cdiv(H, bh))](
        log_gate, rec, tab, T, H, nkt, *log_gate.stride(), -1.0 / scale,
        BLOCK_N=block_n, BLOCK_H=bh, BOUND=float(bound), REC=table_bytes // 4 + 4,
        TABLE=table_bytes // 2, TAIL_BLOCK=next_pow2(table_bytes // 2 - block_n // 8 * 24 + 8),
        num_warps=num_warps)


def launch_gate_sums_bwd(
    row, col, out, seg_end=None, rev=None, tot=None, splits=None, block_t=256, num_warps=4
):
    """row, col [B, H, T] (any strides); out [B, T, H] contiguous. With seg_end ([T] int),
    rev is a float64 [B, T, H] scratch. tot: float64 scratch of at least B * H *
    bwd_splits(...) elements, needed when that is more than one."""
    B, H, T = row.shape
    if _bwd_whole(T, splits, seg_end is not None, block_t):
        launcher(gate_sums_bwd_whole_kernel)[(B * H,)](
            row, col, out, T, H, *row.stride(), *col.stride(), CHUNK=block_t,
            NC_PAD=next_pow2(cdiv(T, block_t)), num_warps=8,
        )
        return
    bh = heads_per_program(H)
    hb = cdiv(H, bh)
    n_split, per = _split(cdiv(T, block_t), B * hb, splits)
    dst = rev if seg_end is not None else out
    common = dict(BLOCK_T=block_t, BLOCK_H=bh, SPLIT_BLOCK=64, num_warps=num_warps)
    args = (
        row,
        col,
        tot if tot is not None else dst,
        dst,
        T,
        H,
        n_split,
        per,
        *row.stride(),
        *col.stride(),
    )
    grid = (B, hb, n_split)
    if n_split > 1:
        launcher(gate_sums_bwd_kernel)[grid](
            *args, TOTALS=True, FROM_TOTALS=False, RAW_REV=False, **common
        )
    launcher(gate_sums_bwd_kernel)[grid](
        *args, TOTALS=False, FROM_TOTALS=n_split > 1, RAW_REV=seg_end is not None, **common
    )
    if seg_end is not None:
        bt = 64
        launcher(gate_sums_restart_kernel)[(cdiv(T, bt), B, hb)](
            rev, seg_end, out, T, H, BLOCK_T=bt, BLOCK_H=bh, num_warps=4
        )


def _bwd_whole(T, splits, packed, block_t):
    """Whether launch_gate_sums_bwd takes the one-launch kernel."""
    return splits is None and not packed and cdiv(T, block_t) <= WHOLE_MAX_CHUNKS


def bwd_splits(B, H, T, splits=None, block_t=256, packed=False):
    """How many splits launch_gate_sums_bwd uses (its tot scratch holds B * H * this); packed:
    whether it gets seg_end."""
    if _bwd_whole(T, splits, packed, block_t):
        return 1
    return _split(cdiv(T, block_t), B * cdiv(H, heads_per_program(H)), splits)[0]
