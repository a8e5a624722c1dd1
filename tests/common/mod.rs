//! Shared helpers of the end-to-end tests: running the binary, scratch folders, reading and
//! writing safetensors files with the `safetensors` crate (independently of lamina's reader),
//! and a seeded random generator.
#![allow(dead_code)]

pub mod calibrated;
pub mod check;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_lamina");

/// The environment variables that inject faults; every run starts without them.
pub const FAULT_VARS: [&str; 3] =
    ["LAMINA_FAULT_ENOSPC_AFTER", "LAMINA_FAULT_ABORT_AFTER_TENSORS", "LAMINA_FAULT_STALL_AFTER_TENSORS"];

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A scratch folder under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("lamina-e2e-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn assert_ok(&self) -> &Run {
        assert_eq!(self.code, Some(0), "lamina failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self
    }
    /// Asserts a clean failure (an exit code other than 0, not a crash) whose message holds every needle.
    pub fn assert_fails_with(&self, needles: &[&str]) -> &Run {
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a failure, got {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "lamina panicked: {}", self.stderr);
        let all = format!("{}\n{}", self.stdout, self.stderr);
        for n in needles {
            assert!(all.contains(n), "the message does not mention {n:?}:\n{all}");
        }
        self
    }
}

pub fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args).stdin(Stdio::null());
    for v in FAULT_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("the lamina binary runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

pub fn quant_args<'a>(model: &'a Path, save: &'a Path, quant_type: &'a str) -> Vec<String> {
    vec![
        "quant".into(),
        "--model_path".into(),
        model.display().to_string(),
        "--save_path".into(),
        save.display().to_string(),
        "--quant_type".into(),
        quant_type.into(),
    ]
}

/// `lamina quant` with extra arguments (and environment).
pub fn quant(model: &Path, save: &Path, quant_type: &str, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = quant_args(model, save, quant_type);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run(&args, env)
}

/// The save folder holds nothing that looks like a finished output.
pub fn assert_no_complete_output(save: &Path) {
    let Ok(entries) = std::fs::read_dir(save) else {
        return;
    };
    for e in entries {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !(name == "quant_model_description.json"
                || name.starts_with("quant_model_weights")
                || name == "config.json"),
            "{} holds {name}, which looks like finished output",
            save.display()
        );
    }
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct St {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl St {
    pub fn bf16(shape: &[usize], v: &[f32]) -> St {
        St {
            dtype: "BF16".into(),
            shape: shape.to_vec(),
            data: v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Float values widened to f32 (bf16, f16, f32).
    pub fn f32s(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "BF16" => self.data.chunks_exact(2).map(|c| bf16_bits(u16::from_le_bytes([c[0], c[1]]))).collect(),
            "F16" => self.data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            "F32" => self.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            d => panic!("not a float dtype: {d}"),
        }
    }
    pub fn i8s(&self) -> Vec<i8> {
        assert_eq!(self.dtype, "I8");
        self.data.iter().map(|&b| b as i8).collect()
    }
    pub fn i32s(&self) -> Vec<i32> {
        assert_eq!(self.dtype, "I32");
        self.data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

pub fn bf16_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Reads every tensor of a safetensors file with the `safetensors` crate.
pub fn read_st(path: &Path) -> BTreeMap<String, St> {
    let buf = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&buf).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, St { dtype: format!("{:?}", v.dtype()), shape: v.shape().to_vec(), data: v.data().to_vec() }))
        .collect()
}

fn st_dtype(name: &str) -> safetensors::Dtype {
    use safetensors::Dtype as D;
    match name {
        "BF16" => D::BF16,
        "F16" => D::F16,
        "F32" => D::F32,
        "I8" => D::I8,
        "I32" => D::I32,
        "I64" => D::I64,
        "U8" => D::U8,
        "F8_E4M3" => D::F8_E4M3,
        d => panic!("test helper cannot write {d}"),
    }
}

/// Writes tensors to a safetensors file with the `safetensors` crate.
pub fn write_st(path: &Path, tensors: &BTreeMap<String, St>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, t)| {
            (n.clone(), safetensors::tensor::TensorView::new(st_dtype(&t.dtype), t.shape.clone(), &t.data).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// The raw JSON header of a safetensors file and the byte offset where its data starts.
pub fn raw_header(path: &Path) -> (serde_json::Map<String, serde_json::Value>, Vec<u8>) {
    let buf = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(buf[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&buf[8..8 + n]).unwrap();
    (h.as_object().unwrap().clone(), buf[8 + n..].to_vec())
}

/// Writes a safetensors file from a raw header and data section, exactly as given.
pub fn write_raw(path: &Path, header: &serde_json::Map<String, serde_json::Value>, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Copies a folder's regular files (not recursive).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of a fixture without its reference activations (not needed by `quant`).
pub fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    copy_dir(&fixture(name), to);
    let _ = std::fs::remove_file(to.join("reference.safetensors"));
    to.to_path_buf()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display())))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

pub fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// Rewrites a checkpoint folder's single `model.safetensors` as `n` shards with an index, in name
/// order, returning the shard each tensor went to.
pub fn shard_checkpoint(dir: &Path, n: usize) -> BTreeMap<String, String> {
    let all = read_st(&dir.join("model.safetensors"));
    let per = all.len().div_ceil(n);
    let mut weight_map = BTreeMap::new();
    let names: Vec<&String> = all.keys().collect();
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let part: BTreeMap<String, St> = chunk.iter().map(|n| ((*n).clone(), all[*n].clone())).collect();
        write_st(&dir.join(&file), &part);
        for name in chunk {
            weight_map.insert((*name).clone(), file.clone());
        }
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_json(
        &dir.join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map}),
    );
    weight_map
}

/// Every regular file of a folder (hidden ones only if asked) with its bytes.
pub fn snapshot(dir: &Path, hidden: bool) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if e.file_type().unwrap().is_file() && (hidden || !name.starts_with('.')) {
            out.insert(name, std::fs::read(e.path()).unwrap());
        }
    }
    out
}

/// Names of the files in which two snapshots differ.
pub fn differing(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
    names.sort();
    names.dedup();
    names.into_iter().filter(|n| a.get(*n) != b.get(*n)).cloned().collect()
}

/// xorshift64*: a small seeded generator, so every run of a test does the same thing.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in [-1, 1).
    pub fn signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A Qwen3-VL-MoE checkpoint of `layers` text layers with random bf16 weights, built from the
/// fixture's config and tensor names (fused experts in the release layout), a few MB in size.
pub fn write_synthetic_moe(dir: &Path, layers: usize, seed: u64) -> PathBuf {
    let src = fixture("qwen3_vl_moe");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["preprocessor_config.json", "image.png"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config = read_json(&src.join("config.json"));
    config["text_config"]["num_hidden_layers"] = serde_json::json!(layers);
    write_json(&dir.join("config.json"), &config);

    let base = read_st(&src.join("model.safetensors"));
    let prefix = "model.language_model.layers.";
    let mut rng = Rng::new(seed);
    let mut out = BTreeMap::new();
    for (name, t) in &base {
        let Some(rest) = name.strip_prefix(prefix) else {
            out.insert(name.clone(), t.clone());
            continue;
        };
        let (layer, tail) = rest.split_once('.').unwrap();
        if layer != "0" {
            continue;
        }
        for i in 0..layers {
            let v: Vec<f32> = (0..t.numel()).map(|_| rng.signed() * 0.05).collect();
            out.insert(format!("{prefix}{i}.{tail}"), St::bf16(&t.shape, &v));
        }
    }
    write_st(&dir.join("model.safetensors"), &out);
    dir.to_path_buf()
}

/// A copy of a text fixture (`llama`, `qwen3`, `qwen3_moe`) with every dimension doubled and the
/// expert intermediate size raised to 128 (hidden 128, intermediate 256, expert intermediate 128, head_dim
/// 32; vocabulary and expert count kept) and random bf16 weights: sizes that, like every released model's,
/// divide by the 128-wide groups of W4A16.
pub fn write_widened(name: &str, dir: &Path, seed: u64) -> PathBuf {
    let src = fixture(name);
    copy_dir(&src, dir);
    let mut config = read_json(&src.join("config.json"));
    for (k, v) in [("hidden_size", 128), ("intermediate_size", 256), ("moe_intermediate_size", 128), ("head_dim", 32)] {
        if config.get(k).is_some() || k == "head_dim" {
            config[k] = serde_json::json!(v);
        }
    }
    write_json(&dir.join("config.json"), &config);
    let widen = |d: usize| match d {
        64 => 128,
        48 => 128,
        128 => 256,
        16 => 32,
        32 => 64,
        other => other,
    };
    let mut rng = Rng::new(seed);
    let out: BTreeMap<String, St> = read_st(&src.join("model.safetensors"))
        .into_iter()
        .map(|(n, t)| {
            let shape: Vec<usize> = t.shape.iter().map(|&d| widen(d)).collect();
            let numel: usize = shape.iter().product();
            let norm = n.ends_with("norm.weight");
            let v: Vec<f32> =
                (0..numel).map(|_| if norm { 1.0 + 0.1 * rng.signed() } else { rng.signed() * 0.05 }).collect();
            (n, St::bf16(&shape, &v))
        })
        .collect();
    write_st(&dir.join("model.safetensors"), &out);
    let _ = std::fs::remove_file(dir.join("reference.safetensors"));
    dir.to_path_buf()
}

/// `lamina check OUT` (with extra arguments).
pub fn check(out: &Path, extra: &[&str]) -> Run {
    let out = out.display().to_string();
    let mut args = vec!["check", out.as_str()];
    args.extend(extra);
    run(&args, &[])
}

/// Whether this machine lets the tests make a private mount namespace (`unshare -rm`) and mount
/// a tmpfs in it. The mount is invisible outside and vanishes with the namespace.
pub fn unshare_works() -> bool {
    let script = format!("mount -t tmpfs -o size=64k tmpfs '{}'", std::env::temp_dir().display());
    Command::new("unshare").args(["-rm", "sh", "-c", &script]).output().is_ok_and(|o| o.status.success())
}

/// A copy of a GLM-4.5 fixture (`glm4_moe`) with the multi-token-prediction layer its release
/// stores after the decoder layers and config.json counts in `num_nextn_predict_layers`:
/// `model.layers.{N}` holds a full decoder layer (random bf16 values in the shapes of the last
/// layer's tensors) plus `enorm`, `hnorm`, `eh_proj` ([hidden, 2·hidden]), `shared_head.norm` and
/// `shared_head.head` ([vocab, hidden]). Reference activations are kept: the MTP layer is not part
/// of the forward they record.
pub fn with_mtp_layer(name: &str, dir: &Path, seed: u64) -> PathBuf {
    copy_dir(&fixture(name), dir);
    let config = read_json(&dir.join("config.json"));
    let n = config["num_hidden_layers"].as_u64().unwrap() as usize;
    let (h, vocab) =
        (config["hidden_size"].as_u64().unwrap() as usize, config["vocab_size"].as_u64().unwrap() as usize);
    let path = dir.join("model.safetensors");
    let mut all = read_st(&path);
    let mut rng = Rng::new(seed);
    let mut random = |shape: &[usize], norm: bool| {
        let v: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| if norm { 1.0 + 0.1 * rng.signed() } else { rng.signed() * 0.05 })
            .collect();
        St::bf16(shape, &v)
    };
    let last = format!("model.layers.{}.", n - 1);
    let copies: Vec<(String, Vec<usize>)> =
        all.iter().filter_map(|(k, t)| k.strip_prefix(&last).map(|tail| (tail.to_string(), t.shape.clone()))).collect();
    let mtp = format!("model.layers.{n}");
    for (tail, shape) in copies {
        let t = random(&shape, tail.contains("norm"));
        all.insert(format!("{mtp}.{tail}"), t);
    }
    for (tail, shape, norm) in [
        ("enorm.weight", vec![h], true),
        ("hnorm.weight", vec![h], true),
        ("eh_proj.weight", vec![h, 2 * h], false),
        ("shared_head.norm.weight", vec![h], true),
        ("shared_head.head.weight", vec![vocab, h], false),
    ] {
        let t = random(&shape, norm);
        all.insert(format!("{mtp}.{tail}"), t);
    }
    write_st(&path, &all);
    dir.to_path_buf()
}
