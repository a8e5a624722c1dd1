//! The rules, one by one, on outputs built from [`linear_layout`] with the dimensions of real models
//! where divisibility matters (Qwen3-30B-A3B: hidden 2048, expert intermediate 768, 32 heads × 128,
//! 4 KV heads; Qwen3-VL's vision tower: 1152 → 4304; DeepSeek-V3: hidden 7168, expert intermediate 2048).

use super::*;
use serde_json::json;

const BF16: Option<DType> = Some(DType::BF16);

fn setting(target: Target, model_type: &str) -> Setting {
    Setting { target, model_type: model_type.into(), serving: BF16, kv_channels: Some(4 * 128), head_dim: Some(128) }
}

/// An output holding these linears (module, type, out, in), with msModelSlim's global keys computed the
/// way its saver computes them, plus the float tensors given.
fn output(linears: &[(&str, &'static str, usize, usize)], group: usize) -> Described {
    let mut outs = Vec::new();
    for &(m, kind, o, i) in linears {
        // Per-group types in groups of `group` (the last one shorter, as lamina can write it).
        let per_group = rule(kind).unwrap().grouping == Grouping::PerGroup && group > 0;
        let groups = if per_group { i.div_ceil(group) } else { 1 };
        outs.extend(linear_layout(kind, m, o, i, groups, DType::BF16, &[]));
    }
    outs.push(OutMeta { meta: TensorMeta::new("model.norm.weight", DType::BF16, &[2048]), kind: FLOAT });
    let strongest = linears.iter().filter_map(|l| PRIORITY.iter().position(|p| *p == l.1)).max().unwrap_or(0);
    let mut g = Map::new();
    g.insert("model_quant_type".into(), json!(PRIORITY[strongest]));
    g.insert("version".into(), json!("1.0.0"));
    g.insert("group_size".into(), json!(group));
    Described::planned(&outs, g)
}

fn rules_broken(p: &[Problem]) -> Vec<&'static str> {
    let mut v: Vec<&str> = p.iter().map(|p| p.rule).collect();
    v.dedup();
    v
}

fn find<'a>(p: &'a [Problem], rule: &str, subject: &str) -> &'a Problem {
    p.iter()
        .find(|x| x.rule == rule && x.subject == subject)
        .unwrap_or_else(|| panic!("no [{rule}] problem on {subject} in:\n{}", report(p)))
}

const L: &str = "model.layers.0";

fn attention(kind: &'static str) -> Vec<(String, &'static str, usize, usize)> {
    [("q_proj", 4096, 2048), ("k_proj", 512, 2048), ("v_proj", 512, 2048), ("o_proj", 2048, 4096)]
        .iter()
        .map(|&(n, o, i)| (format!("{L}.self_attn.{n}"), kind, o, i))
        .collect()
}

fn experts(kind: &'static str, n: usize) -> Vec<(String, &'static str, usize, usize)> {
    let mut v = Vec::new();
    for j in 0..n {
        for (p, o, i) in [("gate_proj", 768, 2048), ("up_proj", 768, 2048), ("down_proj", 2048, 768)] {
            v.push((format!("{L}.mlp.experts.{j}.{p}"), kind, o, i));
        }
    }
    v
}

fn build(parts: &[Vec<(String, &'static str, usize, usize)>], group: usize) -> Described {
    let all: Vec<(String, &'static str, usize, usize)> = parts.iter().flatten().cloned().collect();
    let refs: Vec<(&str, &'static str, usize, usize)> =
        all.iter().map(|(m, k, o, i)| (m.as_str(), *k, *o, *i)).collect();
    output(&refs, group)
}

#[test]
fn msmodelslim_mixed_recipes_load() {
    // w4a8_dynamic on a MoE: experts W4A8, attention W8A8_DYNAMIC.
    let d = build(&[attention("W8A8_DYNAMIC"), experts("W4A8_DYNAMIC", 4)], 0);
    assert_eq!(check(&d, &setting(Target::VllmAscend, "qwen3_moe")), vec![]);
    // w4a16: experts W4A16 in groups of 128 (Qwen3-30B-A3B's sizes divide), the rest W8A16.
    let d = build(&[attention("W8A16"), experts("W4A16", 4)], 128);
    assert_eq!(check(&d, &setting(Target::VllmAscend, "qwen3_moe")), vec![]);
    // Static W8A8 attention with dynamic experts (qwen3_moe-w8a8).
    let d = build(&[attention("W8A8"), experts("W8A8_DYNAMIC", 2)], 0);
    assert_eq!(check(&d, &setting(Target::VllmAscend, "qwen3_vl_moe")), vec![]);
}

#[test]
fn each_type_loads_only_on_its_layer_kinds() {
    // W8A16 experts: vLLM-Ascend has no W8A16 MoE scheme.
    let p = check(&build(&[attention("W8A16"), experts("W8A16", 1)], 0), &setting(Target::VllmAscend, "qwen3_moe"));
    let e = find(&p, "layer kind", "model.layers.0.mlp.experts.0.gate_proj");
    for needle in ["routed MoE expert", "W8A16", "methods/w8a16.py", "W8A8_DYNAMIC, W4A16, W4A8_DYNAMIC"] {
        assert!(e.detail.contains(needle), "{needle}: {e}");
    }
    // Dense W4A8_DYNAMIC and W4A16: MoE only on vLLM-Ascend, fine for MindIE.
    for (kind, group, file) in [("W4A8_DYNAMIC", 0, "methods/w4a8.py"), ("W4A16", 128, "methods/w4a16.py")] {
        let d = build(&[attention(kind)], group);
        let p = check(&d, &setting(Target::VllmAscend, "qwen3"));
        let e = find(&p, "layer kind", "model.layers.0.self_attn.q_proj");
        assert!(e.detail.contains("linear layer") && e.detail.contains(file) && e.detail.contains("W8A16"), "{e}");
        assert_eq!(rules_broken(&p), vec!["layer kind"], "{}", report(&p));
        assert_eq!(check(&d, &setting(Target::MindIe, "qwen3")), vec![], "{kind} for MindIE");
    }
    // Static W8A8 experts load nowhere.
    for t in Target::ALL {
        let p = check(&build(&[experts("W8A8", 1)], 0), &setting(t, "qwen3_moe"));
        assert!(find(&p, "layer kind", "model.layers.0.mlp.experts.0.up_proj").detail.contains("w8a8_static.py"));
    }
    assert_eq!(LayerKind::of("model.layers.3.mlp.experts.17.down_proj"), LayerKind::Expert);
    assert_eq!(LayerKind::of("model.layers.3.mlp.shared_expert.down_proj"), LayerKind::Linear);
    assert_eq!(LayerKind::of("model.layers.3.mlp.shared_experts.down_proj"), LayerKind::Linear);
    assert_eq!(
        loadable_types(Target::VllmAscend, "a.mlp.experts.0.up_proj", 768, 2048),
        ["W8A8_DYNAMIC", "W4A16", "W4A8_DYNAMIC"]
    );
    assert_eq!(
        loadable_types(Target::VllmAscend, "a.self_attn.q_proj", 4096, 2048),
        ["W8A16", "W8A8_DYNAMIC", "W8A8", "W8A8S", "W4A4_DYNAMIC"]
    );
}

#[test]
fn w4a16_groups_must_divide_real_and_fixture_sizes() {
    // DeepSeek-V3's experts (7168 ↔ 2048) divide by 128.
    let ds: Vec<_> = [("gate_proj", 2048, 7168), ("up_proj", 2048, 7168), ("down_proj", 7168, 2048)]
        .iter()
        .map(|&(p, o, i)| (format!("{L}.mlp.experts.0.{p}"), "W4A16", o, i))
        .collect();
    assert_eq!(check(&build(&[ds], 128), &setting(Target::VllmAscend, "deepseek_v3")), vec![]);
    // The fixtures' experts (hidden 64, intermediate 48) do not: the loader asserts both sizes divisible.
    let small: Vec<_> = [("gate_proj", 48, 64), ("down_proj", 64, 48), ("up_proj", 48, 64)]
        .iter()
        .map(|&(p, o, i)| (format!("{L}.mlp.experts.0.{p}"), "W4A16", o, i))
        .collect();
    let p = check(&build(std::slice::from_ref(&small), 128), &setting(Target::VllmAscend, "qwen3_moe"));
    let e = find(&p, "divisibility", "model.layers.0.mlp.experts.0.gate_proj");
    assert!(
        e.detail.contains("group_size 128")
            && e.detail.contains("48 × 64")
            && e.detail.contains("W8A8_DYNAMIC, W4A8_DYNAMIC"),
        "{e}"
    );
    // With groups of 16 both 48 and 64 divide.
    let d = build(&[small], 16);
    assert_eq!(check(&d, &setting(Target::VllmAscend, "qwen3_moe")), vec![]);
    // Qwen3-VL's vision linear_fc2 (4304 inputs) cannot be W4A16 g128 even where dense W4A16 loads.
    let fc2 = vec![("model.visual.blocks.0.mlp.linear_fc2".to_string(), "W4A16", 1152, 4304)];
    let p = check(&build(&[fc2], 128), &setting(Target::MindIe, "qwen3_vl_moe"));
    assert!(find(&p, "divisibility", "model.visual.blocks.0.mlp.linear_fc2").detail.contains("4304"));
    // No group_size at all.
    let mut d = build(&[experts("W4A16", 1)], 128);
    d.globals.insert("group_size".into(), json!(0));
    let p = check(&d, &setting(Target::VllmAscend, "qwen3_moe"));
    assert!(p.iter().any(|x| x.rule == "divisibility" && x.detail.contains("needs the description's group_size")));
}

#[test]
fn w4a8_shapes_and_group_size() {
    // Odd outputs cannot pair; a row-parallel input must split into 16 partial sums.
    // (An odd output count cannot even be written: the packed weight holds pairs, so the scales disagree.)
    let mut d = build(&[vec![(format!("{L}.self_attn.o_proj"), "W4A8_DYNAMIC", 8, 2048)]], 0);
    d.tensors.get_mut("model.layers.0.self_attn.o_proj.weight_scale").unwrap().shape = vec![7, 1];
    let p = check(&d, &setting(Target::MindIe, "qwen3"));
    assert!(find(&p, "shapes", "model.layers.0.self_attn.o_proj.weight_scale").detail.contains("needs [8, 1]"));
    assert!(shape_limit(rule("W4A8_DYNAMIC").unwrap(), Target::MindIe, "a.q_proj", 7, 64, 0)
        .unwrap()
        .contains("pairs"));
    let d = build(&[vec![(format!("{L}.mlp.experts.0.down_proj"), "W4A8_DYNAMIC", 2048, 760)]], 0);
    let p = check(&d, &setting(Target::VllmAscend, "qwen3_moe"));
    assert!(find(&p, "divisibility", "model.layers.0.mlp.experts.0.down_proj").detail.contains("760"));
    // W4A8 experts beside any per-group linear: the loader refuses group_size > 0.
    let d = build(&[attention("W8A16"), experts("W4A8_DYNAMIC", 1)], 128);
    let d = {
        let mut d = d;
        // Make the attention per-group (what msModelSlim's on_w8a16_static_per_group writes).
        for (n, t) in d.tensors.iter_mut() {
            if n.contains("self_attn") && (n.ends_with("weight_scale") || n.ends_with("weight_offset")) {
                t.shape[1] = if n.contains("o_proj") { 32 } else { 16 };
            }
        }
        d
    };
    let p = check(&d, &setting(Target::VllmAscend, "qwen3_moe"));
    let e = p.iter().find(|x| x.rule == "group size" && x.detail.contains("methods/w4a8.py")).expect("W4A8 refusal");
    assert!(e.detail.contains("group_size is 128") && e.detail.contains("self_attn"), "{e}");
    // And vLLM-Ascend reads int8 scales per channel only.
    find(&p, "group size", "model.layers.0.self_attn.q_proj.weight_scale");
    // MindIE reads the per-group int8 scales (and has no W4A8 group rule).
    assert_eq!(check(&d, &setting(Target::MindIe, "qwen3_moe")), vec![]);
}

#[test]
fn one_group_size_for_every_per_group_linear() {
    // W4A16 experts in groups of 128 and W8A16 attention in groups of 64: one key cannot say both.
    let mut d = build(&[attention("W8A16"), experts("W4A16", 1)], 128);
    for (n, t) in d.tensors.iter_mut() {
        if n.contains("self_attn") && (n.ends_with("weight_scale") || n.ends_with("weight_offset")) {
            t.shape[1] = if n.contains("o_proj") { 64 } else { 32 };
        }
    }
    let p = check(&d, &setting(Target::MindIe, "qwen3_moe"));
    let e = find(&p, "group size", "group_size");
    assert!(e.detail.contains("2 group lengths") && e.detail.contains("64") && e.detail.contains("128"), "{e}");
    // A group_size that is not the per-group linears'.
    let mut d = build(&[experts("W4A16", 1)], 128);
    d.globals.insert("group_size".into(), json!(64));
    let p = check(&d, &setting(Target::VllmAscend, "qwen3_moe"));
    assert!(find(&p, "group size", "group_size").detail.contains("is 64"));
}

#[test]
fn deq_scale_follows_the_serving_dtype() {
    let d = build(&[attention("W8A8")], 0);
    let name = "model.layers.0.self_attn.q_proj.deq_scale";
    assert_eq!(d.tensors[name].dtype, DType::F32, "built for bfloat16 serving");
    let mut s = setting(Target::VllmAscend, "qwen3");
    assert_eq!(check(&d, &s), vec![]);
    s.serving = Some(DType::F16);
    let p = check(&d, &s);
    let e = find(&p, "deq_scale dtype", name);
    assert!(
        e.detail.contains("float16") && e.detail.contains("I64") && e.detail.contains("--serving_dtype float16"),
        "{e}"
    );
    s.serving = Some(DType::F32);
    assert!(find(&check(&d, &s), "deq_scale dtype", name).detail.contains("cannot be served in float32"));
    s.serving = None;
    assert_eq!(check(&d, &s), vec![]);
    // Built for float16 serving: int64.
    let l = linear_layout("W8A8", "m.q_proj", 8, 16, 1, DType::F16, &[]);
    assert_eq!(l.iter().find(|o| o.meta.name == "m.q_proj.deq_scale").unwrap().meta.dtype, DType::I64);
}

#[test]
fn fused_modules_share_one_type() {
    let mut parts = attention("W8A8");
    parts[1].1 = "W8A8_DYNAMIC"; // k_proj
    let p = check(&build(&[parts], 0), &setting(Target::VllmAscend, "llama"));
    let e = find(&p, "fused", "model.layers.0.self_attn.qkv_proj");
    assert!(e.detail.contains("q_proj + k_proj + v_proj") && e.detail.contains("k_proj W8A8_DYNAMIC"), "{e}");
    // A FLOAT member among quantized ones.
    let mut d = build(&[attention("W8A16")], 0);
    for n in ["weight", "weight_scale", "weight_offset"] {
        d.types.remove(&format!("{L}.self_attn.v_proj.{n}"));
        d.tensors.remove(&format!("{L}.self_attn.v_proj.{n}"));
    }
    let v = TensorMeta::new(format!("{L}.self_attn.v_proj.weight"), DType::BF16, &[512, 2048]);
    d.types.insert(v.name.clone(), FLOAT.into());
    d.tensors.insert(v.name.clone(), v);
    let p = check(&d, &setting(Target::VllmAscend, "qwen3"));
    assert!(find(&p, "fused", "model.layers.0.self_attn.qkv_proj").detail.contains("v_proj FLOAT"));
    // A member the description does not list.
    let mut d = build(&[attention("W8A16")], 0);
    d.types.retain(|n, _| !n.contains("k_proj"));
    d.tensors.retain(|n, _| !n.contains("k_proj"));
    let p = check(&d, &setting(Target::VllmAscend, "qwen3"));
    assert!(find(&p, "fused", "model.layers.0.self_attn.qkv_proj")
        .detail
        .contains("k_proj.weight has no description entry"));
    // gate/up.
    let mlp = vec![
        (format!("{L}.mlp.gate_proj"), "W8A8", 6144, 2048),
        (format!("{L}.mlp.up_proj"), "W8A16", 6144, 2048),
        (format!("{L}.mlp.down_proj"), "W8A16", 2048, 6144),
    ];
    let p = check(&build(&[mlp], 0), &setting(Target::VllmAscend, "qwen3"));
    find(&p, "fused", "model.layers.0.mlp.gate_up_proj");
    // MLA: q_a_proj and kv_a_proj_with_mqa are one fused layer for DeepSeek-V3, not for a family without it.
    let mla = vec![
        (format!("{L}.self_attn.q_a_proj"), "W8A8_DYNAMIC", 1536, 7168),
        (format!("{L}.self_attn.kv_a_proj_with_mqa"), "W8A16", 576, 7168),
    ];
    let p = check(&build(std::slice::from_ref(&mla), 0), &setting(Target::VllmAscend, "deepseek_v3"));
    find(&p, "fused", "model.layers.0.self_attn.fused_qkv_a_proj");
    assert_eq!(check(&build(&[mla], 0), &setting(Target::VllmAscend, "llama")), vec![]);
    // Without q_lora_rank (DeepSeek-V2-Lite) there is no q_a_proj and vLLM fuses nothing.
    let lite = vec![
        (format!("{L}.self_attn.q_proj"), "W8A8_DYNAMIC", 3072, 2048),
        (format!("{L}.self_attn.kv_a_proj_with_mqa"), "W8A8_DYNAMIC", 576, 2048),
    ];
    assert_eq!(check(&build(&[lite], 0), &setting(Target::VllmAscend, "deepseek_v2")), vec![]);
}

#[test]
fn every_expert_of_a_layer_shares_one_type() {
    let mut parts = experts("W4A8_DYNAMIC", 3);
    parts[7].1 = "W8A8_DYNAMIC"; // experts.2.up_proj
    let p = check(&build(&[parts], 0), &setting(Target::VllmAscend, "qwen3_moe"));
    let e = find(&p, "fused", "model.layers.0.mlp.experts");
    assert!(
        e.detail.contains("typed from expert 0") && e.detail.contains("W8A8_DYNAMIC: 1 linear(s), e.g. 2.up_proj"),
        "{e}"
    );
    // Another layer's experts may have another type (msModelSlim's qwen3-30b-w4a8 keeps the last layers 8-bit).
    let mut other = experts("W8A8_DYNAMIC", 2);
    for x in other.iter_mut() {
        x.0 = x.0.replace("layers.0", "layers.1");
    }
    assert_eq!(
        check(&build(&[experts("W4A8_DYNAMIC", 2), other], 0), &setting(Target::VllmAscend, "qwen3_moe")),
        vec![]
    );
    // A MoE family without an "experts" entry in vLLM-Ascend's table cannot load quantized experts.
    let p = check(&build(&[experts("W8A8_DYNAMIC", 1)], 0), &setting(Target::VllmAscend, "qwen2_moe"));
    assert!(find(&p, "fused", "model.layers.0.mlp.experts").detail.contains("no \"experts\" entry"));
}

#[test]
fn names_dtypes_and_shapes_per_type() {
    let base = build(&[attention("W8A8")], 0);
    let s = setting(Target::VllmAscend, "qwen3");
    // A missing required tensor.
    let mut d = base.clone();
    d.types.remove("model.layers.0.self_attn.o_proj.quant_bias");
    d.tensors.remove("model.layers.0.self_attn.o_proj.quant_bias");
    assert!(find(&check(&d, &s), "tensors", "model.layers.0.self_attn.o_proj.quant_bias").detail.contains("missing"));
    // A tensor the type does not have.
    let mut d = base.clone();
    let extra = TensorMeta::new("model.layers.0.self_attn.o_proj.scale_bias", DType::F32, &[2048, 16]);
    d.types.insert(extra.name.clone(), "W8A8".into());
    d.tensors.insert(extra.name.clone(), extra);
    assert!(find(&check(&d, &s), "names", "model.layers.0.self_attn.o_proj.scale_bias")
        .detail
        .contains("no tensor `scale_bias`"));
    // Wrong shape, wrong dtype.
    let mut d = base.clone();
    d.tensors.get_mut("model.layers.0.self_attn.q_proj.quant_bias").unwrap().shape = vec![4096, 1];
    d.tensors.get_mut("model.layers.0.self_attn.q_proj.weight").unwrap().dtype = DType::BF16;
    let p = check(&d, &s);
    assert!(find(&p, "shapes", "model.layers.0.self_attn.q_proj.quant_bias").detail.contains("[4096]"));
    assert!(find(&p, "dtypes", "model.layers.0.self_attn.q_proj.weight").detail.contains("reads I8"));
    // W4A8's packed weight is [out/2, in]; its row-parallel scale_bias has 16 columns.
    let d = build(&[experts("W4A8_DYNAMIC", 1)], 0);
    assert_eq!(d.tensors["model.layers.0.mlp.experts.0.up_proj.weight"].shape, vec![384, 2048]);
    assert_eq!(d.tensors["model.layers.0.mlp.experts.0.down_proj.scale_bias"].shape, vec![2048, 16]);
    assert_eq!(d.tensors["model.layers.0.mlp.experts.0.up_proj.scale_bias"].shape, vec![768, 1]);
    // Undescribed tensors, described ghosts, unknown types.
    let mut d = base.clone();
    d.types.remove("model.norm.weight");
    d.types.insert("model.layers.0.ghost.weight".into(), FLOAT.into());
    let t = TensorMeta::new("model.layers.0.mlp.gate_proj.weight", DType::I8, &[8, 8]);
    d.types.insert(t.name.clone(), "W3A5".into());
    d.tensors.insert(t.name.clone(), t);
    let p = check(&d, &s);
    assert!(find(&p, "described", "model.norm.weight").detail.contains("not in quant_model_description.json"));
    assert!(find(&p, "described", "model.layers.0.ghost.weight").detail.contains("no weights file"));
    assert!(find(&p, "types", "model.layers.0.mlp.gate_proj").detail.contains("W3A5"));
}

#[test]
fn global_keys() {
    let mut d = build(&[attention("W8A8_DYNAMIC"), experts("W4A8_DYNAMIC", 1)], 0);
    // W4A8_DYNAMIC is hidden from model_quant_type: the other linears' type.
    assert_eq!(d.globals["model_quant_type"], "W8A8_DYNAMIC");
    let s = setting(Target::VllmAscend, "qwen3_moe");
    assert_eq!(check(&d, &s), vec![]);
    d.globals.insert("model_quant_type".into(), json!("W8A16"));
    assert!(find(&check(&d, &s), "globals", "model_quant_type")
        .detail
        .contains("strongest type present is W8A8_DYNAMIC"));
    d.globals.remove("model_quant_type");
    d.globals.remove("group_size");
    let p = check(&d, &s);
    find(&p, "globals", "model_quant_type");
    find(&p, "globals", "group_size");
}

fn c8(d: &mut Described, layers: usize, channels: usize) {
    for l in 0..layers {
        for n in ["k_proj.kv_cache_scale", "k_proj.kv_cache_offset", "v_proj.kv_cache_scale", "v_proj.kv_cache_offset"]
        {
            let t = TensorMeta::new(format!("model.layers.{l}.self_attn.{n}"), DType::F32, &[channels]);
            d.types.insert(t.name.clone(), "C8".into());
            d.tensors.insert(t.name.clone(), t);
        }
    }
    d.globals.insert("kv_cache_type".into(), json!("C8"));
    d.globals.insert("kv_quant_type".into(), json!("C8"));
}

#[test]
fn c8_kv_cache_scales() {
    let s = setting(Target::VllmAscend, "qwen3");
    let mut d = build(&[attention("W8A8")], 0);
    c8(&mut d, 1, 512);
    assert_eq!(check(&d, &s), vec![]);
    // The switch without the tensors, the tensors without the switch, the wrong channel count.
    let mut no_tensors = d.clone();
    no_tensors.types.retain(|n, _| !n.contains("kv_cache"));
    no_tensors.tensors.retain(|n, _| !n.contains("kv_cache"));
    let p = check(&no_tensors, &s);
    assert!(find(&p, "C8", "model.layers.0.self_attn.v_proj.kv_cache_offset").detail.contains("missing"));
    let mut no_switch = d.clone();
    no_switch.globals.remove("kv_cache_type");
    let p = check(&no_switch, &s);
    assert!(p.iter().any(|x| x.rule == "C8" && x.detail.contains("kv_cache_type is not \"C8\"")), "{}", report(&p));
    let mut wrong = build(&[attention("W8A8")], 0);
    c8(&mut wrong, 1, 128);
    let p = check(&wrong, &s);
    assert!(find(&p, "C8", "model.layers.0.self_attn.k_proj.kv_cache_scale").detail.contains("= 512"));
    // A per-tensor scale (one value) is read too.
    let mut one = build(&[attention("W8A8")], 0);
    c8(&mut one, 1, 1);
    assert_eq!(check(&one, &s), vec![]);
    // msModelSlim v1 stores offsets as int32 and v0 described the tensors with the linear's type; the loader
    // reads neither (it casts to the serving dtype and finds C8 layers by name). An integer scale is refused.
    let mut v1 = d.clone();
    let off = "model.layers.0.self_attn.k_proj.kv_cache_offset";
    v1.tensors.get_mut(off).unwrap().dtype = DType::I32;
    v1.types.insert(off.into(), "W8A8".into());
    assert_eq!(check(&v1, &s), vec![]);
    let scale = "model.layers.0.self_attn.v_proj.kv_cache_scale";
    v1.tensors.get_mut(scale).unwrap().dtype = DType::I32;
    assert!(find(&check(&v1, &s), "C8", scale).detail.contains("a C8 scale is float"));
    // vLLM-Ascend's C8 decode needs heads of a multiple of 32 channels; MindIE does not.
    let small = Setting { head_dim: Some(16), kv_channels: Some(512), ..s.clone() };
    assert!(find(&check(&d, &small), "C8", "kv_cache_type").detail.contains("_nz_5d_view"));
    assert_eq!(check(&d, &Setting { target: Target::MindIe, ..small }), vec![]);
    // lamina's own layout is what the rules ask.
    let mut own = build(&[attention("W8A8")], 0);
    for o in kv_cache_layout("model.layers.0.self_attn", 512, 512) {
        own.types.insert(o.meta.name.clone(), o.kind.into());
        own.tensors.insert(o.meta.name.clone(), o.meta);
    }
    own.globals.insert("kv_cache_type".into(), json!("C8"));
    assert_eq!(check(&own, &s), vec![]);
}

struct Fixed(BTreeMap<String, Vec<f32>>);

impl Values for Fixed {
    fn f32s(&self, name: &str) -> anyhow::Result<Vec<f32>> {
        self.0.get(name).cloned().ok_or_else(|| anyhow::anyhow!("absent"))
    }
}

#[test]
fn numeric_rules() {
    let mut d = build(&[attention("W8A8")], 0);
    c8(&mut d, 1, 512);
    let mut v = BTreeMap::new();
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        v.insert(format!("{L}.self_attn.{p}.input_scale"), vec![0.02]);
        v.insert(format!("{L}.self_attn.{p}.input_offset"), vec![-5.0]);
    }
    for n in ["k_proj", "v_proj"] {
        v.insert(format!("{L}.self_attn.{n}.kv_cache_scale"), vec![0.1; 512]);
        v.insert(format!("{L}.self_attn.{n}.kv_cache_offset"), vec![0.0; 512]);
    }
    let s = setting(Target::VllmAscend, "qwen3");
    assert_eq!(check_values(&d, &s, &Fixed(v.clone())), vec![]);
    // q/k/v are one fused layer with one activation quantizer.
    let mut w = v.clone();
    w.insert(format!("{L}.self_attn.k_proj.input_scale"), vec![0.03]);
    w.insert(format!("{L}.self_attn.o_proj.input_offset"), vec![2.5]);
    let p = check_values(&d, &s, &Fixed(w));
    assert!(find(&p, "fused", "model.layers.0.self_attn.qkv_proj").detail.contains("different input scales"));
    assert!(find(&p, "values", "model.layers.0.self_attn.o_proj.input_offset").detail.contains("integer"));
    // Asymmetric C8: vLLM-Ascend's decode ignores offsets; MindIE reads them.
    let mut w = v.clone();
    w.insert(format!("{L}.self_attn.k_proj.kv_cache_offset"), vec![3.0; 512]);
    w.insert(format!("{L}.self_attn.v_proj.kv_cache_scale"), vec![0.0; 512]);
    let p = check_values(&d, &s, &Fixed(w.clone()));
    assert!(find(&p, "C8", "model.layers.0.self_attn.k_proj.kv_cache_offset").detail.contains("Scale-only"));
    find(&p, "values", "model.layers.0.self_attn.v_proj.kv_cache_scale");
    let p = check_values(&d, &setting(Target::MindIe, "qwen3"), &Fixed(w));
    assert_eq!(rules_broken(&p), vec!["values"]);
}

#[test]
fn the_report_lists_identical_findings_once() {
    let p = check(&build(&[experts("W8A16", 4)], 0), &setting(Target::VllmAscend, "qwen3_moe"));
    let r = report(&p);
    assert_eq!(r.lines().filter(|l| l.contains("[layer kind]")).count(), 1, "{r}");
    assert!(r.contains("and 9 more"), "{r}");
}

/// Every group of linears a lamina decoder layer says a server fuses ([`crate::model::decoder::LayerGraph`]'s
/// `fused`) is one the loader table knows for the family, so the fused-consistency rule covers it. A new
/// family whose graph fuses modules vLLM-Ascend's table does not list fails here until the table says how
/// its loader fuses them.
#[test]
fn the_loader_table_covers_every_fused_group_of_every_family() {
    use crate::model::{decoder, Model};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for f in crate::model::layout::Family::ALL {
        let name = f.model_type();
        // The fixtures are named by model_type, but Qwen (1)'s "qwen" is tests/fixtures/qwen1 and
        // transformers' `-hf` InternVL's "internvl" is tests/fixtures/internvl_hf.
        let dir = match f {
            crate::model::layout::Family::Qwen => "qwen1",
            crate::model::layout::Family::InternVl => "internvl_hf",
            _ => name,
        };
        let Ok(text) = std::fs::read_to_string(fixtures.join(dir).join("config.json")) else {
            panic!("no fixture config for family {name}");
        };
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let model = Model::new(&config, None, &[]).unwrap();
        // The loader's table is keyed by config.json's model_type (Qwen-VL's is "qwen").
        let fam = family(config.get("model_type").and_then(|t| t.as_str()).unwrap_or(name));
        for i in 0..model.text.num_layers {
            for group in decoder::graph(&model, i).fused {
                if group.iter().all(|m| LayerKind::of(m) == LayerKind::Expert) {
                    assert!(
                        fam.experts || MOE_WITHOUT_EXPERTS_ENTRY.contains(&name),
                        "{name}: layer {i} fuses experts but the table has no \"experts\" entry"
                    );
                    continue;
                }
                let leaves: Vec<&str> = group.iter().map(|m| m.rsplit('.').next().unwrap()).collect();
                assert!(
                    fam.packed.iter().any(|(_, members)| leaves.iter().all(|l| members.contains(l))),
                    "{name}: layer {i} fuses {group:?}, which no packed entry of the loader table covers"
                );
            }
        }
    }
}

#[test]
fn the_readme_table_is_the_rules_table() {
    let readme = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table = markdown_table();
    assert!(readme.contains(&table), "README.md's loader table differs from the rules; paste this:\n{table}");
}

#[test]
fn asymmetric_w4a16_loads_in_mindie_only() {
    // vLLM-Ascend's W4A16 experts build zero offsets (methods/w4a16.py): a written weight_offset
    // would be dropped. MindIE takes it.
    let linears: Vec<(String, &'static str, usize, usize)> = experts("W4A16", 1);
    let mut outs = Vec::new();
    for (m, kind, o, i) in &linears {
        outs.extend(linear_layout(kind, m, *o, *i, i / 128, DType::BF16, &["weight_offset"]));
    }
    let offsets: Vec<&str> =
        outs.iter().map(|o| o.meta.name.as_str()).filter(|n| n.ends_with("weight_offset")).collect();
    assert_eq!(offsets.len(), 3, "the optional offset is laid out when asked for");
    let mut g = Map::new();
    g.insert("model_quant_type".into(), json!("W4A16"));
    g.insert("version".into(), json!("1.0.0"));
    g.insert("group_size".into(), json!(128));
    let d = Described::planned(&outs, g);
    let p = check(&d, &setting(Target::VllmAscend, "qwen3_moe"));
    assert_eq!(rules_broken(&p), ["asymmetric"], "{}", report(&p));
    assert!(find(&p, "asymmetric", &format!("{L}.mlp.experts.0.down_proj.weight_offset")).detail.contains("w4a16.py"));
    assert_eq!(check(&d, &setting(Target::MindIe, "qwen3_moe")), vec![]);
}

#[test]
fn w8a8s_is_static_w8a8_with_an_int64_deq_scale() {
    // 310P's W8A8S scheme creates deq_scale as int64 whatever the serving dtype (310P serves float16).
    let d = build(&[attention("W8A8S")], 0);
    let name = format!("{L}.self_attn.q_proj.deq_scale");
    assert_eq!(d.tensors[&name].dtype, DType::I64);
    assert_eq!(check(&d, &setting(Target::VllmAscend, "qwen3")), vec![]);
    assert_eq!(d.globals["model_quant_type"], "W8A8S");
    let mut f32_deq = d.clone();
    f32_deq.tensors.get_mut(&name).unwrap().dtype = DType::F32;
    assert!(find(&check(&f32_deq, &setting(Target::VllmAscend, "qwen3")), "dtypes", &name).detail.contains("I64"));
    // W8A8S has no MoE scheme.
    let p = check(&build(&[experts("W8A8S", 1)], 0), &setting(Target::VllmAscend, "qwen3_moe"));
    assert!(rules_broken(&p).contains(&"layer kind"), "{}", report(&p));
}

/// GLM-4.1V (vLLM's glm4_1v.py): the vision attention is looked up as q/k/v_proj and every SwiGLU as
/// gate_up_proj. msModelSlim's practice output (the tower float, text linears W8A8) loads on vLLM-Ascend
/// only with those names described, with the types of the linears they stand for; MindIE does not look
/// them up. GLM-4.5V's table entry packs gate_proj + up_proj, so only the vision q/k/v names are needed.
#[test]
fn glm4v_lookups_under_vllm_names() {
    let v = "model.visual.blocks.0";
    let t = "model.language_model.layers.0";
    let linears = [
        (format!("{v}.attn.qkv"), FLOAT, 4608, 1536),
        (format!("{v}.mlp.gate_proj"), FLOAT, 4096, 1536),
        (format!("{v}.mlp.up_proj"), FLOAT, 4096, 1536),
        (format!("{t}.mlp.gate_proj"), "W8A8", 13696, 4096),
        (format!("{t}.mlp.up_proj"), "W8A8", 13696, 4096),
    ];
    let outs: Vec<OutMeta> = linears
        .iter()
        .flat_map(|(m, k, o, i)| {
            if *k == FLOAT {
                vec![OutMeta { meta: TensorMeta::new(format!("{m}.weight"), DType::BF16, &[*o, *i]), kind: FLOAT }]
            } else {
                linear_layout(k, m, *o, *i, 1, DType::BF16, &[])
            }
        })
        .collect();
    let mut g = Map::new();
    g.insert("model_quant_type".into(), json!("W8A8"));
    g.insert("version".into(), json!("1.0.0"));
    g.insert("group_size".into(), json!(0));
    let bare = Described::planned(&outs, g.clone());
    let vllm = setting(Target::VllmAscend, "glm4v");
    let p = check(&bare, &vllm);
    for key in ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_up_proj"] {
        find(&p, "lookup", &format!("{v}.{key}.weight"));
    }
    find(&p, "lookup", &format!("{t}.mlp.gate_up_proj.weight"));
    assert!(check(&bare, &setting(Target::MindIe, "glm4v")).is_empty());

    let full = Described::planned(&outs, g.clone()).with_lookup_aliases("glm4v").unwrap();
    assert_eq!(full.types[&format!("{t}.mlp.gate_up_proj.weight")], "W8A8");
    assert_eq!(full.types[&format!("{v}.attn.k_proj.weight")], FLOAT);
    assert!(check(&full, &vllm).is_empty(), "{}", report(&check(&full, &vllm)));

    // A gate and an up of different types cannot stand behind one gate_up_proj.
    let mut mixed = outs.clone();
    mixed.retain(|o| !o.meta.name.starts_with(&format!("{v}.mlp.up_proj")));
    mixed.extend(linear_layout("W8A8", &format!("{v}.mlp.up_proj"), 4096, 1536, 1, DType::BF16, &[]));
    assert!(Described::planned(&mixed, g.clone()).with_lookup_aliases("glm4v").is_err());

    let moe = Described::planned(&outs, g).with_lookup_aliases("glm4v_moe").unwrap();
    assert!(moe.types.contains_key(&format!("{v}.attn.q_proj.weight")));
    assert!(!moe.types.contains_key(&format!("{t}.mlp.gate_up_proj.weight")));
    assert!(lookup_aliases("qwen2_5_vl", "visual.blocks.0.attn.qkv").is_empty());
}

/// transformers' `-hf` InternVL (`internvl`): vLLM serves it with InternS1ForConditionalGeneration,
/// whose vision tower and projector load float weights only (interns1_vit.py: `q_proj` / `k_proj` /
/// `v_proj` / `projection_layer` are `nn.Linear`, `InternS1VisionEncoder` is built without
/// `quant_config`; interns1.py: `InternS1MultiModalProjector` is `nn.Linear`): a quantized vision
/// linear is refused for vLLM-Ascend, the text model's are not, and the remote-code layout
/// (`internvl_chat`, served by vLLM's internvl.py with a quantizable InternViT) is not concerned.
#[test]
fn the_hf_internvl_vision_tower_stays_float_for_vllm_ascend() {
    let d = output(
        &[
            ("model.vision_tower.encoder.layer.0.mlp.fc1", "W8A8", 4096, 1024),
            ("model.multi_modal_projector.linear_1", "W8A8", 2048, 4096),
            ("model.language_model.layers.0.mlp.gate_proj", "W8A8", 4096, 2048),
            ("model.language_model.layers.0.mlp.up_proj", "W8A8", 4096, 2048),
        ],
        0,
    );
    let p = check(&d, &setting(Target::VllmAscend, "internvl"));
    let float_only: Vec<&str> = p.iter().filter(|x| x.rule == "float-only").map(|x| x.subject.as_str()).collect();
    assert_eq!(float_only, ["model.multi_modal_projector.linear_1", "model.vision_tower.encoder.layer.0.mlp.fc1"]);
    assert!(find(&p, "float-only", "model.vision_tower.encoder.layer.0.mlp.fc1").detail.contains("interns1_vit.py"));
    for (target, model_type) in [(Target::VllmAscend, "internvl_chat"), (Target::MindIe, "internvl")] {
        assert!(!rules_broken(&check(&d, &setting(target, model_type))).contains(&"float-only"), "{model_type}");
    }
}
