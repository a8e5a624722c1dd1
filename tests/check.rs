//! Outputs that load where users serve them: `lamina check` on folders written the way msModelSlim's
//! saver writes them (each loader rule broken once), the loader rules deciding on paper what loads for
//! real models' sizes, and the save folder's lock.

mod common;

use common::calibrated::write_calib_ids;
use common::check::check_output;
use common::check::Scheme;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

fn i8s(shape: &[usize], rng: &mut Rng) -> St {
    let n: usize = shape.iter().product();
    St {
        dtype: "I8".into(),
        shape: shape.to_vec(),
        data: (0..n).map(|_| (rng.below(255) as i64 - 127) as i8 as u8).collect(),
    }
}

fn f32s(shape: &[usize], v: f32) -> St {
    let n: usize = shape.iter().product();
    St { dtype: "F32".into(), shape: shape.to_vec(), data: (0..n).flat_map(|_| v.to_le_bytes()).collect() }
}

fn f16s(shape: &[usize], v: f32) -> St {
    let n: usize = shape.iter().product();
    St {
        dtype: "F16".into(),
        shape: shape.to_vec(),
        data: (0..n).flat_map(|_| half::f16::from_f32(v).to_le_bytes()).collect(),
    }
}

fn ints(dtype: &str, shape: &[usize], v: &[i64]) -> St {
    let data = match dtype {
        "I32" => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    };
    St { dtype: dtype.into(), shape: shape.to_vec(), data }
}

/// A one-layer Qwen3 (hidden 64, 4 heads / 2 KV heads of 16) as msModelSlim's v1 saver writes a W8A8 +
/// C8 practice for a float16 model (lab_practice/qwen3/qwen3-32b-dense-w8a8c8 without the pd-mix): static
/// W8A8 attention and gate/up (`on_w8a8_static`: deq_scale as int64 bits, `deqscale2int64`), W8A16 down_proj
/// (`on_w8a16_static_per_channel`), the KV cache's four C8 tensors (`on_dynamic_cache`), everything else
/// FLOAT, `kv_cache_type` / `kv_quant_type` "C8".
fn msmodelslim_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Rng::new(11);
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "float16",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": false
    });
    write_json(&dir.join("config.json"), &config);
    let mut t: BTreeMap<String, St> = BTreeMap::new();
    let mut desc = serde_json::Map::new();
    let mut put = |t: &mut BTreeMap<String, St>, name: String, kind: &str, st: St| {
        desc.insert(name.clone(), json!(kind));
        t.insert(name, st);
    };
    put(&mut t, "model.embed_tokens.weight".into(), "FLOAT", f16s(&[100, 64], 0.01));
    put(&mut t, "model.norm.weight".into(), "FLOAT", f16s(&[64], 1.0));
    put(&mut t, "lm_head.weight".into(), "FLOAT", f16s(&[100, 64], 0.01));
    let l = "model.layers.0";
    for n in ["input_layernorm", "post_attention_layernorm"] {
        put(&mut t, format!("{l}.{n}.weight"), "FLOAT", f16s(&[64], 1.0));
    }
    for n in ["q_norm", "k_norm"] {
        put(&mut t, format!("{l}.self_attn.{n}.weight"), "FLOAT", f16s(&[16], 1.0));
    }
    let statics = [
        ("self_attn.q_proj", 64, 64, 0.02f32),
        ("self_attn.k_proj", 32, 64, 0.02),
        ("self_attn.v_proj", 32, 64, 0.02),
        ("self_attn.o_proj", 64, 64, 0.05),
        ("mlp.gate_proj", 128, 64, 0.03),
        ("mlp.up_proj", 128, 64, 0.03),
    ];
    for (m, o, i, sx) in statics {
        let m = format!("{l}.{m}");
        put(&mut t, format!("{m}.weight"), "W8A8", i8s(&[o, i], &mut rng));
        put(&mut t, format!("{m}.quant_bias"), "W8A8", ints("I32", &[o], &vec![0; o]));
        put(&mut t, format!("{m}.input_scale"), "W8A8", f32s(&[1], sx));
        put(&mut t, format!("{m}.input_offset"), "W8A8", f32s(&[1], -3.0));
        let deq: Vec<i64> = (0..o).map(|_| (sx * 0.004).to_bits() as i32 as i64).collect();
        put(&mut t, format!("{m}.deq_scale"), "W8A8", ints("I64", &[o], &deq));
    }
    let m = format!("{l}.mlp.down_proj");
    put(&mut t, format!("{m}.weight"), "W8A16", i8s(&[64, 128], &mut rng));
    put(&mut t, format!("{m}.weight_scale"), "W8A16", f32s(&[64, 1], 0.004));
    put(&mut t, format!("{m}.weight_offset"), "W8A16", f32s(&[64, 1], 0.0));
    for p in ["k_proj", "v_proj"] {
        put(&mut t, format!("{l}.self_attn.{p}.kv_cache_scale"), "C8", f32s(&[32], 0.05));
        put(&mut t, format!("{l}.self_attn.{p}.kv_cache_offset"), "C8", f32s(&[32], 0.0));
    }
    for (k, v) in [
        ("kv_cache_type", json!("C8")),
        ("kv_quant_type", json!("C8")),
        ("version", json!("1.0.0")),
        ("model_quant_type", json!("W8A8")),
        ("metadata", json!({})),
        ("group_size", json!(0)),
        ("optional", json!({})),
    ] {
        desc.insert(k.into(), v);
    }
    write_json(&dir.join("quant_model_description.json"), &serde_json::Value::Object(desc));
    // Two shards and their index, as msModelSlim's BufferedSafetensorsWriter splits them.
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    let mut map = serde_json::Map::new();
    for (k, (n, st)) in t.into_iter().enumerate() {
        let (file, part) = if k % 2 == 0 {
            ("quant_model_weights-00001-of-00002.safetensors", &mut a)
        } else {
            ("quant_model_weights-00002-of-00002.safetensors", &mut b)
        };
        map.insert(n.clone(), json!(file));
        part.insert(n, st);
    }
    write_st(&dir.join("quant_model_weights-00001-of-00002.safetensors"), &a);
    write_st(&dir.join("quant_model_weights-00002-of-00002.safetensors"), &b);
    write_json(
        &dir.join("quant_model_weights.safetensors.index.json"),
        &json!({"metadata": {"total_size": 0}, "weight_map": map}),
    );
}

/// Rewrites one tensor wherever it is, keeping its description entry.
fn replace_tensor(dir: &Path, name: &str, st: St) {
    for f in ["quant_model_weights-00001-of-00002.safetensors", "quant_model_weights-00002-of-00002.safetensors"] {
        let mut all = read_st(&dir.join(f));
        if all.contains_key(name) {
            all.insert(name.into(), st);
            write_st(&dir.join(f), &all);
            return;
        }
    }
    panic!("no tensor {name}");
}

fn edit_description(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("quant_model_description.json");
    let mut d = read_json(&path);
    f(d.as_object_mut().unwrap());
    write_json(&path, &d);
}

fn assert_problem(out: &Path, extra: &[&str], needles: &[&str]) {
    let r = check(out, extra);
    assert_eq!(r.code, Some(1), "lamina check should list problems:\n{}\n{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for n in needles {
        assert!(r.stdout.contains(n), "the report does not mention {n:?}:\n{}", r.stdout);
    }
}

#[test]
fn check_reads_msmodelslim_outputs_and_names_each_broken_rule() {
    let tmp = TempDir::new("check-msmodelslim");
    let good = tmp.join("good");
    msmodelslim_folder(&good);
    let r = check(&good, &[]);
    r.assert_ok();
    assert!(r.stdout.contains("ok: vLLM-Ascend loads") && r.stdout.contains("C8 KV cache"), "{}", r.stdout);
    assert!(r.stdout.contains("serving dtype float16"), "{}", r.stdout);

    // Served in bfloat16, int64 deq_scale reads as garbage.
    assert_problem(
        &good,
        &["--serving_dtype", "bfloat16"],
        &["[deq_scale dtype]", "deq_scale and 3 more: is I64", "loader creates deq_scale as F32"],
    );
    // A bf16-style (f32) deq_scale in a float16 model.
    let case = |name: &str| {
        let d = tmp.join(name);
        copy_dir(&good, &d);
        d
    };
    let d = case("f32-deq");
    replace_tensor(&d, "model.layers.0.self_attn.o_proj.deq_scale", f32s(&[64], 1e-4));
    assert_problem(&d, &[], &["[deq_scale dtype]", "o_proj.deq_scale", "is F32", "float16"]);
    // q/k/v typed differently.
    let d = case("fused");
    edit_description(&d, |m| {
        for s in ["weight", "quant_bias", "input_scale", "input_offset", "deq_scale"] {
            m.insert(format!("model.layers.0.self_attn.k_proj.{s}"), json!("W8A8_MIX"));
        }
    });
    assert_problem(&d, &[], &["[fused]", "self_attn.qkv_proj", "k_proj W8A8_MIX", "[tensors]", "k_proj.weight_scale"]);
    // Different activation quantizers inside one fused module.
    let d = case("fused-scales");
    replace_tensor(&d, "model.layers.0.mlp.up_proj.input_scale", f32s(&[1], 0.07));
    assert_problem(&d, &[], &["[fused]", "mlp.gate_up_proj", "different input scales"]);
    // A tensor the description does not list, and a described one no file holds.
    let d = case("undescribed");
    edit_description(&d, |m| {
        m.remove("model.norm.weight");
        m.insert("model.layers.0.mlp.down_proj.bias".into(), json!("FLOAT"));
    });
    assert_problem(
        &d,
        &[],
        &[
            "model.norm.weight: is in the weights but not in quant_model_description.json",
            "down_proj.bias: is described but no weights file holds it",
        ],
    );
    // Asymmetric C8: vLLM-Ascend's decode ignores the offsets; MindIE reads them.
    let d = case("c8-asym");
    replace_tensor(&d, "model.layers.0.self_attn.v_proj.kv_cache_offset", f32s(&[32], 2.0));
    assert_problem(&d, &[], &["[C8]", "v_proj.kv_cache_offset", "Scale-only"]);
    check(&d, &["--target", "mindie"]).assert_ok();
    // C8 scales without the switch; with the wrong channel count.
    let d = case("c8-switch");
    edit_description(&d, |m| {
        m.remove("kv_cache_type");
    });
    assert_problem(&d, &[], &["[C8]", "kv_cache_type is not \"C8\""]);
    let d = case("c8-channels");
    replace_tensor(&d, "model.layers.0.self_attn.k_proj.kv_cache_scale", f32s(&[64], 0.05));
    assert_problem(&d, &[], &["[C8]", "k_proj.kv_cache_scale", "num_key_value_heads × head_dim = 32"]);
    // W8A16 on a layer vLLM-Ascend fuses into a MoE layer is refused; here: per-group W8A16 scales.
    let d = case("per-group");
    replace_tensor(&d, "model.layers.0.mlp.down_proj.weight_scale", f32s(&[64, 4], 0.004));
    replace_tensor(&d, "model.layers.0.mlp.down_proj.weight_offset", f32s(&[64, 4], 0.0));
    assert_problem(&d, &[], &["[group size]", "4 groups per row", "--target mindie", "group_size: is 0"]);
    // The index naming a file that is not there, and a corrupt shard: problems, not crashes.
    let d = case("files");
    std::fs::remove_file(d.join("quant_model_weights-00002-of-00002.safetensors")).unwrap();
    assert_problem(&d, &[], &["[files]", "00002-of-00002.safetensors: is named by", "does not exist"]);
    let d = case("corrupt");
    let p = d.join("quant_model_weights-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[0..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&p, bytes).unwrap();
    assert_problem(&d, &[], &["[files]", "header length"]);
    // Not an output at all.
    let r = check(&fixture("qwen3"), &[]);
    r.assert_fails_with(&["quant_model_description.json", "not an Ascend-format"]);
}

/// The loader rules on the sizes of real models, from their config.json alone: what loads depends on
/// whether hidden and intermediate sizes divide into W4A16's groups of 128 (SmolLM2-135M's 576 does not),
/// and on which layer kinds each server registers a type for.
#[test]
fn real_model_sizes_decide_what_loads() {
    let cfg = |n: &str| fixture("configs").join(n).display().to_string();
    let plan = |config: &str, q: &str, target: &str| {
        run(&["plan", "--model_path", config, "--quant_type", q, "--target", target, "--memory_budget", "64"], &[])
    };
    // Qwen3-VL-30B-A3B (hidden 2048, 128 experts of 768): every 4-bit type loads for both servers.
    for (q, target, recipe, types) in [
        ("w4a16", "vllm-ascend", "default-w4a16", "18432 W4A16"),
        ("w4a8_dynamic", "vllm-ascend", "default-w4a8_dynamic", "18432 W4A8_DYNAMIC"),
        ("w4a16", "mindie", "mindie-w4a16", "W4A16"),
        ("w8a16", "vllm-ascend", "default-w8a16", "18432 W8A8_DYNAMIC"),
    ] {
        let r = plan(&cfg("qwen3-vl-30b-a3b"), q, target);
        r.assert_ok();
        assert!(
            r.stdout.contains(&format!("recipe       : {recipe}")) && r.stdout.contains(types),
            "{q} {target}:\n{}",
            r.stdout
        );
    }
    // C8 on real heads (128 channels): the w8a8 / w4a8_dynamic recipes plus the KV cache of every layer.
    for (q, recipe) in [("w8a8c8", "qwen3_vl_moe-w8a8+c8"), ("w4a8c8", "default-w4a8_dynamic+c8")] {
        let r = plan(&cfg("qwen3-vl-30b-a3b"), q, "vllm-ascend");
        r.assert_ok();
        assert!(
            r.stdout.contains(&format!("recipe       : {recipe}"))
                && r.stdout.contains("C8 (int8 per channel, calibrated) in 48 attention layers"),
            "{q}:\n{}",
            r.stdout
        );
    }
    // SmolLM2-135M (dense, hidden 576): no 4-bit type for vLLM-Ascend; for MindIE W4A16's groups of 128
    // do not divide 576, W4A8_DYNAMIC loads.
    let smol = cfg("smollm2-135m");
    plan(&smol, "w4a8_dynamic", "vllm-ascend").assert_fails_with(&[
        "vLLM-Ascend loads W4A8_DYNAMIC only for routed MoE experts",
        "--quant_type values whose bundled recipe loads here: w8a8, w8a8_dynamic, w8a16",
        "with --target mindie",
        "also: w4a8_dynamic",
    ]);
    plan(&smol, "w4a16", "mindie").assert_fails_with(&[
        "[divisibility]",
        "linear layer of 576 × 576",
        "divisible by group_size 128",
        "types that load here: W8A16, W8A8_DYNAMIC, W8A8, W8A8S, W4A8_DYNAMIC, W4A4_DYNAMIC",
    ]);
    plan(&smol, "w4a8_dynamic", "mindie").assert_ok();
    // A user recipe typing experts W8A16 is refused for the layer kind, naming what loads there.
    let tmp = TempDir::new("real-sizes");
    let recipe = tmp.join("experts-w8a16.yaml");
    std::fs::write(
        &recipe,
        "apiversion: modelslim_v1\nspec:\n  process:\n    - type: linear_quant\n      qconfig: {weight: {scope: per_channel, dtype: int8}}\n      include: [\"*\"]\n      exclude: [\"lm_head\", \"*mlp.gate\", \"*visual*\"]\n",
    )
    .unwrap();
    let r =
        run(&["plan", "--model_path", &cfg("qwen3-vl-30b-a3b"), "--config_path", &recipe.display().to_string()], &[]);
    r.assert_fails_with(&[
        "[layer kind]",
        "mlp.experts.0.down_proj",
        "routed MoE expert typed W8A16",
        "methods/w8a16.py",
        "a routed MoE expert loads as W8A8_DYNAMIC, W4A16, W4A8_DYNAMIC",
    ]);
}

#[test]
fn a_second_run_on_the_same_folder_is_refused_at_once() {
    let tmp = TempDir::new("lock");
    let model = fixture("qwen3_moe");
    let save = tmp.join("out");
    let release = tmp.join("release");
    // The first run stalls mid-write, holding the folder.
    let first = Command::new(BIN)
        .args(quant_args(&model, &save, "w8a8_dynamic"))
        .env("LAMINA_FAULT_STALL_AFTER_TENSORS", format!("20:{}", release.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !save.join(".lamina-journal.jsonl").exists() || snapshot(&save, true).keys().all(|k| !k.ends_with(".partial"))
    {
        assert!(t0.elapsed().as_secs() < 30, "the first run did not start writing");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = snapshot(&save, true);
    for extra in [&[][..], &["--overwrite"][..]] {
        let started = std::time::Instant::now();
        let pid = first.id().to_string();
        quant(&model, &save, "w8a8_dynamic", extra, &[]).assert_fails_with(&[
            "another lamina run",
            &pid,
            "Nothing was changed",
        ]);
        assert!(started.elapsed().as_secs() < 10, "the refusal must be immediate");
    }
    let r = check(&save, &[]);
    assert_eq!(r.code, Some(1));
    assert!(r.stdout.contains("a lamina run is writing this folder now"), "{}", r.stdout);
    assert_eq!(differing(&before, &snapshot(&save, true)), Vec::<String>::new(), "the refused runs touched the folder");
    // Released, the first run finishes as if alone.
    std::fs::write(&release, b"").unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    check_output(&model, &save, Scheme::W8A8Dynamic, None);
    check(&save, &[]).assert_ok();
    // The lock dies with its process: a killed run leaves nothing that blocks the next one.
    let killed = tmp.join("killed");
    let mut victim = Command::new(BIN)
        .args(quant_args(&model, &killed, "w8a16"))
        .env("LAMINA_FAULT_STALL_AFTER_TENSORS", format!("3:{}", tmp.join("never").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !killed.join(".lamina.lock").exists() || !killed.join(".lamina-journal.jsonl").exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    quant(&model, &killed, "w8a16", &[], &[]).assert_ok();
    check_output(&model, &killed, Scheme::W8A16, None);
}

/// `deq_scale`'s dtype is the serving dtype's (F32 for bfloat16, the F32 bits in I64 for float16): decided
/// by `--serving_dtype`, default config.json's `torch_dtype`, recorded in the description's metadata and
/// read back by `lamina check`; a float32 model needs the flag for static W8A8, which float32 cannot serve.
#[test]
fn deq_scale_follows_the_serving_dtype() {
    let tmp = TempDir::new("serving");
    let model = fixture("qwen3");
    let (bf, fp) = (tmp.join("bf16"), tmp.join("fp16"));
    let data = tmp.join("calib.jsonl");
    write_calib_ids(&model, &data, 2, 16, 1000, 3);
    let d = data.display().to_string();
    let calib = ["--calib_data", d.as_str(), "--calib_samples", "2", "--calib_seq_len", "16"];
    let r = quant(&model, &bf, "w8a8", &calib, &[]);
    r.assert_ok();
    assert!(r.stderr.contains("served in bfloat16") && r.stderr.contains("deq_scale stored as F32"), "{}", r.stderr);
    let mut extra = calib.to_vec();
    extra.extend(["--serving_dtype", "float16"]);
    let r = quant(&model, &fp, "w8a8", &extra, &[]);
    r.assert_ok();
    assert!(r.stderr.contains("deq_scale stored as I64"), "{}", r.stderr);
    let (a, b) =
        (read_st(&bf.join("quant_model_weights.safetensors")), read_st(&fp.join("quant_model_weights.safetensors")));
    let name = "model.layers.0.self_attn.q_proj.deq_scale";
    assert_eq!((a[name].dtype.as_str(), b[name].dtype.as_str()), ("F32", "I64"));
    // The same f32 values, as bits in int64 (msModelSlim's deqscale2int64).
    let bits: Vec<i64> = b[name].data.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let vals: Vec<f32> = a[name].f32s();
    assert_eq!(bits, vals.iter().map(|v| v.to_bits() as i32 as i64).collect::<Vec<_>>());
    for (dir, dtype) in [(&bf, "bfloat16"), (&fp, "float16")] {
        let desc = read_json(&dir.join("quant_model_description.json"));
        assert_eq!(desc["metadata"]["serving_dtype"], dtype);
        check(dir, &[]).assert_ok();
    }
    let r = check(&fp, &["--serving_dtype", "bfloat16"]);
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stdout.contains("[deq_scale dtype]"), "{}", r.stdout);
    // A float32 checkpoint: vLLM-Ascend creates no deq_scale in float32.
    let m = copy_fixture("qwen2", &tmp.join("fp32"));
    let path = m.join("model.safetensors");
    let converted = read_st(&path)
        .into_iter()
        .map(|(n, t)| {
            let data = t.f32s().iter().flat_map(|x| x.to_le_bytes()).collect();
            (n, St { dtype: "F32".into(), shape: t.shape, data })
        })
        .collect();
    write_st(&path, &converted);
    let mut c = read_json(&m.join("config.json"));
    c.as_object_mut().unwrap().remove("dtype");
    c["torch_dtype"] = json!("float32");
    write_json(&m.join("config.json"), &c);
    run(&["plan", "--model_path", &m.display().to_string(), "--quant_type", "w8a8"], &[])
        .assert_fails_with(&["cannot be served in float32", "--serving_dtype bfloat16 or float16"]);
    run(&["plan", "--model_path", &m.display().to_string(), "--quant_type", "w8a8", "--serving_dtype", "float16"], &[])
        .assert_ok();
    run(&["plan", "--model_path", &m.display().to_string(), "--quant_type", "w8a8_dynamic"], &[]).assert_ok();
}
