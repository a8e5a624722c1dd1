//! `lamina forward`: the float model, one unit at a time, on the `input_ids` of an inputs file.
//! It writes what transformers reference files hold, under the same names (`<text>.layers.i.in`,
//! `.out`, `final_norm.out`, `logits`, and for VL models `lm.inputs_embeds`, `lm.position_ids`),
//! so a user can check lamina against their own reference of a model family.
//!
//! Memory: the checkpoint stays memory-mapped; each unit's weights are widened to f32, used for
//! every sequence, dropped, and their pages given back, while the next unit is prefetched. Only
//! the hidden states of the sequences (and the outputs to write) stay resident.

use super::load;
use crate::device::{self, Device};
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::{load_all, save};
use crate::model::layout::UnitKind;
use crate::model::nn::Plain;
use crate::model::rope::{Positions, Rope, RopeAngles};
use crate::model::text::{embed, DecoderLayer, ForwardOptions, Head};
use crate::model::weights::Weights;
use crate::model::{build_units, Model, Unit};
use crate::tensor::{Tensor, TensorMeta};
use anyhow::{bail, ensure, Context, Result};
use ndarray::Array2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The options of `lamina forward`.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    pub model_path: PathBuf,
    /// A safetensors file with `input_ids` (`[batch, seq]` or `[seq]`, integer).
    pub inputs: PathBuf,
    pub out: PathBuf,
    pub device: String,
    pub model_type: Option<String>,
}

/// What a finished forward reports.
#[derive(Debug)]
pub struct ForwardSummary {
    pub sequences: usize,
    pub tokens: usize,
    pub tensors: usize,
    pub seconds: f64,
}

/// A checkpoint opened for float forwards: its units are loaded one at a time on demand.
pub struct FloatModel {
    pub ckpt: Checkpoint,
    pub model: Model,
    pub units: Vec<Unit>,
}

impl FloatModel {
    pub fn open(model_path: &Path, model_type: Option<&str>) -> Result<FloatModel> {
        let ckpt = Checkpoint::open(model_path)?;
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, model_type, &names)?;
        let inventory: Vec<TensorMeta> = names.iter().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory)?;
        Ok(FloatModel { ckpt, model, units })
    }

    pub fn unit(&self, kind: UnitKind) -> Result<&Unit> {
        self.units.iter().find(|u| u.kind == kind).with_context(|| {
            format!("the checkpoint in {} has no {}", self.ckpt.dir.display(), self.model.layout.unit_name(kind))
        })
    }

    /// The token embedding table `[vocab, hidden]`.
    pub fn embedding_table(&self) -> Result<Array2<f32>> {
        let mut w = Weights::load(&self.ckpt, self.unit(UnitKind::Embed)?, "")?;
        let name = self.model.layout.embed_tokens();
        let table = w.map.remove(&name).with_context(|| format!("tensor {name} is missing"))?;
        let shape = table.shape().to_vec();
        table.into_dimensionality().with_context(|| format!("tensor {name} has shape {shape:?}, expected 2D"))
    }

    /// Decoder layer `i`, its weights widened to f32.
    pub fn layer(&self, i: usize) -> Result<DecoderLayer> {
        let prefix = format!("{}.", self.model.layout.text_layer(i));
        let w = Weights::load(&self.ckpt, self.unit(UnitKind::TextLayer(i))?, &prefix)?;
        DecoderLayer::from_weights(&self.model.text, i, w)
            .with_context(|| format!("building {}", prefix.trim_end_matches('.')))
    }

    /// The final norm and output projection (the embedding table when tied).
    pub fn head(&self) -> Result<Head> {
        let w = Weights::load(&self.ckpt, self.unit(UnitKind::Head)?, "")?;
        Head::new(&self.model.text, &self.model.layout, w, || self.embedding_table())
    }

    /// Gives a unit's mapped pages back once it is done with.
    pub fn release(&self, kind: UnitKind) {
        if let Ok(u) = self.unit(kind) {
            u.tensors.iter().for_each(|t| load::release(&self.ckpt, t));
        }
    }

    pub fn prefetch(&self, kind: UnitKind) {
        if let Ok(u) = self.unit(kind) {
            load::prefetch(&self.ckpt, u);
        }
    }
}

/// One sequence as the text decoder receives it.
#[derive(Debug, Clone)]
pub struct DecoderInput {
    /// `[seq, hidden]`: token embeddings, with image features spliced in for VL prompts.
    pub embeds: Array2<f32>,
    pub positions: Positions,
    /// Added to the hidden states after given layers (Qwen3-VL's deepstack features).
    pub injections: Vec<Injection>,
}

/// Values added to some rows of the hidden states after a decoder layer.
#[derive(Debug, Clone)]
pub struct Injection {
    pub after_layer: usize,
    pub rows: Vec<usize>,
    /// `[rows.len(), hidden]`.
    pub values: Array2<f32>,
}

impl Injection {
    fn apply(&self, h: &mut Array2<f32>) {
        for (k, &t) in self.rows.iter().enumerate() {
            let mut row = h.row_mut(t);
            row += &self.values.row(k);
        }
    }
}

/// `lamina forward`.
pub fn run(args: &ForwardArgs) -> Result<ForwardSummary> {
    let started = Instant::now();
    let device = device::open(&args.device)?;
    let fm = FloatModel::open(&args.model_path, args.model_type.as_deref())?;
    let inputs =
        load_all(&args.inputs).with_context(|| format!("reading the inputs file {}", args.inputs.display()))?;
    let batch = input_ids(&inputs, &args.inputs)?;
    let seqs = decoder_inputs(&fm, &inputs, &args.inputs, &batch)?;
    let outputs = forward(&fm, device.as_ref(), seqs)?;
    let tensors = outputs.len();
    save(&args.out, &outputs).with_context(|| format!("writing {}", args.out.display()))?;
    Ok(ForwardSummary {
        sequences: batch.len(),
        tokens: batch.iter().map(|s| s.len()).sum(),
        tensors,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `input_ids` as one id list per sequence.
fn input_ids(inputs: &BTreeMap<String, Tensor>, file: &Path) -> Result<Vec<Vec<i64>>> {
    let t = inputs.get("input_ids").with_context(|| format!("{} holds no tensor input_ids", file.display()))?;
    let ids = t.to_i64().with_context(|| format!("tensor input_ids in {} must hold integers", file.display()))?;
    let (b, s) = match t.shape[..] {
        [s] => (1, s),
        [b, s] => (b, s),
        _ => bail!("tensor input_ids in {} has shape {:?}, expected [batch, seq] or [seq]", file.display(), t.shape),
    };
    ensure!(b > 0 && s > 0, "tensor input_ids in {} is empty (shape {:?})", file.display(), t.shape);
    if let Some(mask) = inputs.get("attention_mask") {
        let m = mask.to_i64().with_context(|| format!("tensor attention_mask in {}", file.display()))?;
        ensure!(
            m.iter().all(|&v| v == 1),
            "{} has padding in attention_mask; lamina's forward runs unpadded sequences only",
            file.display()
        );
    }
    Ok(ids.chunks(s).map(|c| c.to_vec()).collect())
}

/// Embeds each sequence and gives it its positions. The vision tower plugs in here: it turns
/// `pixel_values` (and `image_grid_thw`) into image features spliced at the image tokens, M-RoPE
/// ids from `get_rope_index`, and deepstack injections.
fn decoder_inputs(
    fm: &FloatModel,
    inputs: &BTreeMap<String, Tensor>,
    file: &Path,
    batch: &[Vec<i64>],
) -> Result<Vec<DecoderInput>> {
    if inputs.contains_key("pixel_values") {
        bail!(
            "{} holds pixel_values, but this build of lamina has no vision forward yet; \
             give input_ids of a text-only prompt",
            file.display()
        );
    }
    let config = &fm.ckpt.config;
    let image_tokens: Vec<i64> = ["image_token_id", "image_token_index", "video_token_id"]
        .iter()
        .filter_map(|k| config.get(*k).and_then(|v| v.as_i64()))
        .collect();
    let table = fm.embedding_table()?;
    let mut seqs = Vec::with_capacity(batch.len());
    for (b, ids) in batch.iter().enumerate() {
        if let Some(t) = ids.iter().position(|id| image_tokens.contains(id)) {
            bail!(
                "input_ids of sequence {b} in {} holds the image token {} at position {t} but the file has no pixel_values",
                file.display(),
                ids[t]
            );
        }
        let embeds = embed(table.view(), ids)
            .with_context(|| format!("tensor input_ids of sequence {b} in {}", file.display()))?;
        seqs.push(DecoderInput { embeds, positions: Positions::sequential(ids.len()), injections: vec![] });
    }
    fm.release(UnitKind::Embed);
    Ok(seqs)
}

/// Runs the text decoder layer by layer over every sequence; returns the named outputs.
fn forward(fm: &FloatModel, device: &dyn Device, seqs: Vec<DecoderInput>) -> Result<Vec<(String, Tensor)>> {
    let cfg = &fm.model.text;
    let layout = &fm.model.layout;
    let rope = Rope::new(&cfg.rope, cfg.head_dim)?;
    let angles = seqs.iter().map(|s| rope.angles(&s.positions)).collect::<Result<Vec<RopeAngles>>>()?;
    let mut out = Vec::new();
    let mut hidden: Vec<Array2<f32>> = seqs.iter().map(|s| s.embeds.clone()).collect();
    if fm.model.family.is_vision_language() {
        out.push(("lm.inputs_embeds".to_string(), stack(&hidden)?));
    }
    if rope.is_multimodal() {
        out.push(("lm.position_ids".to_string(), position_ids(&seqs)?));
    }
    for i in 0..cfg.num_layers {
        let next = if i + 1 < cfg.num_layers { UnitKind::TextLayer(i + 1) } else { UnitKind::Head };
        fm.prefetch(next);
        let layer = fm.layer(i)?;
        let name = layout.text_layer(i);
        out.push((format!("{name}.in"), stack(&hidden)?));
        for (b, h) in hidden.iter_mut().enumerate() {
            *h = layer
                .forward(device, h.view(), &angles[b], &mut Plain, ForwardOptions::default())
                .with_context(|| format!("{name} on sequence {b}"))?;
        }
        out.push((format!("{name}.out"), stack(&hidden)?));
        for (s, h) in seqs.iter().zip(hidden.iter_mut()) {
            s.injections.iter().filter(|j| j.after_layer == i).for_each(|j| j.apply(h));
        }
        drop(layer);
        fm.release(UnitKind::TextLayer(i));
    }
    let head = fm.head()?;
    let normed: Vec<Array2<f32>> = hidden.iter().map(|h| head.final_norm(h.view())).collect();
    out.push(("final_norm.out".to_string(), stack(&normed)?));
    drop(hidden);
    let logits: Vec<Array2<f32>> = normed.iter().map(|h| head.logits(device, h.view(), &mut Plain)).collect();
    out.push(("logits".to_string(), stack(&logits)?));
    fm.release(UnitKind::Head);
    Ok(out)
}

/// Sequences `[seq, width]` of equal length as one `[batch, seq, width]` f32 tensor.
fn stack(rows: &[Array2<f32>]) -> Result<Tensor> {
    let (seq, width) = rows[0].dim();
    ensure!(rows.iter().all(|r| r.dim() == (seq, width)), "sequences of different lengths cannot be written together");
    let mut data = Vec::with_capacity(rows.len() * seq * width);
    for r in rows {
        data.extend(r.iter());
    }
    Ok(Tensor::from_f32(&[rows.len(), seq, width], &data))
}

/// M-RoPE ids as transformers passes them: `[3, batch, seq]`, int64.
fn position_ids(seqs: &[DecoderInput]) -> Result<Tensor> {
    let seq = seqs[0].positions.len();
    ensure!(seqs.iter().all(|s| s.positions.len() == seq), "sequences of different lengths cannot be written together");
    let mut data = Vec::with_capacity(3 * seqs.len() * seq);
    for axis in 0..3 {
        for s in seqs {
            let ids = s.positions.ids();
            data.extend(ids.row(if ids.nrows() == 1 { 0 } else { axis }).iter());
        }
    }
    Ok(Tensor::from_i64(&[3, seqs.len(), seq], &data))
}
