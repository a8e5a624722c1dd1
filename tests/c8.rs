//! The int8 KV cache (C8), end to end: scales measured on what the cache holds (checked against the ranges
//! transformers' DynamicCache receives, `tests/fixtures/gen/c8_reference.py`), written as msModelSlim names
//! them, accepted by `lamina check` where the loader accepts them, refused where it does not, and simulated
//! by `lamina eval`.

mod common;

use common::*;
use std::path::Path;

/// The calibration JSONL of the reference's input_ids (one record per sequence), for `--calib_samples 2
/// --calib_seq_len 16`.
fn reference_ids(model: &Path, path: &Path) -> [String; 6] {
    let r = read_st(&model.join("c8_reference.safetensors"));
    let ids: Vec<i64> =
        r["input_ids"].data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
    let lines: Vec<String> = ids.chunks(16).map(|row| serde_json::json!({ "input_ids": row }).to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    [
        "--calib_data".into(),
        path.display().to_string(),
        "--calib_samples".into(),
        "2".into(),
        "--calib_seq_len".into(),
        "16".into(),
    ]
}

fn c8_only_recipe(path: &Path, symmetric: bool) {
    std::fs::write(
        path,
        format!(
            "apiversion: modelslim_v1\nspec:\n  process:\n    - type: dynamic_cache\n      qconfig: {{scope: per_channel, dtype: int8, symmetric: {symmetric}, method: minmax}}\n      include: [\"*\"]\n"
        ),
    )
    .unwrap();
}

fn rel_err(a: f32, b: f32) -> f32 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn c8_scales_are_the_ranges_of_what_transformers_caches() {
    for fam in ["qwen3", "qwen2"] {
        let tmp = TempDir::new(&format!("c8-{fam}"));
        let model = fixture(fam);
        let calib = reference_ids(&model, &tmp.join("calib.jsonl"));
        let reference = read_st(&model.join("c8_reference.safetensors"));
        for symmetric in [true, false] {
            let recipe = tmp.join(&format!("c8-{symmetric}.yaml"));
            c8_only_recipe(&recipe, symmetric);
            let save = tmp.join(&format!("out-{symmetric}"));
            let mut args: Vec<String> = quant_args(&model, &save, "w8a8");
            args.extend(["--config_path".into(), recipe.display().to_string(), "--target".into(), "mindie".into()]);
            args.extend(calib.iter().cloned());
            let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            run(&args, &[]).assert_ok();
            let out = read_st(&save.join("quant_model_weights.safetensors"));
            let desc = read_json(&save.join("quant_model_description.json"));
            assert_eq!((desc["kv_cache_type"].as_str(), desc["kv_quant_type"].as_str()), (Some("C8"), Some("C8")));
            for layer in 0..2 {
                // Layer 0 sees the float embeddings: its ranges are transformers' exactly. Later layers see
                // the outputs of layers whose cache is already int8, a few per cent away.
                let tol = if layer == 0 { 1e-4 } else { 0.05 };
                for side in ["k", "v"] {
                    let lo = reference[&format!("layers.{layer}.{side}_min")].f32s();
                    let hi = reference[&format!("layers.{layer}.{side}_max")].f32s();
                    let name = |t: &str| format!("model.layers.{layer}.self_attn.{side}_proj.kv_cache_{t}");
                    assert_eq!(desc[name("scale")], "C8");
                    let (scale, offset) = (out[&name("scale")].f32s(), out[&name("offset")].f32s());
                    assert_eq!((scale.len(), out[&name("scale")].dtype.as_str()), (lo.len(), "F32"));
                    for j in 0..lo.len() {
                        let (l, h) = (lo[j].min(0.0), hi[j].max(0.0));
                        // msModelSlim's min-max quantizer (calculate_int_qparam), textbook form.
                        let (want_scale, want_offset) = if symmetric {
                            ((-l).max(h) / 127.0, 0.0)
                        } else {
                            let s = (h - l) / 255.0;
                            (s, (-l / s).round() - 128.0)
                        };
                        assert!(
                            rel_err(scale[j], want_scale) < tol,
                            "{fam} {} [{j}]: {} vs {want_scale}",
                            name("scale"),
                            scale[j]
                        );
                        if layer == 0 {
                            assert_eq!(offset[j], want_offset, "{fam} {} [{j}]", name("offset"));
                        }
                    }
                }
            }
            // MindIE reads either; vLLM-Ascend's C8 decode needs heads of 32 channels (the fixture's are
            // 16) and, dequantizing with the scale alone, zero offsets.
            check(&save, &["--target", "mindie"]).assert_ok();
            let r = check(&save, &[]);
            assert_eq!(r.code, Some(1), "{}", r.stdout);
            assert!(r.stdout.contains("_nz_5d_view"), "{}", r.stdout);
            assert_eq!(r.stdout.contains("Scale-only"), !symmetric, "{}", r.stdout);
        }
    }
}

#[test]
fn w8a8c8_loads_where_the_loader_allows_and_eval_simulates_the_int8_cache() {
    let tmp = TempDir::new("w8a8c8");
    let model = fixture("qwen3");
    let calib = reference_ids(&model, &tmp.join("calib.jsonl"));
    let calib: Vec<&str> = calib.iter().map(|s| s.as_str()).collect();
    // vLLM-Ascend: refused before anything is written, naming the limit and the target that loads it.
    let refused = tmp.join("refused");
    quant(&model, &refused, "w8a8c8", &calib, &[]).assert_fails_with(&[
        "would not load in vLLM-Ascend",
        "head_dim 16 does not divide by 32",
        "--target mindie",
    ]);
    assert_no_complete_output(&refused);
    let plain = tmp.join("w8a8");
    quant(&model, &plain, "w8a8", &[&calib[..], &["--target", "mindie"]].concat(), &[]).assert_ok();
    let save = tmp.join("w8a8c8");
    let r = quant(&model, &save, "w8a8c8", &[&calib[..], &["--target", "mindie"]].concat(), &[]);
    r.assert_ok();
    check(&save, &["--target", "mindie"]).assert_ok();
    let desc = read_json(&save.join("quant_model_description.json"));
    assert_eq!(desc["model_quant_type"], "W8A8");
    assert_eq!(desc["kv_cache_type"], "C8");
    // The linears are the w8a8 recipe's: same types (GPTQ and smoothing see the same data).
    let plain_desc = read_json(&plain.join("quant_model_description.json"));
    for (k, v) in plain_desc.as_object().unwrap() {
        if k.ends_with(".weight") {
            assert_eq!(&desc[k], v, "{k}");
        }
    }
    let error = |out: &Path| -> (f64, f64) {
        let inputs = model.join("reference.safetensors");
        let r = run(
            &[
                "eval",
                "--model_path",
                model.to_str().unwrap(),
                "--quantized",
                out.to_str().unwrap(),
                "--inputs",
                inputs.to_str().unwrap(),
            ],
            &[],
        );
        r.assert_ok();
        let value = |label: &str| -> f64 {
            let line =
                r.stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label}: {}", r.stdout));
            line[label.len()..].trim().trim_end_matches('%').parse().unwrap()
        };
        (value("logit relative error:"), value("top-1 agreement:"))
    };
    let (e_plain, _) = error(&plain);
    let (e_c8, top1) = error(&save);
    // The random fixture is hard on int8 already (w8a8 alone: ~0.27); the int8 cache adds little, but something.
    assert!(e_c8 < e_plain + 0.1 && e_c8 != e_plain && top1 >= 50.0, "w8a8c8 {e_c8} (top-1 {top1}%), w8a8 {e_plain}");
    // eval computes with the stored scales: a K cache clipped to a hundredth of its range is far worse.
    let path = save.join("quant_model_weights.safetensors");
    let mut t = read_st(&path);
    for (name, st) in t.iter_mut() {
        if name.ends_with("k_proj.kv_cache_scale") {
            let v: Vec<f32> = st.f32s().iter().map(|s| s / 100.0).collect();
            st.data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
    }
    write_st(&path, &t);
    let (e_clipped, _) = error(&save);
    assert!(e_clipped > 2.0 * e_c8.max(e_plain), "clipped K cache: {e_clipped} vs {e_c8} (w8a8 {e_plain})");
}
