//! Bad input: each case ends with a clear message naming the file (and tensor), a non-zero exit
//! code, and nothing in the save folder that looks like finished output.

mod common;

use common::check::{check_output, Scheme};
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};

/// A copy of the llama fixture to break, and a save path beside it.
fn setup(label: &str) -> (TempDir, PathBuf, PathBuf) {
    let tmp = TempDir::new(label);
    let model = copy_fixture("llama", &tmp.join("model"));
    let save = tmp.join("out");
    (tmp, model, save)
}

fn refuses(model: &Path, save: &Path, needles: &[&str]) {
    quant(model, save, "w8a8_dynamic", &[], &[]).assert_fails_with(needles);
    assert_no_complete_output(save);
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn missing_config() {
    let (_t, model, save) = setup("no-config");
    std::fs::remove_file(model.join("config.json")).unwrap();
    refuses(&model, &save, &[&path_str(&model.join("config.json"))]);
    assert!(!save.exists(), "nothing is created before the input is validated");
}

#[test]
fn unreadable_config() {
    let (_t, model, save) = setup("bad-config");
    std::fs::write(model.join("config.json"), b"{\"model_type\": \"llama\", ").unwrap();
    refuses(&model, &save, &[&path_str(&model.join("config.json")), "not valid JSON"]);
    // A config.json that cannot be read at all (a folder in its place).
    std::fs::remove_file(model.join("config.json")).unwrap();
    std::fs::create_dir(model.join("config.json")).unwrap();
    refuses(&model, &save, &[&path_str(&model.join("config.json"))]);
}

#[test]
fn unknown_model_type_without_layers_is_refused() {
    let (_t, model, save) = setup("unknown-type");
    let mut c = read_json(&model.join("config.json"));
    c["model_type"] = json!("mystery_lm");
    c["architectures"] = json!(["MysteryForCausalLM"]);
    write_json(&model.join("config.json"), &c);
    // Keys that do not follow `*.layers.N.*`.
    let path = model.join("model.safetensors");
    let renamed = read_st(&path).into_iter().map(|(n, t)| (n.replace("model.layers.", "transformer.h."), t)).collect();
    write_st(&path, &renamed);
    refuses(&model, &save, &["mystery_lm", &path_str(&model.join("config.json")), "layers.N"]);
}

#[test]
fn unknown_model_type_with_decoder_layers_uses_the_generic_fallback() {
    let (_t, model, save) = setup("generic");
    let mut c = read_json(&model.join("config.json"));
    c["model_type"] = json!("mystery_lm");
    c["architectures"] = json!(["MysteryForCausalLM"]);
    write_json(&model.join("config.json"), &c);
    quant(&model, &save, "w8a16", &[], &[]).assert_ok();
    let seen = check_output(&model, &save, Scheme::W8A16, None);
    assert_eq!(seen.quantized.len(), 2 * 7, "2 layers × (q, k, v, o, gate, up, down)");
}

#[test]
fn truncated_safetensors() {
    let (_t, model, save) = setup("truncated");
    let path = model.join("model.safetensors");
    let (header, data) = raw_header(&path);
    let cut = data.len() - 100;
    std::fs::write(&path, &std::fs::read(&path).unwrap()[..std::fs::metadata(&path).unwrap().len() as usize - 100])
        .unwrap();
    // The tensors whose bytes the cut removed; the message names one of them.
    let cut_off: Vec<String> = header
        .iter()
        .filter(|(n, v)| *n != "__metadata__" && v["data_offsets"][1].as_u64().unwrap() as usize > cut)
        .map(|(n, _)| n.clone())
        .collect();
    let r = quant(&model, &save, "w8a8_dynamic", &[], &[]);
    r.assert_fails_with(&[&path_str(&path), "truncated"]);
    assert!(cut_off.iter().any(|n| r.stderr.contains(&format!("tensor {n}"))), "{}", r.stderr);
    assert_no_complete_output(&save);

    // Cut inside the header itself.
    std::fs::write(&path, &std::fs::read(fixture("llama").join("model.safetensors")).unwrap()[..200]).unwrap();
    refuses(&model, &save, &[&path_str(&path), "header length"]);
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    refuses(&model, &save, &[&path_str(&path), "truncated"]);
}

#[test]
fn header_length_past_the_end() {
    let (_t, model, save) = setup("header-len");
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    refuses(&model, &save, &[&path_str(&path), "header length"]);
}

#[test]
fn offsets_outside_the_file() {
    let (_t, model, save) = setup("offsets");
    let path = model.join("model.safetensors");
    let (mut header, data) = raw_header(&path);
    let name = "model.layers.1.self_attn.q_proj.weight";
    let n = data.len() as u64;
    header[name]["data_offsets"] = json!([n, n + 64 * 64 * 2]);
    write_raw(&path, &header, &data);
    refuses(&model, &save, &[&path_str(&path), &format!("tensor {name}"), "outside"]);
}

#[test]
fn overlapping_tensors() {
    let (_t, model, save) = setup("overlap");
    let path = model.join("model.safetensors");
    let (mut header, data) = raw_header(&path);
    let (a, b) = ("model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight");
    header[b]["data_offsets"] = header[a]["data_offsets"].clone();
    write_raw(&path, &header, &data);
    refuses(&model, &save, &[&path_str(&path), a, b, "overlap"]);
}

#[test]
fn unsupported_dtype() {
    let (_t, model, save) = setup("dtype");
    let path = model.join("model.safetensors");
    let (mut header, data) = raw_header(&path);
    let name = "model.layers.0.self_attn.k_proj.weight";
    // The same bytes read as FP8: twice the elements.
    header[name]["dtype"] = json!("F8_E4M3");
    header[name]["shape"] = json!([32, 128]);
    write_raw(&path, &header, &data);
    refuses(&model, &save, &[&path_str(&path), &format!("tensor {name}"), "F8_E4M3"]);
}

#[test]
fn tensor_in_the_index_but_not_in_its_shard() {
    let (_t, model, save) = setup("index-missing");
    let map = shard_checkpoint(&model, 2);
    // The sharded copy itself is fine.
    let ok = model.parent().unwrap().join("ok");
    quant(&model, &ok, "w8a16", &[], &[]).assert_ok();
    check_output(&model, &ok, Scheme::W8A16, None);

    let name = "model.layers.1.mlp.up_proj.weight";
    let shard = model.join(&map[name]);
    let mut tensors = read_st(&shard);
    tensors.remove(name).unwrap();
    write_st(&shard, &tensors);
    refuses(&model, &save, &[name, &path_str(&shard), "model.safetensors.index.json"]);

    // A shard the index names that is not there at all.
    std::fs::remove_file(&shard).unwrap();
    refuses(&model, &save, &[&path_str(&shard), "does not exist"]);
}

/// Sets one element of a bf16 tensor to the given bit pattern.
fn poison(path: &Path, name: &str, index: usize, bits: u16) {
    let mut all = read_st(path);
    let t = all.get_mut(name).unwrap();
    t.data[2 * index..2 * index + 2].copy_from_slice(&bits.to_le_bytes());
    write_st(path, &all);
}

#[test]
fn nan_or_inf_in_a_weight_to_quantize() {
    let (_t, model, save) = setup("nan");
    let path = model.join("model.safetensors");
    let name = "model.layers.1.mlp.down_proj.weight";
    poison(&path, name, 3 * 128 + 5, 0x7FC0);
    // Many small shards: the layers before the bad one are written, yet nothing looks finished.
    let r = quant(&model, &save, "w8a8_dynamic", &["--part_file_size", "0.00002"], &[]);
    r.assert_fails_with(&[&path_str(&path), name, "NaN"]);
    assert_no_complete_output(&save);

    // +Inf in one expert of a fused Qwen3-VL-MoE tensor: the message names the expert's linear.
    let tmp = TempDir::new("inf");
    let moe = copy_fixture("qwen3_vl_moe", &tmp.join("model"));
    let path = moe.join("model.safetensors");
    // Expert 2, hidden row 7, column 3 of gate_up (a gate column): gate_proj[3, 7].
    poison(&path, "model.language_model.layers.0.mlp.experts.gate_up_proj", 2 * 64 * 96 + 7 * 96 + 3, 0x7F80);
    let save = tmp.join("out");
    quant(&moe, &save, "w4a8_dynamic", &[], &[]).assert_fails_with(&[
        &path_str(&path),
        "model.language_model.layers.0.mlp.experts.2.gate_proj.weight",
        "inf",
        "[3, 7]",
    ]);
    assert_no_complete_output(&save);
}

#[test]
fn nan_in_a_float_tensor_is_copied_as_is() {
    // Only weights to be quantized are refused: a norm is written unchanged, whatever it holds.
    let (_t, model, save) = setup("nan-norm");
    poison(&model.join("model.safetensors"), "model.layers.0.input_layernorm.weight", 1, 0x7FC0);
    quant(&model, &save, "w8a16", &[], &[]).assert_ok();
    let out = read_st(&save.join("quant_model_weights.safetensors"));
    assert_eq!(out["model.layers.0.input_layernorm.weight"].data[2..4], 0x7FC0u16.to_le_bytes());
}

#[test]
fn save_path_is_a_file() {
    let (_t, model, save) = setup("save-file");
    std::fs::write(&save, b"not a folder").unwrap();
    refuses(&model, &save, &[&path_str(&save), "not a folder"]);
    assert_eq!(std::fs::read(&save).unwrap(), b"not a folder");
}

#[test]
fn save_path_is_the_model_folder() {
    let (_t, model, _) = setup("save-model");
    let before = snapshot(&model, true);
    refuses_keeping(&model, &model, &[&path_str(&model), "model folder"]);
    assert_eq!(snapshot(&model, true), before, "the model folder is untouched");
}

fn refuses_keeping(model: &Path, save: &Path, needles: &[&str]) {
    quant(model, save, "w8a8_dynamic", &[], &[]).assert_fails_with(needles);
}

#[test]
fn save_path_not_writable() {
    let (_t, model, _) = setup("save-ro");
    // Root ignores permission bits; /proc refuses new entries to everyone.
    for save in ["/proc/lamina-e2e-save", "/proc/lamina-e2e-save/nested"] {
        refuses(&model, Path::new(save), &[save]);
    }
    // An existing folder on a read-only mount, if this machine lets the test make one.
    if !unshare_works() {
        eprintln!("SKIPPED the read-only mount case: `unshare -rm` is not available here");
        return;
    }
    let mnt = model.parent().unwrap().join("ro");
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m,ro tmpfs '{mnt}' && exec '{BIN}' quant --model_path '{model}' --save_path '{mnt}' --quant_type w8a16",
        mnt = mnt.display(),
        model = model.display()
    );
    let out = std::process::Command::new("unshare").args(["-rm", "sh", "-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(c) if c != 0), "{stderr}");
    assert!(stderr.contains(&format!("{} is not writable", mnt.display())), "{stderr}");
}

#[test]
fn device_npu() {
    let (_t, model, save) = setup("npu");
    quant(&model, &save, "w8a16", &["--device", "npu"], &[]).assert_fails_with(&["npu", "cpu"]);
    assert!(!save.exists());
}
