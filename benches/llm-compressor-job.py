#!/usr/bin/env python3
"""The calibration benchmark's job run by vLLM's llm-compressor, for a side-by-side comparison with lamina in
the same run (`benches/calibration.rs` starts this script; it can also be run alone).

usage: llm-compressor-job.py MODEL_DIR CALIB_IDS.jsonl OUT_DIR [--eval TEXT] [--eval_seq_len 512]
                             [--eval_windows 40] [--threads N] [--dtype float32]

Install (a venv of its own; llm-compressor pins torch and transformers):
    python3 -m venv VENV && VENV/bin/pip install llmcompressor==0.14.0.1

The job is lamina's `benches/recipes/sq_gptq.yaml` as llm-compressor spells it:
- SmoothQuant, alpha 0.8, on input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down
  (lamina also smooths v -> o; llm-compressor cannot with grouped-query attention, where v has fewer output
  channels than o has inputs);
- GPTQ weights, int8 symmetric per output channel (block 128, damping 1%, llm-compressor's defaults);
- static int8 activations, one asymmetric per-tensor range per linear (min-max observer);
- every linear of the decoder layers; lm_head float.
The calibration sequences are CALIB_IDS.jsonl's `{"input_ids": [...]}` lines, the very ids lamina calibrates
on, in order, one sequence per batch.

Prints `quantize_seconds` (from the start of this script, imports included, through the saved output: what a
user waits for), `quantize_cpu_seconds` (CPU time of all its threads for the same), `oneshot_seconds` (the
oneshot call alone), `peak_rss_bytes` once calibrated, and with --eval the
perplexity of the quantized model as llm-compressor simulates it (fake-quantized weights and activations, the
state oneshot leaves the model in), by the protocol of `lamina eval` and benches/hf-perplexity.py: the text
tokenized once without special tokens, windows of EVAL_SEQ_LEN tokens, exp(mean NLL) over positions 2..N.
"""
import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("calib_ids")
    p.add_argument("out_dir")
    p.add_argument("--eval")
    p.add_argument("--eval_seq_len", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier
    from transformers import AutoModelForCausalLM

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    with open(a.calib_ids) as f:
        samples = [json.loads(line)["input_ids"] for line in f if line.strip()]
    seq_len = max(len(s) for s in samples)
    dataset = Dataset.from_list([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples])

    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype))
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False),
        input_activations=QuantizationArgs(
            num_bits=8, type="int", strategy="tensor", symmetric=False, dynamic=False, observer="minmax"
        ),
    )
    recipe = [
        SmoothQuantModifier(
            smoothing_strength=0.8,
            mappings=[
                [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"],
                [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"],
                [["re:.*down_proj"], "re:.*up_proj"],
            ],
        ),
        GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
    ]
    t = time.time()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=len(samples),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    oneshot_seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Evaluate before saving: saving compresses the in-memory weights.
    ppl = None
    eval_wall = eval_cpu = 0.0
    if a.eval:
        wall, cpu = time.time(), time.process_time()
        ppl = perplexity(model, a.model_dir, a.eval, a.eval_seq_len, a.eval_windows)
        eval_wall, eval_cpu = time.time() - wall, time.process_time() - cpu
    model.save_pretrained(a.out_dir, save_compressed=True)
    # The evaluation ran in between: it is not part of the quantization.
    quantize = time.time() - STARTED - eval_wall
    quantize_cpu = time.process_time() - eval_cpu
    if ppl is not None:
        print(f"windows: {ppl[1]}")
        print(f"quantized perplexity: {ppl[0]:.4f}")
    print(f"oneshot_seconds: {oneshot_seconds:.2f}")
    print(f"quantize_seconds: {quantize:.2f}")
    print(f"quantize_cpu_seconds: {quantize_cpu:.2f}")
    print(f"peak_rss_bytes: {peak}")
    print(f"threads: {torch.get_num_threads()}")


def perplexity(model, model_dir, text_path, seq_len, max_windows):
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_special_tokens=False).ids
    windows = min(max_windows, len(ids) // seq_len)
    nll, predicted = 0.0, 0
    model.eval()
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * seq_len:(w + 1) * seq_len]])
            logp = torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
            predicted += seq_len - 1
    return math.exp(nll / predicted), f"{windows} x {seq_len} tokens ({predicted} predicted)"


if __name__ == "__main__":
    main()
