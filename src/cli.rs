//! The command line, spelled as msModelSlim spells it (`--model_path`), with kebab-case aliases.

use crate::export::rules::Target;
use crate::export::SaveFormat;
use crate::pipeline::{self, memory::human, QuantArgs};
use crate::tensor::DType;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lamina",
    version,
    about = "Quantize huge language and vision-language models one layer at a time, in bounded memory, resumably.",
    long_about = "Quantize huge language and vision-language models one layer at a time, in bounded memory, resumably.\n\n\
        lamina reads a Hugging Face checkpoint folder through memory maps, streams it one decoder layer or vision \
        block at a time, and writes the msModelSlim / Ascend format (quant_model_weights*.safetensors and \
        quant_model_description.json). A run that is interrupted resumes from the last finished unit when the same \
        command is run again.\n\n\
        Examples:\n  lamina quant --model_path ./Qwen3-VL-30B-A3B --save_path ./out --quant_type w8a8_dynamic\n  \
        lamina plan --model_path ./configs/qwen3-vl-235b-a22b/config.json --quant_type w8a8_dynamic --memory_budget 64"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Quantize a checkpoint and write the Ascend format.
    Quant(QuantCli),
    /// Print what `quant` would do (units, bytes, predicted peak memory, whether it fits) without
    /// writing anything. Works from a config.json alone. Exits non-zero when the run would not fit.
    Plan(QuantCli),
    /// Run the float model layer by layer on the input_ids of a safetensors file and write every
    /// text layer's input and output, the final norm's output and the logits, named as in
    /// transformers reference files (`model.layers.0.in`, `final_norm.out`, `logits`).
    Forward(ForwardCli),
    /// Perplexity of the float model, and of a quantized output computed as the NPU computes it
    /// (dequantized weights, per-token or static activation quantization). The text is tokenized
    /// once without special tokens and cut into windows of --seq_len tokens; the last line is
    /// `perplexity: X` (the quantized model's when --quantized is given).
    ///
    /// With --image (or --inputs) and --quantized: runs both models on one image prompt, vision
    /// tower included, and prints how far the quantized logits are from the float ones.
    Eval(EvalCli),
    /// Check an output folder (lamina's or msModelSlim's) against the target server's loader rules:
    /// every tensor described, names, dtypes and shapes per quantization type, the layer kinds each type
    /// loads on, fused modules (q/k/v, gate/up, all experts of a layer) sharing one type, group sizes,
    /// deq_scale's dtype for the serving dtype, the C8 KV-cache scales. Prints each problem and exits 1
    /// when there is any; `lamina quant` runs the same checks on what it is about to write.
    Check(CheckCli),
}

#[derive(Args)]
struct EvalCli {
    /// The float checkpoint folder (its tokenizer.json, or Qwen's qwen.tiktoken, tokenizes the text).
    #[arg(long = "model_path", alias = "model-path")]
    model_path: PathBuf,
    /// A lamina output folder of the same model to evaluate too; repeat it to evaluate several on the
    /// same windows (the float model runs once).
    #[arg(long)]
    quantized: Vec<PathBuf>,
    /// A UTF-8 text file for perplexity.
    #[arg(long, required_unless_present_any = ["image", "inputs"])]
    text: Option<PathBuf>,
    /// An image: compare the quantized model's logits with the float model's on it and --prompt
    /// (rendered with the model's chat template; needs tokenizer.json or qwen.tiktoken). Needs --quantized.
    #[arg(long, requires = "quantized", conflicts_with_all = ["text", "inputs"])]
    image: Option<PathBuf>,
    /// The question asked about --image.
    #[arg(long, default_value = "Describe this image in detail.")]
    prompt: String,
    /// Or a prepared inputs file as `lamina forward` reads it (input_ids, pixel_values,
    /// image_grid_thw) to compare the logits on. Needs --quantized.
    #[arg(long, requires = "quantized", conflicts_with = "text")]
    inputs: Option<PathBuf>,
    /// Tokens per window.
    #[arg(long = "seq_len", alias = "seq-len", default_value_t = 512)]
    seq_len: usize,
    /// Evaluate at most this many windows.
    #[arg(long = "max_windows", alias = "max-windows")]
    max_windows: Option<usize>,
    #[arg(long = "model_type", alias = "model-type")]
    model_type: Option<String>,
    /// The compute device. Only cpu exists in this build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute threads (GEMMs, quantizers, attention); 0 = every core of the machine.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct ForwardCli {
    /// The checkpoint folder (config.json and *.safetensors).
    #[arg(long = "model_path", alias = "model-path")]
    model_path: PathBuf,
    /// A safetensors file holding `input_ids` ([batch, seq] or [seq], integer).
    #[arg(long)]
    inputs: PathBuf,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// A quantized output of this model (either format): run it as its server computes it (dequantized
    /// weights, quantized activations and KV cache), as `lamina eval` does, instead of the float model.
    #[arg(long)]
    quantized: Option<PathBuf>,
    /// The model family; default: config.json's model_type.
    #[arg(long = "model_type", alias = "model-type")]
    model_type: Option<String>,
    /// The compute device. Only cpu exists in this build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute threads (GEMMs, quantizers, attention); 0 = every core of the machine.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct QuantCli {
    /// The checkpoint folder (config.json and *.safetensors); for `plan`, a config.json alone also works.
    #[arg(long = "model_path", alias = "model-path")]
    model_path: PathBuf,
    /// The output folder. It is created if missing; rerunning the same command there resumes.
    #[arg(long = "save_path", alias = "save-path")]
    save_path: Option<PathBuf>,
    /// The scheme: w8a8 (static per-tensor activations; calibrates with smoothing and GPTQ),
    /// w8a8_dynamic, w8a16, w4a8_dynamic (alias w4a8), w4a16. Picks the bundled recipe for the
    /// model type (see pipelines/).
    #[arg(long = "quant_type", alias = "quant-type")]
    quant_type: Option<String>,
    /// The model family (llama, qwen2, qwen3, qwen3_moe, internlm2, qwen, qwen2_vl, qwen2_5_vl,
    /// qwen3_vl, qwen3_vl_moe, llava, glm4). Default: config.json's model_type.
    #[arg(long = "model_type", alias = "model-type")]
    model_type: Option<String>,
    /// The compute device. Only cpu exists in this build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute threads (GEMMs, quantizers, attention); 0 = every core of the machine.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Largest weights file in GiB (fractions allowed); 0 writes one file. Default: the recipe's, else 4.
    #[arg(long = "part_file_size", alias = "part-file-size")]
    part_file_size: Option<f64>,
    /// Memory the run may use, in GiB. Default: what the machine has available now.
    #[arg(long = "memory_budget", alias = "memory-budget")]
    memory_budget: Option<f64>,
    /// A recipe YAML (msModelSlim v1 shape) instead of the bundled one, or the name of a bundled
    /// variant (w8a8-fast, w8a8-all-static).
    #[arg(long = "config_path", alias = "config-path")]
    config_path: Option<PathBuf>,
    /// msModelSlim's switch for models with remote code (InternLM2, Qwen (1)):
    /// `--trust_remote_code True`. Accepted and not needed: lamina never runs the model's Python;
    /// it reads config.json and the tensors, and copies the model's .py files to the output.
    #[arg(long = "trust_remote_code", alias = "trust-remote-code", value_parser = parse_python_bool)]
    trust_remote_code: Option<bool>,
    /// Discard an earlier run's output in the save folder and start over.
    #[arg(long)]
    overwrite: bool,
    /// Calibration data for recipes that calibrate (static W8A8, smoothing, GPTQ): a text file, a
    /// JSONL of {"text": ...} or {"input_ids": [...]}, or for vision-language models a folder of
    /// images (or a .json/.jsonl / index.json of {"image", "text"}). Default: the bundled set.
    #[arg(long = "calib_data", alias = "calib-data", alias = "calib_images", alias = "calib-images")]
    calib_data: Option<PathBuf>,
    /// Number of calibration sequences (text); for an image set, at most this many images.
    #[arg(long = "calib_samples", alias = "calib-samples", default_value_t = 32)]
    calib_samples: usize,
    /// Tokens per calibration sequence (text models).
    #[arg(long = "calib_seq_len", alias = "calib-seq-len", default_value_t = 512)]
    calib_seq_len: usize,
    /// The server the output must load in: vllm-ascend (default) or mindie. The plan is checked against
    /// its loader's rules before anything is written (types per layer kind, fused modules, group sizes,
    /// shapes); mindie also reads per-group int8 scales and dense W4A8_DYNAMIC / W4A16 linears, and
    /// `--quant_type w4a8_dynamic|w4a16` then picks recipes that use them.
    #[arg(long, default_value = "vllm-ascend", value_parser = parse_target)]
    target: Target,
    /// The dtype the server runs the model in (bfloat16, float16): static W8A8's deq_scale is written
    /// as the loader reads it in that dtype (f32 for bfloat16, int64 for float16; 310P serves float16).
    /// Default: config.json's torch_dtype.
    #[arg(long = "serving_dtype", alias = "serving-dtype", value_parser = parse_serving_dtype)]
    serving_dtype: Option<DType>,
    /// The output format: ascend (msModelSlim's, for vLLM-Ascend and MindIE; default) or compressed-tensors
    /// (for vLLM on GPUs and transformers: int8 W8A8 static and dynamic, W8A16, W4A16 in groups of 128;
    /// config.json carries the quantization_config). `--quant_type w8a8` then picks a recipe without
    /// m2's shift, whose biases compressed-tensors cannot hold.
    #[arg(long = "save_format", alias = "save-format", default_value = "ascend", value_parser = parse_save_format)]
    save_format: SaveFormat,
}

fn parse_save_format(s: &str) -> Result<SaveFormat, String> {
    SaveFormat::parse(s).map_err(|e| e.to_string())
}

fn parse_target(s: &str) -> Result<Target, String> {
    Target::parse(s).map_err(|e| e.to_string())
}

fn parse_serving_dtype(s: &str) -> Result<DType, String> {
    DType::from_torch_name(s).ok_or_else(|| format!("unknown dtype {s:?} (bfloat16, float16, float32)"))
}

#[derive(Args)]
struct CheckCli {
    /// The output folder: lamina's, or one msModelSlim wrote (quant_model_description.json and
    /// quant_model_weights*.safetensors).
    out: PathBuf,
    /// The server to check against: vllm-ascend (default) or mindie.
    #[arg(long, default_value = "vllm-ascend", value_parser = parse_target)]
    target: Target,
    /// The dtype the server will run in (decides which deq_scale dtype loads). Default: what lamina
    /// recorded in the description's metadata, else config.json's torch_dtype.
    #[arg(long = "serving_dtype", alias = "serving-dtype", value_parser = parse_serving_dtype)]
    serving_dtype: Option<DType>,
}

/// `True` / `False` as msModelSlim's command line spells them (Python's), or `true` / `false`.
fn parse_python_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{s:?} is not True or False")),
    }
}

impl QuantCli {
    fn args(&self) -> QuantArgs {
        QuantArgs {
            model_path: self.model_path.clone(),
            save_path: self.save_path.clone(),
            quant_type: self.quant_type.clone(),
            model_type: self.model_type.clone(),
            device: self.device.clone(),
            part_file_size: self.part_file_size,
            memory_budget: self.memory_budget,
            config_path: self.config_path.clone(),
            overwrite: self.overwrite,
            calib_data: self.calib_data.clone(),
            calib_samples: self.calib_samples,
            calib_seq_len: self.calib_seq_len,
            threads: crate::device::threads(),
            target: self.target,
            serving_dtype: self.serving_dtype,
            save_format: self.save_format,
        }
    }
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Quant(q) | Command::Plan(q) => q.threads,
        Command::Forward(f) => f.threads,
        Command::Eval(e) => e.threads,
        Command::Check(_) => 0,
    };
    if let Err(e) = crate::device::set_threads(threads) {
        eprintln!("error: {e:#}");
        return 1;
    }
    let result = match cli.command {
        Command::Quant(q) => quant(&q),
        Command::Plan(q) => plan(&q),
        Command::Forward(f) => forward(&f),
        Command::Eval(e) => eval(&e),
        Command::Check(c) => check(&c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn quant(q: &QuantCli) -> anyhow::Result<i32> {
    let _ = q.trust_remote_code;
    let s = pipeline::quantize(&q.args())?;
    let save = q.save_path.as_ref().unwrap().display();
    if s.already_done {
        eprintln!("{save} already holds the finished output of this exact run; nothing to do.");
        return Ok(0);
    }
    eprintln!(
        "done in {:.1} s: read {}, wrote {} in {} file(s) to {save}; peak RSS {}{}",
        s.seconds,
        human(s.bytes_in),
        human(s.bytes_out),
        s.shards,
        human(s.peak_rss),
        if s.resumed_from > 0 { format!(" (resumed at unit {})", s.resumed_from) } else { String::new() }
    );
    eprintln!("for {}", s.serving);
    Ok(0)
}

fn plan(q: &QuantCli) -> anyhow::Result<i32> {
    let mut args = q.args();
    args.save_path = None;
    let p = pipeline::prepare(&args)?;
    Ok(if pipeline::print_plan(&p) { 0 } else { 2 })
}

fn forward(f: &ForwardCli) -> anyhow::Result<i32> {
    let s = pipeline::forward::run(&pipeline::forward::ForwardArgs {
        model_path: f.model_path.clone(),
        inputs: f.inputs.clone(),
        out: f.out.clone(),
        device: f.device.clone(),
        model_type: f.model_type.clone(),
        quantized: f.quantized.clone(),
    })?;
    eprintln!(
        "wrote {} tensors to {} ({} sequence(s), {} tokens) in {:.2} s",
        s.tensors,
        f.out.display(),
        s.sequences,
        s.tokens,
        s.seconds
    );
    Ok(0)
}

fn eval(e: &EvalCli) -> anyhow::Result<i32> {
    let started = std::time::Instant::now();
    let Some(text) = &e.text else {
        let r = pipeline::eval::compare_on_prompt(&pipeline::eval::PromptArgs {
            model_path: e.model_path.clone(),
            quantized: match e.quantized.as_slice() {
                [one] => one.clone(),
                _ => anyhow::bail!("--image and --inputs compare one --quantized output"),
            },
            inputs: e.inputs.clone(),
            image: e.image.clone(),
            prompt: e.prompt.clone(),
            device: e.device.clone(),
            model_type: e.model_type.clone(),
        })?;
        println!("positions: {} ({:.1} s)", r.positions, started.elapsed().as_secs_f64());
        println!("top-1 agreement: {:.2}%", 100.0 * r.top1_agreement);
        println!("mean KL(float || quantized): {:.3e} nats", r.mean_kl);
        println!("max abs logit error: {:.4e}", r.max_abs);
        println!("logit relative error: {:.4e}", r.relative);
        return Ok(0);
    };
    let r = pipeline::eval::run(&pipeline::eval::EvalArgs {
        model_path: e.model_path.clone(),
        quantized: e.quantized.clone(),
        text: text.clone(),
        seq_len: e.seq_len,
        max_windows: e.max_windows,
        device: e.device.clone(),
        model_type: e.model_type.clone(),
    })?;
    println!("windows: {} x {} tokens ({:.1} s)", r.windows, e.seq_len, started.elapsed().as_secs_f64());
    println!("float perplexity: {:.4}", r.float_perplexity);
    for (q, dir) in r.quantized_perplexity.iter().zip(&e.quantized) {
        let delta = 100.0 * (q / r.float_perplexity - 1.0);
        match e.quantized.len() {
            1 => println!("quantized perplexity: {q:.4} ({delta:+.2}% vs float)"),
            _ => println!("quantized perplexity: {q:.4} ({delta:+.2}% vs float) {}", dir.display()),
        }
    }
    match r.quantized_perplexity.as_slice() {
        [q] => println!("perplexity: {q:.4}"),
        [] => println!("perplexity: {:.4}", r.float_perplexity),
        _ => {}
    }
    Ok(0)
}

fn check(c: &CheckCli) -> anyhow::Result<i32> {
    let r = crate::export::check::check_folder(&c.out, c.target, c.serving_dtype)?;
    print!("{}", r.summary());
    Ok(if r.problems.is_empty() { 0 } else { 1 })
}
