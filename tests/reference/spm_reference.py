#!/usr/bin/env python3
"""Runs the real SentencePiece library (Debian's python3-sentencepiece) as an independent reference
for collm's tokenizer. Reads JSON from the file named by its argument:
  {"model": PATH, "encode": [text, ...], "decode": [[id, ...], ...]}
and prints {"encode": [[id, ...], ...], "decode": [text, ...]}.
"""
import json
import sys

import sentencepiece as spm

with open(sys.argv[1]) as f:
    req = json.load(f)
sp = spm.SentencePieceProcessor(model_file=req["model"])
out = {
    "encode": [sp.encode(t) for t in req.get("encode", [])],
    "decode": [sp.decode(ids) for ids in req.get("decode", [])],
}
json.dump(out, sys.stdout)
