//! Helpers shared by the benchmarks (`mod common;` in each): medians, random bf16 weights, synthetic checkpoints, and a child
//! process run with its wall time, CPU time and peak RSS.
#![allow(dead_code)] // each benchmark uses a part

use lamina::model::Model;
use rayon::prelude::*;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

pub const MB: f64 = 1e6;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// `n` bf16 values uniform in `centre ± spread`, generated in parallel (splitmix64).
pub fn random_bf16(n: usize, seed: u64, centre: f32, spread: f32) -> Vec<u8> {
    let mut buf = vec![0u8; 2 * n];
    buf.par_chunks_mut(1 << 17).enumerate().for_each(|(p, chunk)| {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (p as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        for pair in chunk.chunks_exact_mut(2) {
            let u = (splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
            let v = half::bf16::from_f32(centre + spread * (2.0 * u - 1.0));
            pair.copy_from_slice(&v.to_le_bytes());
        }
    });
    buf
}

/// The next value of a splitmix64 stream whose state is `s`.
pub fn splitmix64(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What a child process did.
#[derive(Debug, Clone, Copy)]
pub struct ChildRun {
    /// Exited with status 0.
    pub ok: bool,
    /// The raw `wait4` status, for messages.
    pub status: i32,
    /// Wall seconds from spawn to exit.
    pub wall: f64,
    /// User + system CPU seconds of the child (all its threads).
    pub cpu: f64,
    /// Its peak resident set size in bytes (`ru_maxrss`, the kernel's VmHWM of the child).
    pub peak_rss: u64,
}

/// Runs `cmd` to completion and measures it. `wait4` reaps the child and gives its rusage, which
/// std's `Child::wait` cannot.
#[allow(clippy::zombie_processes)] // reaped by wait4
pub fn run_measured(cmd: &mut Command) -> ChildRun {
    let started = Instant::now();
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid out-parameters.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(pid, child.id() as libc::pid_t, "wait4 failed");
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    ChildRun {
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        status,
        wall,
        cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        peak_rss: usage.ru_maxrss as u64 * 1024,
    }
}

/// A one-file checkpoint (`model.safetensors` + `config.json`) of the tensors of `config`'s release
/// layout that `keep` accepts, random bf16 of trained-model magnitudes: norm scales near 1, biases
/// ±0.02, linears and embeddings ±0.035 (uniform with standard deviation 0.02, the configs'
/// initializer_range). Returns the data bytes; the written file's pages are dropped from the cache.
pub fn write_synthetic_checkpoint(config_path: &Path, dir: &Path, keep: &dyn Fn(&Model, &str) -> bool) -> u64 {
    use lamina::io::shards::{drop_cache, ShardLayout};
    use lamina::model::layout;
    use lamina::tensor::{DType, TensorMeta};
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(config_path).unwrap()).unwrap();
    let model = Model::new(&config, None, &[]).unwrap();
    let metas: Vec<TensorMeta> = layout::synthesize_inventory(model.family, &config)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| keep(&model, n))
        .map(|(n, shape)| TensorMeta::new(n, DType::BF16, &shape))
        .collect();
    assert!(!metas.is_empty(), "{}: no tensor to write", config_path.display());
    let shards = ShardLayout::plan(&metas, None, &|_, _| "model.safetensors".into()).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let f = &shards.files[0];
    let mut out = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(dir.join(&f.name)).unwrap());
    out.write_all(&f.header).unwrap();
    for (i, t) in f.tensors.iter().enumerate() {
        let (centre, spread) = if t.name.contains("norm") && t.name.ends_with(".weight") {
            (1.0, 0.1)
        } else if t.name.ends_with(".bias") {
            (0.0, 0.02)
        } else {
            (0.0, 0.035)
        };
        out.write_all(&random_bf16(t.numel(), i as u64 + 1, centre, spread)).unwrap();
    }
    let file = out.into_inner().unwrap();
    file.sync_all().unwrap();
    drop_cache(&file);
    metas.iter().map(|m| m.nbytes()).sum()
}

/// This process's CPU time in seconds (every thread), for CPU-time figures beside wall times.
pub fn cpu_seconds() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// GFLOP/s (wall) and GFLOP per CPU-second of one `[m, k] · [k, n]` product on the CPU device
/// (faer, every thread of the pool), medians of 5 after a warm-up.
pub fn gemm_throughput(m: usize, k: usize, n: usize) -> (f64, f64) {
    use lamina::device::{Cpu, Device};
    use ndarray::Array2;
    let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 13) as f32 * 0.01);
    let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j * 11) % 17) as f32 * 0.01);
    std::hint::black_box(Cpu.matmul(a.view(), b.view()));
    let (wall, cpu): (Vec<f64>, Vec<f64>) = (0..5)
        .map(|_| {
            let (w, c) = (Instant::now(), cpu_seconds());
            std::hint::black_box(Cpu.matmul(a.view(), b.view()));
            (w.elapsed().as_secs_f64(), cpu_seconds() - c)
        })
        .unzip();
    let flop = 2.0 * (m * k * n) as f64;
    (flop / median(wall) / 1e9, flop / median(cpu) / 1e9)
}
