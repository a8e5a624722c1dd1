//! The calibration benchmark: wall time and peak RSS of a calibrated W8A8 quantization (SmoothQuant 0.8 +
//! GPTQ, static per-tensor activations with min-max ranges) run by the release `lamina` binary, set against
//! the figures of vLLM's llm-compressor for the same job on SmolLM2-135M.
//!
//! ```text
//! cargo bench --bench calibration
//! LAMINA_BENCH_MODEL=/path/to/smollm2 LAMINA_BENCH_EVAL_TEXT=/path/to/wiki-eval.txt cargo bench --bench calibration
//! ```
//!
//! Settings come from the environment (this bench is slow, so `cargo bench` runs it once by default):
//!
//! | variable | default |
//! |---|---|
//! | `LAMINA_BENCH_MODEL` | a synthetic Llama checkpoint with SmolLM2-135M's shapes (`tests/fixtures/configs/smollm2-135m/config.json`), random bf16 weights, written to a temp folder |
//! | `LAMINA_BENCH_CALIB` | `calib/text/corpus.txt` when the model has a `tokenizer.json`, else a JSONL of random pre-tokenized ids the bench writes |
//! | `LAMINA_BENCH_SAMPLES`, `LAMINA_BENCH_SEQ_LEN` | 32 sequences of 512 tokens |
//! | `LAMINA_BENCH_RECIPE` | `benches/recipes/sq_gptq.yaml` |
//! | `LAMINA_BENCH_RUNS` | 1 (the median of the runs is reported) |
//! | `LAMINA_BENCH_EVAL_TEXT` | unset: no evaluation. Set: `lamina eval` on this text prints float and quantized perplexity |
//! | `LAMINA_BENCH_EVAL_SEQ_LEN`, `LAMINA_BENCH_EVAL_WINDOWS` | windows of 512 tokens, at most 40 |
//! | `LAMINA_BENCH_DIR`, `LAMINA_BENCH_KEEP` | a temp folder, deleted at the end unless `LAMINA_BENCH_KEEP=1` |
//!
//! Each run is `lamina quant --config_path RECIPE --calib_data ... --overwrite` as a child process; its peak RSS
//! is the child's `ru_maxrss` from `wait4` (the kernel's VmHWM of that process). The llm-compressor figures were
//! measured elsewhere (see `benches/PERPLEXITY.md`); they are printed for comparison, not measured here.

mod common;

use common::{median, run_measured, splitmix64, ChildRun, MB};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// vLLM llm-compressor, SmoothQuant 0.8 + GPTQ W8A8 on SmolLM2-135M with 32 samples of 512 tokens, on a
/// 2-core machine like the one lamina's figures come from (measured elsewhere, not by this bench).
const LLM_COMPRESSOR_SECONDS: f64 = 266.6;
const LLM_COMPRESSOR_PEAK_GB: f64 = 1.95;

struct Settings {
    model: Option<PathBuf>,
    calib: Option<PathBuf>,
    samples: usize,
    seq_len: usize,
    recipe: PathBuf,
    runs: usize,
    eval_text: Option<PathBuf>,
    eval_seq_len: usize,
    eval_windows: usize,
    dir: PathBuf,
    keep: bool,
}

fn settings() -> Settings {
    let path = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let number = |k: &str, default: usize| match std::env::var(k) {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|_| panic!("{k}={v} is not a whole number")),
        _ => default,
    };
    let s = Settings {
        model: path("LAMINA_BENCH_MODEL"),
        calib: path("LAMINA_BENCH_CALIB"),
        samples: number("LAMINA_BENCH_SAMPLES", 32),
        seq_len: number("LAMINA_BENCH_SEQ_LEN", 512),
        recipe: path("LAMINA_BENCH_RECIPE").unwrap_or_else(|| repo().join("benches/recipes/sq_gptq.yaml")),
        runs: number("LAMINA_BENCH_RUNS", 1),
        eval_text: path("LAMINA_BENCH_EVAL_TEXT"),
        eval_seq_len: number("LAMINA_BENCH_EVAL_SEQ_LEN", 512),
        eval_windows: number("LAMINA_BENCH_EVAL_WINDOWS", 40),
        dir: path("LAMINA_BENCH_DIR")
            .unwrap_or_else(|| std::env::temp_dir().join(format!("lamina-calib-bench-{}", std::process::id()))),
        keep: std::env::var("LAMINA_BENCH_KEEP").is_ok_and(|v| v == "1"),
    };
    assert!(s.runs >= 1 && s.samples >= 1 && s.seq_len >= 2, "runs, samples and seq_len must be positive");
    s
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() {
    let s = settings();
    std::fs::create_dir_all(&s.dir).unwrap();
    let lamina = PathBuf::from(env!("CARGO_BIN_EXE_lamina"));

    let (model_dir, synthetic) = match &s.model {
        Some(m) => (m.clone(), false),
        None => {
            let dir = s.dir.join("model");
            let config = repo().join("tests/fixtures/configs/smollm2-135m/config.json");
            common::write_synthetic_checkpoint(&config, &dir, &|_, _| true);
            (dir, true)
        }
    };
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_dir.join("config.json")).unwrap()).unwrap();
    let has_tokenizer = model_dir.join("tokenizer.json").is_file();
    println!(
        "model        : {} ({}{}, {} layers, hidden {}, {:.0} MB of weights)",
        model_dir.display(),
        if synthetic { "synthetic SmolLM2-135M shapes, random bf16 weights; " } else { "" },
        config["model_type"].as_str().unwrap_or("?"),
        config["num_hidden_layers"],
        config["hidden_size"],
        weight_bytes(&model_dir) as f64 / MB
    );

    let calib = match (&s.calib, has_tokenizer) {
        (Some(c), _) => c.clone(),
        (None, true) => repo().join("calib/text/corpus.txt"),
        (None, false) => {
            let vocab = config["vocab_size"].as_u64().expect("config.json has no vocab_size") as usize;
            let path = s.dir.join("calib-ids.jsonl");
            write_random_ids(&path, s.samples, s.seq_len, vocab);
            path
        }
    };
    println!("calibration  : {} samples x {} tokens from {}", s.samples, s.seq_len, calib.display());
    println!("recipe       : {}", s.recipe.display());

    let save = s.dir.join("quant");
    let log = s.dir.join("quant.log");
    let mut runs: Vec<ChildRun> = Vec::new();
    for run in 1..=s.runs {
        let r = run_measured(
            Command::new(&lamina)
                .arg("quant")
                .arg("--model_path")
                .arg(&model_dir)
                .arg("--save_path")
                .arg(&save)
                .arg("--config_path")
                .arg(&s.recipe)
                .arg("--calib_data")
                .arg(&calib)
                .args(["--calib_samples", &s.samples.to_string(), "--calib_seq_len", &s.seq_len.to_string()])
                .arg("--overwrite")
                .stderr(File::create(&log).unwrap()),
        );
        if !r.ok {
            panic!("lamina quant failed (status {}):\n{}", r.status, std::fs::read_to_string(&log).unwrap_or_default());
        }
        println!(
            "run {run}        : {:.1} s wall, {:.1} CPU-s, peak RSS {:.0} MB",
            r.wall,
            r.cpu,
            r.peak_rss as f64 / MB
        );
        runs.push(r);
    }

    let wall = median(runs.iter().map(|r| r.wall).collect());
    let cpu = median(runs.iter().map(|r| r.cpu).collect());
    let peak = median(runs.iter().map(|r| r.peak_rss as f64).collect());
    println!("--- median of {} run(s) ---", s.runs);
    println!("wall time    : {wall:.1} s ({cpu:.1} CPU-s on {} core(s))", available_cores());
    println!("peak RSS     : {:.0} MB (the child's VmHWM, ru_maxrss from wait4)", peak / MB);
    println!(
        "llm-compressor, SmoothQuant 0.8 + GPTQ W8A8 on SmolLM2-135M, 32 x 512 (measured elsewhere): {LLM_COMPRESSOR_SECONDS} s, {LLM_COMPRESSOR_PEAK_GB} GB"
    );
    let same_job = s.samples == 32 && s.seq_len == 512 && is_smollm2_shape(&config);
    println!(
        "lamina vs it : {:.2}x faster, {:.2}x less peak memory{}",
        LLM_COMPRESSOR_SECONDS / wall,
        LLM_COMPRESSOR_PEAK_GB * 1e9 / peak,
        if same_job { "" } else { " (not the same model shapes or sample count: indicative only)" }
    );

    if let Some(text) = &s.eval_text {
        if has_tokenizer {
            evaluate(&lamina, &model_dir, &save, text, &s);
        } else {
            println!("eval         : skipped, {} has no tokenizer.json to tokenize the text", model_dir.display());
        }
    }

    if s.keep {
        println!("kept {}", s.dir.display());
    } else {
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}

/// `lamina eval` of the float model and the quantized output; prints both perplexities.
fn evaluate(lamina: &Path, model_dir: &Path, save: &Path, text: &Path, s: &Settings) {
    let out = s.dir.join("eval.out");
    let log = s.dir.join("eval.log");
    let r = run_measured(
        Command::new(lamina)
            .arg("eval")
            .arg("--model_path")
            .arg(model_dir)
            .arg("--quantized")
            .arg(save)
            .arg("--text")
            .arg(text)
            .args(["--seq_len", &s.eval_seq_len.to_string(), "--max_windows", &s.eval_windows.to_string()])
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&log).unwrap()),
    );
    if !r.ok {
        panic!("lamina eval failed (status {}):\n{}", r.status, std::fs::read_to_string(&log).unwrap_or_default());
    }
    let report = std::fs::read_to_string(&out).unwrap();
    let value = |prefix: &str| -> f64 {
        let line = report.lines().find_map(|l| l.strip_prefix(prefix));
        let line = line.unwrap_or_else(|| panic!("lamina eval printed no `{prefix}` line:\n{report}"));
        line.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap()
    };
    let (float, quantized) = (value("float perplexity: "), value("quantized perplexity: "));
    let windows = report.lines().find_map(|l| l.strip_prefix("windows: ")).unwrap_or("?");
    let windows = windows.split(" (").next().unwrap();
    println!("eval         : {}, {windows}, in {:.1} s", text.display(), r.wall);
    println!("perplexity   : float {float:.4}, quantized {quantized:.4} ({:+.2}%)", 100.0 * (quantized / float - 1.0));
}

fn is_smollm2_shape(config: &serde_json::Value) -> bool {
    let shape = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"];
    shape.iter().map(|k| config[k].as_u64()).eq([576, 1536, 30, 9, 49152].map(Some))
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// `samples` lines of `{"input_ids": [...]}`, `seq_len` ids each, uniform over the vocabulary.
fn write_random_ids(path: &Path, samples: usize, seq_len: usize, vocab: usize) {
    let mut out = std::io::BufWriter::new(File::create(path).unwrap());
    let mut state = 0x5EED_CA11_B8A7_E000u64;
    for _ in 0..samples {
        let ids: Vec<u64> = (0..seq_len).map(|_| splitmix64(&mut state) % vocab as u64).collect();
        serde_json::to_writer(&mut out, &serde_json::json!({ "input_ids": ids })).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
}
