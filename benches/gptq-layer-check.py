# Usage: python benches/gptq-layer-check.py MODEL_DIR CALIB.jsonl N EVAL.txt LAYERS   (e.g. 0,3,11,20,28)
# Independent check (transformers + a textbook GPTQ in torch, not lamina): on SmolLM2-135M's real
# linear inputs, does GPTQ with int4 per-channel symmetric weights (scale absmax/7 from the
# original rows, integers -7..7, natural order, damp 1% of mean diag) beat round-to-nearest on
# the layer-wise output error ||X (W - Q)ᵀ||², measured on held-out tokens? And what do the first
# positions (the massive-activation tokens) do to the Hessian?
import json, sys, torch
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer

model_dir, calib, n, evaltxt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
layers_to_check = [int(v) for v in sys.argv[5].split(",")]
ids = torch.tensor([json.loads(l)["input_ids"] for l in open(calib)][:n])
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
ev = tok.encode(open(evaltxt).read(), add_special_tokens=False).ids
evids = torch.tensor([ev[w * 512:(w + 1) * 512] for w in range(2)])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
seq = 512
names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
store = {}


def hook(key):
    def f(m, args):
        store[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
    return f


for i in layers_to_check:
    for nm in names:
        model.model.layers[i].get_submodule(nm).register_forward_pre_hook(hook((i, nm)))
with torch.no_grad():
    model(ids)
    cal = dict(store)
    model(evids)
    held = dict(store)


def rtn(W, qmax=7):
    s = W.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
    return (W / s).round().clamp(-qmax, qmax) * s


def gptq(W, H, qmax=7, damp=0.01):
    W = W.clone()
    n = W.shape[1]
    s = W.abs().amax(1, keepdim=True).clamp(min=1e-12) / qmax
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i in range(n):
        w = W[:, i]
        q = (w / s[:, 0]).round().clamp(-qmax, qmax) * s[:, 0]
        Q[:, i] = q
        e = (w - q) / Hinv[i, i]
        W[:, i:] -= e[:, None] * Hinv[i, i:][None, :]
    return Q


def out_err(X, W, Q, skip_first):
    if skip_first:
        m = torch.ones(X.shape[0], dtype=torch.bool)
        m[::seq] = False
        X = X[m]
    return ((X @ (W - Q).T) ** 2).sum().item() / ((X @ W.T) ** 2).sum().item()


print("layer linear          | held-out rel. error, all tokens: RTN  GPTQ  GPTQ(H w/o pos0) | w/o pos 0: RTN  GPTQ  GPTQ(H w/o pos0) | share of H's trace from pos 0")
for i in layers_to_check:
    for nm in names:
        W = model.model.layers[i].get_submodule(nm).weight.detach().double()
        X = cal[(i, nm)]
        H = 2 * X.T @ X / X.shape[0]
        m = torch.ones(X.shape[0], dtype=torch.bool)
        m[::seq] = False
        H0 = 2 * X[m].T @ X[m] / m.sum()
        share = 1 - (X[m] ** 2).sum().item() / (X ** 2).sum().item()
        R, G, G0 = rtn(W), gptq(W, H), gptq(W, H0)
        Xh = held[(i, nm)]
        a = [out_err(Xh, W, Q, False) for Q in (R, G, G0)]
        b = [out_err(Xh, W, Q, True) for Q in (R, G, G0)]
        print(f"{i:5d} {nm:16} | {a[0]:.3e} {a[1]:.3e} {a[2]:.3e} | {b[0]:.3e} {b[1]:.3e} {b[2]:.3e} | {share:.3f}", flush=True)
