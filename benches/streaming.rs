//! The streaming benchmark: how close `lamina quant` comes to a plain copy of the same bytes, and how much
//! memory it holds, on a synthetic checkpoint with the real tensor shapes of a model.
//!
//! ```text
//! cargo bench --bench streaming -- [--config PATH] [--layers N] [--experts E] [--runs R] [--quant_type T]
//!                                  [--shard_gib G] [--dir DIR] [--keep]
//!                                  [--calib_samples S --calib_seq_len L] [--quant_only]
//! ```
//!
//! A calibrated `--quant_type` (`w8a8`) calibrates on the bundled data (`calib/`: photographs and
//! prompts), `--calib_samples` × `--calib_seq_len` tokens; `--quant_only` skips the read and the copy
//! (for a calibrated run, where the disk does not decide): the figure is then the peak RSS against the
//! plan's.
//!
//! 1. Builds a checkpoint from `config.json` (default: Qwen3-VL-30B-A3B) with `--layers` text layers (default
//!    4), every tensor of the release layout (`model::layout::synthesize_inventory`: fused experts, vision
//!    tower) filled with random bf16, written as `model-0000k-of-0000N.safetensors` shards of `--shard_gib`
//!    (default 2) with `model.safetensors.index.json`. A config with an FP8 `quantization_config`
//!    (`quant_method: fp8`, `weight_block_size`: DeepSeek-V3's, Qwen3's FP8 releases) gets its decoder
//!    linears as random `F8_E4M3` with an f32 `weight_scale_inv` per block, as those releases store them
//!    (embeddings, lm_head, norms and routers stay bf16). `--experts E` keeps E routed experts of the real
//!    shape per MoE layer (a data-free unit's peak is one linear's, whatever the count; fewer experts keep
//!    the checkpoint within the disk).
//! 2. `--runs` times (default 3), alternating: a plain read of every input byte (8 MiB at a time, nothing
//!    written), a plain copy (read every input byte, write as many bytes to the same disk, fsync, as `cp`
//!    would), then `lamina quant --quant_type T` (default w8a8_dynamic) as a child process, its peak RSS from
//!    `wait4`. Before each, the input files' pages are dropped from the page cache (`posix_fadvise(DONTNEED)`),
//!    so all three read from disk.
//! 3. Prints medians: wall time, throughput in input bytes per second and its ratio to the read's and the
//!    copy's, and peak RSS against lamina's own plan, with the targets (≥ 0.9× read throughput; peak RSS
//!    within the plan's predicted peak and ≤ 1 GiB). A checkpoint larger than the machine's RAM (`--layers`
//!    enough) shows that nothing depends on the page cache holding the input.
//! 4. Deletes everything it wrote unless `--keep`.

mod common;

use common::{median, run_measured, splitmix64, MB};
use lamina::io::shards::{drop_cache, ShardLayout};
use lamina::model::{layout, Model};
use lamina::pipeline::{prepare, QuantArgs};
use lamina::tensor::{DType, TensorMeta};
use rayon::prelude::*;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;

struct Args {
    config: PathBuf,
    layers: usize,
    experts: Option<usize>,
    runs: usize,
    quant_type: String,
    shard_gib: f64,
    dir: PathBuf,
    keep: bool,
    calib_samples: usize,
    calib_seq_len: usize,
    quant_only: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        config: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs/qwen3-vl-30b-a3b/config.json"),
        layers: 4,
        experts: None,
        runs: 3,
        quant_type: "w8a8_dynamic".into(),
        shard_gib: 2.0,
        dir: std::env::temp_dir().join(format!("lamina-bench-{}", std::process::id())),
        keep: false,
        calib_samples: 32,
        calib_seq_len: 512,
        quant_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--config" => a.config = value().into(),
            "--layers" => a.layers = value().parse().expect("--layers N"),
            "--experts" => a.experts = Some(value().parse().expect("--experts E")),
            "--runs" => a.runs = value().parse().expect("--runs R"),
            "--quant_type" => a.quant_type = value(),
            "--shard_gib" => a.shard_gib = value().parse().expect("--shard_gib G"),
            "--dir" => a.dir = value().into(),
            "--keep" => a.keep = true,
            "--calib_samples" => a.calib_samples = value().parse().expect("--calib_samples S"),
            "--calib_seq_len" => a.calib_seq_len = value().parse().expect("--calib_seq_len L"),
            "--quant_only" => a.quant_only = true,
            "--bench" => {} // cargo bench passes it
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.runs >= 1 && a.layers >= 1);
    a
}

fn main() {
    let args = parse_args();
    let model_dir = args.dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();

    let t = Instant::now();
    let files = write_checkpoint(&args.config, args.layers, args.experts, args.shard_gib, &model_dir);
    let bytes_in: u64 = files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    println!(
        "checkpoint   : {} ({} text layers), {:.2} GiB in {} shard(s), written in {:.1} s",
        model_dir.display(),
        args.layers,
        bytes_in as f64 / GIB,
        files.len(),
        t.elapsed().as_secs_f64()
    );

    let (largest_name, largest_input, planned_peak) = largest_unit(&model_dir, &args);
    println!(
        "largest unit : {largest_name}, {:.1} MB of input; the plan predicts a peak of {:.0} MB",
        largest_input as f64 / MB,
        planned_peak as f64 / MB
    );
    println!("RAM          : {:.1} GiB; checkpoint / RAM = {:.2}", ram() as f64 / GIB, bytes_in as f64 / ram() as f64);

    let lamina = PathBuf::from(env!("CARGO_BIN_EXE_lamina"));
    let (mut reads, mut copies, mut quants, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let (mut r, mut c) = (f64::NAN, f64::NAN);
        if !args.quant_only {
            drop_input_cache(&files);
            r = plain_read(&files);
            let copy_dir = args.dir.join("copy");
            drop_input_cache(&files);
            c = plain_copy(&files, &copy_dir);
            std::fs::remove_dir_all(&copy_dir).unwrap();
        }
        reads.push(r);

        let save = args.dir.join("quant");
        let _ = std::fs::remove_dir_all(&save);
        drop_input_cache(&files);
        let (q, peak) = run_quant(&lamina, &model_dir, &save, &args, &args.dir.join("quant.log"));
        std::fs::remove_dir_all(&save).unwrap();
        if args.quant_only {
            println!("run {run}        : quant {q:.2} s, peak RSS {:.0} MB", peak as f64 / MB);
            quants.push(q);
            rss.push(peak as f64);
            continue;
        }
        println!(
            "run {run}        : read {r:.2} s ({:.0} MB/s), copy {c:.2} s ({:.0} MB/s), quant {q:.2} s ({:.0} MB/s), peak RSS {:.0} MB",
            bytes_in as f64 / MB / r,
            bytes_in as f64 / MB / c,
            bytes_in as f64 / MB / q,
            peak as f64 / MB
        );
        copies.push(c);
        quants.push(q);
        rss.push(peak as f64);
    }

    if args.quant_only {
        let (q, peak) = (median(quants), median(rss));
        println!("--- medians of {} run(s), {} ---", args.runs, args.quant_type);
        println!("lamina quant : {q:.2} s");
        println!(
            "peak RSS     : {:.0} MB; the plan predicted {:.0} MB: {}",
            peak / MB,
            planned_peak as f64 / MB,
            if peak <= planned_peak as f64 { "within" } else { "OVER" }
        );
        if !args.keep {
            std::fs::remove_dir_all(&args.dir).unwrap();
        }
        return;
    }
    let (r, c, q, peak) = (median(reads), median(copies), median(quants), median(rss));
    let (read_tp, copy_tp, quant_tp) = (bytes_in as f64 / r, bytes_in as f64 / c, bytes_in as f64 / q);
    println!("--- medians of {} run(s), {} ---", args.runs, args.quant_type);
    println!("read         : {r:.2} s, {:.0} MB/s", read_tp / MB);
    println!("copy         : {c:.2} s, {:.0} MB/s", copy_tp / MB);
    println!(
        "lamina quant : {q:.2} s, {:.0} MB/s = {:.2}x read throughput (target >= 0.90x: {}), {:.2}x copy throughput",
        quant_tp / MB,
        quant_tp / read_tp,
        verdict(quant_tp / read_tp >= 0.9),
        quant_tp / copy_tp
    );
    println!(
        "peak RSS     : {:.0} MB = {:.2}x the largest unit ({:.0} MB); the plan predicted {:.0} MB: {}; 1 GiB: {}",
        peak / MB,
        peak / largest_input as f64,
        largest_input as f64 / MB,
        planned_peak as f64 / MB,
        if peak <= planned_peak as f64 { "within" } else { "OVER" },
        verdict(peak <= GIB)
    );

    if args.keep {
        println!("kept {}", args.dir.display());
    } else {
        std::fs::remove_dir_all(&args.dir).unwrap();
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// Writes the synthetic checkpoint; returns its shard files.
fn write_checkpoint(
    config_path: &Path,
    layers: usize,
    experts: Option<usize>,
    shard_gib: f64,
    dir: &Path,
) -> Vec<PathBuf> {
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(config_path).unwrap()).unwrap();
    let text = if config.get("text_config").is_some() { &mut config["text_config"] } else { &mut config };
    text["num_hidden_layers"] = layers.into();
    if let Some(e) = experts {
        let key = ["n_routed_experts", "num_experts", "num_local_experts"]
            .into_iter()
            .find(|k| text.get(*k).is_some())
            .expect("--experts needs a MoE config");
        text[key] = e.into();
        for k in ["num_experts_per_tok", "topk_group", "n_group"] {
            if let Some(v) = text.get(k).and_then(|v| v.as_u64()) {
                text[k] = (v as usize).min(e).into();
            }
        }
    }
    let block = fp8_block(&config);
    let model = Model::new(&config, None, &[]).unwrap();
    let mut metas: Vec<TensorMeta> = Vec::new();
    for (n, s) in layout::synthesize_inventory(model.family, &config).unwrap() {
        match block {
            Some([bh, bw]) if is_fp8_linear(&model, &n, &s) => {
                let grid = [s[0].div_ceil(bh), s[1].div_ceil(bw)];
                metas.push(TensorMeta::new(format!("{n}_scale_inv"), DType::F32, &grid));
                metas.push(TensorMeta::new(n, DType::F8E4M3, &s));
            }
            _ => metas.push(TensorMeta::new(n, DType::BF16, &s)),
        }
    }
    let limit = (shard_gib * GIB) as u64;
    let shards =
        ShardLayout::plan(&metas, Some(limit), &|k, n| format!("model-{:05}-of-{:05}.safetensors", k + 1, n)).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), shards.index_json().unwrap()).unwrap();
    let mut files = Vec::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for f in &shards.files {
        let path = dir.join(&f.name);
        let mut out = std::io::BufWriter::with_capacity(8 << 20, File::create(&path).unwrap());
        out.write_all(&f.header).unwrap();
        for t in &f.tensors {
            seed = seed.wrapping_add(1);
            match t.dtype {
                DType::F8E4M3 => write_random_fp8(&mut out, t.numel(), seed),
                DType::F32 => write_random_scales(&mut out, t.numel(), seed),
                _ => write_random_bf16(&mut out, t.numel(), seed),
            }
        }
        let file = out.into_inner().unwrap();
        file.sync_all().unwrap();
        drop_cache(&file);
        files.push(path);
    }
    files
}

/// The FP8 block size of a config whose `quantization_config` is block-wise FP8.
fn fp8_block(config: &serde_json::Value) -> Option<[usize; 2]> {
    let text = config.get("text_config").unwrap_or(config);
    let q = config.get("quantization_config").or_else(|| text.get("quantization_config"))?;
    if q.get("quant_method").and_then(|v| v.as_str()) != Some("fp8") {
        return None;
    }
    let b = q.get("weight_block_size")?.as_array()?;
    Some([b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize])
}

/// Whether an FP8 release stores this tensor as FP8: a decoder layer's linear weight (not its router,
/// nor the MTP layer's `eh_proj`).
fn is_fp8_linear(model: &Model, name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with("_proj.weight")
        && layout::layer_index(name, &format!("{}.layers.", model.layout.text)).is_some()
        && !name.ends_with("eh_proj.weight")
        && !name.contains("visual")
}

/// Random e4m3 values of magnitude 2^-3..2^1 and either sign (exponent field 4..=8: never NaN).
fn write_random_fp8(out: &mut impl Write, n: usize, seed: u64) {
    const BLOCK: usize = 32 << 20;
    let mut buf = vec![0u8; BLOCK.min(n)];
    for (b, start) in (0..n).step_by(BLOCK).enumerate() {
        let len = BLOCK.min(n - start);
        buf[..len].par_chunks_mut(1 << 16).enumerate().for_each(|(p, chunk)| {
            let mut s = seed ^ ((b as u64) << 32) ^ (p as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for v in chunk.iter_mut() {
                let z = splitmix64(&mut s);
                let exp = 4 + (z as u8 % 5);
                *v = ((z >> 8) as u8 & 0x80) | exp << 3 | ((z >> 16) as u8 & 7);
            }
        });
        out.write_all(&buf[..len]).unwrap();
    }
}

/// Random positive f32 block scales around 1e-3.
fn write_random_scales(out: &mut impl Write, n: usize, seed: u64) {
    let mut s = seed;
    for _ in 0..n {
        let v = 5e-4 + (splitmix64(&mut s) % 1000) as f32 * 1e-6;
        out.write_all(&v.to_le_bytes()).unwrap();
    }
}

/// Random bf16 values of magnitude 2^-7..2^-3 and either sign (no zeros, NaN or Inf), generated in parallel
/// 32 MiB at a time.
fn write_random_bf16(out: &mut impl Write, n: usize, seed: u64) {
    const BLOCK: usize = 16 << 20; // elements
    const PIECE: usize = 1 << 16;
    let mut buf = vec![0u8; BLOCK.min(n) * 2];
    for (b, start) in (0..n).step_by(BLOCK).enumerate() {
        let len = BLOCK.min(n - start);
        buf[..len * 2].par_chunks_mut(PIECE * 2).enumerate().for_each(|(p, chunk)| {
            let mut s = seed ^ ((b as u64) << 32) ^ (p as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            for pair in chunk.chunks_exact_mut(2) {
                let z = splitmix64(&mut s);
                let sign = (z as u16 & 1) << 15;
                let exp = 120 + ((z >> 1) as u16 & 3);
                let mant = (z >> 8) as u16 & 0x7F;
                pair.copy_from_slice(&(sign | exp << 7 | mant).to_le_bytes());
            }
        });
        out.write_all(&buf[..len * 2]).unwrap();
    }
}

/// The unit with the most input bytes, and the predicted peak, from lamina's own plan.
fn largest_unit(model_dir: &Path, args: &Args) -> (String, u64, u64) {
    let p = prepare(&QuantArgs {
        model_path: model_dir.to_path_buf(),
        save_path: None,
        quant_type: Some(args.quant_type.clone()),
        calib_samples: args.calib_samples,
        calib_seq_len: args.calib_seq_len,
        ..QuantArgs::default()
    })
    .unwrap();
    let u = p.plan.units.iter().max_by_key(|u| u.unit.stored_bytes).unwrap();
    (u.unit.name.clone(), u.unit.stored_bytes, p.plan.memory.peak)
}

fn ram() -> u64 {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    sys.total_memory()
}

/// Reads every input byte (8 MiB at a time) and drops it; returns the wall time.
fn plain_read(files: &[PathBuf]) -> f64 {
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    for f in files {
        let mut src = File::open(f).unwrap();
        while src.read(&mut buf).unwrap() > 0 {}
        drop_cache(&src);
    }
    t.elapsed().as_secs_f64()
}

fn drop_input_cache(files: &[PathBuf]) {
    for f in files {
        drop_cache(&File::open(f).unwrap());
    }
}

/// Reads every input byte and writes them to files in `dir` (8 MiB at a time, as `cp` does), then syncs;
/// returns the wall time including the sync.
fn plain_copy(files: &[PathBuf], dir: &Path) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    for f in files {
        let mut src = File::open(f).unwrap();
        let mut dst = File::create(dir.join(f.file_name().unwrap())).unwrap();
        loop {
            let n = src.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).unwrap();
        }
        dst.sync_all().unwrap();
        drop_cache(&dst);
        drop_cache(&src);
    }
    t.elapsed().as_secs_f64()
}

/// Runs `lamina quant` as a child; returns its wall time and peak RSS in bytes.
fn run_quant(lamina: &Path, model: &Path, save: &Path, args: &Args, log: &Path) -> (f64, u64) {
    let (samples, seq) = (args.calib_samples.to_string(), args.calib_seq_len.to_string());
    let r = run_measured(
        std::process::Command::new(lamina)
            .args(["quant", "--quant_type", &args.quant_type, "--model_path"])
            .arg(model)
            .args(["--calib_samples", &samples, "--calib_seq_len", &seq])
            .arg("--save_path")
            .arg(save)
            .stderr(File::create(log).unwrap()),
    );
    if !r.ok {
        panic!("lamina quant failed (status {}):\n{}", r.status, std::fs::read_to_string(log).unwrap_or_default());
    }
    (r.wall, r.peak_rss)
}
