#!/usr/bin/env python3
"""Independent reference for Hugging Face PEFT LoRA adapters (no collm code, no peft package).

  logits: reads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors),
          merges W' = W + scale * B @ A into the base weights in float64 (scale = lora_alpha / r,
          or lora_alpha / sqrt(r) with use_rslora) and prints the merged model's logits as JSON
          {"logits": [[...], ...]} using tests/reference/llama_reference.py's forward pass.
  write:  writes a PEFT adapter as HF PEFT's save_pretrained does (tensor names
          base_model.model.model.layers.N.{self_attn,mlp}.<module>.lora_{A,B}.weight, sorted-key
          adapter_config.json), with random A and B from a seed, to simulate an adapter trained
          with HF PEFT.

Usage:
  /usr/bin/python3 peft_reference.py logits --model DIR --adapter DIR --tokens 1,2,3
  /usr/bin/python3 peft_reference.py write --model DIR --out DIR --r 4 --alpha 8 \
      --targets q_proj,v_proj --seed 1 [--rslora] [--dtype F32|F16|BF16]
Needs Debian's python3-torch and python3-numpy.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_reference  # noqa: E402

GROUP = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PREFIX = "base_model.model."


def adapter_scale(cfg):
    r = cfg["r"]
    alpha = cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r


def merge(w, adapter_dir):
    """Returns the base weights w with every adapted module's s * B @ A added."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg.get("peft_type", "LORA") == "LORA", cfg
    scale = adapter_scale(cfg)
    lora = llama_reference.load_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    merged = dict(w)
    used = set()
    for name, a in lora.items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[len(PREFIX) : -len(".lora_A.weight")]  # model.layers.N.self_attn.q_proj
        b_name = name.replace(".lora_A.weight", ".lora_B.weight")
        b = lora[b_name]
        base = module + ".weight"
        assert base in merged, base
        merged[base] = merged[base] + scale * (b @ a)
        used.update([name, b_name])
    assert used == set(lora), sorted(set(lora) - used)
    return merged


def save_safetensors(path, tensors, dtype):
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if dtype == "F16":
            raw = arr.astype(np.float16).tobytes()
        elif dtype == "BF16":
            bits = arr.view(np.uint32)
            # Round to nearest even, as torch's bfloat16 conversion does.
            raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
        else:
            raw = arr.tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)


def write_adapter(args):
    with open(os.path.join(args.model, "config.json")) as f:
        mcfg = json.load(f)
    d = mcfg["hidden_size"]
    heads = mcfg["num_attention_heads"]
    hd = mcfg.get("head_dim") or d // heads
    kv = mcfg.get("num_key_value_heads") or heads
    inter = mcfg["intermediate_size"]
    shapes = {  # (out, in) of each base projection
        "q_proj": (heads * hd, d),
        "k_proj": (kv * hd, d),
        "v_proj": (kv * hd, d),
        "o_proj": (d, heads * hd),
        "gate_proj": (inter, d),
        "up_proj": (inter, d),
        "down_proj": (d, inter),
    }
    targets = args.targets.split(",")
    rng = np.random.default_rng(args.seed)
    tensors = {}
    for layer in range(mcfg["num_hidden_layers"]):
        for t in targets:
            out, inp = shapes[t]
            p = f"{PREFIX}model.layers.{layer}.{GROUP[t]}.{t}."
            bound = 1.0 / math.sqrt(inp)
            tensors[p + "lora_A.weight"] = rng.uniform(-bound, bound, (args.r, inp))
            tensors[p + "lora_B.weight"] = rng.normal(0.0, 0.1, (out, args.r))
    os.makedirs(args.out, exist_ok=True)
    save_safetensors(os.path.join(args.out, "adapter_model.safetensors"), tensors, args.dtype)
    # The keys PEFT 0.13 writes for a Llama LoraConfig (json.dumps(indent=2, sort_keys=True)).
    cfg = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": args.model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": args.alpha,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": args.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": args.rslora,
    }
    with open(os.path.join(args.out, "adapter_config.json"), "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))
    json.dump({"ok": True, "tensors": sorted(tensors)}, sys.stdout)


def logits(args):
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    w = llama_reference.load_safetensors(os.path.join(args.model, "model.safetensors"))
    w = merge(w, args.adapter)
    tokens = [int(t) for t in args.tokens.split(",")]
    with torch.no_grad():
        out = llama_reference.forward(cfg, w, tokens)
    json.dump({"logits": out.tolist()}, sys.stdout)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits")
    lg.add_argument("--model", required=True)
    lg.add_argument("--adapter", required=True)
    lg.add_argument("--tokens", required=True, help="comma-separated token ids")
    wr = sub.add_parser("write")
    wr.add_argument("--model", required=True)
    wr.add_argument("--out", required=True)
    wr.add_argument("--r", type=int, required=True)
    wr.add_argument("--alpha", type=int, required=True)
    wr.add_argument("--targets", required=True, help="comma-separated module names")
    wr.add_argument("--seed", type=int, default=0)
    wr.add_argument("--rslora", action="store_true")
    wr.add_argument("--dtype", default="F32", choices=["F32", "F16", "BF16"])
    args = ap.parse_args()
    if args.cmd == "logits":
        logits(args)
    else:
        write_adapter(args)


if __name__ == "__main__":
    main()
