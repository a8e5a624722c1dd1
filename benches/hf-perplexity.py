#!/usr/bin/env python3
"""Float perplexity of a Hugging Face checkpoint with transformers, by the protocol of `lamina eval`:
an independent check of lamina's float figure in benches/PERPLEXITY.md.

usage: hf-perplexity.py MODEL_DIR TEXT [SEQ_LEN=512] [MAX_WINDOWS=40]
       (pip install torch transformers tokenizers)

The whole text is tokenized once with MODEL_DIR/tokenizer.json, without special tokens, and cut into
consecutive windows of SEQ_LEN tokens (a last partial window is dropped; at most MAX_WINDOWS are used).
Each window is run in float32; the perplexity is exp(mean negative log-likelihood) over every predicted
token, positions 2..SEQ_LEN of each window.
"""
import math
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) not in (3, 4, 5):
        sys.exit(__doc__)
    model_dir, text_path = sys.argv[1], sys.argv[2]
    seq_len = int(sys.argv[3]) if len(sys.argv) > 3 else 512
    max_windows = int(sys.argv[4]) if len(sys.argv) > 4 else 40
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False).ids
    windows = min(max_windows, len(ids) // seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, predicted = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            predicted += seq_len - 1
    print(f"windows: {windows} x {seq_len} tokens ({predicted} predicted, text of {len(ids)} tokens)")
    print(f"perplexity: {math.exp(nll / predicted):.4f}")


if __name__ == "__main__":
    main()
