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

use super::calibrate::hooks::{SimLinear, Simulate};
use super::forward::FloatModel;
use crate::data::prompt::TextTokenizer;
use crate::device::{self, Device};
use crate::export::ascend_read::AscendModel;
use crate::model::layout::UnitKind;
use crate::model::nn::{LinearHook, Plain};
use crate::model::rope::{Positions, Rope};
use crate::model::text::{embed, DecoderLayer, ForwardOptions, Head};
use crate::model::weights::Weights;
use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayView2};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub model_path: PathBuf,
    pub quantized: Option<PathBuf>,
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
    pub quantized_perplexity: Option<f64>,
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
    let float_nll = nll(&fm, device.as_ref(), &windows, None)?;
    let quantized_nll = match &args.quantized {
        Some(dir) => Some(nll(&fm, device.as_ref(), &windows, Some(&AscendModel::open(dir)?))?),
        None => None,
    };
    let predicted = windows.len() * (args.seq_len - 1);
    Ok(EvalReport {
        windows: windows.len(),
        tokens: windows.len() * args.seq_len,
        float_perplexity: (float_nll / predicted as f64).exp(),
        quantized_perplexity: quantized_nll.map(|n| (n / predicted as f64).exp()),
    })
}

/// Total negative log-likelihood of every window's next tokens: of the float checkpoint, or of
/// the quantized output `q` when given.
fn nll(fm: &FloatModel, device: &dyn Device, windows: &[Vec<i64>], q: Option<&AscendModel>) -> Result<f64> {
    let mut total = 0f64;
    logits(fm, device, windows, q, &mut |w, l| {
        total += window_nll(l, &windows[w]);
        Ok(())
    })?;
    Ok(total)
}

/// Runs every window (of one length) through the model, streaming the layers: the float
/// checkpoint, or the quantized output `q` computed as the NPU computes it. Each window's logits
/// `[seq, vocab]` go to `each(window, logits)` in order.
pub fn logits(
    fm: &FloatModel,
    device: &dyn Device,
    windows: &[Vec<i64>],
    q: Option<&AscendModel>,
    each: &mut dyn FnMut(usize, ArrayView2<f32>) -> Result<()>,
) -> Result<()> {
    if windows.is_empty() || windows.iter().any(|w| w.len() != windows[0].len()) {
        bail!("the windows must be non-empty and of one length");
    }
    let cfg = &fm.model.text;
    let layout = &fm.model.layout;
    let embed_name = layout.embed_tokens();
    let whole = |names: &[String]| -> Result<Weights> {
        let q = q.unwrap();
        let mut w = Weights::default();
        for n in names {
            if q.description.contains_key(n) {
                let (ww, _) = q.weights(n)?;
                for (k, v) in ww.map {
                    w.map.insert(format!("{n}{k}"), v);
                }
            }
        }
        Ok(w)
    };
    let table: Array2<f32> = match q {
        None => fm.embedding_table()?,
        Some(_) => whole(std::slice::from_ref(&embed_name))?.matrix(&embed_name)?,
    };
    let mut hidden: Vec<Array2<f32>> = windows.iter().map(|w| embed(table.view(), w)).collect::<Result<_>>()?;
    let rope = Rope::new(&cfg.rope, cfg.head_dim)?;
    let angles = rope.angles(&Positions::sequential(windows[0].len()))?;
    let fast = ForwardOptions::default();
    for i in 0..cfg.num_layers {
        let (layer, mut hook): (DecoderLayer, Box<dyn LinearHook>) = match q {
            None => (fm.layer(i)?, Box::new(Plain)),
            Some(q) => {
                let prefix = layout.unit_prefix(UnitKind::TextLayer(i));
                let (w, acts) = q.weights(&prefix)?;
                let mut sim = Simulate::default();
                for (m, act) in acts {
                    sim.linears.insert(m.clone(), SimLinear { linear: w.linear(&m)?, act });
                }
                (
                    DecoderLayer::from_weights(cfg, i, w)
                        .with_context(|| format!("building {prefix} from {}", q.dir.display()))?,
                    Box::new(sim),
                )
            }
        };
        for h in hidden.iter_mut() {
            *h = layer.forward(device, h.view(), &angles, hook.as_mut(), fast)?;
        }
        fm.release(UnitKind::TextLayer(i));
    }
    let head = match q {
        None => fm.head()?,
        Some(_) => {
            let w = whole(&[layout.final_norm(), layout.lm_head_weight()])?;
            Head::new(cfg, layout, w, || Ok(table.clone()))?
        }
    };
    for (w, h) in hidden.iter().enumerate() {
        let logits = head.logits(device, head.final_norm(h.view()).view(), &mut Plain);
        each(w, logits.view())?;
    }
    Ok(())
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
}
