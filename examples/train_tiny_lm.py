"""A tiny GatedFWA language model trained on the CPU on a repeating-pattern task, then greedy
generation with the ring-buffer KV cache checked token for token against the no-cache forward.

    python examples/train_tiny_lm.py                  # ~300 steps, well under 2 min on 2 cores
    python examples/train_tiny_lm.py --compile        # the training step under torch.compile

Each training sequence repeats a random pattern of 2..max_period tokens; after the first
period every token is predictable by copying from `period` positions back, which the model
learns (an induction-style task), so the loss falls from ~log(vocab) towards the entropy of
the first period. The window (16) is smaller than the generated continuation, so the cache's
ring wraps several times during generation.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from gfwagen.nn import GatedFWA, GatedFWACache, RMSNorm


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, window, layer_idx, backend="auto"):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = GatedFWA(dim, heads, kv_heads, window=window, layer_idx=layer_idx,
                             qk_norm=True, backend=backend)
        self.norm2 = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, cache=None):
        if cache is None:
            x = x + self.attn(self.norm1(x))
        else:
            a, cache = self.attn(self.norm1(x), cache)
            x = x + a
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=32, dim=64, heads=4, kv_heads=2, layers=2, window=16,
                 backend="auto"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, window, i, backend)
                                    for i in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx, cache: GatedFWACache | None = None):
        x = self.embed(idx)
        for blk in self.blocks:
            x = blk(x, cache)
        return self.head(self.norm(x))


def make_batch(batch, seq_len, vocab, max_period, gen):
    """[batch, seq_len] token ids: each row repeats a random pattern of 2..max_period tokens."""
    periods = torch.randint(2, max_period + 1, (batch,), generator=gen)
    patterns = torch.randint(0, vocab, (batch, max_period), generator=gen)
    t = torch.arange(seq_len)
    return torch.gather(patterns, 1, t[None, :] % periods[:, None])


def train(model, steps=300, batch=16, seq_len=48, max_period=8, lr=1e-2, log_every=50,
          compile=False, seed=0, log=print):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.head.out_features
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))

    def loss_fn(idx):
        logits = model(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, vocab), idx[:, 1:].reshape(-1))

    step_fn = torch.compile(loss_fn) if compile else loss_fn
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = make_batch(batch, seq_len + 1, vocab, max_period, gen)
        loss = step_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)")
    return losses


@torch.no_grad()
def generate_no_cache(model, prompt, n):
    """Greedy: the full forward over the whole sequence for every new token."""
    seq = prompt
    for _ in range(n):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq[:, prompt.shape[1]:]


@torch.no_grad()
def generate_cached(model, prompt, n, return_cache=False):
    """Greedy with the ring-buffer cache: prefill once, then one token per step."""
    cache = GatedFWACache()
    logits = model(prompt, cache)
    out = []
    for i in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 < n:
            logits = model(nxt, cache)
    toks = torch.cat(out, dim=1)
    return (toks, cache) if return_cache else toks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--gen", type=int, default=48, help="tokens to generate")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step")
    ap.add_argument("--lr", type=float, default=1e-2)
    # One thread: the model is so small that intra-op threading costs more than it saves
    # (and oversubscribed cores make it several times slower).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto",
                    help="gfwagen.attention backend: auto (TVM or the reference on the CPU), "
                         "reference, tvm, triton")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = TinyLM(window=args.window, backend=args.backend)
    print(f"TinyLM: {sum(p.numel() for p in model.parameters()) / 1e3:.1f}k parameters, "
          f"window {args.window}, backend {args.backend}, compile={args.compile}")
    t0 = time.perf_counter()
    losses = train(model, args.steps, args.batch, args.seq_len, lr=args.lr,
                   log_every=args.log_every,
                   compile=args.compile, seed=args.seed)
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s: "
          f"loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} (mean of the last 10)")

    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = make_batch(4, 12, model.head.out_features, 6, gen)
    ref = generate_no_cache(model, prompt, args.gen)
    got, cache = generate_cached(model, prompt, args.gen, return_cache=True)
    for p_row, g_row in zip(prompt.tolist(), got.tolist()):
        print(f"prompt {p_row}  ->  {g_row[:24]}{' ...' if len(g_row) > 24 else ''}")
    assert torch.equal(got, ref), "cached generation differs from the no-cache forward"
    print(f"cached == no-cache generation for {args.gen} tokens x {prompt.shape[0]} sequences "
          f"(ring of {args.window} positions, {cache.nbytes()} bytes for "
          f"{cache.seq_len()} positions seen)")


if __name__ == "__main__":
    main()
