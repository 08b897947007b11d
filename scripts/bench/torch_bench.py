#!/usr/bin/env python3
"""The bench card (configs/bench/*.yaml) as a plain PyTorch training loop, for the side-by-side in
docs/benchmarks.md. It builds the same shapes as `trialign bench` and times the same step: forward,
backward, gradient clipping to 1.0 and AdamW. Batches are random tensors made before the timed
loop, so the Python side does no data work at all (trialign's figures include its data pipeline).

    python3 scripts/bench/torch_bench.py stage1|stage3|dpo [--precision fp32|bf16] [--threads 2]
        [--warmup 3] [--steps 10] [--free norm,rope,softmax,act] [--micro-threads N] [--pooled-top]

--free is a what-if for timing only: the named element-wise ops cost nothing (norms and RoPE
return their input, attention skips its softmax, the MLP activation becomes a sum: quick-GELU
returns its input, SwiGLU's silu(gate) * up becomes gate + up, so every matmul stays). The loss is
then meaningless, but the step time is an upper bound on what fusing those ops could save.

--micro-threads N (stage3, dpo) cuts the batch into N micro-batches and runs them at once, each
on its own Python thread with threads / N LibTorch threads, then adds their gradients in order:
what trialign's train.micro_batch_threads does, written in Python (LibTorch releases the GIL inside
each op). Start it with OPENBLAS_NUM_THREADS=1, as trialign gives each GEMM one thread then.

--pooled-top runs the last layer on the rows the loss reads only, as trialign does: keys and values
from every token, the query, output projection and MLP for those rows. Stage 1: each tower's pooled
row (CLS, end-of-text); stage3 and dpo: the LLM's last layer on the LOSS_TOKENS positions that
predict the reply. The loop as a user writes it, like Hugging Face's CLIPModel and
LlamaForCausalLM, runs the whole last layer.

Prints one JSON line: median step time, steps/s, samples/s. Needs Debian's python3-torch (the
same LibTorch build trialign links against).
"""
import argparse
import concurrent.futures
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- the card ------------------------------------------------------------------------------
IMAGE, PATCH, WIDTH, LAYERS, HEADS, MLP, EMBED = 64, 8, 256, 4, 4, 1024, 256
TEXT_CTX, TEXT_VOCAB = 32, 2048
LLM_H, LLM_LAYERS, LLM_HEADS, LLM_KV, LLM_MLP, VOCAB = 512, 6, 8, 8, 1408, 2048
TEXT_TOKENS, LOSS_TOKENS = 48, 24
FREE = set()  # --free: element-wise ops that cost nothing (a timing what-if, see the docstring)
POOLED_TOP = False  # --pooled-top: the last layer on the rows the loss reads only (towers, LLM)


def softmax(s):
    return s if "softmax" in FREE else s.softmax(-1)


def norm(d):
    return nn.Identity() if "norm" in FREE else nn.LayerNorm(d)


def quick_gelu(x):
    if "act" in FREE:
        return x
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None, rows=None):  # rows: one query row per sample, or all
        b, t, d = x.shape
        split = lambda y: y.view(b, -1, self.h, self.dh).transpose(1, 2)
        xq = x if rows is None else x[torch.arange(b), rows].unsqueeze(1)
        q, k, v = split(self.q_proj(xq)), split(self.k_proj(x)), split(self.v_proj(x))
        s = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        if mask is not None:
            s = s + (mask if rows is None else mask[rows].view(b, 1, 1, t))
        return self.out_proj((softmax(s) @ v).transpose(1, 2).reshape(b, -1, d))


class EncoderLayer(nn.Module):  # pre-LN, quick-GELU MLP
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.self_attn, self.layer_norm1, self.layer_norm2 = Attention(d, heads), norm(d), norm(d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x, mask=None, rows=None):
        h = self.layer_norm1(x)
        x = (x if rows is None else x[torch.arange(x.shape[0]), rows].unsqueeze(1)) + self.self_attn(h, mask, rows)
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class Vit(nn.Module):
    def __init__(self):
        super().__init__()
        n = (IMAGE // PATCH) ** 2
        self.patch = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.cls = nn.Parameter(torch.randn(WIDTH) * 0.02)
        self.pos = nn.Parameter(torch.randn(n + 1, WIDTH) * 0.02)
        self.pre, self.post = norm(WIDTH), norm(WIDTH)
        self.layers = nn.ModuleList(EncoderLayer(WIDTH, HEADS, MLP) for _ in range(LAYERS))
        self.pooled = False  # only CLS is read (stage 1), so --pooled-top may prune the last layer

    def forward(self, pixels):  # every hidden state: [embeddings, layer 1, ..., layer L]
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], 1) + self.pos
        states = [self.pre(x)]
        for i, layer in enumerate(self.layers):
            top = POOLED_TOP and self.pooled and i == len(self.layers) - 1
            states.append(layer(states[-1], rows=torch.zeros(x.shape[0], dtype=torch.long) if top else None))
        return states


class TextEncoder(nn.Module):  # causal, pooled at the end-of-text token
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(TEXT_VOCAB, WIDTH), nn.Parameter(torch.randn(TEXT_CTX, WIDTH) * 0.01)
        self.layers = nn.ModuleList(EncoderLayer(WIDTH, HEADS, MLP) for _ in range(LAYERS))
        self.final = norm(WIDTH)
        self.register_buffer("mask", torch.full((TEXT_CTX, TEXT_CTX), float("-inf")).triu(1))

    def forward(self, ids, lengths):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for i, layer in enumerate(self.layers):
            top = POOLED_TOP and i == len(self.layers) - 1
            x = layer(x, self.mask, lengths - 1 if top else None)
        x = self.final(x)
        return x[:, 0] if POOLED_TOP else x[torch.arange(ids.shape[0]), lengths - 1]


class Clip(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision, self.text = Vit(), TextEncoder()
        self.vision.pooled = True
        self.visual_projection = nn.Linear(WIDTH, EMBED, bias=False)
        self.text_projection = nn.Linear(WIDTH, EMBED, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def loss(self, pixels, ids, lengths):  # symmetric InfoNCE
        i = F.normalize(self.visual_projection(self.vision.post(self.vision(pixels)[-1][:, 0])).float(), dim=-1)
        t = F.normalize(self.text_projection(self.text(ids, lengths)).float(), dim=-1)
        logits = self.logit_scale.exp() * i @ t.t()
        target = torch.arange(i.shape[0])
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        if "norm" in FREE:
            return x
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x, cos, sin):
    if "rope" in FREE:
        return x
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.dh = LLM_H // LLM_HEADS
        self.q_proj = nn.Linear(LLM_H, LLM_H, bias=False)
        self.k_proj = nn.Linear(LLM_H, LLM_KV * self.dh, bias=False)
        self.v_proj = nn.Linear(LLM_H, LLM_KV * self.dh, bias=False)
        self.o_proj = nn.Linear(LLM_H, LLM_H, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(LLM_H, LLM_MLP, bias=False), nn.Linear(LLM_H, LLM_MLP, bias=False)
        self.down_proj = nn.Linear(LLM_MLP, LLM_H, bias=False)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(LLM_H), RMSNorm(LLM_H)

    def forward(self, x, cos, sin, mask, rows=slice(None)):
        """rows (a slice of the positions): the output at those rows only, keys and values from all."""
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        r = h[:, rows].shape[1]
        q = rope(self.q_proj(h[:, rows]).view(b, r, LLM_HEADS, self.dh).transpose(1, 2), cos[rows], sin[rows])
        k = rope(self.k_proj(h).view(b, t, LLM_KV, self.dh).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(b, t, LLM_KV, self.dh).transpose(1, 2)
        if LLM_KV != LLM_HEADS:
            k, v = (y.repeat_interleave(LLM_HEADS // LLM_KV, 1) for y in (k, v))
        s = (q @ k.transpose(-2, -1)) / math.sqrt(self.dh) + mask[rows]
        x = x[:, rows] + self.o_proj((softmax(s) @ v).transpose(1, 2).reshape(b, r, LLM_H))
        h = self.post_attention_layernorm(x)
        if "act" in FREE:
            return x + self.down_proj(self.gate_proj(h) + self.up_proj(h))
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Vlm(nn.Module):
    """ViT features of the second to last layer (CLS dropped) -> mlp2x_gelu -> LLaMA decoder."""

    def __init__(self):
        super().__init__()
        self.vision = Vit()
        self.projector = nn.Sequential(nn.Linear(WIDTH, LLM_H), nn.GELU(), nn.Linear(LLM_H, LLM_H))
        self.embed = nn.Embedding(VOCAB, LLM_H)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(LLM_LAYERS))
        self.norm = RMSNorm(LLM_H)
        self.lm_head = nn.Linear(LLM_H, VOCAB, bias=False)
        n = (IMAGE // PATCH) ** 2 + TEXT_TOKENS
        dh = LLM_H // LLM_HEADS
        inv = 1.0 / (10000 ** (torch.arange(0, dh, 2).float() / dh))
        ang = torch.arange(n).float()[:, None] * inv[None]
        self.register_buffer("cos", torch.cat([ang.cos(), ang.cos()], -1))
        self.register_buffer("sin", torch.cat([ang.sin(), ang.sin()], -1))
        self.register_buffer("mask", torch.full((n, n), float("-inf")).triu(1))

    def logps(self, pixels, ids):
        """Log-probs of the last LOSS_TOKENS text tokens of each sequence: [N, LOSS_TOKENS]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vision.patch.weight.requires_grad):
            feats = self.vision(pixels)[-2][:, 1:]
        x = torch.cat([self.projector(feats), self.embed(ids)], 1)
        reply = slice(x.shape[1] - LOSS_TOKENS - 1, x.shape[1] - 1)  # the positions that predict the reply
        for i, layer in enumerate(self.layers):
            top = POOLED_TOP and i == len(self.layers) - 1
            x = layer(x, self.cos, self.sin, self.mask, reply if top else slice(None))
        h = self.norm(x) if POOLED_TOP else self.norm(x)[:, reply]
        logits = self.lm_head(h).float()
        return logits.log_softmax(-1).gather(-1, ids[:, -LOSS_TOKENS:, None]).squeeze(-1)


def adamw(params, lr=1e-4):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.1)


def make_case(name):
    torch.manual_seed(0)
    n_img = (IMAGE // PATCH) ** 2
    if name == "stage1":
        model, batch = Clip(), 64
        data = [(torch.randn(batch, 3, IMAGE, IMAGE), torch.randint(4, TEXT_VOCAB, (batch, TEXT_CTX)),
                 torch.full((batch,), TEXT_CTX)) for _ in range(4)]
        step_loss = lambda d: model.loss(*d)
        micro = None  # in-batch negatives: the loss needs the whole batch
        tokens = batch * (n_img + 1 + TEXT_CTX)
    elif name == "stage3":
        model, batch = Vlm(), 16
        model.vision.requires_grad_(False)
        data = [(torch.randn(batch, 3, IMAGE, IMAGE), torch.randint(4, VOCAB, (batch, TEXT_TOKENS))) for _ in range(4)]
        step_loss = lambda d: -model.logps(*d).mean()
        micro = lambda d, j, n: tuple(t[j * batch // n:(j + 1) * batch // n] for t in d)
        tokens = batch * (n_img + TEXT_TOKENS)
    elif name == "dpo":
        model, batch, beta = Vlm(), 8, 0.1
        model.vision.requires_grad_(False)
        reference = Vlm()
        reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False).eval()
        prompt = TEXT_TOKENS - LOSS_TOKENS

        def pairs():
            p = torch.randint(4, VOCAB, (batch, prompt))
            chosen = torch.cat([p, torch.randint(4, VOCAB, (batch, LOSS_TOKENS))], 1)
            rejected = torch.cat([p, torch.randint(4, VOCAB, (batch, LOSS_TOKENS))], 1)
            pixels = torch.randn(batch, 3, IMAGE, IMAGE)
            return torch.cat([pixels, pixels]), torch.cat([chosen, rejected])  # one concatenated forward

        data = [pairs() for _ in range(4)]

        def step_loss(d):
            pol = model.logps(*d).sum(-1)
            with torch.no_grad():
                ref = reference.logps(*d).sum(-1)
            n = pol.shape[0] // 2  # pairs: chosen rows, then rejected rows
            margin = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
            return -F.logsigmoid(beta * margin).mean()

        def micro(d, j, n):  # pairs j*batch/n .. (j+1)*batch/n, chosen and rejected
            a, b = j * batch // n, (j + 1) * batch // n
            return tuple(torch.cat([t[a:b], t[batch + a:batch + b]]) for t in d)

        tokens = 2 * batch * (n_img + TEXT_TOKENS)
    else:
        raise SystemExit(f"unknown case {name}: stage1 | stage3 | dpo")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, data, step_loss, micro, batch, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=["stage1", "stage3", "dpo"])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--free", default="", help="comma list of norm, rope, softmax, act (timing what-if)")
    ap.add_argument("--micro-threads", type=int, default=1, help="micro-batches at once, one thread each (stage3, dpo)")
    ap.add_argument("--pooled-top", action="store_true", help="the last layer on the rows the loss reads only (towers' pooled rows; the LLM's reply rows)")
    a = ap.parse_args()
    global POOLED_TOP
    POOLED_TOP = a.pooled_top
    FREE.update(x for x in a.free.split(",") if x)
    unknown = FREE - {"norm", "rope", "softmax", "act"}
    if unknown:
        raise SystemExit(f"--free: unknown op(s) {sorted(unknown)}; choose from norm, rope, softmax, act")
    torch.set_num_threads(a.threads)
    model, params, data, step_loss, micro, batch, tokens = make_case(a.case)
    n = a.micro_threads
    if n > 1 and micro is None:
        raise SystemExit(f"--micro-threads: {a.case} scores the whole batch at once; use stage3 or dpo")
    model.train()
    opt = adamw(params)
    # Each worker sets its OpenMP count once (per thread in libgomp; setting it per step would also
    # clear oneDNN's primitive cache). Unlike trialign, the gradients are added only once every
    # micro-batch is done, so the additions do not overlap the other micro-batch's work.
    per_thread = max(1, a.threads // n)
    pool = concurrent.futures.ThreadPoolExecutor(n, initializer=torch.set_num_threads,
                                                 initargs=(per_thread,)) if n > 1 else None

    def micro_grads(d, j):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            loss = step_loss(micro(d, j, n)) / n  # equal micro-batches: the mean of means
        return torch.autograd.grad(loss, params, allow_unused=True)

    times = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        d = data[s % len(data)]
        if pool is None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                loss = step_loss(d)
            loss.backward()
        else:
            grads = list(pool.map(lambda j: micro_grads(d, j), range(n)))
            with torch.no_grad():
                for i, p in enumerate(params):
                    for g in grads:
                        if g[i] is not None:
                            p.grad = g[i].clone() if p.grad is None else p.grad.add_(g[i])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(json.dumps({"case": a.case, "framework": "pytorch " + torch.__version__, "precision": a.precision,
                      "threads": a.threads, "micro_threads": n, "free": sorted(FREE), "pooled_top": POOLED_TOP, "median_step_s": med, "steps_per_s": 1 / med,
                      "samples_per_s": batch / med, "tokens_per_s": tokens / med, "step_s": times}))


if __name__ == "__main__":
    main()
