"""The models: finding and loading them, and scoring responses with them.

loading.py   tokenizer, policy (full or LoRA) and reference from a folder or a hub id
logprobs.py  the response-only LM head and per-sequence response log-probs (one scoring function
             for policy and reference)
weight_files.py  safetensors weights read a row range at a time (each rank of a sharded model
             copies only its part)
"""
