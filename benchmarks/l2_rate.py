"""The H200's L2-to-SM read rate, for the floor of a forward whose key and value tiles are
re-read from L2 by every query tile that sees them (at S5's 64-row tiles, each K and V tile
nine times: 1.2 GB per forward).

    python benchmarks/l2_rate.py

Programs re-read a 16 MiB buffer (a third of the L2) in 16 KiB tiles, at 4 and 16 programs
per SM; the rate is bytes read over the median time.
"""
import torch
import triton
import triton.language as tl
import triton.testing

TILE = 8192  # bf16 elements: 16 KiB, a 64x64 K plus V tile pair's size at head dim 64
TILES = 1024  # 16 MiB
READS = 64  # tiles read by each program


@triton.jit
def _read_tiles(X, OUT, n_tiles, READS: tl.constexpr, TILE: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([TILE], dtype=tl.float32)
    for i in range(READS):
        # a spread of tiles per program, so neighbours do not read the same lines together
        t = (pid * 7 + i * 13) % n_tiles
        acc += tl.load(X + t * TILE + tl.arange(0, TILE)).to(tl.float32)
    tl.store(OUT + pid * TILE + tl.arange(0, TILE), acc)


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.randn(TILES * TILE, device="cuda", dtype=torch.bfloat16)
    for per_sm in (4, 16):
        progs = sms * per_sm
        out = torch.empty(progs * TILE, device="cuda")
        ms = triton.testing.do_bench(
            lambda p=progs, o=out: _read_tiles[(p,)](x, o, TILES, READS=READS, TILE=TILE,
                                                     num_warps=8),
            warmup=10, rep=100, return_mode="median")
        rate = progs * READS * TILE * x.element_size() / ms / 1e9
        print(f"{per_sm} programs per SM: {rate:.2f} TB/s ({ms:.4f} ms)")


if __name__ == "__main__":
    main()
