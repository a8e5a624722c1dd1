//! Checks of a calibrated output (static W8A8 mixed with other schemes) against the checkpoint it
//! came from, from formats.md and textbook formulas rather than lamina's code:
//! - the description covers every tensor once, with the scheme each linear was meant to get;
//! - static W8A8: int8 weight, positive finite `input_scale` and `deq_scale` (f32 for bf16
//!   models, the f32 bits in int64 otherwise), integral `input_offset` in int8 range,
//!   `deq_scale = input_scale * weight_scale` and `quant_bias = round(bias / deq_scale -
//!   input_offset * Σ_k q[:, k])`;
//! - SmoothQuant's fold, read back from the norms: a norm's new weight is `g / s`, so the test
//!   knows `s = g / g'` and the smoothed weight `W diag(s)` of every linear reading that norm
//!   (MLA's too: `q_a_proj` / `kv_a_proj_with_mqa` read `input_layernorm`, `q_b_proj` and
//!   `kv_b_proj` the low-rank norms); weight scales are that weight's row absmax / 127, the router
//!   stays `W diag(s)` in bf16; m2's shift `z = -b' s`, read back from the bias a norm gained,
//!   is in its static consumers' `quant_bias` as `W z` (the original `W`);
//! - float linears are the input's bytes (an FP8 weight: its dequantized values in bf16);
//! - layer 0's activation range: the textbook RMSNorm of the calibration tokens' embeddings
//!   times the stored norm weight, min-max over every token and channel.

use super::check::{description_entries, logical_inputs, read_output, Logical};
use super::{read_json, read_st, St};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `samples * seq_len` calibration tokens for a fixture, written as a pre-tokenized JSONL: the
/// fixture's reference input_ids first (for text fixtures), then records of 13 ids from a linear
/// congruential generator, all below `max_id`. Returns the windows lamina cuts from the stream.
pub fn write_calib_ids(
    fixture: &Path,
    path: &Path,
    samples: usize,
    seq_len: usize,
    max_id: u64,
    seed: u64,
) -> Vec<Vec<i64>> {
    let mut records: Vec<Vec<i64>> = Vec::new();
    let reference = read_st(&fixture.join("reference.safetensors"));
    if !reference.contains_key("pixel_values") {
        let ids = &reference["input_ids"];
        records.push(ids.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect());
    }
    let mut x = seed;
    while records.iter().map(|r| r.len()).sum::<usize>() < samples * seq_len {
        records.push(
            (0..13)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((x >> 33) % max_id) as i64
                })
                .collect(),
        );
    }
    let lines: Vec<String> = records.iter().map(|r| serde_json::json!({ "input_ids": r }).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    let stream: Vec<i64> = records.concat();
    stream[..samples * seq_len].chunks(seq_len).map(|c| c.to_vec()).collect()
}

/// Whether a tensor is a linear's weight: 2D `.weight`, not an embedding table.
pub fn is_linear(name: &str, shape: &[usize]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else { return false };
    let last = module.rsplit('.').next().unwrap();
    shape.len() == 2 && !["embed_tokens", "tok_embeddings", "wte", "pos_embed", "position_embedding"].contains(&last)
}

/// What a check should expect of a run.
pub struct Expect<'a> {
    /// The description type each linear is meant to get (`None`: float).
    pub scheme: &'a dyn Fn(&str) -> Option<&'static str>,
    /// Whether a quantized linear's weights were rounded to nearest (else GPTQ).
    pub rtn: &'a dyn Fn(&str) -> bool,
    /// The recipe smooths up_proj -> down_proj too (besides norm -> linears and v -> o).
    pub up_down: bool,
    /// The calibration windows, for layer 0's activation range.
    pub calib: &'a [Vec<i64>],
}

/// What a check saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Linears by description type ("FLOAT" for float ones).
    pub by_kind: BTreeMap<String, usize>,
    /// Linears whose weight scales were checked against the smoothed original weight.
    pub scales_checked: usize,
    /// Linears whose int8 weights were checked within half a step of the smoothed original.
    pub rounding_checked: usize,
    /// Static linears whose activation range was recomputed from the embeddings.
    pub ranges_checked: usize,
}

fn f32s(t: &St) -> Vec<f32> {
    t.f32s()
}

fn i64s(t: &St) -> Vec<i64> {
    assert_eq!(t.dtype, "I64");
    t.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// `deq_scale` as stored: f32 for bf16 models, else msModelSlim's `deqscale2int64` (the f32 bits
/// read as int32, widened to int64).
fn deq_scale(t: &St, model_is_bf16: bool, module: &str) -> Vec<f32> {
    if model_is_bf16 {
        assert_eq!(t.dtype, "F32", "{module}.deq_scale of a bf16 model is f32");
        f32s(t)
    } else {
        assert_eq!(t.dtype, "I64", "{module}.deq_scale of a non-bf16 model holds the f32 bits in int64");
        i64s(t)
            .into_iter()
            .map(|v| {
                assert!(
                    v >= i32::MIN as i64 && v <= i32::MAX as i64,
                    "{module}.deq_scale: {v} is not an int32 widened"
                );
                f32::from_bits(v as i32 as u32)
            })
            .collect()
    }
}

/// The text decoder layer a module belongs to: `(prefix up to and including "layers.N." or Qwen
/// (1)'s "h.N.", rest)`.
fn text_layer(module: &str) -> Option<(&str, &str)> {
    if module.contains("visual.") || module.contains("vision_tower.") || module.contains("vision_model.") {
        return None;
    }
    for container in ["layers.", "transformer.h."] {
        let Some(at) = module.find(container) else { continue };
        let after = &module[at + container.len()..];
        let dot = after.find('.')?;
        after[..dot].parse::<usize>().ok()?;
        let split = at + container.len() + dot + 1;
        return Some((&module[..split], &module[split..]));
    }
    None
}

/// What a text-layer linear does, by the names of the checkpoints the fixtures follow (Llama /
/// Qwen, InternLM2's remote code, Qwen (1)'s remote code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Reads the attention norm, its rows are not rescaled by v -> o smoothing: q, k, and the
    /// fused q/k/v projections (whose value rows no smoothing touches).
    QueryKey,
    Value,
    /// MLA's projections out of a low-rank latent (`q_b_proj`, `kv_b_proj`): they read that
    /// latent's norm.
    LowRank {
        norm: &'static str,
    },
    /// The attention output projection; `fused` when the layer's q/k/v are fused (no v -> o pair).
    Output {
        fused: bool,
    },
    GateUp,
    Down,
    Router,
}

fn role(rest: &str) -> Option<Role> {
    Some(match rest {
        "self_attn.q_proj" | "self_attn.k_proj" | "attention.wqkv" | "attn.c_attn" => Role::QueryKey,
        // MLA (DeepSeek): the low-rank query and the shared latent read the attention norm.
        "self_attn.q_a_proj" | "self_attn.kv_a_proj_with_mqa" => Role::QueryKey,
        "self_attn.q_b_proj" => Role::LowRank { norm: "self_attn.q_a_layernorm" },
        "self_attn.kv_b_proj" => Role::LowRank { norm: "self_attn.kv_a_layernorm" },
        // Qwen3-Next's Gated DeltaNet projections read the attention norm; no smoothing pairs with them.
        "linear_attn.in_proj_qkvz" | "linear_attn.in_proj_ba" => Role::QueryKey,
        "self_attn.v_proj" => Role::Value,
        "self_attn.o_proj" => Role::Output { fused: false },
        "attention.wo" | "attn.c_proj" => Role::Output { fused: true },
        "mlp.gate_proj" | "mlp.up_proj" | "feed_forward.w1" | "feed_forward.w3" | "mlp.w1" | "mlp.w2" => Role::GateUp,
        "mlp.down_proj" | "feed_forward.w2" | "mlp.c_proj" => Role::Down,
        // The router and Qwen3-Next's shared-expert gate read the MLP norm, as the experts do.
        "mlp.gate" | "mlp.gate.wg" | "mlp.shared_expert_gate" => Role::Router,
        // Routed and shared experts (`mlp.experts.J.*`, `mlp.shared_experts.*`, `mlp.shared_expert.*`)
        // by their leaf, as the standard names go.
        r => match r.rsplit('.').next() {
            Some("gate_proj" | "up_proj") => Role::GateUp,
            Some("down_proj") => Role::Down,
            _ => return None,
        },
    })
}

/// The attention norm and the MLP norm of the layer whose linears are named like `rest`.
fn norms_of(rest: &str) -> (&'static str, &'static str) {
    if rest.starts_with("attention.") || rest.starts_with("feed_forward.") {
        ("attention_norm", "ffn_norm")
    } else if rest.starts_with("attn.") || rest == "mlp.w1" || rest == "mlp.w2" || rest == "mlp.c_proj" {
        ("ln_1", "ln_2")
    } else {
        ("input_layernorm", "post_attention_layernorm")
    }
}

/// The per-input-channel smoothing scales `s = g / g'` of a norm, from the input's and the
/// output's weights.
fn norm_scales(norm: &str, inputs: &BTreeMap<String, Logical>, outputs: &BTreeMap<String, St>) -> Vec<f32> {
    let name = format!("{norm}.weight");
    // Zero-centred norms (Qwen3-Next) compute with `1 + w`: the scale is the ratio of those.
    let offset = norm_offset(inputs);
    let (g, gs) = (f32s(&inputs[&name].st), outputs.get(&name).map(f32s));
    let gs = gs.unwrap_or_else(|| panic!("{name} is missing from the output"));
    let (g, gs): (Vec<f32>, Vec<f32>) =
        (g.iter().map(|v| v + offset).collect(), gs.iter().map(|v| v + offset).collect());
    g.iter()
        .zip(&gs)
        .map(|(&a, &b)| {
            assert!(b.is_finite() && (b != 0.0 || a == 0.0), "{name}: smoothed weight {b} (was {a})");
            assert!(a == 0.0 || a.signum() == b.signum(), "{name}: smoothing scales are positive, {a} became {b}");
            if a == 0.0 {
                1.0
            } else {
                a / b
            }
        })
        .collect()
}

/// 1 for a model whose RMSNorms are zero-centred (`x̂ · (1 + w)`: Qwen3-Next, recognised by its
/// Gated DeltaNet tensors), else 0.
fn norm_offset(inputs: &BTreeMap<String, Logical>) -> f32 {
    if inputs.keys().any(|k| k.contains(".linear_attn.")) {
        1.0
    } else {
        0.0
    }
}

/// Every norm a linear reads ([`consumed_norm`]): the ones smoothing may rescale.
const READ_NORMS: [&str; 8] = [
    "input_layernorm",
    "post_attention_layernorm",
    "attention_norm",
    "ffn_norm",
    "ln_1",
    "ln_2",
    "self_attn.q_a_layernorm",
    "self_attn.kv_a_layernorm",
];

/// The weight the recipe's smoothing made of `module`'s, `[rows * cols]`, when the test can know
/// it: norm consumers get `W diag(s)`; linears no smoothing touches keep `W`; v_proj, o_proj (and
/// up_proj, down_proj under up-down smoothing) take scales the output does not record: `None`.
/// MLA has no v_proj: its o_proj reads the heads' values through kv_b_proj, a path no smoothing
/// subgraph (ov is v_proj → o_proj) crosses, so it keeps `W`.
fn smoothed_weight(
    module: &str,
    w: &St,
    inputs: &BTreeMap<String, Logical>,
    outputs: &BTreeMap<String, St>,
    up_down: bool,
) -> Option<Vec<f32>> {
    let wv = f32s(w);
    let Some((layer, rest)) = text_layer(module) else { return Some(wv) };
    let (attn_norm, mlp_norm) = norms_of(rest);
    let up = rest.ends_with("up_proj") || rest == "feed_forward.w3" || rest == "mlp.w1";
    // MLA has no v_proj: its o_proj pairs with no smoothing and keeps its weight.
    let has_v_proj = inputs.contains_key(&format!("{layer}self_attn.v_proj.weight"));
    let norm = match role(rest) {
        Some(Role::QueryKey) => attn_norm,
        Some(Role::LowRank { norm }) => norm,
        Some(Role::Value) => return None,
        Some(Role::Output { fused: false }) if has_v_proj => return None,
        Some(Role::GateUp) if up_down && up => return None,
        Some(Role::Down) if up_down => return None,
        Some(Role::GateUp | Role::Router) => mlp_norm,
        _ => return Some(wv),
    };
    let s = norm_scales(&format!("{layer}{norm}"), inputs, outputs);
    let cols = w.shape[1];
    Some(wv.iter().enumerate().map(|(k, &v)| v * s[k % cols]).collect())
}

/// The norm a text-layer linear reads, when it reads one (full name).
fn consumed_norm(module: &str) -> Option<String> {
    let (layer, rest) = text_layer(module)?;
    let (attn_norm, mlp_norm) = norms_of(rest);
    let norm = match role(rest)? {
        Role::QueryKey | Role::Value => attn_norm,
        Role::LowRank { norm } => norm,
        Role::GateUp | Role::Router => mlp_norm,
        _ => return None,
    };
    if rest.contains(".experts.") && rest.ends_with("down_proj") {
        return None;
    }
    Some(format!("{layer}{norm}"))
}

/// m2's shift of a norm's output, `z = -b' · s`, read back from the bias the smoothing gave a
/// norm that had none (`None` when the norm was not shifted).
fn norm_shift(norm: &str, inputs: &BTreeMap<String, Logical>, outputs: &BTreeMap<String, St>) -> Option<Vec<f32>> {
    let bias = format!("{norm}.bias");
    if inputs.contains_key(&bias) {
        return None;
    }
    let b = f32s(outputs.get(&bias)?);
    let s = norm_scales(norm, inputs, outputs);
    Some(b.iter().zip(&s).map(|(b, s)| -b * s).collect())
}

/// `x [tokens, hidden]` through RMSNorm with weight `g`: `x / sqrt(mean(x²) + eps) * g`.
fn rms_norm(x: &[f32], hidden: usize, g: &[f32], eps: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let ms = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / hidden as f64;
        let r = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(g).map(|(&v, &w)| (v as f64 * r) as f32 * w));
    }
    out
}

/// msModelSlim's asymmetric int8 range of values in `[lo, hi]`: `(scale, offset)`.
fn textbook_range(lo: f32, hi: f32) -> (f64, f64) {
    let (lo, hi) = (lo.min(0.0) as f64, hi.max(0.0) as f64);
    let scale = hi / 255.0 - lo / 255.0;
    (scale, (-lo / scale).round() - 128.0)
}

/// What the checks of one output share.
struct Ctx<'a> {
    inputs: BTreeMap<String, Logical>,
    outputs: BTreeMap<String, St>,
    /// Tensor name → description type.
    desc: BTreeMap<String, String>,
    expect: &'a Expect<'a>,
    eps: f64,
    model_is_bf16: bool,
}

/// One linear of the input and its tensors in the output (by suffix).
struct LinearOut<'a> {
    module: &'a str,
    weight: &'a St,
    /// What the weight is written as when it stays float: the input's bytes, or for an FP8
    /// weight its dequantized values in bf16.
    float_weight: St,
    input_bias: Option<Vec<f32>>,
    tensors: BTreeMap<&'a str, &'a St>,
}

impl LinearOut<'_> {
    fn get(&self, suffix: &str) -> &St {
        self.tensors.get(suffix).unwrap_or_else(|| panic!("{}.{suffix} is missing", self.module))
    }
    fn rows_cols(&self) -> (usize, usize) {
        (self.weight.shape[0], self.weight.shape[1])
    }
}

/// Checks an output folder of a calibrated run against its input.
pub fn check_calibrated(input: &Path, out: &Path, expect: &Expect) -> Seen {
    let config = read_json(&input.join("config.json"));
    let text_cfg = if config["text_config"].is_object() { &config["text_config"] } else { &config };
    let inputs = logical_inputs(input);
    // An FP8 release serves in its config's bf16, as lamina dequantizes it.
    let model_is_bf16 = inputs.values().filter(|l| l.st.shape.len() == 2).all(|l| l.from_fp8 || l.st.dtype == "BF16");
    let (outputs, _) = read_output(out, None);

    // The description: every tensor once, nothing else.
    let entries = description_entries(&out.join("quant_model_description.json"));
    let globals = ["model_quant_type", "version", "group_size", "metadata", "optional"];
    let mut desc: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in entries.iter().filter(|(k, _)| !globals.contains(&k.as_str())) {
        let kind = v.as_str().unwrap_or_else(|| panic!("description of {k} is {v}, not a type string"));
        assert!(desc.insert(k.clone(), kind.to_string()).is_none(), "the description lists {k} twice");
    }
    let described: BTreeSet<&String> = desc.keys().collect();
    assert_eq!(described, outputs.keys().collect(), "the description must cover every written tensor, and only those");
    let global: BTreeMap<&str, &serde_json::Value> =
        entries.iter().filter(|(k, _)| globals.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v)).collect();
    assert_eq!(global.len(), globals.len(), "global keys");
    assert_eq!((global["version"].as_str(), global["group_size"].as_u64()), (Some("1.0.0"), Some(0)));

    let eps = text_cfg["rms_norm_eps"].as_f64().or(text_cfg["layer_norm_epsilon"].as_f64()).unwrap();
    let ctx = Ctx { inputs, outputs, desc, expect, eps, model_is_bf16 };
    let mut seen = Seen::default();
    let mut accounted: BTreeSet<String> = BTreeSet::new();
    let modules: BTreeSet<String> = ctx
        .inputs
        .iter()
        .filter(|(n, l)| is_linear(n, &l.st.shape))
        .map(|(n, _)| n.strip_suffix(".weight").unwrap().to_string())
        .collect();
    for module in &modules {
        let input = &ctx.inputs[&format!("{module}.weight")];
        let l = LinearOut {
            module,
            weight: &input.st,
            float_weight: if input.from_fp8 { St::bf16(&input.st.shape, &f32s(&input.st)) } else { input.st.clone() },
            input_bias: ctx.inputs.get(&format!("{module}.bias")).map(|l| f32s(&l.st)),
            tensors: ctx
                .outputs
                .iter()
                .filter_map(|(k, t)| {
                    let suffix = k.strip_prefix(module.as_str())?.strip_prefix('.')?;
                    (!suffix.contains('.')).then_some((suffix, t))
                })
                .collect(),
        };
        accounted.extend(l.tensors.keys().map(|s| format!("{module}.{s}")));
        ctx.check_linear(&l, &mut seen);
    }

    // Everything else is float: the input's bytes, except the norms smoothing rescaled.
    for (name, l) in &ctx.inputs {
        if accounted.contains(name) || modules.iter().any(|m| name.starts_with(&format!("{m}."))) {
            continue;
        }
        let o = ctx.outputs.get(name).unwrap_or_else(|| panic!("float tensor {name} is missing from the output"));
        assert_eq!(ctx.desc[name], "FLOAT", "description type of {name}");
        assert_eq!((&o.dtype, &o.shape), (&l.st.dtype, &l.st.shape), "{name}");
        let smoothed_norm =
            text_layer(name).is_some_and(|(_, r)| r.strip_suffix(".weight").is_some_and(|n| READ_NORMS.contains(&n)));
        if !smoothed_norm {
            assert!(*o == l.st, "float tensor {name} is not the input's bytes");
        }
        accounted.insert(name.clone());
    }
    // m2 gives a shifted norm a bias, float and finite.
    for (name, t) in &ctx.outputs {
        let norm_bias = text_layer(name).is_some_and(|(_, r)| {
            ["layernorm.bias", "attention_norm.bias", "ffn_norm.bias", "ln_1.bias", "ln_2.bias"]
                .iter()
                .any(|n| r.ends_with(n))
        });
        if norm_bias && !ctx.inputs.contains_key(name) {
            assert_eq!(ctx.desc[name], "FLOAT", "description type of {name}");
            assert!(f32s(t).iter().all(|v| v.is_finite()), "{name} holds a non-finite value");
            accounted.insert(name.clone());
        }
    }
    let extra: Vec<&String> = ctx.outputs.keys().filter(|k| !accounted.contains(*k)).collect();
    assert!(extra.is_empty(), "the output holds tensors no input accounts for: {extra:?}");
    let strongest = if seen.by_kind.contains_key("W8A8") { "W8A8" } else { "W8A8_DYNAMIC" };
    assert_eq!(global["model_quant_type"], strongest, "model_quant_type");
    seen
}

impl Ctx<'_> {
    fn check_linear(&self, l: &LinearOut, seen: &mut Seen) {
        let module = l.module;
        let want = (self.expect.scheme)(module);
        let kind = want.unwrap_or("FLOAT");
        *seen.by_kind.entry(kind.to_string()).or_default() += 1;
        for suffix in l.tensors.keys() {
            let want_d = if *suffix == "bias" { "FLOAT" } else { kind };
            assert_eq!(self.desc[&format!("{module}.{suffix}")], want_d, "description type of {module}.{suffix}");
        }
        let smoothed = smoothed_weight(module, l.weight, &self.inputs, &self.outputs, self.expect.up_down);
        let Some(kind) = want else {
            let got = l.get("weight");
            let want = &l.float_weight;
            assert_eq!((&got.dtype, &got.shape), (&want.dtype, &want.shape), "{module}.weight");
            match smoothed {
                // A float consumer of a smoothed norm (the router, Qwen3-Next's in_proj_ba and
                // shared expert): W diag(s), in its dtype.
                Some(sw) if consumed_norm(module).is_some() => {
                    for (k, (&a, &b)) in f32s(got).iter().zip(&sw).enumerate() {
                        assert!((a - b).abs() <= b.abs() / 128.0, "{module}.weight[{k}] = {a}, want {b}");
                    }
                    seen.scales_checked += 1;
                }
                _ => assert!(*got == *want, "float linear {module} must be the input's bytes (FP8: bf16 values)"),
            }
            return;
        };
        let (rows, cols) = l.rows_cols();
        let q = l.get("weight");
        assert_eq!((q.dtype.as_str(), q.shape.clone()), ("I8", vec![rows, cols]), "{module}.weight");
        let q = q.i8s();
        let mut suffixes: Vec<&str> = match kind {
            "W8A8" => vec!["weight", "quant_bias", "input_scale", "input_offset", "deq_scale"],
            "W8A8_DYNAMIC" | "W8A16" => vec!["weight", "weight_scale", "weight_offset"],
            other => panic!("{module}: unexpected scheme {other}"),
        };
        if l.input_bias.is_some() {
            suffixes.push("bias");
        }
        suffixes.sort();
        assert_eq!(l.tensors.keys().copied().collect::<Vec<_>>(), suffixes, "{module}: the tensors of a {kind}");
        let scale = if kind == "W8A8" { self.check_static(l, &q, seen) } else { weight_scale(l) };
        for (r, &s) in scale.iter().enumerate() {
            assert!(s.is_finite() && s > 0.0, "{module}: weight scale of row {r} = {s}");
            // Every row uses its int8 range (a scale twice too large would leave |q| <= 64).
            let m = q[r * cols..(r + 1) * cols].iter().map(|&v| (v as i32).abs()).max().unwrap();
            assert!(m > 100, "{module} row {r}: largest |q| is {m}");
        }
        if let Some(sw) = smoothed {
            let rtn = (self.expect.rtn)(module);
            check_against_smoothed(module, &sw, &q, &scale, cols, rtn);
            seen.scales_checked += 1;
            seen.rounding_checked += rtn as usize;
        }
    }

    /// A static W8A8 linear's activation quantizer, deq_scale and quant_bias; returns its weight
    /// scales `deq_scale / input_scale`.
    fn check_static(&self, l: &LinearOut, q: &[i8], seen: &mut Seen) -> Vec<f32> {
        let (module, (rows, cols)) = (l.module, l.rows_cols());
        let scalar = |s: &str| {
            let t = l.get(s);
            assert_eq!((t.dtype.as_str(), t.shape.clone()), ("F32", vec![1]), "{module}.{s}");
            f32s(t)[0]
        };
        let (input_scale, offset) = (scalar("input_scale"), scalar("input_offset"));
        assert!(input_scale.is_finite() && input_scale > 0.0, "{module}.input_scale = {input_scale}");
        assert!(
            offset.fract() == 0.0 && (-128.0..=127.0).contains(&offset),
            "{module}.input_offset = {offset} is not an int8 zero point"
        );
        assert_eq!(l.get("deq_scale").shape, vec![rows], "{module}.deq_scale shape");
        let deq = deq_scale(l.get("deq_scale"), self.model_is_bf16, module);
        let qb = l.get("quant_bias");
        assert_eq!((qb.dtype.as_str(), qb.shape.clone()), ("I32", vec![rows]), "{module}.quant_bias");
        let qb = qb.i32s();
        // The float bias is written beside (as msModelSlim does) when the linear has one.
        // m2 shifts a norm's output by z; its consumers' biases take W z.
        let shift = consumed_norm(module).and_then(|n| norm_shift(&n, &self.inputs, &self.outputs));
        let with_shift = |b: Vec<f32>| -> Vec<f32> {
            let Some(z) = &shift else { return b };
            let w = f32s(l.weight);
            (0..rows).map(|r| b[r] + (0..cols).map(|c| w[r * cols + c] * z[c]).sum::<f32>()).collect()
        };
        let bias = match &l.input_bias {
            Some(ib) => {
                let b = l.get("bias");
                assert_eq!((b.dtype.as_str(), b.shape.clone()), ("F32", vec![rows]), "{module}.bias");
                // q/k (and fused q/k/v) take the norm's column scales only: their bias stays the
                // input's (plus W z).
                if text_layer(module).and_then(|(_, r)| role(r)) == Some(Role::QueryKey) {
                    let want = with_shift(ib.clone());
                    for (r, (&got, &want)) in f32s(b).iter().zip(&want).enumerate() {
                        let tol = 1e-2 * want.abs() + 1e-3;
                        assert!((got - want).abs() <= tol, "{module}.bias[{r}] = {got}, want {want}");
                    }
                }
                f32s(b)
            }
            // The shifted bias is not written beside: it lives in quant_bias. v_proj's rows are
            // rescaled by v→o smoothing, which the output does not record: its bias is unknown.
            None if shift.is_some() && module.ends_with("v_proj") => Vec::new(),
            None => with_shift(vec![0.0; rows]),
        };
        // The bf16 rounding of the norm bias the test reads z from costs up to 2^-9 of W z.
        let tolerance = |want: f64| 1.0 + if shift.is_some() { 1e-2 * want.abs() } else { 0.0 };
        for r in 0..rows {
            assert!(deq[r].is_finite() && deq[r] > 0.0, "{module}.deq_scale[{r}] = {}", deq[r]);
            if bias.is_empty() {
                continue;
            }
            let qsum: f64 = q[r * cols..(r + 1) * cols].iter().map(|&v| v as f64).sum();
            let want = (bias[r] as f64 / deq[r] as f64 - qsum * offset as f64).round();
            assert!(
                (qb[r] as f64 - want).abs() <= tolerance(want),
                "{module}.quant_bias[{r}] = {}, formats.md gives {want}",
                qb[r]
            );
        }
        // Layer 0's q/k/v (MLA: q_a_proj, kv_a_proj_with_mqa) read the input norm of the
        // embeddings: recompute their range.
        let layer0_qkv = text_layer(module).is_some_and(|(l, r)| {
            (l.ends_with("layers.0.") || l.ends_with("h.0.")) && matches!(role(r), Some(Role::QueryKey | Role::Value))
        });
        if layer0_qkv {
            let (want_scale, want_offset) =
                layer0_range(module, &self.inputs, &self.outputs, self.expect.calib, self.eps);
            let rel = (input_scale as f64 / want_scale - 1.0).abs();
            assert!(rel <= 1e-2, "{module}.input_scale = {input_scale}, the embeddings give {want_scale}");
            assert!(
                (offset as f64 - want_offset).abs() <= 2.0,
                "{module}.input_offset = {offset}, the embeddings give {want_offset}"
            );
            seen.ranges_checked += 1;
        }
        deq.iter().map(|d| d / input_scale).collect()
    }
}

/// The stored per-channel weight scales of W8A8_DYNAMIC / W8A16, with their zero offsets.
fn weight_scale(l: &LinearOut) -> Vec<f32> {
    let (module, (rows, _)) = (l.module, l.rows_cols());
    let s = l.get("weight_scale");
    assert_eq!((s.dtype.as_str(), s.shape.clone()), ("F32", vec![rows, 1]), "{module}.weight_scale");
    let o = l.get("weight_offset");
    assert_eq!(o.shape, vec![rows, 1], "{module}.weight_offset");
    assert!(f32s(o).iter().all(|&v| v == 0.0), "{module}: symmetric weights have zero offsets");
    f32s(s)
}

/// Against the smoothed original weight `sw`: the scales are its row absmax / 127 (within the
/// bf16 rounding of the norm the test read `s` from), and rounding to nearest keeps every
/// weight within half a step.
fn check_against_smoothed(module: &str, sw: &[f32], q: &[i8], scale: &[f32], cols: usize, rtn: bool) {
    for (r, row) in sw.chunks(cols).enumerate() {
        let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = (scale[r] / (absmax / 127.0) - 1.0).abs();
        assert!(rel <= 1e-2, "{module} row {r}: weight scale {}, the smoothed row gives {}", scale[r], absmax / 127.0);
        if rtn {
            for (c, &w) in row.iter().enumerate() {
                let v = q[r * cols + c] as f32 * scale[r];
                assert!(
                    (v - w).abs() <= scale[r] * 0.5 + w.abs() / 256.0,
                    "{module}[{r}, {c}]: {} * {} = {v}, the smoothed weight is {w}",
                    q[r * cols + c],
                    scale[r]
                );
            }
        }
    }
}

/// The textbook input range of a layer-0 attention projection: RMSNorm of every calibration
/// token's embedding, times the stored (smoothed) norm weight; min-max over all of them.
fn layer0_range(
    module: &str,
    inputs: &BTreeMap<String, Logical>,
    outputs: &BTreeMap<String, St>,
    calib: &[Vec<i64>],
    eps: f64,
) -> (f64, f64) {
    let (layer, rest) = text_layer(module).unwrap();
    let (attn_norm, _) = norms_of(rest);
    let offset = norm_offset(inputs);
    let norm: Vec<f32> = f32s(&outputs[&format!("{layer}{attn_norm}.weight")]).iter().map(|v| v + offset).collect();
    let bias = outputs.get(&format!("{layer}{attn_norm}.bias")).map(f32s);
    let table_name = inputs
        .keys()
        .find(|k| ["embed_tokens.weight", "tok_embeddings.weight", "wte.weight"].iter().any(|e| k.ends_with(e)))
        .expect("an embedding table");
    let table = &inputs[table_name].st;
    let hidden = table.shape[1];
    let values = f32s(table);
    let (mut lo, mut hi) = (f32::MAX, f32::MIN);
    for window in calib {
        let x: Vec<f32> =
            window.iter().flat_map(|&id| values[id as usize * hidden..(id as usize + 1) * hidden].to_vec()).collect();
        for (k, v) in rms_norm(&x, hidden, &norm, eps).into_iter().enumerate() {
            let v = v + bias.as_ref().map_or(0.0, |b| b[k % hidden]);
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    textbook_range(lo, hi)
}
