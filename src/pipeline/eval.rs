//! `lamina eval`: perplexity of the float model and of a quantized output, layer by layer.
//!
//! The protocol is the usual one, so figures compare with other tools: the whole text is
//! tokenized once without special tokens, cut into consecutive windows of `seq_len` tokens (a
//! last partial window is dropped), and the perplexity is exp(mean negative log-likelihood) over
//! every predicted token (positions 2..L of each window).
//!
//! The quantized model is read back from its Ascend output and computed as the NPU computes it:
//! dequantized weights, and activations quantized per token (dynamic schemes) or per tensor with
//! the stored scale and offset (static W8A8), with the static kernel's effective bias.

use super::forward::{self, decoder_layer, embedding_table, head, FloatModel, ModelWeights, QuantizedModel};
use crate::data::calib::{Prompt, VisionModel};
use crate::data::prompt::TextTokenizer;
use crate::device::{self, Device};
use crate::export::read;
use crate::io::safetensors::load_all;
use crate::model::decoder::{embed, Carry, ForwardOptions};
use crate::model::layout::UnitKind;
use crate::model::nn::Plain;
use crate::model::rope::Positions;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub model_path: PathBuf,
    /// lamina output folders of the same model, each evaluated on the same windows (the float model
    /// once for all).
    pub quantized: Vec<PathBuf>,
    pub text: PathBuf,
    pub seq_len: usize,
    /// Evaluate at most this many windows (all by default).
    pub max_windows: Option<usize>,
    pub device: String,
    pub model_type: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EvalReport {
    pub windows: usize,
    pub tokens: usize,
    pub float_perplexity: f64,
    /// One per `EvalArgs::quantized`, in order.
    pub quantized_perplexity: Vec<f64>,
}

pub fn run(args: &EvalArgs) -> Result<EvalReport> {
    let device = device::open(&args.device)?;
    let fm = FloatModel::open(&args.model_path, args.model_type.as_deref())?;
    let text = std::fs::read_to_string(&args.text).with_context(|| format!("cannot read {}", args.text.display()))?;
    let ids = TextTokenizer::load(&args.model_path)?.encode(&text, false)?;
    if args.seq_len < 2 {
        bail!("--seq_len must be at least 2");
    }
    let mut windows: Vec<Vec<i64>> = ids.chunks_exact(args.seq_len).map(|c| c.to_vec()).collect();
    if let Some(m) = args.max_windows {
        windows.truncate(m);
    }
    if windows.is_empty() {
        bail!("{} has {} tokens, fewer than one window of {}", args.text.display(), ids.len(), args.seq_len);
    }
    let float_nll = nll(&fm, device.as_ref(), &windows)?;
    let quantized_nll = args
        .quantized
        .iter()
        .map(|dir| nll(&QuantizedModel { float: &fm, output: read::open(dir)? }, device.as_ref(), &windows))
        .collect::<Result<Vec<f64>>>()?;
    let predicted = windows.len() * (args.seq_len - 1);
    Ok(EvalReport {
        windows: windows.len(),
        tokens: windows.len() * args.seq_len,
        float_perplexity: (float_nll / predicted as f64).exp(),
        quantized_perplexity: quantized_nll.iter().map(|n| (n / predicted as f64).exp()).collect(),
    })
}

/// Total negative log-likelihood of every window's next tokens, streaming the layers of `src`.
fn nll(src: &dyn ModelWeights, device: &dyn Device, windows: &[Vec<i64>]) -> Result<f64> {
    let cfg = &src.model().text;
    let table = embedding_table(src)?;
    let mut hidden: Vec<Array2<f32>> = windows.iter().map(|w| embed(table.view(), w)).collect::<Result<_>>()?;
    src.release(UnitKind::Embed);
    let positions = Positions::sequential(windows[0].len());
    let mut carries = vec![Carry::default(); windows.len()];
    for i in 0..cfg.num_layers {
        let (layer, mut hook) = decoder_layer(src, i)?;
        for (h, carry) in hidden.iter_mut().zip(carries.iter_mut()) {
            *h = layer.forward(device, h.view(), &positions, carry, &mut hook, ForwardOptions::default())?;
        }
        src.release(UnitKind::TextLayer(i));
    }
    let head = head(src)?;
    let mut total = 0f64;
    for (h, ids) in hidden.iter().zip(windows) {
        let logits = head.logits(device, head.final_norm(h.view()).view(), &mut Plain);
        total += window_nll(logits.view(), ids);
    }
    Ok(total)
}

/// What `lamina eval --image` / `--inputs` compares.
#[derive(Debug, Clone)]
pub struct PromptArgs {
    pub model_path: PathBuf,
    pub quantized: PathBuf,
    /// An inputs file as `lamina forward` reads it (`input_ids`, `pixel_values`, `image_grid_thw`).
    pub inputs: Option<PathBuf>,
    /// Or an image and a prompt, preprocessed as calibration images are (needs tokenizer.json or qwen.tiktoken).
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub device: String,
    pub model_type: Option<String>,
}

/// How far the quantized model's logits are from the float model's on one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LogitError {
    pub positions: usize,
    /// `‖q − f‖₂ / ‖f‖₂` over every logit.
    pub relative: f64,
    pub max_abs: f64,
    /// Positions where both pick the same most likely token.
    pub top1_agreement: f64,
    /// Mean over positions of KL(float ‖ quantized), in nats.
    pub mean_kl: f64,
}

/// Runs the float and the quantized model on an image prompt and compares their logits.
pub fn compare_on_prompt(args: &PromptArgs) -> Result<LogitError> {
    let device = device::open(&args.device)?;
    let fm = FloatModel::open(&args.model_path, args.model_type.as_deref())?;
    let (inputs, origin): (BTreeMap<String, Tensor>, PathBuf) = match (&args.inputs, &args.image) {
        (Some(f), None) => {
            (load_all(f).with_context(|| format!("reading the inputs file {}", f.display()))?, f.clone())
        }
        (None, Some(img)) => {
            let vm = VisionModel::load(&args.model_path)?;
            let sample = vm.sample(img, &Prompt::Text(args.prompt.clone()), &img.display().to_string())?;
            (sample.tensors().into_iter().collect(), img.clone())
        }
        _ => bail!("give either --inputs or --image"),
    };
    let q = QuantizedModel { float: &fm, output: read::open(&args.quantized)? };
    let float = logits(&fm, device.as_ref(), &inputs, &origin)?;
    let quant = logits(&q, device.as_ref(), &inputs, &origin)?;
    Ok(logit_error(&float, &quant))
}

/// The logits of every sequence of `inputs` (as `lamina forward` reads them), stacked
/// `[tokens, vocab]`, computed by `src`: the float model or a quantized output.
pub fn logits(
    src: &dyn ModelWeights,
    device: &dyn Device,
    inputs: &BTreeMap<String, Tensor>,
    file: &Path,
) -> Result<Array2<f32>> {
    let batch = forward::input_ids(inputs, file)?;
    let mut ignored = Vec::new();
    let seqs = forward::decoder_inputs(src, device, inputs, file, &batch, &mut ignored)?;
    drop(ignored);
    let out = forward::forward(src, device, seqs)?;
    let t = &out.iter().find(|(n, _)| n == "logits").context("the forward gave no logits")?.1;
    let vocab = *t.shape.last().unwrap();
    Ok(Array2::from_shape_vec((t.numel() / vocab, vocab), t.to_f32()?)?)
}

fn logit_error(float: &Array2<f32>, quant: &Array2<f32>) -> LogitError {
    let (mut diff2, mut ref2, mut max_abs, mut agree, mut kl) = (0f64, 0f64, 0f64, 0usize, 0f64);
    for (f, q) in float.rows().into_iter().zip(quant.rows()) {
        for (&a, &b) in f.iter().zip(q.iter()) {
            let d = (b - a) as f64;
            diff2 += d * d;
            ref2 += (a as f64) * (a as f64);
            max_abs = max_abs.max(d.abs());
        }
        agree += usize::from(argmax(f) == argmax(q));
        let (lf, lq) = (log_softmax(f), log_softmax(q));
        kl += lf.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
    }
    let n = float.nrows();
    LogitError {
        positions: n,
        relative: (diff2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
        max_abs,
        top1_agreement: agree as f64 / n as f64,
        mean_kl: kl / n as f64,
    }
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

fn log_softmax(row: ndarray::ArrayView1<f32>) -> Vec<f64> {
    let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// `Σ_t -log p(ids[t+1] | ids[..=t])` from `logits [seq, vocab]`.
fn window_nll(logits: ArrayView2<f32>, ids: &[i64]) -> f64 {
    let mut total = 0f64;
    for t in 0..ids.len() - 1 {
        let row = logits.row(t);
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        total += lse - row[ids[t + 1] as usize] as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn nll_of_a_known_distribution() {
        // Uniform over 4 tokens: each prediction costs ln 4.
        let logits = array![[0.0f32, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]];
        let n = window_nll(logits.view(), &[0, 3, 2]);
        assert!((n - 2.0 * 4f64.ln()).abs() < 1e-9);
        // A confident right answer costs almost nothing.
        let sharp = array![[0.0f32, 30.0], [0.0, 0.0]];
        assert!(window_nll(sharp.view(), &[0, 1]) < 1e-9);
    }

    #[test]
    fn logit_error_of_known_differences() {
        let f = array![[1.0f32, 0.0], [0.0, 2.0]];
        let same = logit_error(&f, &f);
        assert_eq!((same.relative, same.max_abs, same.top1_agreement), (0.0, 0.0, 1.0));
        assert!(same.mean_kl.abs() < 1e-12);
        // Flip the first row's winner: half the positions agree; ‖Δ‖ = √2 against ‖f‖ = √5.
        let q = array![[0.0f32, 1.0], [0.0, 2.0]];
        let e = logit_error(&f, &q);
        assert_eq!(e.top1_agreement, 0.5);
        assert!((e.relative - (2f64 / 5.0).sqrt()).abs() < 1e-9);
        assert_eq!(e.max_abs, 1.0);
        // KL of row 0: p = softmax(1, 0), q = softmax(0, 1); the second row adds nothing.
        let p0 = 1.0 / (1.0 + (-1f64).exp());
        let want = (p0 * (p0 / (1.0 - p0)).ln() + (1.0 - p0) * ((1.0 - p0) / p0).ln()) / 2.0;
        assert!((e.mean_kl - want).abs() < 1e-9);
    }
}
