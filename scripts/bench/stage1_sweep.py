#!/usr/bin/env python3
"""Which stage-1 recipe gives the VLM patch tokens it can answer questions from? A PyTorch replica of
the quickstart's stage 1 (ViT 64x64 / patch 8 / width 128 / 4 layers and a causal text encoder of
the same size, symmetric InfoNCE with NegCLIP text negatives, AdamW, warm-up + cosine) followed by
a *reader probe*: the tower is frozen, its patch states at one layer are merged 2x2 into 16 tokens
(what the projector reads), and a small transformer over [16 visual tokens ; question words] is
trained to classify the one-word answer of the shapes-world questions. Its held-out exact match per
question type says what a VLM could at best read out of the tower, without the cost of stages 2-3.

    python3 scripts/bench/stage1_sweep.py --name NAME [--pool cls|max|clsmax] [--kernel 8|16]
        [--negatives none|stored|bind|bind+stored] [--steps 1000] [--batch 128] [--layers -2,-1]
        [--reader-steps 3000] [--reader-evals 250,1000] [--data data/shapes]

--negatives: `stored` adds one of the record's stored hard negatives per pair (trialign's
data.hard_negatives: 1); `bind` adds a caption whose two objects of different colours swap
colours ("a red star left of a blue circle" -> "a blue star left of a red circle"), a negative that
no bag of attribute words can reject (records without such a pair fall back to a stored one);
`bind+stored` adds both (a stored negative of kind `binding` is the same swap). Prints one JSON
line per evaluation: stage-1 retrieval and hard-negative accuracy per kind, then per tapped layer
the reader's exact match per question type ("core4": colour, shape, count and existence). Runs on
CUDA when there is one (fourteen recipes side by side took 8 minutes on one H200); on two CPU
cores one recipe takes hours. Needs torch, numpy and PIL (Debian: python3-torch, python3-pil).
Word-level tokens stand in for the BPE tokenizer (every shapes-world word is one piece of it).
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_bench as tb  # noqa: E402  (the ViT / encoder layers of the bench card)
from shape_probe import load_scenes  # noqa: E402  (images of a manifest, normalised as trialign does)

WIDTH, MLP, HEADS, LAYERS, PATCH, IMAGE, EMBED, CTX = 128, 512, 4, 4, 8, 64, 128, 32
PHRASE = re.compile(r"\b(an?) (small|large) (\w+) (\w+)")


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def bind_negative(caption, rng):
    """The caption with the colours of two objects of different colours swapped, or None."""
    found = list(PHRASE.finditer(caption))
    pairs = [(i, j) for i in range(len(found)) for j in range(i + 1, len(found))
             if found[i].group(3) != found[j].group(3) and found[i].group(4) != found[j].group(4)]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    colours = {i: found[j].group(3), j: found[i].group(3)}
    out, last = [], 0
    for k, m in enumerate(found):
        out.append(caption[last:m.start()])
        c = colours.get(k, m.group(3))
        out.append(f"{article(m.group(2))} {m.group(2)} {c} {m.group(4)}")
        last = m.end()
    out.append(caption[last:])
    return "".join(out)


class Vocab:
    def __init__(self):
        self.ids = {"<pad>": 0, "<eos>": 1}

    def encode(self, text, grow=True):
        out = []
        for w in re.findall(r"[a-z0-9]+|\?", text.lower()):
            if w not in self.ids:
                if not grow:
                    w = "<pad>"
                else:
                    self.ids[w] = len(self.ids)
            out.append(self.ids[w])
        return out


def pad(seqs, length):
    t = torch.zeros(len(seqs), length, dtype=torch.long)
    lens = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:length]
        t[i, :len(s)] = torch.tensor(s)
        lens[i] = len(s)
    return t, lens


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


class Vit(tb.Vit):
    """The bench card's ViT (its forward) at the quickstart's sizes, with a patch window."""

    def __init__(self, kernel):
        nn.Module.__init__(self)  # tb.Vit's own __init__ reads the bench card's sizes
        n = (IMAGE // PATCH) ** 2
        self.patch = nn.Conv2d(3, WIDTH, kernel, PATCH, padding=(kernel - PATCH) // 2, bias=False)
        self.cls = nn.Parameter(torch.randn(WIDTH) * 0.02)
        self.pos = nn.Parameter(torch.randn(n + 1, WIDTH) * 0.02)
        self.pre, self.post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.layers = nn.ModuleList(tb.EncoderLayer(WIDTH, HEADS, MLP) for _ in range(LAYERS))


class TextEncoder(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, WIDTH), nn.Parameter(torch.randn(CTX, WIDTH) * 0.01)
        self.layers = nn.ModuleList(tb.EncoderLayer(WIDTH, HEADS, MLP) for _ in range(LAYERS))
        self.final = nn.LayerNorm(WIDTH)
        self.register_buffer("mask", torch.full((CTX, CTX), float("-inf")).triu(1))

    def forward(self, ids, lens):
        t = ids.shape[1]
        x = self.tok(ids) + self.pos[:t]
        for layer in self.layers:
            x = layer(x, self.mask[:t, :t])
        return self.final(x)[torch.arange(ids.shape[0], device=ids.device), lens - 1]


def image_embed(vit, proj, pixels, pool):
    last = vit(pixels)[-1]
    if pool == "cls":
        pooled = vit.post(last[:, 0])
    else:
        mx = vit.post(last[:, 1:]).amax(1)
        pooled = mx if pool == "max" else mx + vit.post(last[:, 0])
    return F.normalize(proj(pooled), dim=-1)


def caption_batch(vocab, texts, dev):
    ids, lens = pad([vocab.encode(t) + [1] for t in texts], CTX)
    return ids.to(dev), lens.to(dev)


def train_stage1(a, recs, x, vocab, dev, log):
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    vit, text = Vit(a.kernel).to(dev), TextEncoder(256).to(dev)
    vproj, tproj = nn.Linear(WIDTH, EMBED, bias=False).to(dev), nn.Linear(WIDTH, EMBED, bias=False).to(dev)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=dev))
    params = [*vit.parameters(), *text.parameters(), *vproj.parameters(), *tproj.parameters(), scale]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98))
    t0 = time.time()
    for step in range(1, a.steps + 1):
        lr = a.lr * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = [rng.randrange(len(recs)) for _ in range(a.batch)]
        caps = [recs[i]["caption"] for i in idx]
        negs = []
        for i in idx:
            stored = [n["caption"] for n in recs[i].get("negatives", [])]
            if a.negatives in ("bind", "bind+stored"):
                b = bind_negative(recs[i]["caption"], rng)
                negs.append(b if b is not None else rng.choice(stored))
            if a.negatives in ("stored", "bind+stored"):
                negs.append(rng.choice(stored))
        img = image_embed(vit, vproj, x[idx].to(dev), a.pool)
        ids, lens = caption_batch(vocab, caps + negs, dev)
        txt = F.normalize(tproj(text(ids, lens)), dim=-1)
        s = scale.exp().clamp(max=100)
        n = len(caps)
        l_i2t = F.cross_entropy(s * img @ txt.t(), torch.arange(n, device=dev))
        l_t2i = F.cross_entropy(s * txt[:n] @ img.t(), torch.arange(n, device=dev))
        loss = 0.5 * (l_i2t + l_t2i)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == a.steps:
            log({"phase": "stage1", "step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)})
    return vit, text, vproj, tproj


@torch.no_grad()
def stage1_eval(vit, text, vproj, tproj, vrecs, xv, vocab, pool, dev):
    img = torch.cat([image_embed(vit, vproj, xv[i:i + 500].to(dev), pool) for i in range(0, len(vrecs), 500)])
    ids, lens = caption_batch(vocab, [r["caption"] for r in vrecs], dev)
    txt = F.normalize(tproj(text(ids, lens)), dim=-1)
    r1 = (img @ txt.t()).argmax(1).eq(torch.arange(len(vrecs), device=dev)).float().mean().item()
    out = {"i2t_r1": round(r1, 3)}
    rng = random.Random(0)
    kinds = {}
    for i, r in enumerate(vrecs):
        cands = [(n["kind"], n["caption"]) for n in r.get("negatives", [])]
        b = bind_negative(r["caption"], rng)
        if b is not None:
            cands.append(("bind", b))
        for kind, c in cands:
            kinds.setdefault(kind, []).append((i, c))
    for kind, lst in sorted(kinds.items()):
        ids, lens = caption_batch(vocab, [c for _, c in lst], dev)
        neg = F.normalize(tproj(text(ids, lens)), dim=-1)
        rows = torch.tensor([i for i, _ in lst], device=dev)
        pos_s = (img[rows] * txt[rows]).sum(1)
        neg_s = (img[rows] * neg).sum(1)
        out["neg_" + kind] = round((pos_s > neg_s).float().mean().item(), 3)
    return out


def questions_of(records):
    """(record index, type, question, answer) from LLaVA conversations."""
    out = []
    for k, r in enumerate(records):
        conv = r["conversations"]
        types = r.get("question_types") or [r.get("question_type")]
        for t, (h, g) in enumerate(zip(conv[0::2], conv[1::2])):
            qt = types[t] if t < len(types) else None
            if qt is None or qt == "caption":
                continue
            out.append((k, qt, h["value"].replace("<image>", "").strip(), g["value"].strip()))
    return out


class Reader(nn.Module):
    """[16 projected visual tokens ; question words] -> answer class, read at the last position."""

    def __init__(self, feat, vocab, answers):
        super().__init__()
        d = 128
        self.proj = nn.Sequential(nn.Linear(feat, d), nn.GELU(), nn.Linear(d, d))
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(64, d) * 0.02)
        self.layers = nn.ModuleList(tb.EncoderLayer(d, 4, 4 * d) for _ in range(3))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, answers)

    def forward(self, feats, ids, lens):
        x = torch.cat([self.proj(feats), self.tok(ids)], 1)
        x = x + self.pos[:x.shape[1]]
        keymask = torch.zeros(ids.shape[0], x.shape[1], device=x.device)
        keymask[:, feats.shape[1]:] = torch.where(
            torch.arange(ids.shape[1], device=x.device)[None] < lens[:, None], 0.0, float("-inf"))
        for layer in self.layers:
            x = layer(x, keymask[:, None, None, :])
        last = feats.shape[1] + lens - 1
        return self.head(self.norm(x[torch.arange(x.shape[0], device=x.device), last]))


@torch.no_grad()
def merged_tokens(vit, x, layer, dev):
    """[N, 16, 4W]: layer's patch states (CLS dropped), 2x2 neighbours concatenated."""
    out = []
    for i in range(0, x.shape[0], 500):
        h = vit(x[i:i + 500].to(dev))[layer][:, 1:]             # [n, 64, W]
        n = h.shape[0]
        h = h.view(n, 4, 2, 4, 2, WIDTH).permute(0, 1, 3, 2, 4, 5).reshape(n, 16, 4 * WIDTH)
        out.append(h)
    return torch.cat(out)


def reader_probe(a, vit, x, xv, tq, vq, dev, layer):
    vocab, answers = Vocab(), {}
    for _, _, q, ans in tq:
        vocab.encode(q)
        answers.setdefault(ans, len(answers))
    ft, fv = merged_tokens(vit, x, layer, dev), merged_tokens(vit, xv, layer, dev)
    tok = fv.view(-1, 4, WIDTH)  # per patch token: how large and how uneven the projector's input is
    stats = {"token_norm": round(tok.norm(dim=-1).mean().item(), 2),
             "channel_std_max_over_median": round((tok.std((0, 1)).max() / tok.std((0, 1)).median()).item(), 1),
             "max_abs": round(tok.abs().max().item(), 1)}
    qt, lt = pad([vocab.encode(q) for _, _, q, _ in tq], 24)
    qv, lv = pad([vocab.encode(q, grow=False) for _, _, q, _ in vq], 24)
    at = torch.tensor([answers[ans] for *_, ans in tq])
    av = torch.tensor([answers.get(ans, -1) for *_, ans in vq])
    it, iv = torch.tensor([k for k, *_ in tq]), torch.tensor([k for k, *_ in vq])
    torch.manual_seed(a.seed)
    model = Reader(4 * WIDTH, len(vocab.ids), len(answers)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed)
    evals = {int(v) for v in a.reader_evals.split(",") if v} | {a.reader_steps}
    out = {"layer": layer, **stats}
    for step in range(1, a.reader_steps + 1):
        for pg in opt.param_groups:
            pg["lr"] = 1e-3 * min(1.0, step / 100) * 0.5 * (1 + math.cos(math.pi * step / a.reader_steps))
        b = torch.randint(0, len(tq), (256,), generator=g)
        logits = model(ft[it[b]], qt[b].to(dev), lt[b].to(dev))
        loss = F.cross_entropy(logits, at[b].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in evals and step != a.reader_steps:
            out[f"core4@{step}"] = reader_score(model, fv, iv, qv, lv, av, vq, dev)["core4"]
    out.update(reader_score(model, fv, iv, qv, lv, av, vq, dev))
    return out


@torch.no_grad()
def reader_score(model, fv, iv, qv, lv, av, vq, dev):
    pred = torch.cat([model(fv[iv[i:i + 1000]], qv[i:i + 1000].to(dev), lv[i:i + 1000].to(dev)).argmax(1).cpu()
                      for i in range(0, len(vq), 1000)])
    ok = (pred == av).float()
    types = [t for _, t, _, _ in vq]
    out = {"overall": round(ok.mean().item(), 3)}
    core = [i for i, t in enumerate(types) if t in ("colour", "shape", "count", "existence")]
    out["core4"] = round(ok[core].mean().item(), 3)
    for t in sorted(set(types)):
        sel = [i for i, tt in enumerate(types) if tt == t]
        out[t] = round(ok[sel].mean().item(), 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--pool", choices=["cls", "max", "clsmax"], default="cls")
    ap.add_argument("--kernel", type=int, default=PATCH)
    ap.add_argument("--negatives", choices=["none", "stored", "bind", "bind+stored"], default="none")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default="-2,-1")
    ap.add_argument("--reader-steps", type=int, default=3000)
    ap.add_argument("--reader-evals", default="", help="also score the reader after these steps, e.g. 250,1000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="data/shapes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def log(d):
        print(json.dumps({"name": a.name, **d}), flush=True)

    recs = read_jsonl(os.path.join(a.data, "train.jsonl"))
    vrecs = read_jsonl(os.path.join(a.data, "val.jsonl"))
    x, xv = load_scenes(a.data, "train.jsonl")[0], load_scenes(a.data, "val.jsonl")[0]
    vocab = Vocab()
    for r in recs:
        vocab.encode(r["caption"])
        for n in r.get("negatives", []):
            vocab.encode(n["caption"])
    vit, text, vproj, tproj = train_stage1(a, recs, x, vocab, dev, log)
    for m in (vit, text):
        m.eval()
    log({"phase": "stage1_eval", **stage1_eval(vit, text, vproj, tproj, vrecs, xv, vocab, a.pool, dev)})

    # Reader probe: train questions from the instruction conversations (same scenes as train.jsonl,
    # same order), held-out ones from val_vqa.jsonl (whose records name their scene's image).
    inst = read_jsonl(os.path.join(a.data, "train_instruct.jsonl"))
    by_image = {r["image"]: k for k, r in enumerate(recs)}
    tq = [(by_image[inst[k]["image"]], t, q, ans) for k, t, q, ans in questions_of(inst)]
    vv = read_jsonl(os.path.join(a.data, "val_vqa.jsonl"))
    vby = {r["image"]: k for k, r in enumerate(vrecs)}
    vq = [(vby[vv[k]["image"]], t, q, ans) for k, t, q, ans in questions_of(vv)]
    for layer in [int(s) for s in a.layers.split(",")]:
        log({"phase": "reader", **reader_probe(a, vit, x, xv, tq, vq, dev, layer)})


if __name__ == "__main__":
    main()
