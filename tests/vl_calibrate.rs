//! Vision-language calibration end to end: every VL fixture quantized to W8A8 from images in
//! each of the three calibration-data forms (a folder of images, a folder with one listing, an
//! `index.json`), with the vision tower calibrated block by block; the output is complete, its
//! static scales are sane, and `lamina eval` finds the quantized logits close to the float ones on
//! the fixture's own image prompt (whose float logits the forward tests check against
//! transformers). A run killed inside the vision tower resumes to the same bytes.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const VL_FIXTURES: [&str; 7] =
    ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "qwen3_vl_realvocab", "internvl_chat"];

fn photos() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/images")
}

/// The fixture in `dir`, with a tiny word-level tokenizer when it has none: its special tokens are
/// the config's image tokens, every other word is `<unk>`, so prompts become ids inside the
/// fixture's small vocabulary.
fn model_with_tokenizer(name: &str, dir: &Path) -> PathBuf {
    let model = copy_fixture(name, &dir.join(name));
    if model.join("tokenizer.json").is_file() {
        return model;
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let id = |k: &str| config[k].as_i64();
    let qwen_vl_start = config["visual"]["image_start_id"].as_i64();
    let specials: Vec<(String, i64)> = match id("image_token_index") {
        // Qwen-VL's `<img>`, `</img>`, `<imgpad>` (tokenization_qwen.py): image_start_id and the next two.
        _ if qwen_vl_start.is_some() => {
            let s = qwen_vl_start.unwrap();
            vec![("<img>".into(), s), ("</img>".into(), s + 1), ("<imgpad>".into(), s + 2)]
        }
        Some(image) => vec![("<image>".into(), image)],
        None if id("image_start_token_id").is_some() => vec![
            ("<|begin_of_image|>".into(), id("image_start_token_id").unwrap()),
            ("<|end_of_image|>".into(), id("image_end_token_id").unwrap()),
            ("<|image|>".into(), id("image_token_id").unwrap()),
        ],
        // InternVL: the remote code's img_context_token_id, the -hf layout's image_token_id.
        None if id("img_start_token_id").is_some() => vec![
            ("<img>".into(), id("img_start_token_id").unwrap()),
            ("</img>".into(), id("img_end_token_id").unwrap()),
            ("<IMG_CONTEXT>".into(), id("img_context_token_id").or(id("image_token_id")).unwrap()),
        ],
        None => vec![
            ("<|vision_start|>".into(), id("vision_start_token_id").unwrap()),
            ("<|vision_end|>".into(), id("vision_end_token_id").unwrap()),
            ("<|image_pad|>".into(), id("image_token_id").unwrap()),
        ],
    };
    let added: Vec<Value> = specials
        .iter()
        .map(|(t, i)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let words =
        ["<unk>", "Describe", "this", "image", "in", "detail", ".", "What", "is", "shown", "?", "Picture", "1", ":"];
    // The special tokens are in the model's vocabulary too, so they keep the config's ids.
    let mut vocab: serde_json::Map<String, Value> =
        words.iter().enumerate().map(|(i, w)| (w.to_string(), json!(i))).collect();
    vocab.extend(specials.iter().map(|(t, i)| (t.clone(), json!(i))));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model
}

/// The three forms of a calibration set over the same photographs and the fixture's own image.
fn calibration_sets(model: &Path, dir: &Path) -> [(&'static str, PathBuf); 3] {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::copy(photos().join("chelsea.png"), images.join("chelsea.png")).unwrap();
    std::fs::copy(photos().join("rocket.jpg"), images.join("rocket.jpg")).unwrap();
    std::fs::copy(model.join("image.png"), images.join("fixture.png")).unwrap();

    let listed = dir.join("listed");
    std::fs::create_dir_all(listed.join("pics")).unwrap();
    std::fs::copy(photos().join("coffee.png"), listed.join("pics/coffee.png")).unwrap();
    std::fs::copy(photos().join("astronaut.png"), listed.join("pics/astronaut.png")).unwrap();
    let lines = [
        json!({"image": "pics/coffee.png", "text": "What is shown in this image ?"}),
        json!({"image": "pics/astronaut.png", "text": "Describe this image ."}),
    ];
    let jsonl: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(listed.join("prompts.jsonl"), jsonl.join("\n")).unwrap();

    let indexed = dir.join("indexed");
    std::fs::create_dir_all(&indexed).unwrap();
    std::fs::copy(photos().join("rocket.jpg"), indexed.join("rocket.jpg")).unwrap();
    std::fs::copy(model.join("image.png"), indexed.join("fixture.png")).unwrap();
    let index = json!([
        {"image": "rocket.jpg", "text": "Describe this image in detail ."},
        {"image": "fixture.png", "text": "What is shown ?"}
    ]);
    std::fs::write(indexed.join("index.json"), index.to_string()).unwrap();
    [("folder of images", images), ("folder with a listing", listed), ("index.json", indexed)]
}

/// The description's types, and every tensor of the output's shards.
fn read_output(save: &Path) -> (BTreeMap<String, String>, BTreeMap<String, St>) {
    let desc: BTreeMap<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(save.join("quant_model_description.json")).unwrap()).unwrap();
    let types = desc.into_iter().filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string()))).collect();
    let mut tensors = BTreeMap::new();
    for e in std::fs::read_dir(save).unwrap() {
        let p = e.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().to_string();
        if n.starts_with("quant_model_weights") && n.ends_with(".safetensors") {
            for (k, v) in read_st(&p) {
                assert!(tensors.insert(k.clone(), v).is_none(), "{k} is written twice");
            }
        }
    }
    (types, tensors)
}

/// Every tensor is described once; at least one vision-block linear is static W8A8 with sane
/// scales; the layers msModelSlim keeps float in the vision tower are float.
fn check_vl_output(name: &str, save: &Path, form: &str) {
    let (types, tensors) = read_output(save);
    for k in tensors.keys() {
        assert!(types.contains_key(k), "{name} ({form}): {k} is not described");
    }
    let vision_w8a8: Vec<&String> = types
        .iter()
        .filter(|(k, t)| {
            t.as_str() == "W8A8"
                && k.ends_with(".weight")
                && (k.contains("visual.blocks.")
                    || k.contains("vision_tower.vision_model.encoder.layers.")
                    || k.starts_with("vision_model.encoder.layers."))
        })
        .map(|(k, _)| k)
        .collect();
    assert!(!vision_w8a8.is_empty(), "{name} ({form}): no vision linear was calibrated to W8A8");
    for w in types.keys().filter(|k| types[*k] == "W8A8" && k.ends_with(".weight")) {
        let m = w.strip_suffix(".weight").unwrap();
        let scale = tensors[&format!("{m}.input_scale")].f32s();
        let offset = tensors[&format!("{m}.input_offset")].f32s();
        assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{name} ({form}): {m}.input_scale {scale:?}");
        assert!(
            offset.iter().all(|o| o.fract() == 0.0 && (-128.0..=127.0).contains(o)),
            "{name} ({form}): {m}.input_offset {offset:?}"
        );
        assert_eq!(tensors[w].dtype, "I8", "{name} ({form}): {w}");
    }
    for (k, t) in &types {
        let internvit_fc2 = k.starts_with("vision_model.encoder.layers.") && k.contains(".mlp.fc2.");
        if k.contains("merger")
            || k.contains("linear_fc2")
            || k.contains("multi_modal_projector")
            || k.starts_with("mlp1.")
            || internvit_fc2
        {
            assert_eq!(t, "FLOAT", "{name} ({form}): {k} should stay float");
        }
    }
}

/// `lamina eval --inputs` on the fixture's image prompt: (top-1 agreement, logit relative error).
fn logit_error(name: &str, model: &Path, save: &Path) -> (f64, f64) {
    let r = run(
        &[
            "eval",
            "--model_path",
            model.to_str().unwrap(),
            "--quantized",
            save.to_str().unwrap(),
            "--inputs",
            fixture(name).join("reference.safetensors").to_str().unwrap(),
        ],
        &[],
    );
    r.assert_ok();
    let value = |label: &str| -> f64 {
        let line =
            r.stdout.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no {label}: {}", r.stdout));
        line[label.len()..].trim().trim_end_matches('%').parse().unwrap()
    };
    (value("top-1 agreement:") / 100.0, value("logit relative error:"))
}

#[test]
fn every_vl_fixture_calibrates_from_each_form_of_image_set() {
    for name in VL_FIXTURES {
        let tmp = TempDir::new(&format!("vl-{name}"));
        let model = model_with_tokenizer(name, tmp.path());
        for (form, set) in calibration_sets(&model, &tmp.join("calib")) {
            let save = tmp.join(&format!("out-{}", form.replace(' ', "-")));
            let r = quant(&model, &save, "w8a8", &["--calib_data", set.to_str().unwrap()], &[]);
            r.assert_ok();
            check_vl_output(name, &save, form);
            check(&save, &[]).assert_ok();
            let (agreement, relative) = logit_error(name, &model, &save);
            // The fixtures' random logits are small and nearly tied, and per-tensor static ranges
            // calibrated on a few photographs are coarse for them (measured 5–65% relative
            // error; data-free per-token W8A8 gives 5–9%), so this only tells a working model
            // from a broken one, whose error is 100% or more. The calibration forward itself is
            // checked against transformers in `calibrate::tests`.
            eprintln!("{name} ({form}): top-1 agreement {agreement}, logit relative error {relative}");
            assert!(relative < 0.8, "{name} ({form}): logit relative error {relative}");
            assert!(agreement > 0.3, "{name} ({form}): top-1 agreement {agreement}");
        }
    }
}

/// GLM-4.1V with its recipe (msModelSlim's GLM-4.1V practice): calibrated from each form of image
/// set; every text linear but down_proj static W8A8, the whole vision tower and every down_proj
/// float; the description also holds the names vLLM-Ascend looks them up under (glm4_1v.py: the
/// vision `attn.qkv_proj` packed from q/k/v_proj, every `gate_up_proj` packed from itself), and
/// `lamina check` refuses the output without them.
#[test]
fn glm4v_calibrates_from_images_with_its_recipe() {
    let name = "glm4v";
    let tmp = TempDir::new("vl-glm4v");
    let model = model_with_tokenizer(name, tmp.path());
    for (form, set) in calibration_sets(&model, &tmp.join("calib")) {
        let save = tmp.join(&format!("out-{}", form.replace(' ', "-")));
        quant(&model, &save, "w8a8", &["--calib_data", set.to_str().unwrap()], &[]).assert_ok();
        let (types, tensors) = read_output(&save);
        for k in tensors.keys() {
            assert!(types.contains_key(k), "{form}: {k} is not described");
        }
        for l in 0..2 {
            let layer = format!("model.language_model.layers.{l}");
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
                .into_iter()
                .chain(["mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"])
            {
                assert_eq!(types[&format!("{layer}.{m}.weight")], "W8A8", "{form}: {layer}.{m}");
            }
            assert_eq!(types[&format!("{layer}.mlp.down_proj.weight")], "FLOAT", "{form}");
            // The fused name is a lookup key only; the weights are split as vLLM's glm4.py loads them.
            assert!(!tensors.contains_key(&format!("{layer}.mlp.gate_up_proj.weight")));
            let scale = tensors[&format!("{layer}.mlp.gate_proj.input_scale")].f32s();
            assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{form}: {scale:?}");
        }
        let vision: Vec<(&String, &String)> = types.iter().filter(|(k, _)| k.starts_with("model.visual.")).collect();
        assert!(vision.len() > 20, "{form}: {}", vision.len());
        for (k, t) in vision {
            assert_eq!(t, "FLOAT", "{form}: {k} should stay float (msModelSlim's GLM-4.1V practice)");
        }
        for alias in ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_up_proj"] {
            assert_eq!(types[&format!("model.visual.blocks.1.{alias}.weight")], "FLOAT", "{form}: {alias}");
        }
        assert_eq!(types["model.visual.merger.gate_up_proj.weight"], "FLOAT");
        check(&save, &[]).assert_ok();
        let (agreement, relative) = logit_error(name, &model, &save);
        eprintln!("{name} ({form}): top-1 agreement {agreement}, logit relative error {relative}");
        assert!(relative < 0.8, "{name} ({form}): logit relative error {relative}");
        assert!(agreement > 0.3, "{name} ({form}): top-1 agreement {agreement}");
    }
    // Without the lookup names vLLM-Ascend's load fails (KeyError), and `lamina check` says so.
    let save = tmp.join("out-folder-of-images");
    let path = save.join("quant_model_description.json");
    let mut desc: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    desc.remove("model.visual.blocks.0.attn.k_proj.weight");
    desc.remove("model.language_model.layers.1.mlp.gate_up_proj.weight");
    std::fs::write(&path, Value::Object(desc).to_string()).unwrap();
    let r = check(&save, &[]);
    assert_ne!(r.code, Some(0));
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(text.contains("model.visual.blocks.0.attn.k_proj.weight"), "{text}");
    assert!(text.contains("model.language_model.layers.1.mlp.gate_up_proj.weight"), "{text}");
}

/// transformers' `-hf` InternVL layout with its recipe (internvl-w8a8), calibrated from a folder of
/// images and from a JSONL of image + prompt pairs (prompts `<IMG_CONTEXT>\n` + text, expanded to
/// `<img>` + 4 per tile + `</img>` as InternVLProcessor does): every text linear but down_proj static
/// W8A8 with scales calibrated on the image prompts, down_proj W8A16, the vision tower, the projector
/// and lm_head float (vLLM's InternS1ForConditionalGeneration loads them float only:
/// rules::FLOAT_ONLY). The description is keyed by the checkpoint's names, which vLLM-Ascend maps with
/// the model's hf_to_vllm_mapper before its lookups (modelslim_config.py `apply_vllm_mapper`); the
/// output passes `lamina check` and its logits stay close to the float model's.
#[test]
fn internvl_hf_calibrates_from_images_with_its_recipe() {
    let name = "internvl_hf";
    let tmp = TempDir::new("vl-internvl_hf");
    let model = model_with_tokenizer(name, tmp.path());
    let [folder, listed, _] = calibration_sets(&model, &tmp.join("calib"));
    for (form, set) in [folder, listed] {
        let save = tmp.join(&format!("out-{}", form.replace(' ', "-")));
        quant(&model, &save, "w8a8", &["--calib_data", set.to_str().unwrap()], &[]).assert_ok();
        let (types, tensors) = read_output(&save);
        for k in tensors.keys() {
            assert!(types.contains_key(k), "{form}: {k} is not described");
        }
        for l in 0..2 {
            let layer = format!("model.language_model.layers.{l}");
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
                .into_iter()
                .chain(["mlp.gate_proj", "mlp.up_proj"])
            {
                assert_eq!(types[&format!("{layer}.{m}.weight")], "W8A8", "{form}: {layer}.{m}");
                let scale = tensors[&format!("{layer}.{m}.input_scale")].f32s();
                assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{form}: {scale:?}");
            }
            assert_eq!(types[&format!("{layer}.mlp.down_proj.weight")], "W8A16", "{form}: {layer}");
        }
        let vision: Vec<(&String, &String)> = types
            .iter()
            .filter(|(k, _)| k.starts_with("model.vision_tower.") || k.starts_with("model.multi_modal_projector."))
            .collect();
        assert!(vision.len() > 30, "{form}: {}", vision.len());
        for (k, t) in vision {
            assert_eq!(t, "FLOAT", "{form}: {k} should stay float");
        }
        assert_eq!(types["lm_head.weight"], "FLOAT");
        // vLLM-Ascend's view: InternS1ForConditionalGeneration.hf_to_vllm_mapper (interns1.py) applied
        // to the description's keys finds every text linear under the vLLM module's prefix.
        let mapper = [
            ("lm_head.", "language_model.lm_head."),
            ("model.language_model.", "language_model.model."),
            ("model.vision_tower.", "vision_tower."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ];
        let mapped: BTreeMap<String, &String> = types
            .iter()
            .map(|(k, t)| {
                let m = mapper.iter().find_map(|(a, b)| k.strip_prefix(a).map(|r| format!("{b}{r}")));
                (m.unwrap_or_else(|| k.clone()), t)
            })
            .collect();
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"] {
            let key = format!("language_model.model.layers.1.{m}.weight");
            assert_eq!(mapped.get(&key).map(|t| t.as_str()), Some("W8A8"), "{form}: {key}");
        }
        assert_eq!(mapped["vision_tower.encoder.layer.0.mlp.fc1.weight"], "FLOAT");
        check(&save, &[]).assert_ok();
        check(&save, &["--target", "mindie"]).assert_ok();
        let (agreement, relative) = logit_error(name, &model, &save);
        eprintln!("{name} ({form}): top-1 agreement {agreement}, logit relative error {relative}");
        assert!(relative < 0.8, "{name} ({form}): logit relative error {relative}");
        assert!(agreement > 0.3, "{name} ({form}): top-1 agreement {agreement}");
    }
    // A recipe that quantizes the -hf tower is refused before anything is written.
    let recipe = tmp.join("vision.yaml");
    std::fs::write(
        &recipe,
        "apiversion: modelslim_v1\nspec:\n  process:\n    - type: linear_quant\n      qconfig: {act: {scope: per_token, dtype: int8, symmetric: true, method: minmax}, weight: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}}\n      include: [\"*vision_tower*fc1\"]\n",
    )
    .unwrap();
    let save = tmp.join("out-vision");
    let (m, o, r) = (model.to_str().unwrap(), save.to_str().unwrap(), recipe.to_str().unwrap());
    run(&["quant", "--model_path", m, "--save_path", o, "--config_path", r], &[])
        .assert_fails_with(&["model.vision_tower.encoder.layer.0.mlp.fc1", "float-only"]);
    assert_no_complete_output(&save);
}

#[test]
fn the_bundled_calibration_set_is_the_default_for_vl_models() {
    let tmp = TempDir::new("vl-default");
    let model = fixture("qwen3_vl_realvocab");
    let save = tmp.join("out");
    let r = quant(&model, &save, "w8a8", &[], &[]);
    r.assert_ok();
    check_vl_output("qwen3_vl_realvocab", &save, "bundled calib/");
}

#[test]
fn a_run_killed_inside_the_vision_tower_resumes_to_the_same_bytes() {
    let tmp = TempDir::new("vl-resume");
    let model = model_with_tokenizer("qwen3_vl", tmp.path());
    let [(_, set), ..] = calibration_sets(&model, &tmp.join("calib"));
    let args = ["--calib_data", set.to_str().unwrap(), "--part_file_size", "0.0001"];
    let reference = tmp.join("reference");
    quant(&model, &reference, "w8a8", &args, &[]).assert_ok();
    let save = tmp.join("resumed");
    // A few tensors in: the tower's first units are written, the rest is not.
    let r = quant(&model, &save, "w8a8", &args, &[("LAMINA_FAULT_ABORT_AFTER_TENSORS", "12")]);
    assert_ne!(r.code, Some(0), "the run was to abort: {}", r.stderr);
    quant(&model, &save, "w8a8", &args, &[]).assert_ok();
    let files = |d: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("quant_model"))
            .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()))
            .collect()
    };
    let (want, got) = (files(&reference), files(&save));
    assert!(want.len() > 2, "the test wants several shards");
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
    for (k, v) in &want {
        assert!(v == &got[k], "{k} differs after resuming inside the vision tower");
    }
}

#[test]
fn a_broken_calibration_image_is_named() {
    let tmp = TempDir::new("vl-bad-image");
    let model = model_with_tokenizer("qwen2_vl", tmp.path());
    let set = tmp.join("set");
    std::fs::create_dir_all(&set).unwrap();
    std::fs::write(set.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let save = tmp.join("out");
    quant(&model, &save, "w8a8", &["--calib_data", set.to_str().unwrap()], &[]).assert_fails_with(&["broken.png"]);
    assert_no_complete_output(&save);
}

#[test]
fn text_only_calibration_of_a_calibrated_vision_tower_is_refused() {
    let tmp = TempDir::new("vl-text-only");
    let model = fixture("qwen2_vl");
    let data = tmp.join("ids.jsonl");
    std::fs::write(&data, json!({"input_ids": (1..200).collect::<Vec<i64>>()}).to_string()).unwrap();
    let save = tmp.join("out");
    let args = ["--calib_data", data.to_str().unwrap(), "--calib_samples", "2", "--calib_seq_len", "16"];
    quant(&model, &save, "w8a8", &args, &[])
        .assert_fails_with(&["visual.blocks.0", "no calibration sample has an image"]);
    assert_no_complete_output(&save);
}

/// GLM-4.5V / 4.6V (glm4v_moe) with its recipe (msModelSlim's GLM-4.6V mixed W8A8 with the GLM-4.1V
/// practice's float layers), calibrated from a folder of images and from a JSONL of image + prompt
/// pairs: attention and the dense / shared gate and up projections static W8A8, every routed expert
/// W8A8_DYNAMIC, routers, down_proj (dense and shared) and the whole vision tower float; the output
/// passes `lamina check` for vLLM-Ascend and MindIE, and its logits stay close to the float model's.
#[test]
fn glm4v_moe_calibrates_from_images_with_its_recipe() {
    let name = "glm4v_moe";
    let tmp = TempDir::new("vl-glm4v_moe");
    let model = model_with_tokenizer(name, tmp.path());
    let [folder, listed, _] = calibration_sets(&model, &tmp.join("calib"));
    for (form, set) in [folder, listed] {
        let save = tmp.join(&format!("out-{}", form.replace(' ', "-")));
        quant(&model, &save, "w8a8", &["--calib_data", set.to_str().unwrap()], &[]).assert_ok();
        let (types, tensors) = read_output(&save);
        for k in tensors.keys() {
            assert!(types.contains_key(k), "{form}: {k} is not described");
        }
        for l in 0..3 {
            let layer = format!("model.language_model.layers.{l}");
            for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
                assert_eq!(types[&format!("{layer}.{m}.weight")], "W8A8", "{form}: {layer}.{m}");
            }
            let ffn = if l == 0 { "mlp" } else { "mlp.shared_experts" };
            for m in ["gate_proj", "up_proj"] {
                assert_eq!(types[&format!("{layer}.{ffn}.{m}.weight")], "W8A8", "{form}: {layer}.{ffn}.{m}");
            }
            assert_eq!(types[&format!("{layer}.{ffn}.down_proj.weight")], "FLOAT", "{form}: {layer}");
            let scale = tensors[&format!("{layer}.self_attn.q_proj.input_scale")].f32s();
            assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{form}: {scale:?}");
            if l > 0 {
                assert_eq!(types[&format!("{layer}.mlp.gate.weight")], "FLOAT", "{form}: the router");
                for j in 0..8 {
                    for m in ["gate_proj", "up_proj", "down_proj"] {
                        let k = format!("{layer}.mlp.experts.{j}.{m}.weight");
                        assert_eq!(types[&k], "W8A8_DYNAMIC", "{form}: {k}");
                        assert_eq!(tensors[&k].dtype, "I8", "{form}: {k}");
                    }
                }
                assert!(tensors.contains_key(&format!("{layer}.mlp.gate.e_score_correction_bias")));
            }
        }
        let vision: Vec<(&String, &String)> = types.iter().filter(|(k, _)| k.starts_with("model.visual.")).collect();
        assert!(vision.len() > 20, "{form}: {}", vision.len());
        for (k, t) in vision {
            assert_eq!(t, "FLOAT", "{form}: {k} should stay float");
        }
        check(&save, &[]).assert_ok();
        check(&save, &["--target", "mindie"]).assert_ok();
        let (agreement, relative) = logit_error(name, &model, &save);
        eprintln!("{name} ({form}): top-1 agreement {agreement}, logit relative error {relative}");
        assert!(relative < 0.8, "{name} ({form}): logit relative error {relative}");
        assert!(agreement > 0.3, "{name} ({form}): top-1 agreement {agreement}");
    }
}

/// Qwen-VL with its recipe: calibrated from each form of image set (prompts `Picture 1:<img>` +
/// 16 image pads + `</img>` + text), and from a JSONL of image + token-id records whose text covers
/// the fixture's vocabulary; in the ViT attn.in_proj, attn.out_proj and mlp.c_fc static W8A8,
/// mlp.c_proj float; the resampler (attn_pool) and proj float; the Qwen (1) decoder's c_attn,
/// c_proj, w1, w2 W8A8 and mlp.c_proj W8A16; `lamina check` passes for both targets and the
/// quantized logits stay close to the float ones on the fixture's image prompt.
#[test]
fn qwen_vl_calibrates_from_images_with_its_recipe() {
    let name = "qwen_vl";
    let tmp = TempDir::new("vl-qwen_vl");
    let model = model_with_tokenizer(name, tmp.path());
    // Image + id records whose text spans the fixture's text vocabulary (the ids below
    // `<img>`, 990), 330 ids each, the image's `<img>` `<imgpad>` `</img>` after the first five.
    let config: Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let start = config["visual"]["image_start_id"].as_i64().unwrap();
    let covering = tmp.join("calib/covering");
    std::fs::create_dir_all(&covering).unwrap();
    let lines: Vec<String> = ["chelsea.png", "rocket.jpg", "coffee.png"]
        .iter()
        .enumerate()
        .map(|(k, image)| {
            std::fs::copy(photos().join(image), covering.join(image)).unwrap();
            let text: Vec<i64> = (330 * k as i64..(330 * (k as i64 + 1)).min(start)).collect();
            let ids: Vec<i64> = text[..5]
                .iter()
                .copied()
                .chain([start, start + 2, start + 1])
                .chain(text[5..].iter().copied())
                .collect();
            json!({"image": image, "input_ids": ids}).to_string()
        })
        .collect();
    std::fs::write(covering.join("prompts.jsonl"), lines.join("\n")).unwrap();
    let sets = calibration_sets(&model, &tmp.join("calib"));
    for (form, set) in sets.into_iter().chain([("ids covering the vocabulary", covering)]) {
        for target in ["vllm-ascend", "mindie"] {
            let save = tmp.join(&format!("out-{}-{target}", form.replace(' ', "-")));
            let args = ["--calib_data", set.to_str().unwrap(), "--target", target];
            quant(&model, &save, "w8a8", &args, &[]).assert_ok();
            let (types, tensors) = read_output(&save);
            for k in tensors.keys() {
                assert!(types.contains_key(k), "{form}: {k} is not described");
            }
            for b in 0..2 {
                let block = format!("transformer.visual.transformer.resblocks.{b}");
                for m in ["attn.in_proj", "attn.out_proj", "mlp.c_fc"] {
                    let w = format!("{block}.{m}");
                    assert_eq!(types[&format!("{w}.weight")], "W8A8", "{form}: {w}");
                    let scale = tensors[&format!("{w}.input_scale")].f32s();
                    assert!(scale.iter().all(|s| s.is_finite() && *s > 0.0), "{form}: {w} {scale:?}");
                }
                assert_eq!(types[&format!("{block}.mlp.c_proj.weight")], "FLOAT", "{form}");
            }
            for (k, t) in types.iter().filter(|(k, _)| k.starts_with("transformer.visual.attn_pool.")) {
                assert_eq!(t, "FLOAT", "{form}: {k} (the resampler) should stay float");
            }
            assert_eq!(types["transformer.visual.proj"], "FLOAT");
            for l in 0..2 {
                let layer = format!("transformer.h.{l}");
                for m in ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2"] {
                    assert_eq!(types[&format!("{layer}.{m}.weight")], "W8A8", "{form}: {layer}.{m}");
                }
                assert_eq!(types[&format!("{layer}.mlp.c_proj.weight")], "W8A16", "{form}");
            }
            assert_eq!(types["lm_head.weight"], "FLOAT");
            check(&save, &["--target", target]).assert_ok();
            let (agreement, relative) = logit_error(name, &model, &save);
            eprintln!("{name} ({form}, {target}): top-1 agreement {agreement}, logit relative error {relative}");
            // The fixture's prompt holds text ids (17, 305, 26, ...) the test tokenizer's 14 words
            // never produce, and its random embeddings make every token's channels independent:
            // token 26 reaches 91 in ln_1's planted-outlier channel 1 of layer 0, 2.65 x the most
            // any calibration word reaches there (34; the other VL fixtures' prompts stay within
            // 1.32 x), so the static c_attn range clips it (3.99 against 1.72 after smoothing) and
            // layer 0 ends 73% off (layer 1 alone: 1.6%). Calibrated on these word prompts the
            // logits land 71-72% off (top-1 22-30%); on the ids covering the vocabulary 10% (top-1
            // 81%; m2 instead of SmoothQuant the same, no smoothing 29%), the recipe is not at
            // fault. The word forms therefore only tell a working model from a broken one (100%
            // or more); the covering set bounds the accuracy, with about twice its error as margin.
            let bound = if form.starts_with("ids") { 0.2 } else { 0.9 };
            assert!(relative < bound, "{name} ({form}): logit relative error {relative}");
            if form.starts_with("ids") {
                assert!(agreement > 0.6, "{name} ({form}): top-1 agreement {agreement}");
            }
        }
    }
}

/// Qwen-VL and Qwen (1) folders that ship `qwen.tiktoken` and no tokenizer.json (as the releases
/// do; here the small vocabulary of tests/fixtures/qwen_tiktoken, whose `<img>` is the qwen_vl
/// fixture's image_start_id): `lamina quant` calibrates Qwen-VL from a folder of photographs with
/// the default text and Qwen (1) from a text file, both tokenized by lamina's tiktoken port.
#[test]
fn qwen_tiktoken_folders_calibrate_from_text_prompts() {
    let tmp = TempDir::new("qwen-tiktoken");
    let vocab = fixture("qwen_tiktoken").join("qwen.tiktoken");
    let model = copy_fixture("qwen_vl", &tmp.join("qwen_vl"));
    std::fs::copy(&vocab, model.join("qwen.tiktoken")).unwrap();
    let images = tmp.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for p in ["chelsea.png", "rocket.jpg"] {
        std::fs::copy(photos().join(p), images.join(p)).unwrap();
    }
    let save = tmp.join("qwen_vl-out");
    quant(&model, &save, "w8a8", &["--calib_data", images.to_str().unwrap()], &[]).assert_ok();
    let (types, _) = read_output(&save);
    assert_eq!(types["transformer.visual.transformer.resblocks.0.attn.in_proj.weight"], "W8A8");
    assert_eq!(types["transformer.h.0.attn.c_attn.weight"], "W8A8");

    let text = copy_fixture("qwen1", &tmp.join("qwen1"));
    std::fs::copy(&vocab, text.join("qwen.tiktoken")).unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("calib/text/corpus.txt");
    let args = ["--calib_data", corpus.to_str().unwrap(), "--calib_samples", "2", "--calib_seq_len", "64"];
    let save = tmp.join("qwen1-out");
    quant(&text, &save, "w8a8", &args, &[]).assert_ok();
    assert_eq!(read_output(&save).0["transformer.h.1.mlp.w1.weight"], "W8A8");

    // Without either file the error names both.
    std::fs::remove_file(text.join("qwen.tiktoken")).unwrap();
    let run = quant(&text, &tmp.join("qwen1-none"), "w8a8", &args, &[]);
    assert_ne!(run.code, Some(0));
    assert!(run.stderr.contains("tokenizer.json: missing") && run.stderr.contains("qwen.tiktoken"), "{}", run.stderr);
}
