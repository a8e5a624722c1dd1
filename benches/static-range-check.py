# Usage: python benches/static-range-check.py MODEL_DIR CALIB.jsonl N   (torch + transformers)
# Independent check (transformers, not lamina): how much output error does a static per-tensor
# int8 activation range (asymmetric min-max, msModelSlim's quantizer) cost each linear's input of
# SmolLM2-135M, with and without QuaRot's rotation, with and without SmoothQuant 0.8, and with the
# first position of each window left out of the range (attention-sink / massive-activation token)?
#
# Error of a linear: ||(x̂ - x) Wᵀ||² / ||x Wᵀ||² over all calibration tokens (relative output
# error caused by activation rounding alone; weights float).
#
# Rotation: a random orthogonal matrix (QR of a Gaussian; the spreading statistics are those of a
# randomized Hadamard). q/k/v and gate/up read n(x) Q with the norm weight folded into W
# (W' = W diag(g) Q); o_proj reads each head's context rotated by a per-head Q_h; down_proj's input
# is not rotated (QuaRot's down rotation is online).
import json, sys, torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
model_dir, calib, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [json.loads(l)["input_ids"] for l in open(calib)][:n]
x = torch.tensor(ids)
model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
model.eval()
cfg = model.config
H, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads


def rand_orth(k):
    q, r = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


Q = rand_orth(H)
Qh = rand_orth(hd)


def fq(x, lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = max(hi / 255 - lo / 255, 1.2e-7)
    o = round(-lo / s) - 128
    return ((x / s + o).round().clamp(-128, 127) - o) * s


def err(X, W, skip_first, seq):
    # X: tokens x in, W: out x in (both already transformed)
    if skip_first:
        mask = torch.ones(X.shape[0], dtype=torch.bool)
        mask[::seq] = False
        lo, hi = X[mask].min().item(), X[mask].max().item()
    else:
        lo, hi = X.min().item(), X.max().item()
    Y = X @ W.T
    D = (fq(X, lo, hi) - X) @ W.T
    return (D.pow(2).sum() / Y.pow(2).sum()).item(), lo, hi


def smooth(X, Ws, alpha=0.8):
    a = X.abs().amax(0).clamp(min=1e-5)
    w = torch.stack([W.abs().amax(0) for W in Ws]).amax(0).clamp(min=1e-5)
    s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
    return X / s, [W * s for W in Ws]


rows = {}
seq = x.shape[1]


def record(layer, name, X, Ws):
    for sm in (False, True):
        Xs, Wss = smooth(X, Ws) if sm else (X, Ws)
        for skip in (False, True):
            e = sum(err(Xs, W, skip, seq)[0] for W in Wss) / len(Wss)
            rows.setdefault((name, sm, skip), []).append(e)


inputs = {}


def hook(mod_name):
    def f(m, args):
        inputs[mod_name] = args[0].detach().reshape(-1, args[0].shape[-1])
    return f


for i, layer in enumerate(model.model.layers):
    for nm in ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]:
        layer.get_submodule(nm).register_forward_pre_hook(hook(f"{i}.{nm}"))

with torch.no_grad():
    model(x)

for i, layer in enumerate(model.model.layers):
    at, mlp = layer.self_attn, layer.mlp
    g1, g2 = layer.input_layernorm.weight.float(), layer.post_attention_layernorm.weight.float()
    Xq = inputs[f"{i}.self_attn.q_proj"]
    qkv = [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]
    Xg = inputs[f"{i}.mlp.gate_proj"]
    gu = [mlp.gate_proj.weight, mlp.up_proj.weight]
    Xo = inputs[f"{i}.self_attn.o_proj"]
    Xd = inputs[f"{i}.mlp.down_proj"]
    Bh = torch.block_diag(*[Qh] * cfg.num_attention_heads)
    for rot in (False, True):
        tag = "rot" if rot else "plain"
        if rot:
            record(i, f"{tag} qkv", (Xq / g1) @ Q, [W * g1 @ Q for W in qkv])
            record(i, f"{tag} gate/up", (Xg / g2) @ Q, [W * g2 @ Q for W in gu])
            record(i, f"{tag} o", Xo @ Bh, [at.o_proj.weight @ Bh])
        else:
            record(i, f"{tag} qkv", Xq, qkv)
            record(i, f"{tag} gate/up", Xg, gu)
            record(i, f"{tag} o", Xo, [at.o_proj.weight])
    # down: identical input either way (its weight's rows rotate, the output error norm does not change)
    record(i, "both down", Xd, [mlp.down_proj.weight])
    # the first position's share of the range
    for nm, X in (("qkv-in", Xq), ("down-in", Xd)):
        first = X[::seq].abs().max().item()
        rest = torch.cat([X[j * seq + 1:(j + 1) * seq] for j in range(len(ids))]).abs().max().item()
        rows.setdefault((f"max|x| first/rest {nm}", None, None), []).append(first / rest)

print(f"SmolLM2-135M, {len(ids)} x {seq} tokens; mean over 30 layers of the relative output error of static int8 activations")
print(f"{'linear':24} {'smooth':7} {'range':12} {'mean err':>10} {'max err':>10} {'worst layer':>11}")
for (name, sm, skip), v in rows.items():
    if sm is None:
        print(f"{name:44} per layer: " + " ".join(f"{r:.1f}" for r in v))
        continue
    t = torch.tensor(v)
    print(f"{name:24} {'SQ0.8' if sm else '-':7} {'no pos 0' if skip else 'all':12} {t.mean():10.2e} {t.max():10.2e} {int(t.argmax()):11d}")
