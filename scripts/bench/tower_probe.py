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

    python3 scripts/bench/tower_probe.py runs/quickstart/stage1/checkpoints/step_00000500 [--data data/shapes]

Needs Debian's python3-torch, python3-pil and python3-yaml. The tower is torch_bench.py's ViT
(pre-LN layers, quick-GELU, CLS first) with the checkpoint's weights; pixels use CLIP's statistics.
"""
import argparse
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_bench as tb  # noqa: E402  (the bench card's ViT, here given the checkpoint's shapes)
from shape_probe import SHAPES, load_scenes  # noqa: E402

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


def build_tower(weights, v):
    """torch_bench's Vit with the checkpoint's shapes and weights (Hugging Face names mapped)."""
    if v["hidden_act"] != "quick_gelu" or float(v["layer_norm_eps"]) != 1e-5:
        raise SystemExit("this probe's ViT is quick-GELU with LayerNorm eps 1e-5, as the quickstart's")
    tb.IMAGE, tb.PATCH, tb.WIDTH = v["image_size"], v["patch_size"], v["hidden_size"]
    tb.MLP, tb.LAYERS, tb.HEADS = v["intermediate_size"], v["num_hidden_layers"], v["num_attention_heads"]
    vit = tb.Vit()
    kernel = v.get("patch_kernel_size") or tb.PATCH
    vit.patch = torch.nn.Conv2d(3, tb.WIDTH, kernel, tb.PATCH, padding=(kernel - tb.PATCH) // 2, bias=False)
    pos = weights["embeddings.position_embedding.weight"]
    state = {"patch.weight": weights["embeddings.patch_embedding.weight"], "pos": pos,
             # trialign adds pos[0] to the class embedding; Vit adds pos to the concatenation: the same sum
             "cls": weights["embeddings.class_embedding"]}
    for ours, theirs in (("pre", "pre_layrnorm"), ("post", "post_layernorm")):
        for t in ("weight", "bias"):
            state[f"{ours}.{t}"] = weights[f"{theirs}.{t}"]
    for i in range(tb.LAYERS):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            for t in ("weight", "bias"):
                state[f"layers.{i}.{name.replace('mlp.', '')}.{t}"] = weights[f"encoder.layers.{i}.{name}.{t}"]
    vit.load_state_dict(state, strict=True)
    return vit.eval()


@torch.no_grad()
def features(vit, x, n=500):
    """(pooled CLS [N,D], hidden states: embeddings + one per layer, each [N,1+P,D]) in chunks."""
    outs = [vit(x[i:i + n]) for i in range(0, x.shape[0], n)]
    states = [torch.cat([o[layer] for o in outs]) for layer in range(len(outs[0]))]
    return vit.post(states[-1][:, 0]), states


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
    vit = build_tower(read_safetensors(os.path.join(a.checkpoint, "model.safetensors"), "vision_model."), v)
    xt, mt, st = load_scenes(a.data, "train.jsonl", 4000, MEAN, STD)
    xv, mv, sv = load_scenes(a.data, "val.jsonl", 1000, MEAN, STD)
    (pt, ht), (pv, hv) = features(vit, xt), features(vit, xv)
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
