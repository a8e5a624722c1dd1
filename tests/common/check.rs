//! An independent check of a quantized output folder against the checkpoint it came from:
//! every linear's dequantized weight within half a quantization step of the original, experts
//! cut out of fused tensors correctly, float tensors bit-identical, the description and the
//! index complete and consistent, config.json and companion files in place.
//!
//! Nothing here calls lamina's code: the expected values come from the input file read with the
//! `safetensors` crate and the textbook symmetric min-max formula.

use super::{read_json, read_st, St};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    W8A16,
    W8A8Dynamic,
    W4A8Dynamic,
    W4A16,
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [Scheme::W8A16, Scheme::W8A8Dynamic, Scheme::W4A8Dynamic, Scheme::W4A16];

    pub fn cli(self) -> &'static str {
        match self {
            Scheme::W8A16 => "w8a16",
            Scheme::W8A8Dynamic => "w8a8_dynamic",
            Scheme::W4A8Dynamic => "w4a8_dynamic",
            Scheme::W4A16 => "w4a16",
        }
    }
    /// The type string quant_model_description.json gives the linear's tensors.
    pub fn kind(self) -> &'static str {
        match self {
            Scheme::W8A16 => "W8A16",
            Scheme::W8A8Dynamic => "W8A8_DYNAMIC",
            Scheme::W4A8Dynamic => "W4A8_DYNAMIC",
            Scheme::W4A16 => "W4A16",
        }
    }
    fn qmax(self) -> i32 {
        match self {
            Scheme::W8A16 | Scheme::W8A8Dynamic => 127,
            _ => 7,
        }
    }
    fn per_group(self) -> bool {
        self == Scheme::W4A16
    }
}

/// A tensor the pipeline sees in the input: stored as is, or one expert cut out of a fused tensor.
#[derive(Debug, Clone)]
pub struct Logical {
    pub st: St,
    pub from_fused: bool,
    /// Dequantized here from an FP8 weight and its block scale (`st` is F32): kept float, the
    /// output holds it in bf16.
    pub from_fp8: bool,
}

/// Reads a checkpoint folder (single file or index + shards) with the `safetensors` crate.
pub fn read_checkpoint(dir: &Path) -> BTreeMap<String, St> {
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return read_st(&dir.join("model.safetensors"));
    }
    let map = read_json(&index)["weight_map"].as_object().unwrap().clone();
    let files: BTreeSet<String> = map.values().map(|v| v.as_str().unwrap().to_string()).collect();
    let mut all = BTreeMap::new();
    for f in files {
        all.extend(read_st(&dir.join(f)));
    }
    all
}

/// The input's tensors as linears and float tensors, fused experts split in the test's own code.
pub fn logical_inputs(dir: &Path) -> BTreeMap<String, Logical> {
    let config = read_json(&dir.join("config.json"));
    let text = ["text_config", "llm_config"].iter().map(|k| &config[*k]).find(|t| t.is_object()).unwrap_or(&config);
    let hidden = text["hidden_size"].as_u64().unwrap() as usize;
    let inter = text["moe_intermediate_size"].as_u64().map(|x| x as usize);
    // GLM-4 (and GLM-4.1V's language model) fuses gate and up by rows (gate's first); the loaders
    // read them split.
    let fused_rows = config["model_type"] == "glm4" || config["model_type"] == "glm4v";
    let stored = read_checkpoint(dir);
    let block = config["quantization_config"]["weight_block_size"]
        .as_array()
        .map(|b| [b[0].as_u64().unwrap() as usize, b[1].as_u64().unwrap() as usize]);
    let mut out = BTreeMap::new();
    for (name, t) in &stored {
        if name.ends_with(".weight_scale_inv") {
            continue;
        }
        if t.dtype == "F8_E4M3" {
            let scale = &stored[&name.replace(".weight", ".weight_scale_inv")];
            let st = dequantize_fp8(t, scale, block.expect("FP8 weights need weight_block_size"));
            out.insert(name.clone(), Logical { st, from_fused: false, from_fp8: true });
        } else if let Some(prefix) = name.strip_suffix("mlp.gate_up_proj.weight").filter(|_| fused_rows) {
            let half = t.data.len() / 2;
            let shape = vec![t.shape[0] / 2, t.shape[1]];
            for (k, part) in ["gate_proj", "up_proj"].iter().enumerate() {
                let st = St {
                    dtype: t.dtype.clone(),
                    shape: shape.clone(),
                    data: t.data[k * half..(k + 1) * half].to_vec(),
                };
                out.insert(format!("{prefix}mlp.{part}.weight"), Logical { st, from_fused: true, from_fp8: false });
            }
        } else if let Some(prefix) = name.strip_suffix("mlp.experts.gate_up_proj") {
            let down = &stored[&format!("{prefix}mlp.experts.down_proj")];
            let inter = inter.expect("fused experts need moe_intermediate_size");
            for (j, [gate, up, d]) in split_fused(t, down, hidden, inter).into_iter().enumerate() {
                for (part, st) in [("gate_proj", gate), ("up_proj", up), ("down_proj", d)] {
                    out.insert(
                        format!("{prefix}mlp.experts.{j}.{part}.weight"),
                        Logical { st, from_fused: true, from_fp8: false },
                    );
                }
            }
        } else if !name.ends_with("mlp.experts.down_proj") {
            out.insert(name.clone(), Logical { st: t.clone(), from_fused: false, from_fp8: false });
        }
    }
    out
}

/// `float8_e4m3fn` by its definition: sign, 4 exponent bits of bias 7, 3 mantissa bits, subnormals
/// below exponent 1, NaN at exponent and mantissa all ones.
pub fn e4m3(b: u8) -> f32 {
    let (s, e, m) = (if b >> 7 == 1 { -1.0 } else { 1.0 }, ((b >> 3) & 15) as i32, (b & 7) as f32);
    if e == 15 && m == 7.0 {
        f32::NAN
    } else if e == 0 {
        s * m / 8.0 * 2f32.powi(-6)
    } else {
        s * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// An FP8 weight times its block scale (`[ceil(rows / b0), ceil(cols / b1)]`), as F32.
pub fn dequantize_fp8(w: &St, scale: &St, block: [usize; 2]) -> St {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    assert_eq!(scale.shape, vec![rows.div_ceil(block[0]), cols.div_ceil(block[1])], "test fixture: scale grid");
    let s = scale.f32s();
    let v: Vec<f32> = (0..rows * cols)
        .map(|k| {
            let (r, c) = (k / cols, k % cols);
            e4m3(w.data[k]) * s[(r / block[0]) * scale.shape[1] + c / block[1]]
        })
        .collect();
    St { dtype: "F32".into(), shape: w.shape.clone(), data: v.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

/// Per expert `[gate, up, down]` as `[out, in]` bf16 matrices, from the release layout
/// (`gate_up [E, hidden, 2*inter]`, `down [E, inter, hidden]`: gate = fused[j, :, :inter]ᵀ,
/// up = fused[j, :, inter:]ᵀ, down = down[j]ᵀ) or the transformers-5 one (`[E, 2*inter, hidden]`,
/// `[E, hidden, inter]`: plain row slices).
pub fn split_fused(gate_up: &St, down: &St, hidden: usize, inter: usize) -> Vec<[St; 3]> {
    let e = gate_up.shape[0];
    let elem = 2;
    assert_eq!(gate_up.dtype, "BF16");
    let release = gate_up.shape == [e, hidden, 2 * inter] && down.shape == [e, inter, hidden];
    let t5 = gate_up.shape == [e, 2 * inter, hidden] && down.shape == [e, hidden, inter];
    assert!(release ^ t5, "test fixture: fused shapes {:?} {:?}", gate_up.shape, down.shape);
    let at = |t: &St, idx: usize| [t.data[idx * elem], t.data[idx * elem + 1]];
    let matrix = |rows: usize, cols: usize, f: &dyn Fn(usize, usize) -> [u8; 2]| St {
        dtype: "BF16".into(),
        shape: vec![rows, cols],
        data: (0..rows * cols).flat_map(|k| f(k / cols, k % cols)).collect(),
    };
    (0..e)
        .map(|j| {
            let gu = j * hidden * 2 * inter;
            let dn = j * hidden * inter;
            if release {
                [
                    matrix(inter, hidden, &|o, i| at(gate_up, gu + i * 2 * inter + o)),
                    matrix(inter, hidden, &|o, i| at(gate_up, gu + i * 2 * inter + inter + o)),
                    matrix(hidden, inter, &|o, i| at(down, dn + i * hidden + o)),
                ]
            } else {
                [
                    matrix(inter, hidden, &|o, i| at(gate_up, gu + o * hidden + i)),
                    matrix(inter, hidden, &|o, i| at(gate_up, gu + (inter + o) * hidden + i)),
                    matrix(hidden, inter, &|o, i| at(down, dn + o * inter + i)),
                ]
            }
        })
        .collect()
}

/// Whether a tensor is a linear's weight the bundled recipes keep float: embedding tables, lm_head, MoE
/// routers, and what each family's W8A8 recipe keeps float in its vision tower (the second MLP
/// projection: Qwen3-VL `linear_fc2`, Qwen2-VL `blocks.*.mlp.fc2`, Qwen2.5-VL `blocks.*.mlp.down_proj`,
/// CLIP and InternViT `encoder.layers.*.mlp.fc2`; mergers, deepstack mergers, LLaVA's and InternVL's
/// (`mlp1`) projectors), and in
/// DeepSeek's MLA `kv_b_proj` (vLLM-Ascend reads it unquantized) and the MTP layer's `eh_proj` and
/// `shared_head.head`.
pub fn stays_float(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap();
    [
        "embed_tokens",
        "tok_embeddings",
        "wte",
        "pos_embed",
        "position_embedding",
        "lm_head",
        "output",
        "shared_expert_gate",
        "kv_b_proj",
        "eh_proj",
    ]
    .contains(&last)
        || module.ends_with("shared_head.head")
        || module.ends_with("mlp.gate")
        || module.ends_with("mlp.gate.wg")
        || module.contains("linear_fc2")
        || module.contains("merger")
        || module.contains("multi_modal_projector")
        || module.starts_with("mlp1.")
        || (module.contains("blocks.") && (module.ends_with("mlp.fc2") || module.ends_with("mlp.down_proj")))
        || (module.contains("encoder.layers.") && module.ends_with("mlp.fc2"))
        // Qwen-VL: the vision MLP's second projection and the resampler.
        || (module.contains("resblocks.") && module.ends_with("mlp.c_proj"))
        || module.contains("attn_pool.")
}

/// Whether a module belongs to a multi-token-prediction layer, which every recipe writes float
/// (vLLM-Ascend serves the MTP draft unquantized): `model.layers.{N}` at or past
/// `num_hidden_layers` (GLM-4.5, DeepSeek-V3), or under `mtp.` (Qwen3-Next).
pub fn mtp_layers(config: &serde_json::Value) -> impl Fn(&str) -> bool {
    let layers = config["num_hidden_layers"].as_u64().map(|n| n as usize);
    move |module: &str| {
        let past = module
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .zip(layers)
            .is_some_and(|(i, n)| i >= n);
        past || module.starts_with("mtp.")
    }
}

/// The linears msModelSlim's Qwen3-Next practice quantizes (its W8A8 and lamina's W8A8 and
/// W8A8_DYNAMIC recipes for `qwen3_next`): the full-attention q/k/v, the routed experts and the
/// Gated DeltaNet's in_proj_qkvz; in_proj_ba, out_proj, o_proj, the shared expert stay float.
pub fn qwen3_next_quantizes(module: &str) -> bool {
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_qkvz"]
        .iter()
        .any(|m| module.ends_with(m))
        || module.contains(".mlp.experts.")
}

/// The scheme the bundled data-free recipe of `quant_type` for `target` means to give the linear
/// `module`, stated from the linear's role (not from the recipes' globs):
/// - vision-tower linears are 8-bit, as in their family's W8A8 recipe: weight-only (W8A16) for the
///   weight-only types, W8A8_DYNAMIC otherwise;
/// - routed experts load in vLLM-Ascend only as W8A8_DYNAMIC, W4A8_DYNAMIC or W4A16: w8a16's are
///   W8A8_DYNAMIC;
/// - W4A8_DYNAMIC and W4A16 load in vLLM-Ascend for experts only: its other linears are W8A8_DYNAMIC and
///   W8A16; MindIE reads them dense too.
pub fn intended(quant_type: &str, target: &str, module: &str, shape: &[usize]) -> Option<Scheme> {
    if shape.len() != 2 || stays_float(module) {
        return None;
    }
    let vision = ["visual.", "vision_tower."].iter().any(|v| module.contains(v));
    let expert = module.contains(".mlp.experts.");
    let mindie = target == "mindie";
    Some(match (quant_type, vision, expert) {
        ("w8a16" | "w4a16", true, _) => Scheme::W8A16,
        (_, true, _) => Scheme::W8A8Dynamic,
        ("w8a16", _, true) => Scheme::W8A8Dynamic,
        ("w8a16", _, false) => Scheme::W8A16,
        ("w8a8_dynamic", _, _) => Scheme::W8A8Dynamic,
        ("w4a8_dynamic", _, true) => Scheme::W4A8Dynamic,
        ("w4a8_dynamic", _, false) => {
            if mindie {
                Scheme::W4A8Dynamic
            } else {
                Scheme::W8A8Dynamic
            }
        }
        ("w4a16", _, true) => Scheme::W4A16,
        ("w4a16", _, false) => {
            if mindie {
                Scheme::W4A16
            } else {
                Scheme::W8A16
            }
        }
        (q, ..) => panic!("no data-free quant type {q}"),
    })
}

/// The output's tensors by name, with the file each came from; checks the index (when sharded)
/// and the shard size limit.
pub fn read_output(out: &Path, limit: Option<u64>) -> (BTreeMap<String, St>, BTreeMap<String, String>) {
    let index = out.join("quant_model_weights.safetensors.index.json");
    let shard_files: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("quant_model_weights") && n.ends_with(".safetensors"))
            .collect();
        v.sort();
        v
    };
    let leftovers: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left in a finished output: {leftovers:?}");
    let mut tensors = BTreeMap::new();
    let mut file_of = BTreeMap::new();
    for f in &shard_files {
        let ts = read_st(&out.join(f));
        let data: u64 = ts.values().map(|t| t.data.len() as u64).sum();
        if let Some(limit) = limit {
            assert!(data <= limit || ts.len() == 1, "{f} holds {data} bytes in {} tensors, over {limit}", ts.len());
        }
        for (n, t) in ts {
            assert!(tensors.insert(n.clone(), t).is_none(), "tensor {n} is in two shards");
            file_of.insert(n, f.clone());
        }
    }
    if shard_files.len() == 1 {
        assert_eq!(shard_files[0], "quant_model_weights.safetensors");
        assert!(!index.exists(), "a single-file output has no index");
    } else {
        let n = shard_files.len();
        for (k, f) in shard_files.iter().enumerate() {
            assert_eq!(*f, format!("quant_model_weights-{:05}-of-{:05}.safetensors", k + 1, n));
        }
        let idx = read_json(&index);
        let map = idx["weight_map"].as_object().expect("the index has a weight_map");
        let listed: BTreeMap<String, String> =
            map.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect();
        assert_eq!(listed, file_of, "the index must map every tensor to the file that holds it");
        let total: u64 = tensors.values().map(|t| t.data.len() as u64).sum();
        assert_eq!(idx["metadata"]["total_size"].as_u64(), Some(total));
    }
    (tensors, file_of)
}

/// The description's entries in file order, duplicates kept (a JSON object parsed into a map
/// would hide them).
pub fn description_entries(path: &Path) -> Vec<(String, serde_json::Value)> {
    struct Entries(Vec<(String, serde_json::Value)>);
    impl<'de> serde::Deserialize<'de> for Entries {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Entries;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Entries, A::Error> {
                    let mut v = Vec::new();
                    while let Some(e) = m.next_entry::<String, serde_json::Value>()? {
                        v.push(e);
                    }
                    Ok(Entries(v))
                }
            }
            d.deserialize_map(V)
        }
    }
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_slice::<Entries>(&bytes).unwrap().0
}

/// What a check saw, for tests that want to assert on counts.
#[derive(Debug, Default)]
pub struct Seen {
    pub quantized: BTreeSet<String>,
    pub float: BTreeSet<String>,
    pub shards: usize,
}

/// Checks an output of `--quant_type` `scheme` (for vLLM-Ascend) against its input; `limit` is the shard
/// size in bytes when one was given.
pub fn check_output(input: &Path, out: &Path, scheme: Scheme, limit: Option<u64>) -> Seen {
    check_output_for(input, out, scheme.cli(), "vllm-ascend", limit)
}

/// Checks an output of `--quant_type quant_type --target target` against its input, every linear against
/// the scheme [`intended`] says.
pub fn check_output_for(input: &Path, out: &Path, quant_type: &str, target: &str, limit: Option<u64>) -> Seen {
    let inputs = logical_inputs(input);
    let (outputs, file_of) = read_output(out, limit);
    let mut seen = Seen { shards: file_of.values().collect::<BTreeSet<_>>().len(), ..Default::default() };
    let mut accounted: BTreeSet<String> = BTreeSet::new();
    let config = read_json(&input.join("config.json"));
    let mtp = mtp_layers(&config);
    let qwen3_next_practice = config["model_type"] == "qwen3_next" && quant_type == "w8a8_dynamic";
    let scheme_of = |name: &str, shape: &[usize]| -> Option<Scheme> {
        let module = name.strip_suffix(".weight")?;
        if mtp(module) || (qwen3_next_practice && !qwen3_next_quantizes(module)) {
            return None;
        }
        intended(quant_type, target, module, shape)
    };
    let modules: BTreeMap<String, Scheme> = inputs
        .iter()
        .filter_map(|(n, l)| Some((n.strip_suffix(".weight")?.to_string(), scheme_of(n, &l.st.shape)?)))
        .collect();

    for (name, l) in &inputs {
        if let Some(scheme) = scheme_of(name, &l.st.shape) {
            let module = name.strip_suffix(".weight").unwrap();
            check_linear(module, &l.st, &outputs, scheme);
            seen.quantized.insert(module.to_string());
            accounted.extend(outputs.keys().filter(|k| k.starts_with(&format!("{module}."))).cloned());
        } else if let Some(module) = name.strip_suffix(".bias").filter(|m| modules.contains_key(*m)) {
            let b = outputs.get(name).unwrap_or_else(|| panic!("bias {name} is missing from the output"));
            assert_eq!((b.dtype.as_str(), &b.shape), ("F32", &l.st.shape), "{name}");
            assert_eq!(b.f32s(), l.st.f32s(), "bias {name} of {module} must be the input's values");
        } else {
            let o = outputs.get(name).unwrap_or_else(|| panic!("float tensor {name} is missing from the output"));
            if l.from_fp8 {
                let want = St::bf16(&l.st.shape, &l.st.f32s());
                assert!(o == &want, "FP8 tensor {name} kept float must be written dequantized in bf16");
            } else {
                assert!(o == &l.st, "float tensor {name} is not bit-identical to the input");
            }
            assert!(!l.from_fused, "{name} is an expert linear and should be quantized");
            seen.float.insert(name.clone());
            accounted.insert(name.clone());
        }
    }
    accounted.extend(inputs.keys().cloned());
    let extra: Vec<&String> = outputs.keys().filter(|k| !accounted.contains(*k)).collect();
    assert!(extra.is_empty(), "the output holds tensors no input accounts for: {extra:?}");
    let fused: Vec<&String> =
        outputs.keys().filter(|k| k.ends_with("gate_up_proj") || k.ends_with("experts.down_proj")).collect();
    assert!(fused.is_empty(), "fused expert tensors remain: {fused:?}");

    let model_type = config["model_type"].as_str().unwrap_or("");
    check_description(out, &outputs, &inputs, &modules, &glm4v_lookup_names(model_type, &inputs));
    check_config_and_companions(input, out);
    seen
}

/// Decodes a quantized linear's integers and checks them against the original weight.
fn check_linear(module: &str, w: &St, outputs: &BTreeMap<String, St>, scheme: Scheme) {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let get = |s: &str| outputs.get(&format!("{module}.{s}"));
    let known = ["weight", "weight_packed", "weight_scale", "weight_offset", "scale_bias", "weight_shape", "bias"];
    for k in outputs.keys().filter_map(|k| k.strip_prefix(&format!("{module}."))) {
        assert!(known.contains(&k), "{module}.{k} is not a tensor of a quantized linear");
    }
    let q = decode_ints(module, outputs, scheme, rows, cols);
    let scale_t = get("weight_scale").unwrap_or_else(|| panic!("{module}.weight_scale is missing"));
    assert_eq!(scale_t.dtype, "F32", "{module}.weight_scale");
    let groups = scale_t.shape[1];
    assert_eq!(scale_t.shape, vec![rows, groups], "{module}.weight_scale shape");
    let group = if scheme.per_group() {
        assert!(groups >= 1);
        cols.div_ceil(groups)
    } else {
        assert_eq!(groups, 1, "{module}: {} is per output channel", scheme.kind());
        cols
    };
    if scheme.per_group() {
        assert_eq!(groups, cols.div_ceil(128), "{module}: the bundled W4A16 recipe uses groups of 128");
    }
    if let Some(off) = get("weight_offset") {
        assert_eq!(off.shape, scale_t.shape, "{module}.weight_offset shape");
        assert!(off.f32s().iter().all(|&x| x == 0.0), "{module}: symmetric weights have zero offsets");
    }
    if let Some(s) = get("weight_shape") {
        assert_eq!(s.i32s(), vec![rows as i32, cols as i32], "{module}.weight_shape");
    }
    let scale = scale_t.f32s();
    let wv = w.f32s();
    let qmax = scheme.qmax();
    for r in 0..rows {
        for g in 0..groups {
            let s = scale[r * groups + g];
            let range = g * group..((g + 1) * group).min(cols);
            let absmax = range.clone().map(|c| wv[r * cols + c].abs()).fold(0f32, f32::max);
            assert!(s.is_finite() && s > 0.0, "{module}: scale[{r}, {g}] = {s}");
            if absmax > 0.0 {
                // Min-max: the scale maps the group's largest magnitude to qmax, no coarser.
                assert!(
                    s <= absmax / qmax as f32 * (1.0 + 1e-5),
                    "{module}: scale[{r}, {g}] = {s} is coarser than min-max"
                );
            }
            for c in range {
                let qi = q[r * cols + c] as i32;
                assert!(qi.abs() <= qmax, "{module}[{r}, {c}] = {qi} is outside ±{qmax}");
                let err = (wv[r * cols + c] - qi as f32 * s).abs();
                assert!(
                    err <= s * (0.5 + 1e-5),
                    "{module}[{r}, {c}]: |w - q·s| = |{} - {qi}·{s}| = {err} > scale/2",
                    wv[r * cols + c]
                );
            }
        }
    }
}

/// The integer weights of a quantized linear, unpacked in the test's own code.
pub fn decode_ints(module: &str, outputs: &BTreeMap<String, St>, scheme: Scheme, rows: usize, cols: usize) -> Vec<i8> {
    let get = |s: &str| outputs.get(&format!("{module}.{s}"));
    let sext = |nibble: u8| ((nibble << 4) as i8) >> 4;
    match scheme {
        Scheme::W8A16 | Scheme::W8A8Dynamic => {
            let w = get("weight").unwrap_or_else(|| panic!("{module}.weight is missing"));
            assert_eq!((w.dtype.as_str(), w.shape.clone()), ("I8", vec![rows, cols]), "{module}.weight");
            w.i8s()
        }
        Scheme::W4A8Dynamic => {
            // msModelSlim: two int4 of adjacent output rows per byte, the even row in the low nibble.
            let w = get("weight").unwrap_or_else(|| panic!("{module}.weight is missing"));
            assert_eq!((w.dtype.as_str(), w.shape.clone()), ("I8", vec![rows / 2, cols]), "{module}.weight");
            let mut q = vec![0i8; rows * cols];
            for r in 0..rows / 2 {
                for c in 0..cols {
                    let b = w.data[r * cols + c];
                    q[2 * r * cols + c] = sext(b & 0x0F);
                    q[(2 * r + 1) * cols + c] = sext(b >> 4);
                }
            }
            q
        }
        Scheme::W4A16 => {
            if let Some(p) = get("weight_packed") {
                // Eight int4 per int32 along the input, lowest bits first, offset by 8 (what
                // vLLM-Ascend's unpack_from_int32 reads).
                assert_eq!(
                    (p.dtype.as_str(), p.shape.clone()),
                    ("I32", vec![rows, cols / 8]),
                    "{module}.weight_packed"
                );
                let words = p.i32s();
                (0..rows * cols)
                    .map(|k| {
                        let (r, c) = (k / cols, k % cols);
                        (((words[r * (cols / 8) + c / 8] >> (4 * (c % 8))) & 0xF) - 8) as i8
                    })
                    .collect()
            } else {
                let w = get("weight").unwrap_or_else(|| panic!("{module}.weight is missing"));
                assert_eq!((w.dtype.as_str(), w.shape.clone()), ("I8", vec![rows, cols]), "{module}.weight");
                w.i8s()
            }
        }
    }
}

/// The description keys vLLM's glm4_1v.py looks GLM-4.1V / 4.5V / 4.6V linears up under that are no
/// tensors, each with the linear whose type it must carry: the vision `attn.qkv` is built as
/// `attn.qkv_proj` packed from `attn.{q,k,v}_proj`; GLM-4.1V (`glm4v`) packs every
/// `gate_up_proj` from itself, so `X.gate_proj` / `X.up_proj` are looked up as `X.gate_up_proj`.
fn glm4v_lookup_names(model_type: &str, inputs: &BTreeMap<String, Logical>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !matches!(model_type, "glm4v" | "glm4v_moe") {
        return out;
    }
    for module in inputs.keys().filter_map(|n| n.strip_suffix(".weight")) {
        if let Some(attn) = module.strip_suffix(".attn.qkv").filter(|_| module.contains("visual.")) {
            for p in ["q_proj", "k_proj", "v_proj"] {
                out.insert(format!("{attn}.attn.{p}.weight"), module.to_string());
            }
        }
        let parent = module.strip_suffix(".gate_proj").or_else(|| module.strip_suffix(".up_proj"));
        if let (Some(parent), "glm4v") = (parent, model_type) {
            out.insert(format!("{parent}.gate_up_proj.weight"), module.to_string());
        }
    }
    out
}

fn check_description(
    out: &Path,
    outputs: &BTreeMap<String, St>,
    inputs: &BTreeMap<String, super::check::Logical>,
    modules: &BTreeMap<String, Scheme>,
    lookup_names: &BTreeMap<String, String>,
) {
    let entries = description_entries(&out.join("quant_model_description.json"));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, _) in &entries {
        *counts.entry(k.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).collect();
    assert!(dup.is_empty(), "the description lists these more than once: {dup:?}");
    let desc: BTreeMap<String, serde_json::Value> = entries.into_iter().collect();
    let globals = ["model_quant_type", "version", "group_size", "metadata", "optional"];
    for g in globals {
        assert!(desc.contains_key(g), "the description lacks the global key {g}");
    }
    let described: BTreeSet<&String> =
        desc.keys().filter(|k| !globals.contains(&k.as_str()) && !lookup_names.contains_key(*k)).collect();
    let written: BTreeSet<&String> = outputs.keys().collect();
    assert_eq!(described, written, "the description must cover every tensor of every shard");
    for (alias, linear) in lookup_names {
        let want = modules.get(linear).map_or("FLOAT", |s| s.kind());
        assert_eq!(desc.get(alias).and_then(|v| v.as_str()), Some(want), "lookup name {alias} (for {linear})");
    }
    for (name, kind) in &desc {
        if globals.contains(&name.as_str()) || lookup_names.contains_key(name) {
            continue;
        }
        let module = modules.iter().find(|(m, _)| name.starts_with(&format!("{m}.")));
        let want = match module {
            Some(_) if name.ends_with(".bias") => "FLOAT",
            Some((_, scheme)) => scheme.kind(),
            None => {
                assert!(inputs.contains_key(name));
                "FLOAT"
            }
        };
        assert_eq!(kind.as_str(), Some(want), "description type of {name}");
    }
    assert_eq!(desc["version"], "1.0.0");
    // msModelSlim's QUANT_TYPE_PRIORITY, weakest first; W4A8_DYNAMIC is hidden from it.
    let priority = ["FLOAT", "W8A16", "W8A8_DYNAMIC", "W8A8", "W4A16"];
    let strongest = modules.values().filter_map(|s| priority.iter().position(|p| *p == s.kind())).max().unwrap_or(0);
    assert_eq!(desc["model_quant_type"].as_str(), Some(priority[strongest]), "model_quant_type");
    let group_size = desc["group_size"].as_u64().expect("group_size is an integer") as usize;
    if modules.values().any(|s| s.per_group()) {
        assert_eq!(group_size, 128, "W4A16 names its group size");
        for (m, s) in modules {
            if s.per_group() {
                let w = &inputs[&format!("{m}.weight")].st;
                let scales = &outputs[&format!("{m}.weight_scale")];
                assert_eq!(scales.shape[1], w.shape[1] / group_size, "{m}: scale columns vs group_size");
            }
        }
    } else {
        assert_eq!(group_size, 0, "per-channel schemes have group_size 0");
    }
}

/// config.json without any quantization_config, and every other non-weight file copied.
fn check_config_and_companions(input: &Path, out: &Path) {
    let mut want = read_json(&input.join("config.json"));
    want.as_object_mut().unwrap().remove("quantization_config");
    if let Some(t) = want.get_mut("text_config").and_then(|t| t.as_object_mut()) {
        t.remove("quantization_config");
    }
    let got = read_json(&out.join("config.json"));
    assert_eq!(got, want, "config.json must be the input's without quantization_config");
    for e in std::fs::read_dir(input).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".index.json") {
            continue;
        }
        let (a, b) = (std::fs::read(input.join(&name)).unwrap(), std::fs::read(out.join(&name)));
        assert!(b.is_ok_and(|b| b == a), "{name} was not copied to the output unchanged");
    }
}
