#!/usr/bin/env python3
"""How fast can the quickstart's vision tower learn shape at all? Trains the same ViT (64x64,
patch 8, width 128, 4 layers, 4 heads, MLP 512; the models of torch_bench.py) with direct
supervision: a linear head on the pooled final layer (--pool) predicts which of the six shapes are in each
shapes-world training scene (binary cross-entropy). Every 50 steps it prints, on the val scenes,
the accuracy on single-object scenes (6-way argmax) and the share of scenes whose whole shape set
is right. It answers a question the contrastive run cannot: whether slow shape learning is the
objective's fault or the tower's. docs/benchmarks.md quotes its figures.

    python3 scripts/bench/shape_probe.py [--kernel 8|16|...] [--pool cls|mean|max|maxlogit]
        [--steps 300] [--lr 1e-3] [--seed 0] [--threads 2] [--pos learned|sincos] [--data data/shapes]

--kernel is the patch embedding's window (trialign's model.vision.patch_kernel_size): 8 = plain
patches, 16 = each token also sees 4 pixels of its neighbours on every side. --pos sincos starts
the learned position embedding from 2-D sine/cosine values instead of noise. --pool picks what the
head reads: the final CLS state (cls, Hugging Face CLIP's pooling), the mean or the channel-wise max
of the normalised patch states (mean, max: trialign's model.vision.pooling), or the max over the
patch tokens of the head's per-token logits (maxlogit). Needs Debian's
python3-torch and python3-pil, and the data from scripts/quickstart.sh.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_bench as tb  # noqa: E402  (the same ViT layers as the bench card)

SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross"]
WIDTH, PATCH = 128, 8


def load_scenes(data, manifest, limit=None, mean=0.45, std=0.27):
    """Images [N,3,S,S] as (x / 255 - mean) / std, shape sets [N,6], single-object shape index or
    -1 [N]; the first `limit` records (all if None). mean/std: scalars or [1,3,1,1] tensors."""
    xs, sets, single = [], [], []
    with open(os.path.join(data, manifest)) as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            rec = json.loads(line)
            img = Image.open(os.path.join(data, rec["image"])).convert("RGB")
            xs.append(np.asarray(img, dtype=np.float32))
            objs = rec["scene"]["objects"]
            y = np.zeros(len(SHAPES), np.float32)
            for o in objs:
                y[SHAPES.index(o["shape"])] = 1
            sets.append(y)
            single.append(SHAPES.index(objs[0]["shape"]) if len(objs) == 1 else -1)
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2) / 255.0
    return (x - mean) / std, torch.tensor(np.stack(sets)), torch.tensor(single)


def sincos_2d(side, d):
    """[side*side, d]: the first half of the channels encodes the row, the second the column."""
    q = d // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                indexing="ij")

    def enc(p):
        a = p.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([a.sin(), a.cos()], 1)

    return torch.cat([enc(rows), enc(cols)], 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", type=int, default=PATCH)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pos", choices=["learned", "sincos"], default="learned")
    ap.add_argument("--pool", choices=["cls", "mean", "max", "maxlogit"], default="cls")
    ap.add_argument("--data", default="data/shapes")
    a = ap.parse_args()
    if a.kernel < PATCH or (a.kernel - PATCH) % 2:
        sys.exit(f"--kernel must be {PATCH} plus an even number, got {a.kernel}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xt, yt, _ = load_scenes(a.data, "train.jsonl")
    xv, yv, sv = load_scenes(a.data, "val.jsonl")

    tb.IMAGE, tb.PATCH, tb.WIDTH, tb.MLP, tb.LAYERS, tb.HEADS = 64, PATCH, WIDTH, 512, 4, 4
    vit = tb.Vit()
    vit.patch = nn.Conv2d(3, WIDTH, a.kernel, PATCH, padding=(a.kernel - PATCH) // 2, bias=False)
    if a.pos == "sincos":
        with torch.no_grad():
            vit.pos.copy_(torch.cat([torch.zeros(1, WIDTH), sincos_2d(64 // PATCH, WIDTH)], 0))
    head = nn.Linear(WIDTH, len(SHAPES))
    params = list(vit.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.1, betas=(0.9, 0.98))
    def logits(x):  # [B,6]
        last = vit(x)[-1]                  # [B,1+64,W]
        if a.pool == "cls":
            return head(vit.post(last[:, 0]))
        tokens = vit.post(last[:, 1:])     # the normalised patch states [B,64,W]
        if a.pool == "maxlogit":           # per-token logits [B,64,6], max over tokens
            return head(tokens).amax(1)
        return head(tokens.mean(1) if a.pool == "mean" else tokens.amax(1))

    t0 = time.time()
    for step in range(1, a.steps + 1):
        # 50 warm-up steps, then cosine to 5 % (the stage-1 schedule)
        lr = a.lr * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, xt.shape[0], (128,))
        loss = F.binary_cross_entropy_with_logits(logits(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == a.steps:
            with torch.no_grad():
                lv = logits(xv)
                one = sv >= 0
                single_acc = (lv[one].argmax(1) == sv[one]).float().mean().item()
                set_acc = ((lv > 0).float() == yv).all(1).float().mean().item()
            print(json.dumps({"kernel": a.kernel, "pos": a.pos, "pool": a.pool, "seed": a.seed, "step": step, "loss": round(loss.item(), 4),
                              "single_object_shape_acc": round(single_acc, 3), "shape_set_exact": round(set_acc, 3),
                              "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
