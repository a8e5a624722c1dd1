//! End-to-end: `lamina forward` on the fixtures' input_ids, compared with the transformers
//! reference activations stored beside them.

use lamina::io::safetensors::{load_all, save};
use lamina::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lamina-forward-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn lamina_forward(model: &Path, inputs: &Path, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lamina"))
        .args(["forward", "--model_path"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn ids_file(dir: &Path, shape: &[usize], ids: &[i64]) -> PathBuf {
    let path = dir.join("inputs.safetensors");
    save(&path, &[("input_ids".to_string(), Tensor::from_i64(shape, ids))]).unwrap();
    path
}

/// max |ours - ref| / max |ref|.
fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.shape, reference.shape);
    if !reference.dtype.is_float() {
        return if ours.to_i64().unwrap() == reference.to_i64().unwrap() { 0.0 } else { f32::INFINITY };
    }
    let (a, b) = (ours.to_f32().unwrap(), reference.to_f32().unwrap());
    let diff = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / b.iter().fold(0f32, |m, y| m.max(y.abs()))
}

/// Runs the binary on a fixture's own reference file (which holds its input_ids, and for VL
/// fixtures pixel_values and image_grid_thw) and checks every activation the reference holds.
fn matches_reference(name: &str) {
    let dir = scratch(name);
    let reference_path = fixture(name).join("reference.safetensors");
    let out = dir.join("out.safetensors");
    let run = lamina_forward(&fixture(name), &reference_path, &out);
    assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
    let ours = load_all(&out).unwrap();
    let reference = load_all(&reference_path).unwrap();
    let mut checked = 0;
    for (key, want) in &reference {
        if ["input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"].contains(&key.as_str()) {
            continue;
        }
        // Inside a unit, not written by the forward (checked in model::vision::qwen_vl's tests).
        if key == "transformer.visual.attn_pool.out" {
            continue;
        }
        let got = ours.get(key).unwrap_or_else(|| panic!("{name}: the output lacks {key}"));
        let e = rel_err(got, want);
        assert!(e <= 1e-4, "{name}: {key} differs by {e}");
        eprintln!("{name} {key}: {e:.2e}");
        checked += 1;
    }
    // At least the text layers' in/out, final norm and logits.
    assert!(checked >= 4, "{name}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn llama_matches_transformers() {
    matches_reference("llama");
}

#[test]
fn qwen2_matches_transformers() {
    matches_reference("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    matches_reference("qwen3");
}

#[test]
fn qwen3_moe_matches_transformers() {
    matches_reference("qwen3_moe");
}

#[test]
fn remote_code_text_families_match_their_references() {
    for name in ["internlm2", "qwen1"] {
        matches_reference(name);
    }
}

#[test]
fn vision_language_models_match_transformers_from_pixels() {
    for name in [
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_vl_moe",
        "llava",
        "qwen3_vl_realvocab",
        "internvl_chat",
        "internvl_chat_6b",
        "glm4v",
        "glm4v_wide",
        "glm4v_moe",
        "qwen_vl",
    ] {
        matches_reference(name);
    }
}

#[test]
fn a_batch_runs_each_sequence_on_its_own() {
    // Two copies of the reference prompt: both rows must reproduce the reference.
    let dir = scratch("batch");
    let reference = load_all(&fixture("qwen2").join("reference.safetensors")).unwrap();
    let ids = reference["input_ids"].to_i64().unwrap();
    let twice: Vec<i64> = ids.iter().chain(ids.iter()).copied().collect();
    let inputs = ids_file(&dir, &[2, ids.len()], &twice);
    let out = dir.join("out.safetensors");
    let run = lamina_forward(&fixture("qwen2"), &inputs, &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ours: BTreeMap<String, Tensor> = load_all(&out).unwrap();
    let logits = &ours["logits"];
    assert_eq!(logits.shape, [2, ids.len(), 1000]);
    let half = logits.bytes.len() / 2;
    for row in [&logits.bytes[..half], &logits.bytes[half..]] {
        let one = Tensor::from_bytes(logits.dtype, &reference["logits"].shape, row.to_vec());
        assert!(rel_err(&one, &reference["logits"]) <= 1e-4);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn text_only_prompt_to_a_vl_model_uses_sequential_mrope_ids() {
    let dir = scratch("vl-text");
    let ids: Vec<i64> = vec![5, 17, 300, 42, 9, 77, 500];
    let inputs = ids_file(&dir, &[1, ids.len()], &ids);
    let out = dir.join("out.safetensors");
    let run = lamina_forward(&fixture("qwen3_vl"), &inputs, &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ours = load_all(&out).unwrap();
    let pos = ours["lm.position_ids"].to_i64().unwrap();
    assert_eq!(ours["lm.position_ids"].shape, [3, 1, ids.len()]);
    let sequential: Vec<i64> = (0..3).flat_map(|_| 0..ids.len() as i64).collect();
    assert_eq!(pos, sequential);
    assert_eq!(ours["lm.inputs_embeds"], ours["model.language_model.layers.0.in"]);
    assert_eq!(ours["logits"].shape, [1, ids.len(), 1000]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_inputs_fail_clearly() {
    let dir = scratch("bad");
    let out = dir.join("out.safetensors");

    let inputs = ids_file(&dir, &[1, 3], &[1, 1000, 2]);
    let run = lamina_forward(&fixture("llama"), &inputs, &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("1000") && err.contains("vocabulary"), "{err}");
    assert!(!out.exists());

    let no_ids = dir.join("no_ids.safetensors");
    save(&no_ids, &[("tokens".to_string(), Tensor::from_i64(&[2], &[1, 2]))]).unwrap();
    let run = lamina_forward(&fixture("llama"), &no_ids, &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("input_ids"), "{err}");

    let floats = dir.join("floats.safetensors");
    save(&floats, &[("input_ids".to_string(), Tensor::from_f32(&[1, 2], &[1.0, 2.0]))]).unwrap();
    let run = lamina_forward(&fixture("llama"), &floats, &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("integers"), "{err}");

    // An image token without pixel values.
    let inputs = ids_file(&dir, &[1, 3], &[5, 997, 6]);
    let run = lamina_forward(&fixture("qwen2_vl"), &inputs, &out);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("image token"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
