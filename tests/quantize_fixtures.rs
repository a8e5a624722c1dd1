//! Every fixture quantizes with every data-free scheme, and the output is checked against the
//! input by the test's own decoding (see common/check.rs). Also: both fused-expert layouts of
//! Qwen3-VL-MoE give the same bytes, shapes that fit neither are refused, and a sharded input
//! gives the same output as a single-file one.

mod common;

use common::check::{check_output, check_output_for, logical_inputs, Scheme};
use common::*;

const GIB: f64 = (1u64 << 30) as f64;

/// Why the bundled recipe of `quant_type` for `target` cannot load on this fixture (the refusal's key
/// phrases), or `None` when it loads. The fixtures' sizes (hidden 64, expert intermediate 48) do not
/// divide into W4A16's groups of 128, which every loader asserts; vLLM-Ascend loads W4A8_DYNAMIC and
/// W4A16 for MoE experts only.
fn refusal(fixture: &str, quant_type: &str, target: &str) -> Option<Vec<&'static str>> {
    let moe = fixture.contains("moe") || fixture == "qwen3_next";
    if fixture == "hunyuan_v1_moe" && target == "vllm-ascend" && quant_type != "w4a16" {
        return Some(vec!["has no \"experts\" entry", "packed_modules_model_mapping", "hunyuan_v1_moe"]);
    }
    match (quant_type, target, moe) {
        ("w4a8_dynamic", "vllm-ascend", false) => Some(vec![
            "loads W4A8_DYNAMIC only for routed MoE experts",
            "methods/w4a8.py",
            "--quant_type values whose bundled recipe loads here: w8a8, w8a8_dynamic, w8a16",
            "--target mindie",
        ]),
        ("w4a16", "vllm-ascend", false) => Some(vec!["loads W4A16 only for routed MoE experts", "methods/w4a16.py"]),
        // The qwen_vl fixture's text sizes (hidden 256, intermediate 512) divide into groups of 128.
        ("w4a16", _, _) if fixture != "qwen_vl" => {
            Some(vec!["[divisibility]", "group_size 128", "types that load here"])
        }
        _ => None,
    }
}

/// Runs every data-free `--quant_type` for both targets on one fixture: each output is checked against
/// the input by the test's own decoding (common/check.rs) and passes `lamina check`; each refusal names
/// its reason and leaves nothing behind. Two runs write many small shards to exercise the index.
fn quantize_every_scheme(name: &str) {
    let model = fixture(name);
    for target in ["vllm-ascend", "mindie"] {
        for scheme in Scheme::ALL {
            let qt = scheme.cli();
            let tmp = TempDir::new(&format!("{name}-{qt}-{target}"));
            let save = tmp.join("out");
            let part = match (scheme, target) {
                (Scheme::W8A8Dynamic, "vllm-ascend") => Some(0.0001),
                (Scheme::W4A8Dynamic, "mindie") => Some(0.00005),
                _ => None,
            };
            let part_arg = part.map(|p| p.to_string());
            let mut extra: Vec<&str> = vec!["--target", target];
            if let Some(p) = &part_arg {
                extra.extend(["--part_file_size", p]);
            }
            // MindIE's `--quant_type w4a16` calibrates (AWQ, `mindie-w4a16`; w4a16_loads_where_sizes_divide
            // runs it): here its data-free recipe of the same type, named.
            if (scheme, target) == (Scheme::W4A16, "mindie") {
                extra.extend(["--config_path", "dense-w4a16"]);
            }
            let run = quant(&model, &save, qt, &extra, &[]);
            if let Some(needles) = refusal(name, qt, target) {
                run.assert_fails_with(&needles);
                assert_no_complete_output(&save);
                continue;
            }
            run.assert_ok();
            let seen = check_output_for(&model, &save, qt, target, part.map(|p| (p * GIB) as u64));
            assert!(!seen.quantized.is_empty() && !seen.float.is_empty(), "{name} {qt} {target}: {seen:?}");
            if part.is_some() {
                assert!(seen.shards > 1, "{name} {qt}: expected several shards, got {}", seen.shards);
            }
            expect_experts(name, &seen.quantized);
            let c = check(&save, &["--target", target]);
            c.assert_ok();
            assert!(c.stdout.contains("ok:"), "{}", c.stdout);
        }
    }
}

/// The MoE fixtures' experts are all there as quantized linears, and the routers stay float.
fn expect_experts(name: &str, quantized: &std::collections::BTreeSet<String>) {
    let (root, experts) = match name {
        "qwen3_moe" => ("model.layers", 4),
        "qwen3_vl_moe" => ("model.language_model.layers", 4),
        "glm4_moe" => ("model.layers", 4),
        "glm4v_moe" => ("model.language_model.layers", 8),
        "qwen3_next" => ("model.layers", 4),
        "hunyuan_v1_moe" | "hunyuan" => ("model.layers", 4),
        _ => return,
    };
    // GLM-4.5's first layer is dense (first_k_dense_replace); every Qwen3-Next layer is MoE.
    let layers = match name {
        "glm4_moe" | "glm4v_moe" => 1..3,
        "qwen3_next" => 0..4,
        "hunyuan_v1_moe" => 0..3,
        "hunyuan" => 0..4,
        _ => 0..2,
    };
    for layer in layers {
        for j in 0..experts {
            for part in ["gate_proj", "up_proj", "down_proj"] {
                let m = format!("{root}.{layer}.mlp.experts.{j}.{part}");
                assert!(quantized.contains(&m), "{name}: expert linear {m} was not quantized");
            }
        }
        assert!(!quantized.contains(&format!("{root}.{layer}.mlp.gate")), "{name}: the router must stay float");
        assert!(!quantized.contains(&format!("{root}.{layer}.mlp.gate.wg")), "{name}: the router must stay float");
    }
}

#[test]
fn llama() {
    quantize_every_scheme("llama");
}
#[test]
fn qwen2() {
    quantize_every_scheme("qwen2");
}
/// A Qwen3 FP8 release (block scales of 32 × 48, ragged on both axes): each linear checked
/// against the test's own dequantization.
#[test]
fn qwen3_fp8() {
    quantize_every_scheme("qwen3_fp8");
}
#[test]
fn qwen3() {
    quantize_every_scheme("qwen3");
}
#[test]
fn qwen3_moe() {
    quantize_every_scheme("qwen3_moe");
}
#[test]
fn qwen2_vl() {
    quantize_every_scheme("qwen2_vl");
}
#[test]
fn qwen2_5_vl() {
    quantize_every_scheme("qwen2_5_vl");
}
#[test]
fn qwen3_vl() {
    quantize_every_scheme("qwen3_vl");
}
#[test]
fn qwen3_vl_moe() {
    quantize_every_scheme("qwen3_vl_moe");
}
#[test]
fn llava() {
    quantize_every_scheme("llava");
}

#[test]
fn internvl_chat() {
    quantize_every_scheme("internvl_chat");
}
#[test]
fn internlm2() {
    quantize_every_scheme("internlm2");
}

#[test]
fn qwen1() {
    quantize_every_scheme("qwen1");
}

#[test]
fn qwen_vl() {
    quantize_every_scheme("qwen_vl");
}

#[test]
fn qwen3_vl_realvocab() {
    quantize_every_scheme("qwen3_vl_realvocab");
}
#[test]
fn glm4() {
    quantize_every_scheme("glm4");
}
#[test]
fn glm4_moe() {
    quantize_every_scheme("glm4_moe");
}
/// GLM-4.1V: the vision tower and the GLM-4 decoder (its fused gate_up_proj split); the description's
/// lookup names (vLLM's glm4_1v.py) are checked by `lamina check`.
#[test]
fn glm4v() {
    quantize_every_scheme("glm4v");
}
/// GLM-4.5V / 4.6V: the same tower and GLM-4.5's MoE decoder (per-expert linears, dense layer 0).
#[test]
fn glm4v_moe() {
    quantize_every_scheme("glm4v_moe");
}

/// Every data-free type on Qwen3-Next (Gated DeltaNet layers 0-2, gated attention layer 3); its
/// w8a8_dynamic is the family recipe (msModelSlim's practice: q/k/v, experts, in_proj_qkvz), the
/// others the defaults. conv1d, A_log, dt_bias and the gated norm stay float everywhere.
#[test]
fn qwen3_next() {
    quantize_every_scheme("qwen3_next");
    let tmp = TempDir::new("qwen3-next-practice");
    let save = tmp.join("out");
    quant(&fixture("qwen3_next"), &save, "w8a8_dynamic", &[], &[]).assert_ok();
    let seen = check_output_for(&fixture("qwen3_next"), &save, "w8a8_dynamic", "vllm-ascend", None);
    assert_eq!(seen.quantized.len(), 3 + 4 * 4 * 3 + 3, "{seen:?}");
    for float in ["model.layers.0.linear_attn.in_proj_ba.weight", "model.layers.0.linear_attn.out_proj.weight"] {
        assert!(seen.float.contains(float), "{float}: {seen:?}");
    }
    assert!(seen.float.contains("model.layers.1.linear_attn.conv1d.weight"), "{seen:?}");
}

/// Hunyuan-A13B (`hunyuan_v1_moe`): every layer MoE (router `mlp.gate.wg` float, experts and the
/// shared MLP quantized). vLLM-Ascend's `packed_modules_model_mapping` has no `hunyuan_v1_moe` row, so
/// no `experts` entry: its fused MoE layer looks its type up as `….mlp.experts.weight`, which an
/// Ascend description (per-expert keys, as msModelSlim writes them) does not hold. Every type that
/// quantizes the experts is therefore refused for `--target vllm-ascend`, naming that rule, and
/// written for MindIE.
#[test]
fn hunyuan_v1_moe() {
    quantize_every_scheme("hunyuan_v1_moe");
    let tmp = TempDir::new("hunyuan-mindie");
    let save = tmp.join("out");
    quant(&fixture("hunyuan_v1_moe"), &save, "w8a8_dynamic", &["--target", "mindie"], &[]).assert_ok();
    let seen = check_output_for(&fixture("hunyuan_v1_moe"), &save, "w8a8_dynamic", "mindie", None);
    for m in ["model.layers.2.mlp.shared_mlp.down_proj", "model.layers.0.self_attn.k_proj"] {
        assert!(seen.quantized.contains(m), "{m}: {seen:?}");
    }
    for f in ["model.layers.1.mlp.gate.wg.weight", "model.layers.0.self_attn.query_layernorm.weight"] {
        assert!(seen.float.contains(f), "{f}: {seen:?}");
    }
}

/// Hunyuan-Large (`hunyuan`, cross-layer attention): data-free W8A8_DYNAMIC for MindIE writes the
/// layers that reuse keys and values with their `q_proj` and `o_proj` alone (no `k_proj` / `v_proj`,
/// as released), their query and key norms float, every expert quantized, the router float, and
/// passes `lamina check --target mindie`. `--target vllm-ascend` is refused for it, whatever the type:
/// vLLM registers no model class for `HunYuanForCausalLM`.
#[test]
fn hunyuan_large() {
    let model = fixture("hunyuan");
    let tmp = TempDir::new("hunyuan-large");
    let refused = tmp.join("refused");
    for qt in ["w8a8_dynamic", "w8a16"] {
        quant(&model, &refused, qt, &["--target", "vllm-ascend"], &[]).assert_fails_with(&[
            "HunYuanForCausalLM",
            "registry.py",
            "--target mindie",
        ]);
        assert_no_complete_output(&refused);
    }
    let save = tmp.join("out");
    quant(&model, &save, "w8a8_dynamic", &["--target", "mindie"], &[]).assert_ok();
    let seen = check_output_for(&model, &save, "w8a8_dynamic", "mindie", None);
    expect_experts("hunyuan", &seen.quantized);
    for m in [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.2.self_attn.v_proj",
        "model.layers.3.mlp.shared_mlp.down_proj",
    ] {
        assert!(seen.quantized.contains(m), "{m}: {seen:?}");
    }
    for m in ["model.layers.1.self_attn.k_proj", "model.layers.3.self_attn.v_proj"] {
        assert!(!seen.quantized.contains(m), "{m}: {seen:?}");
    }
    for f in ["model.layers.1.mlp.gate.wg.weight", "model.layers.1.self_attn.key_layernorm.weight"] {
        assert!(seen.float.contains(f), "{f}: {seen:?}");
    }
    let c = check(&save, &["--target", "mindie"]);
    c.assert_ok();
    assert!(c.stdout.contains("ok:"), "{}", c.stdout);
}

/// GLM-4.5's multi-token-prediction layer (`model.layers.{num_hidden_layers}`) is no decoder layer
/// lamina computes: every scheme writes it float, as vLLM-Ascend serves the MTP draft, and the
/// description says FLOAT for each of its tensors; the decoder layers are quantized as usual.
#[test]
fn glm4_moe_mtp_layer_stays_float() {
    let tmp = TempDir::new("glm4-moe-mtp");
    let model = with_mtp_layer("glm4_moe", &tmp.join("model"), 5);
    for qt in ["w8a8_dynamic", "w4a8_dynamic"] {
        let save = tmp.join(qt);
        quant(&model, &save, qt, &[], &[]).assert_ok();
        let seen = check_output_for(&model, &save, qt, "vllm-ascend", None);
        let mtp: Vec<&String> = seen.float.iter().filter(|n| n.starts_with("model.layers.3.")).collect();
        assert!(mtp.iter().any(|n| n.ends_with("self_attn.q_proj.weight")), "{mtp:?}");
        assert!(mtp.iter().any(|n| n.ends_with("mlp.experts.0.down_proj.weight")), "{mtp:?}");
        assert!(mtp.iter().any(|n| n.ends_with("eh_proj.weight")), "{mtp:?}");
        assert!(seen.quantized.contains("model.layers.2.mlp.experts.3.up_proj"), "{seen:?}");
        let desc = read_json(&save.join("quant_model_description.json"));
        let mtp_types: std::collections::BTreeSet<&str> = desc
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("model.layers.3."))
            .map(|(_, v)| v.as_str().unwrap())
            .collect();
        assert_eq!(mtp_types, ["FLOAT"].into(), "{qt}");
        check(&save, &[]).assert_ok();
    }
}

/// Rewrites a Qwen3-VL-MoE copy's fused experts in the transformers-5 layout
/// (`gate_up [E, 2*inter, hidden]`, `down [E, hidden, inter]`).
fn to_transformers5(dir: &std::path::Path) {
    let path = dir.join("model.safetensors");
    let mut all = read_st(&path);
    let names: Vec<String> = all.keys().filter(|n| n.ends_with("mlp.experts.gate_up_proj")).cloned().collect();
    for gu_name in names {
        let prefix = gu_name.strip_suffix("gate_up_proj").unwrap().to_string();
        let (gu, down) = (all[&gu_name].clone(), all[&format!("{prefix}down_proj")].clone());
        let (e, hidden, two_inter) = (gu.shape[0], gu.shape[1], gu.shape[2]);
        let inter = two_inter / 2;
        let transpose = |t: &St, a: usize, b: usize| -> St {
            let mut data = vec![0u8; t.data.len()];
            for j in 0..e {
                for x in 0..a {
                    for y in 0..b {
                        let src = (j * a * b + x * b + y) * 2;
                        let dst = (j * a * b + y * a + x) * 2;
                        data[dst..dst + 2].copy_from_slice(&t.data[src..src + 2]);
                    }
                }
            }
            St { dtype: t.dtype.clone(), shape: vec![e, b, a], data }
        };
        all.insert(gu_name.clone(), transpose(&gu, hidden, two_inter));
        all.insert(format!("{prefix}down_proj"), transpose(&down, inter, hidden));
    }
    write_st(&path, &all);
}

#[test]
fn both_fused_expert_layouts_give_the_same_bytes() {
    let tmp = TempDir::new("t5-layout");
    let t5 = copy_fixture("qwen3_vl_moe", &tmp.join("t5"));
    to_transformers5(&t5);
    let gu = &read_st(&t5.join("model.safetensors"))["model.language_model.layers.0.mlp.experts.gate_up_proj"];
    assert_eq!(gu.shape, vec![4, 96, 64], "the copy really is in the transformers-5 layout");
    // The test's own split of both layouts agrees before lamina is involved.
    let (a, b) = (logical_inputs(&fixture("qwen3_vl_moe")), logical_inputs(&t5));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, v) in &a {
        assert_eq!(v.st, b[k].st, "{k}");
    }
    for scheme in [Scheme::W8A8Dynamic, Scheme::W4A8Dynamic] {
        let (r, t) = (tmp.join(&format!("release-{}", scheme.cli())), tmp.join(&format!("t5-{}", scheme.cli())));
        quant(&fixture("qwen3_vl_moe"), &r, scheme.cli(), &[], &[]).assert_ok();
        quant(&t5, &t, scheme.cli(), &[], &[]).assert_ok();
        check_output(&t5, &t, scheme, None);
        let (ro, to) =
            (read_st(&r.join("quant_model_weights.safetensors")), read_st(&t.join("quant_model_weights.safetensors")));
        let experts: Vec<&String> = ro.keys().filter(|k| k.contains(".mlp.experts.")).collect();
        assert!(experts.len() >= 2 * 4 * 3 * 3, "2 layers × 4 experts × 3 linears × (weight, scale, offset, …)");
        for k in experts {
            assert_eq!(ro[k], to[k], "{k} differs between the release and transformers-5 layouts");
        }
        assert_eq!(
            std::fs::read(r.join("quant_model_weights.safetensors")).unwrap(),
            std::fs::read(t.join("quant_model_weights.safetensors")).unwrap()
        );
    }
}

#[test]
fn fused_shapes_that_fit_no_layout_are_refused() {
    let tmp = TempDir::new("bad-fused");
    // A config whose expert size contradicts the tensors.
    let m = copy_fixture("qwen3_vl_moe", &tmp.join("m1"));
    let mut c = read_json(&m.join("config.json"));
    c["text_config"]["moe_intermediate_size"] = serde_json::json!(32);
    write_json(&m.join("config.json"), &c);
    let save = tmp.join("o1");
    quant(&m, &save, "w8a8_dynamic", &[], &[]).assert_fails_with(&[
        "model.language_model.layers.0.mlp.experts.gate_up_proj",
        "[4, 64, 96]",
        "moe_intermediate_size 32",
        &m.display().to_string(),
    ]);
    assert_no_complete_output(&save);

    // One layer mixing the two layouts: gate_up in the release layout, down_proj transposed.
    let m = copy_fixture("qwen3_vl_moe", &tmp.join("m2"));
    let path = m.join("model.safetensors");
    let mut all = read_st(&path);
    let d = all.get_mut("model.language_model.layers.1.mlp.experts.down_proj").unwrap();
    d.shape = vec![4, 64, 48];
    write_st(&path, &all);
    let save = tmp.join("o2");
    quant(&m, &save, "w8a8_dynamic", &[], &[]).assert_fails_with(&[
        "model.language_model.layers.1.mlp.experts.down_proj",
        "[4, 64, 48]",
        "neither",
        &m.display().to_string(),
    ]);
    assert_no_complete_output(&save);
}

#[test]
fn a_sharded_input_gives_the_same_output() {
    let tmp = TempDir::new("sharded-input");
    let m = copy_fixture("qwen3_vl_moe", &tmp.join("m"));
    let map = shard_checkpoint(&m, 3);
    assert_eq!(map.values().collect::<std::collections::BTreeSet<_>>().len(), 3);
    // A quantization_config in the input is dropped from the output's config.json.
    let mut c = read_json(&m.join("config.json"));
    c["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
    c["text_config"]["quantization_config"] = serde_json::json!({"quant_method": "fp8"});
    write_json(&m.join("config.json"), &c);
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    quant(&m, &a, "w8a16", &["--part_file_size", "0.0002"], &[]).assert_ok();
    quant(&fixture("qwen3_vl_moe"), &b, "w8a16", &["--part_file_size", "0.0002"], &[]).assert_ok();
    check_output(&m, &a, Scheme::W8A16, Some((0.0002 * GIB) as u64));
    let out = read_json(&a.join("config.json"));
    assert!(out.get("quantization_config").is_none() && out["text_config"].get("quantization_config").is_none());
    let (sa, sb) = (snapshot(&a, false), snapshot(&b, false));
    let weights = |s: &std::collections::BTreeMap<String, Vec<u8>>| {
        s.iter().filter(|(k, _)| k.starts_with("quant_model")).map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>()
    };
    assert_eq!(weights(&sa), weights(&sb), "shards, index and description depend only on the tensors");
}

#[test]
fn fp16_and_fp32_checkpoints() {
    for dtype in ["F16", "F32"] {
        let tmp = TempDir::new(&format!("dtype-{dtype}"));
        let m = copy_fixture("qwen2", &tmp.join("m"));
        let path = m.join("model.safetensors");
        let converted = read_st(&path)
            .into_iter()
            .map(|(n, t)| {
                let v = t.f32s();
                let data: Vec<u8> = match dtype {
                    "F16" => v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                    _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
                };
                (n, St { dtype: dtype.into(), shape: t.shape, data })
            })
            .collect();
        write_st(&path, &converted);
        // Dense W4A8_DYNAMIC loads in MindIE only.
        for (scheme, target) in [(Scheme::W8A8Dynamic, "vllm-ascend"), (Scheme::W4A8Dynamic, "mindie")] {
            let save = tmp.join(scheme.cli());
            quant(&m, &save, scheme.cli(), &["--target", target], &[]).assert_ok();
            let seen = check_output_for(&m, &save, scheme.cli(), target, None);
            assert_eq!(seen.quantized.len(), 14, "{dtype}: 2 layers × 7 linears");
        }
    }
}

/// W4A16's groups of 128 fit models whose sizes divide by 128, as every released one's do: the MoE
/// recipe (experts W4A16, the rest W8A16, data-free) for vLLM-Ascend, and for MindIE, which reads dense
/// W4A16 with zero points, the best measured 4-bit recipe (`mindie-w4a16`: AWQ, asymmetric), which
/// calibrates. The dense recipe is not vLLM-Ascend's, which has no dense W4A16 linear. (AWQ's own
/// numerics are checked in tests/algorithms.rs and `quant::awq`.)
#[test]
fn w4a16_loads_where_sizes_divide() {
    let tmp = TempDir::new("w4a16-widened");
    for (name, target) in [("qwen3_moe", "vllm-ascend"), ("llama", "mindie"), ("qwen3_moe", "mindie")] {
        let m = write_widened(name, &tmp.join(&format!("{name}-{target}-in")), 7);
        let save = tmp.join(&format!("{name}-{target}"));
        if target == "vllm-ascend" {
            quant(&m, &save, "w4a16", &["--target", target], &[]).assert_ok();
            let seen = check_output_for(&m, &save, "w4a16", target, None);
            assert!(seen.quantized.iter().any(|q| q.ends_with("up_proj")), "{seen:?}");
        } else {
            let calib = tmp.join(&format!("{name}-calib.jsonl"));
            common::calibrated::write_calib_ids(&fixture(name), &calib, 4, 32, 900, 5);
            let args = ["--target", target, "--calib_data", calib.to_str().unwrap(), "--calib_samples", "4"];
            quant(&m, &save, "w4a16", &[&args[..], &["--calib_seq_len", "32"]].concat(), &[]).assert_ok();
            check_asymmetric_w4a16(&m, &save);
        }
        let desc = read_json(&save.join("quant_model_description.json"));
        assert_eq!(desc["group_size"], 128);
        check(&save, &["--target", target]).assert_ok();
    }
    let m = write_widened("llama", &tmp.join("llama-vllm-in"), 7);
    quant(&m, &tmp.join("llama-vllm"), "w4a16", &[], &[]).assert_fails_with(&[
        "vLLM-Ascend loads W4A16 only for routed MoE experts",
        "--quant_type values whose bundled recipe loads here: w8a8, w8a8_dynamic, w8a16",
    ]);
}

/// MindIE's W4A16 (`mindie-w4a16`): every decoder linear but the router is W4A16, packed int4 with one
/// positive scale and one zero point per group of 128 inputs, and the groups are not all centred
/// (asymmetric).
fn check_asymmetric_w4a16(input: &std::path::Path, out: &std::path::Path) {
    let desc = read_json(&out.join("quant_model_description.json"));
    let (outputs, _) = common::check::read_output(out, None);
    let mut linears = 0;
    for (name, l) in logical_inputs(input) {
        let Some(module) = name.strip_suffix(".weight").filter(|m| m.contains(".layers.") && l.st.shape.len() == 2)
        else {
            continue;
        };
        if module.ends_with("mlp.gate") || module.contains("norm") {
            continue;
        }
        // W4A16 weights are stored packed, eight int4 to an int32 (`weight_packed`).
        assert_eq!(desc[&format!("{module}.weight_packed")], "W4A16", "{module}");
        let (rows, cols) = (l.st.shape[0], l.st.shape[1]);
        let get = |s: &str| outputs.get(&format!("{module}.{s}")).unwrap_or_else(|| panic!("{module}.{s} is missing"));
        let q = common::check::decode_ints(module, &outputs, Scheme::W4A16, rows, cols);
        let (scale, offset) = (get("weight_scale").f32s(), get("weight_offset").f32s());
        let groups = cols / 128;
        assert_eq!((q.len(), scale.len(), offset.len()), (rows * cols, rows * groups, rows * groups), "{module}");
        assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{module}: scales");
        assert!(offset.iter().any(|&z| z != 0.0), "{module}: asymmetric groups have zero points");
        linears += 1;
    }
    assert!(linears >= 14, "{linears} linears checked");
}
