"""Proof that lamina's compressed-tensors outputs load unchanged in transformers (with the compressed-tensors
package) and compute what lamina's own eval computes.

Makes a small random Llama whose sizes divide by 128 (W4A16's groups), quantizes it with lamina for each
scheme (`--save_format compressed-tensors`), loads every output with transformers' AutoModelForCausalLM
(compressed-tensors decompresses the weights and quantizes the activations as the config says), and
compares its logits with `lamina forward --quantized` (lamina's eval path) and with the float model.

    python benches/ct_transformers.py [--lamina target/release/lamina] [--keep DIR]

Needs torch, transformers and compressed-tensors (a venv; the bench prints the versions). Prints one line
per scheme: max |Δlogit| and relative error between transformers and lamina, and each one's error
against float; exits 1 when transformers and lamina disagree by more than a tenth of the quantization
error.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def make_model(d: Path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.8, 1.2)
    m = m.to(torch.bfloat16)
    m.save_pretrained(d)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lamina", default=str(ROOT / "target/release/lamina"))
    ap.add_argument("--keep")
    a = ap.parse_args()
    import compressed_tensors, transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="lamina-ct-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    float_model = make_model(model_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, 48), generator=g)
    save_file({"input_ids": ids}, str(work / "inputs.safetensors"))
    calib = work / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"input_ids": torch.randint(0, 512, (64,), generator=g).tolist()}) for _ in range(8)) + "\n")
    with torch.no_grad():
        f_logits = float_model.float()(input_ids=ids).logits[0]
    worst = 0.0
    for q in ["w8a8_dynamic", "w8a16", "w4a16", "w8a8"]:
        out = work / f"out-{q}"
        subprocess.run([a.lamina, "quant", "--model_path", str(model_dir), "--save_path", str(out), "--quant_type", q,
                        "--save_format", "compressed-tensors", "--overwrite", "--calib_data", str(calib),
                        "--calib_samples", "8", "--calib_seq_len", "64"], check=True, capture_output=True)
        acts = work / f"lamina-{q}.safetensors"
        subprocess.run([a.lamina, "forward", "--model_path", str(model_dir), "--quantized", str(out),
                        "--inputs", str(work / "inputs.safetensors"), "--out", str(acts)], check=True, capture_output=True)
        l_logits = load_file(str(acts))["logits"].float().reshape(-1, 512)
        tm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            t_logits = tm(input_ids=ids).logits[0].float()
        rel = lambda x, y: float((x - y).norm() / y.norm())
        d_tl, d_tf, d_lf = rel(t_logits, l_logits), rel(t_logits, f_logits), rel(l_logits, f_logits)
        top1 = float((t_logits.argmax(-1) == l_logits.argmax(-1)).float().mean())
        print(f"{q:14s} transformers vs lamina: rel {d_tl:.2e}, max|Δ| {float((t_logits - l_logits).abs().max()):.2e}, top-1 {top1:.0%};"
              f" vs float: transformers {d_tf:.3e}, lamina {d_lf:.3e}")
        # Dynamic per-token int8: compressed-tensors' fake quantization (transformers) rounds to absmax / 127.5
        # (quantization/utils/helpers.py: max_val / (bit_range / 2)), vLLM's int8 kernel and lamina to
        # absmax / 127: another activation grid, so its rounding noise is its own. The weights are checked
        # by the weight-only and static rows.
        if q != "w8a8_dynamic":
            worst = max(worst, d_tl / max(d_lf, 1e-9))
    print(f"worst (transformers vs lamina) / (lamina vs float), w8a8_dynamic aside: {worst:.3f}")
    sys.exit(0 if worst < 0.1 else 1)


if __name__ == "__main__":
    main()
