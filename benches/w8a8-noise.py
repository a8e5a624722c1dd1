# Usage: python benches/w8a8-noise.py OUT_A OUT_B   (two lamina W8A8 outputs of the same model, Ascend format)
# Which static range got worse, read from lamina's own outputs (32 x 512 calibration, the
# ALGORITHMS.md rows): the output noise a linear's activation rounding adds per token,
# step²/12 · ||W||_F² (step = input_scale, W = the dequantized int8 weight the kernel multiplies).
# The float outputs are the same in both models (rotations keep norms), so the ratio of the two
# models' noise is which input's static range got worse, and by how much.
import sys, torch, numpy as np
from safetensors.torch import load_file
a = load_file(sys.argv[1] + "/quant_model_weights.safetensors")
b = load_file(sys.argv[2] + "/quant_model_weights.safetensors")
def noise(t, p):
    s = t[p + ".input_scale"].double().reshape(-1)[0]
    d = t[p + ".deq_scale"]
    if d.dtype == torch.int64:
        d = torch.from_numpy((d.numpy().astype(np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.float32).copy())
    ws = d.double().reshape(-1) / s
    W = t[p + ".weight"].double() * ws[:, None]
    return (s * s / 12 * (W ** 2).sum()).item()
groups = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
          "gate/up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
tot = {g: [0.0, 0.0] for g in groups}
print("layer " + " ".join(f"{g:>16}" for g in groups) + "   (noise: plain -> rotated, ×ratio)")
for i in range(30):
    row = []
    for g, ms in groups.items():
        na = sum(noise(a, f"model.layers.{i}.{m}") for m in ms)
        nb = sum(noise(b, f"model.layers.{i}.{m}") for m in ms)
        tot[g][0] += na; tot[g][1] += nb
        row.append(f"{na:.1e}->x{nb/na:5.2f}")
    print(f"{i:5d} " + " ".join(f"{r:>16}" for r in row))
print("sum   " + " ".join(f"{tot[g][0]:.1e}->x{tot[g][1]/tot[g][0]:5.2f}" for g in groups))
