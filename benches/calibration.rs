//! The calibration benchmark: lamina against vLLM's llm-compressor, side by side in one run, on the same
//! calibrated W8A8 job (SmoothQuant 0.8 + GPTQ, static per-tensor activations with min-max ranges, every linear
//! of the decoder) with the same calibration tokens: wall time, CPU time, peak RSS, their ratios, lamina's
//! efficiency on 1 and 2 threads and, given an evaluation text, the perplexity of both outputs.
//!
//! ```text
//! cargo bench --bench calibration
//! LAMINA_BENCH_MODEL=/path/to/smollm2 LAMINA_BENCH_CALIB=/path/to/wiki-calib.txt \
//!   LAMINA_BENCH_EVAL_TEXT=/path/to/wiki-eval.txt LAMINA_BENCH_LLMC=/path/to/venv cargo bench --bench calibration
//! ```
//!
//! Settings come from the environment (this bench is slow, so `cargo bench` runs it once by default):
//!
//! | variable | default |
//! |---|---|
//! | `LAMINA_BENCH_MODEL` | a synthetic Llama checkpoint with SmolLM2-135M's shapes (`tests/fixtures/configs/smollm2-135m/config.json`), random bf16 weights, written to a temp folder |
//! | `LAMINA_BENCH_CALIB` | `calib/text/corpus.txt` when the model has a `tokenizer.json`, else random token ids |
//! | `LAMINA_BENCH_SAMPLES`, `LAMINA_BENCH_SEQ_LEN` | 32 sequences of 512 tokens |
//! | `LAMINA_BENCH_RECIPE` | `benches/recipes/sq_gptq.yaml` |
//! | `LAMINA_BENCH_RUNS` | 1 (the median of the runs is reported) |
//! | `LAMINA_BENCH_THREADS` | `1,2`: lamina runs with each of these `--threads` (efficiency = T₁ / (n·Tₙ)) |
//! | `LAMINA_BENCH_LLMC` | unset: llm-compressor is not run. A venv folder: `DIR/bin/python` runs `benches/llm-compressor-job.py`; if the folder does not exist the bench makes it: `python3 -m venv DIR && DIR/bin/pip install llmcompressor==0.14.0.1` |
//! | `LAMINA_BENCH_EVAL_TEXT` | unset: no evaluation. Set: `lamina eval` on this text prints float and quantized perplexity, and llm-compressor's script the perplexity of its own output |
//! | `LAMINA_BENCH_EVAL_SEQ_LEN`, `LAMINA_BENCH_EVAL_WINDOWS` | windows of 512 tokens, at most 40 |
//! | `LAMINA_BENCH_DIR`, `LAMINA_BENCH_KEEP` | a temp folder, deleted at the end unless `LAMINA_BENCH_KEEP=1` |
//!
//! The calibration text is tokenized once, by lamina's own reader (`data::calib::load_text`, what
//! `lamina quant --calib_data TEXT` does), into a JSONL of `{"input_ids": [...]}` that both tools then read:
//! they calibrate on the very same tokens. Each run is a child process (`lamina quant --config_path RECIPE
//! --calib_data IDS --overwrite --threads N`, or the llm-compressor script); wall time, CPU time and peak RSS are
//! the child's (`wait4`), except llm-compressor's, which its script measures itself so that its evaluation is
//! left out. Runs alternate between the tools, so that a change of load on a shared machine hits both.

mod common;

use common::{gemm_throughput, median, run_measured, splitmix64, ChildRun, MB};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Settings {
    model: Option<PathBuf>,
    calib: Option<PathBuf>,
    samples: usize,
    seq_len: usize,
    recipe: PathBuf,
    runs: usize,
    threads: Vec<usize>,
    llmc: Option<PathBuf>,
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
    let threads = std::env::var("LAMINA_BENCH_THREADS").unwrap_or_else(|_| "1,2".into());
    let s = Settings {
        model: path("LAMINA_BENCH_MODEL"),
        calib: path("LAMINA_BENCH_CALIB"),
        samples: number("LAMINA_BENCH_SAMPLES", 32),
        seq_len: number("LAMINA_BENCH_SEQ_LEN", 512),
        recipe: path("LAMINA_BENCH_RECIPE").unwrap_or_else(|| repo().join("benches/recipes/sq_gptq.yaml")),
        runs: number("LAMINA_BENCH_RUNS", 1),
        threads: threads
            .split(',')
            .map(|t| t.trim().parse().unwrap_or_else(|_| panic!("LAMINA_BENCH_THREADS={threads}: a list like 1,2")))
            .collect(),
        llmc: path("LAMINA_BENCH_LLMC"),
        eval_text: path("LAMINA_BENCH_EVAL_TEXT"),
        eval_seq_len: number("LAMINA_BENCH_EVAL_SEQ_LEN", 512),
        eval_windows: number("LAMINA_BENCH_EVAL_WINDOWS", 40),
        dir: path("LAMINA_BENCH_DIR")
            .unwrap_or_else(|| std::env::temp_dir().join(format!("lamina-calib-bench-{}", std::process::id()))),
        keep: std::env::var("LAMINA_BENCH_KEEP").is_ok_and(|v| v == "1"),
    };
    assert!(s.runs >= 1 && s.samples >= 1 && s.seq_len >= 2, "runs, samples and seq_len must be positive");
    assert!(!s.threads.is_empty() && s.threads.iter().all(|&t| t >= 1), "LAMINA_BENCH_THREADS: positive counts");
    s
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One timed quantization.
#[derive(Debug, Clone, Copy)]
struct Timing {
    wall: f64,
    cpu: f64,
    peak: f64,
}

fn medians(runs: &[Timing]) -> Timing {
    Timing {
        wall: median(runs.iter().map(|r| r.wall).collect()),
        cpu: median(runs.iter().map(|r| r.cpu).collect()),
        peak: median(runs.iter().map(|r| r.peak).collect()),
    }
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

    let vocab = config["vocab_size"].as_u64().expect("config.json has no vocab_size") as usize;
    let ids_path = s.dir.join("calib-ids.jsonl");
    let source = match (&s.calib, has_tokenizer) {
        (Some(c), _) if c.extension().is_some_and(|e| e == "jsonl") => {
            std::fs::copy(c, &ids_path).unwrap();
            c.display().to_string()
        }
        (c, true) => {
            let text = c.clone().unwrap_or_else(|| repo().join("calib/text/corpus.txt"));
            let ids = lamina::data::calib::load_text(&model_dir, &text, s.samples, s.seq_len, vocab)
                .unwrap_or_else(|e| panic!("cannot tokenize {}: {e:#}", text.display()));
            write_ids(&ids_path, &ids);
            format!("{}, tokenized by lamina", text.display())
        }
        (Some(c), false) => panic!("{} is text but {} has no tokenizer.json", c.display(), model_dir.display()),
        (None, false) => {
            write_random_ids(&ids_path, s.samples, s.seq_len, vocab);
            "random token ids".into()
        }
    };
    println!("calibration  : {} samples x {} tokens from {source} (the same ids for both tools)", s.samples, s.seq_len);
    println!("recipe       : {}", s.recipe.display());
    let llmc_python = s.llmc.as_ref().map(|v| llm_compressor_venv(v));
    let eval_text = s.eval_text.as_ref().filter(|_| has_tokenizer);
    println!("load         : {} (a shared machine: other processes take CPU time too)", load_average());

    let save = s.dir.join("quant");
    let mut lamina_runs: Vec<Vec<Timing>> = vec![Vec::new(); s.threads.len()];
    let mut llmc_runs: Vec<Timing> = Vec::new();
    let mut llmc_perplexity = None;
    for run in 1..=s.runs {
        for (k, &threads) in s.threads.iter().enumerate() {
            let r = run_lamina(&lamina, &model_dir, &save, &ids_path, threads, &s);
            println!(
                "run {run}, lamina, {threads} thread(s): {:.1} s wall, {:.1} CPU-s, peak RSS {:.0} MB",
                r.wall,
                r.cpu,
                r.peak / MB
            );
            lamina_runs[k].push(r);
        }
        if let Some(python) = &llmc_python {
            // Its perplexity once (the output is the same every run), in the first run.
            let eval = if run == 1 { eval_text } else { None };
            let (r, ppl) = run_llm_compressor(python, &model_dir, &ids_path, eval, &s);
            println!(
                "run {run}, llm-compressor: {:.1} s wall, {:.1} CPU-s, peak RSS {:.0} MB",
                r.wall,
                r.cpu,
                r.peak / MB
            );
            llmc_runs.push(r);
            llmc_perplexity = llmc_perplexity.or(ppl);
        }
    }

    println!("--- medians of {} run(s); {} core(s) ---", s.runs, available_cores());
    let lamina_med: Vec<Timing> = lamina_runs.iter().map(|r| medians(r)).collect();
    for (t, m) in s.threads.iter().zip(&lamina_med) {
        println!("lamina, {t} thread(s) : {:.1} s wall, {:.1} CPU-s, peak RSS {:.0} MB", m.wall, m.cpu, m.peak / MB);
    }
    if let Some(one) = s.threads.iter().position(|&t| t == 1) {
        for (t, m) in s.threads.iter().zip(&lamina_med).filter(|(&t, _)| t > 1) {
            println!(
                "efficiency   : {t} threads {:.2}x faster than 1 = {:.0}% parallel efficiency",
                lamina_med[one].wall / m.wall,
                100.0 * lamina_med[one].wall / (*t as f64 * m.wall)
            );
        }
    }
    // The comparison is with lamina on every core, as llm-compressor runs.
    let best = lamina_med[s.threads.iter().enumerate().max_by_key(|(_, &t)| t).unwrap().0];
    if !llmc_runs.is_empty() {
        let l = medians(&llmc_runs);
        println!("llm-compressor      : {:.1} s wall, {:.1} CPU-s, peak RSS {:.0} MB", l.wall, l.cpu, l.peak / MB);
        let ratio = best.wall / l.wall;
        println!(
            "lamina / llm-compressor: {ratio:.3}x the wall time ({:.2}x faster; target <= 0.20x: {}), {:.3}x the CPU time, {:.2}x less peak memory",
            l.wall / best.wall,
            if ratio <= 0.2 { "met" } else { "MISSED" },
            best.cpu / l.cpu,
            l.peak / best.peak
        );
    } else {
        println!("llm-compressor      : not run (set LAMINA_BENCH_LLMC=VENV_DIR to run it in the same run)");
    }
    print_work_floor(&config, &s, best.wall, (!llmc_runs.is_empty()).then(|| medians(&llmc_runs).wall));

    if let Some(text) = eval_text {
        let (float, quantized, windows) = evaluate(&lamina, &model_dir, &save, text, &s);
        println!("eval         : {}, {windows}", text.display());
        println!("perplexity   : float {float:.4}, lamina {quantized:.4} ({:+.2}%)", 100.0 * (quantized / float - 1.0));
        if let Some(p) = llmc_perplexity {
            println!(
                "perplexity   : llm-compressor {p:.4} ({:+.2}%): lamina's is {}",
                100.0 * (p / float - 1.0),
                if quantized <= p { "the same or better" } else { "WORSE" }
            );
        }
    } else if s.eval_text.is_some() {
        println!("eval         : skipped, {} has no tokenizer.json to tokenize the text", model_dir.display());
    }

    if s.keep {
        println!("kept {}", s.dir.display());
    } else {
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}

/// The arithmetic this job cannot avoid, for a dense decoder (`None` for a MoE config): the FLOPs of one
/// forward through every decoder layer (linears and causal attention) and of the GPTQ Hessians `XᵀX`
/// (one per distinct linear input: q/k/v, o, gate/up, down; symmetric, so `tokens · d²`).
struct JobFlops {
    linears: f64,
    attention: f64,
    hessians: f64,
}

fn job_flops(config: &serde_json::Value, samples: usize, seq_len: usize) -> Option<JobFlops> {
    let moe = ["num_experts", "n_routed_experts", "num_local_experts"];
    if moe.iter().any(|k| config[k].as_u64().is_some_and(|n| n > 0)) {
        return None;
    }
    let field = |k: &str| config[k].as_u64().map(|v| v as f64);
    let (hidden, inter, layers) = (field("hidden_size")?, field("intermediate_size")?, field("num_hidden_layers")?);
    let heads = field("num_attention_heads")?;
    let kv_heads = field("num_key_value_heads").unwrap_or(heads);
    let head_dim = field("head_dim").unwrap_or(hidden / heads);
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    let tokens = (samples * seq_len) as f64;
    let weights = hidden * (q + 2.0 * kv) + q * hidden + 3.0 * hidden * inter;
    // Causal: each of a sequence's S queries meets on average S / 2 keys; QKᵀ and P·V, 2 FLOPs per product.
    let attention = samples as f64 * 2.0 * q * (seq_len * seq_len) as f64;
    let hessians = tokens * (2.0 * hidden * hidden + q * q + inter * inter);
    Some(JobFlops {
        linears: layers * 2.0 * tokens * weights,
        attention: layers * attention,
        hessians: layers * hessians,
    })
}

/// Whether a wall-time target is reachable at all on this machine: the job's unavoidable FLOPs at the GEMM
/// throughput measured now (every thread, the model's MLP shape), once without and once with the second
/// forward that propagates the rounding error to the next layer (llm-compressor's sequential pipeline runs
/// it too). A floor, not an estimate: it assumes every FLOP runs at the GEMM's speed.
fn print_work_floor(config: &serde_json::Value, s: &Settings, lamina_wall: f64, llmc_wall: Option<f64>) {
    let Some(f) = job_flops(config, s.samples, s.seq_len) else {
        println!("work floor   : not computed for a MoE config");
        return;
    };
    let (hidden, inter) =
        (config["hidden_size"].as_u64().unwrap() as usize, config["intermediate_size"].as_u64().unwrap() as usize);
    let m = (s.samples * s.seq_len).min(2048);
    let gemm = gemm_throughput(m, hidden, inter).0 * 1e9;
    let forward = f.linears + f.attention;
    let (once, twice) = ((forward + f.hessians) / gemm, (2.0 * forward + f.hessians) / gemm);
    println!(
        "work floor   : a forward {:.2} TFLOP (linears {:.2}, causal attention {:.2}), GPTQ Hessians {:.2} TFLOP; at the GEMM's {:.0} GFLOP/s ([{m}, {hidden}] x [{hidden}, {inter}], now): >= {once:.1} s with one forward, >= {twice:.1} s with the error-propagating second one; lamina took {:.2}x the latter",
        forward / 1e12,
        f.linears / 1e12,
        f.attention / 1e12,
        f.hessians / 1e12,
        gemm / 1e9,
        lamina_wall / twice
    );
    if let Some(l) = llmc_wall {
        println!(
            "work floor   : the floors are {:.2}x / {:.2}x llm-compressor's wall: the 0.20x target ({:.1} s) is {} the one-forward floor",
            once / l,
            twice / l,
            0.2 * l,
            if 0.2 * l >= once { "above" } else { "BELOW" }
        );
    }
}

fn run_lamina(lamina: &Path, model_dir: &Path, save: &Path, ids: &Path, threads: usize, s: &Settings) -> Timing {
    let log = s.dir.join("quant.log");
    let r: ChildRun = run_measured(
        Command::new(lamina)
            .arg("quant")
            .arg("--model_path")
            .arg(model_dir)
            .arg("--save_path")
            .arg(save)
            .arg("--config_path")
            .arg(&s.recipe)
            .arg("--calib_data")
            .arg(ids)
            .args(["--calib_samples", &s.samples.to_string(), "--calib_seq_len", &s.seq_len.to_string()])
            .args(["--threads", &threads.to_string()])
            .arg("--overwrite")
            .stderr(File::create(&log).unwrap()),
    );
    if !r.ok {
        panic!("lamina quant failed (status {}):\n{}", r.status, std::fs::read_to_string(&log).unwrap_or_default());
    }
    Timing { wall: r.wall, cpu: r.cpu, peak: r.peak_rss as f64 }
}

/// The Python of the llm-compressor venv `dir`, made (and llm-compressor installed) if it does not exist.
fn llm_compressor_venv(dir: &Path) -> PathBuf {
    let python = dir.join("bin/python");
    if !python.exists() {
        println!(
            "llm-compressor: making the venv {} (python3 -m venv; pip install llmcompressor==0.14.0.1)",
            dir.display()
        );
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        assert!(ok(Command::new("python3").args(["-m", "venv"]).arg(dir)), "python3 -m venv {} failed", dir.display());
        assert!(
            ok(Command::new(dir.join("bin/pip")).args(["install", "-q", "llmcompressor==0.14.0.1"])),
            "pip install llmcompressor failed in {}",
            dir.display()
        );
    }
    python
}

/// llm-compressor's run of the job, timed by its script; its perplexity when `eval` is given.
fn run_llm_compressor(
    python: &Path,
    model_dir: &Path,
    ids: &Path,
    eval: Option<&PathBuf>,
    s: &Settings,
) -> (Timing, Option<f64>) {
    let out = s.dir.join("llmc.out");
    let log = s.dir.join("llmc.log");
    let save = s.dir.join("llmc-quant");
    let mut cmd = Command::new(python);
    cmd.arg(repo().join("benches/llm-compressor-job.py")).arg(model_dir).arg(ids).arg(&save);
    if let Some(text) = eval {
        cmd.arg("--eval").arg(text);
        cmd.args(["--eval_seq_len", &s.eval_seq_len.to_string(), "--eval_windows", &s.eval_windows.to_string()]);
    }
    let r = run_measured(cmd.stdout(File::create(&out).unwrap()).stderr(File::create(&log).unwrap()));
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    if !r.ok {
        let tail: String = std::fs::read_to_string(&log).unwrap_or_default().chars().rev().take(3000).collect();
        panic!("llm-compressor failed (status {}):\n{report}\n{}", r.status, tail.chars().rev().collect::<String>());
    }
    let value = |key: &str| -> Option<f64> {
        report.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let _ = std::fs::remove_dir_all(&save);
    let timing = Timing {
        wall: value("quantize_seconds: ").expect("the script printed no quantize_seconds"),
        cpu: value("quantize_cpu_seconds: ").expect("the script printed no quantize_cpu_seconds"),
        peak: value("peak_rss_bytes: ").expect("the script printed no peak_rss_bytes"),
    };
    (timing, value("quantized perplexity: "))
}

/// `lamina eval` of the float model and the quantized output: float and quantized perplexity, and the
/// windows line.
fn evaluate(lamina: &Path, model_dir: &Path, save: &Path, text: &Path, s: &Settings) -> (f64, f64, String) {
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
    let windows = report.lines().find_map(|l| l.strip_prefix("windows: ")).unwrap_or("?");
    let windows = windows.split(" (").next().unwrap().to_string();
    (value("float perplexity: "), value("quantized perplexity: "), windows)
}

fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn load_average() -> String {
    let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!("load average {}", l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

fn write_ids(path: &Path, samples: &[Vec<i64>]) {
    let mut out = std::io::BufWriter::new(File::create(path).unwrap());
    for ids in samples {
        serde_json::to_writer(&mut out, &serde_json::json!({ "input_ids": ids })).unwrap();
        out.write_all(b"\n").unwrap();
    }
    out.flush().unwrap();
}

/// `samples` lines of `{"input_ids": [...]}`, `seq_len` ids each, uniform over the vocabulary.
fn write_random_ids(path: &Path, samples: usize, seq_len: usize, vocab: usize) {
    let mut state = 0x5EED_CA11_B8A7_E000u64;
    let ids: Vec<Vec<i64>> =
        (0..samples).map(|_| (0..seq_len).map(|_| (splitmix64(&mut state) % vocab as u64) as i64).collect()).collect();
    write_ids(path, &ids);
}
