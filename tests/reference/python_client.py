#!/usr/bin/env python3
"""An independent Python client for collmd (Debian's python3-grpcio, stubs generated from our
protos at test time). Usage: python_client.py STUBS_DIR HOST:PORT PROMPT MAX_TOKENS
Streams a Generate call and prints JSON {"text": ..., "finish_reason": ..., "completion_tokens": ...}.
"""
import json
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
from collm.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

channel = grpc.insecure_channel(sys.argv[2])
stub = inference_pb2_grpc.InferenceServiceStub(channel)
req = inference_pb2.GenerateRequest(prompt=sys.argv[3])
req.sampling.temperature = 0.0
req.sampling.max_tokens = int(sys.argv[4])
text, last = "", None
for msg in stub.Generate(req, timeout=60):
    text += msg.text
    last = msg
json.dump({"text": text,
           "finish_reason": inference_pb2.FinishReason.Name(last.finish_reason),
           "completion_tokens": last.usage.completion_tokens}, sys.stdout)
