#!/usr/bin/env python3
"""Independent reference forward pass for Hugging Face Llama checkpoints (no collm code).

Reads config.json and model.safetensors with numpy, runs the HF LlamaForCausalLM math in
float64 with PyTorch (RMSNorm, rotate-half RoPE, GQA, SwiGLU, causal attention), and prints the
logits of every position as JSON: {"logits": [[...], ...]}.

Usage: /usr/bin/python3 llama_reference.py --model DIR --tokens 1,403,407
Needs Debian's python3-torch and python3-numpy (not the transformers package).
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

DTYPES = {"F32": np.float32, "F16": np.float16}


def load_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[base + begin : base + end]
        if info["dtype"] == "BF16":
            u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            arr = u16.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=DTYPES[info["dtype"]]).astype(np.float32)
        tensors[name] = torch.from_numpy(arr.reshape(info["shape"]).copy()).double()
    return tensors


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def forward(cfg, w, tokens):
    d = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    hd = cfg.get("head_dim") or d // n_heads
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    qwen = cfg.get("model_type") == "qwen2"
    bias = qwen or cfg.get("attention_bias", False)
    T = len(tokens)

    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    pos = torch.arange(T, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)

    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = h @ w[p + f"self_attn.{name}.weight"].T
            if bias:
                y = y + w[p + f"self_attn.{name}.bias"]
            return y

        q = proj("q_proj").view(T, n_heads, hd)
        k = proj("k_proj").view(T, n_kv, hd)
        v = proj("v_proj").view(T, n_kv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = n_heads // n_kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hts,shd->thd", torch.softmax(scores, -1), v).reshape(T, n_heads * hd)
        o = attn @ w[p + "self_attn.o_proj.weight"].T
        if bias and not qwen:
            o = o + w[p + "self_attn.o_proj.bias"]
        x = x + o
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    tied = cfg.get("tie_word_embeddings", False)
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return x @ head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    w = load_safetensors(os.path.join(args.model, "model.safetensors"))
    tokens = [int(t) for t in args.tokens.split(",")]
    with torch.no_grad():
        logits = forward(cfg, w, tokens)
    json.dump({"logits": logits.tolist()}, sys.stdout)


if __name__ == "__main__":
    main()
