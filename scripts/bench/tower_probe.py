#!/usr/bin/env python3
"""Where does a trained stage-1 vision tower keep shape? Linear probes on its frozen features.

Reads a trialign stage-1 checkpoint (model.safetensors + config.yaml), runs its ViT forward in
plain PyTorch on shapes-world scenes, and fits one linear classifier per feature:
- the pooled CLS (last layer, post_layernorm: what InfoNCE trains);
- the CLS token of hidden states -2 and -1;
- the mean of the patch tokens of hidden states -2 and -1 (what the VLM's projector reads is
  the patch tokens of -2).
It prints 6-way shape accuracy on single-object val scenes (chance 0.17), and for the pooled CLS
and the -2 patch mean also whether a scene's whole set of shapes is read right. Training uses
the first 4,000 train scenes. docs/benchmarks.md quotes its figures.

    python3 scripts/bench/tower_probe.py runs/quickstart/stage1/checkpoints/step_00001000 [--data data/shapes]

Needs Debian's python3-torch, python3-pil and python3-yaml. The forward follows
src/models/clip_model.cpp (pre-LN layers, quick-GELU, CLS first, CLIP's pixel statistics).
"""
import argparse
import json
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def read_safetensors(path, prefix):
    """{name: fp32 tensor} for the names starting with prefix (header: u64 length, JSON)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, v in header.items():
        if name == "__metadata__" or not name.startswith(prefix):
            continue
        if v["dtype"] != "F32":
            raise SystemExit(f"{path}: {name} is {v['dtype']}; this probe reads fp32 checkpoints")
        a, b = v["data_offsets"]
        out[name[len(prefix):]] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(v["shape"])
    return out


def load_scenes(data, manifest, limit):
    """Normalised images [N,3,S,S], single-object shape index or -1 [N], shape sets [N,6]."""
    xs, single, sets = [], [], []
    with open(os.path.join(data, manifest)) as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            rec = json.loads(line)
            objs = rec["scene"]["objects"]
            xs.append(np.asarray(Image.open(os.path.join(data, rec["image"])).convert("RGB"), dtype=np.float32))
            single.append(SHAPES.index(objs[0]["shape"]) if len(objs) == 1 else -1)
            s = np.zeros(len(SHAPES), np.float32)
            for o in objs:
                s[SHAPES.index(o["shape"])] = 1
            sets.append(s)
    x = torch.tensor(np.stack(xs)).permute(0, 3, 1, 2) / 255.0
    return (x - MEAN) / STD, torch.tensor(single), torch.tensor(np.stack(sets))


class Tower:
    def __init__(self, w, v):
        self.w, self.v = w, v
        self.patch = v["patch_size"]
        self.pad = ((v.get("patch_kernel_size") or self.patch) - self.patch) // 2

    def ln(self, x, k):
        return F.layer_norm(x, (x.shape[-1],), self.w[k + ".weight"], self.w[k + ".bias"], float(self.v["layer_norm_eps"]))

    def lin(self, x, k):
        return F.linear(x, self.w[k + ".weight"], self.w[k + ".bias"])

    @torch.no_grad()
    def forward(self, x):
        """(pooled CLS [B,D], hidden states: embeddings + one per layer, each [B,1+P,D])."""
        w = self.w
        e = F.conv2d(x, w["embeddings.patch_embedding.weight"], stride=self.patch, padding=self.pad)
        e = e.flatten(2).transpose(1, 2)
        pos = w["embeddings.position_embedding.weight"]
        cls = (w["embeddings.class_embedding"] + pos[0]).expand(x.shape[0], 1, -1)
        h = self.ln(torch.cat([cls, e + pos[1:]], 1), "pre_layrnorm")
        states = [h]
        heads = self.v["num_attention_heads"]
        for i in range(self.v["num_hidden_layers"]):
            p = f"encoder.layers.{i}."
            y = self.ln(h, p + "layer_norm1")
            b, t, d = y.shape
            split = lambda z: z.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
            q, k, val = (split(self.lin(y, p + "self_attn." + n)) for n in ("q_proj", "k_proj", "v_proj"))
            a = ((q @ k.transpose(-1, -2)) / (d // heads) ** 0.5).softmax(-1) @ val
            h = h + self.lin(a.transpose(1, 2).reshape(b, t, d), p + "self_attn.out_proj")
            y = self.lin(self.ln(h, p + "layer_norm2"), p + "mlp.fc1")
            if self.v["hidden_act"] == "quick_gelu":
                y = y * torch.sigmoid(1.702 * y)
            else:
                y = F.gelu(y)
            h = h + self.lin(y, p + "mlp.fc2")
            states.append(h)
        return self.ln(states[-1][:, 0], "post_layernorm"), states

    def batched(self, x, n=500):
        outs = [self.forward(x[i:i + n]) for i in range(0, x.shape[0], n)]
        pooled = torch.cat([o[0] for o in outs])
        states = [torch.cat([o[1][layer] for o in outs]) for layer in range(len(outs[0][1]))]
        return pooled, states


def probe(train_x, train_y, test_x, test_y, multi_label):
    """Standardised features, a linear layer fitted full-batch with Adam; test accuracy."""
    torch.manual_seed(0)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    head = torch.nn.Linear(train_x.shape[1], len(SHAPES))
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):
        out = head(train_x)
        loss = F.binary_cross_entropy_with_logits(out, train_y) if multi_label else F.cross_entropy(out, train_y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = head(test_x)
        hit = ((out > 0).float() == test_y).all(1) if multi_label else out.argmax(1) == test_y
    return hit.float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a stage-1 checkpoint folder (model.safetensors, config.yaml)")
    ap.add_argument("--data", default="data/shapes")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with open(os.path.join(a.checkpoint, "config.yaml")) as f:
        v = yaml.safe_load(f)["model"]["vision"]
    tower = Tower(read_safetensors(os.path.join(a.checkpoint, "model.safetensors"), "vision_model."), v)
    xt, st, mt = load_scenes(a.data, "train.jsonl", 4000)
    xv, sv, mv = load_scenes(a.data, "val.jsonl", 1000)
    (pt, ht), (pv, hv) = tower.batched(xt), tower.batched(xv)
    one_t, one_v = st >= 0, sv >= 0
    feats = {"pooled CLS": (pt, pv)}
    for layer in (-2, -1):
        feats[f"hidden state {layer}: CLS token"] = (ht[layer][:, 0], hv[layer][:, 0])
        feats[f"hidden state {layer}: mean of patch tokens"] = (ht[layer][:, 1:].mean(1), hv[layer][:, 1:].mean(1))
    result = {"checkpoint": a.checkpoint, "single_object_shape": {}, "shape_set_exact": {}}
    for name, (ft, fv) in feats.items():
        result["single_object_shape"][name] = round(probe(ft[one_t], st[one_t], fv[one_v], sv[one_v], False), 3)
    for name in ("pooled CLS", "hidden state -2: mean of patch tokens"):
        ft, fv = feats[name]
        result["shape_set_exact"][name] = round(probe(ft, mt, fv, mv, True), 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
