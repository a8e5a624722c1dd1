#!/usr/bin/env python3
"""vLLM llm-compressor's runs of the algorithms bench (`benches/algorithms.rs` starts this script in the same
run as lamina's; it can also be run alone).

usage: llm-compressor-algos.py MODEL_DIR CALIB_IDS.jsonl OUT_DIR --job JOB [--eval TEXT] [--eval_seq_len 512]
                               [--eval_windows 40] [--group_size 128] [--threads N]

Jobs (llm-compressor's documented recipes, its defaults otherwise; lm_head float):
- awq_w4a16:     AWQModifier (duo scaling, 20-point grid) then QuantizationModifier, scheme W4A16_ASYM
                 (int4 asymmetric weights in groups, float activations) — llm-compressor's AWQ example;
- gptq_w4a16:    GPTQModifier, scheme W4A16 (int4 symmetric weights in groups) — its GPTQ example;
- gptq_w4a16_asym: the same with asymmetric weights;
- sq_gptq_w8a8_dynamic: SmoothQuantModifier 0.8 then GPTQModifier, scheme W8A8 (int8 per-channel weights,
                 int8 per-token dynamic activations) — its W8A8 example.
--group_size changes the groups of the 4-bit schemes (128 by default, as their presets).

The calibration sequences are CALIB_IDS.jsonl's `{"input_ids": [...]}` lines, the very ids lamina calibrates
on, in order. Prints `quantize_seconds` (from the start of this script, imports included, through the saved
output), `oneshot_seconds`, `peak_rss_bytes`, and with --eval the perplexity of the model as llm-compressor
leaves it (fake-quantized weights and activations) by the protocol of `lamina eval`: the text tokenized once
without special tokens, windows of EVAL_SEQ_LEN tokens, exp(mean NLL) over positions 2..N.

Install (a venv of its own): `pip install llmcompressor==0.14.0.1`; benches/algorithms.rs makes one that
reuses an existing torch/transformers (see there).
"""
import time

STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402


def recipe_for(job, group_size):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    def w4a16(symmetric):
        return {
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=symmetric, dynamic=False
                ),
            )
        }

    if job == "awq_w4a16":
        return [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups=w4a16(False), ignore=["lm_head"])]
    if job == "gptq_w4a16":
        return [GPTQModifier(config_groups=w4a16(True), ignore=["lm_head"])]
    if job == "gptq_w4a16_asym":
        return [GPTQModifier(config_groups=w4a16(False), ignore=["lm_head"])]
    if job == "sq_gptq_w8a8_dynamic":
        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]
    raise SystemExit(f"unknown job {job}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("calib_ids")
    p.add_argument("out_dir")
    p.add_argument("--job", required=True)
    p.add_argument("--eval")
    p.add_argument("--eval_seq_len", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--group_size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins its cached activations for faster host-to-GPU copies, which
        # fails without a CUDA driver; pinning changes no value, so on a CPU-only machine it is skipped.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    with open(a.calib_ids) as f:
        samples = [json.loads(line)["input_ids"] for line in f if line.strip()]
    seq_len = max(len(s) for s in samples)
    dataset = Dataset.from_list([{"input_ids": s, "attention_mask": [1] * len(s)} for s in samples])
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    t = time.time()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_for(a.job, a.group_size),
        num_calibration_samples=len(samples),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    oneshot_seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Evaluate before saving: saving compresses the in-memory weights.
    ppl = None
    eval_wall = 0.0
    if a.eval:
        wall = time.time()
        ppl = perplexity(model, a.model_dir, a.eval, a.eval_seq_len, a.eval_windows)
        eval_wall = time.time() - wall
    model.save_pretrained(a.out_dir, save_compressed=True)
    quantize = time.time() - STARTED - eval_wall
    if ppl is not None:
        print(f"windows: {ppl[1]}")
        print(f"quantized perplexity: {ppl[0]:.4f}")
    print(f"oneshot_seconds: {oneshot_seconds:.2f}")
    print(f"quantize_seconds: {quantize:.2f}")
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
