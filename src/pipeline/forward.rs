//! `lamina forward`: the float model, one unit at a time, on the `input_ids` of an inputs file.
//! It writes what transformers reference files hold, under the same names (`<text>.layers.i.in`,
//! `.out`, `final_norm.out`, `logits`, and for VL models `lm.inputs_embeds`, `lm.position_ids`),
//! so a user can check lamina against their own reference of a model family.
//!
//! Memory: the checkpoint stays memory-mapped; each unit's weights are widened to f32, used for
//! every sequence, dropped, and their pages given back, while the next unit is prefetched. Only
//! the hidden states of the sequences (and the outputs to write) stay resident.

use super::calibrate::hooks::{SimLinear, Simulate};
use crate::device::{self, Device};
use crate::export::read::QuantizedOutput;
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::{load_all, save};
use crate::model::decoder::{self, embed, Carry, DecoderBlock, ForwardOptions, Head};
use crate::model::layout::UnitKind;
use crate::model::load;
use crate::model::nn::Plain;
use crate::model::rope::Positions;
use crate::model::vision::mrope::RopeIndex;
use crate::model::vision::splice::{splice_image_embeds, ImageSlots};
use crate::model::vision::{self, VisionInput, VisionOutput, VisionTower};
use crate::model::weights::Weights;
use crate::model::{build_units, Model, Unit};
use crate::tensor::{Tensor, TensorMeta};
use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array2};
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
    /// A quantized output to run instead of the float model.
    pub quantized: Option<PathBuf>,
}

/// What a finished forward reports.
#[derive(Debug)]
pub struct ForwardSummary {
    pub sequences: usize,
    pub tokens: usize,
    pub tensors: usize,
    pub seconds: f64,
}

/// Where a forward gets each unit's weights and how their linears compute: the float checkpoint
/// ([`FloatModel`]), or a quantized output as the NPU computes it ([`QuantizedModel`]).
pub trait ModelWeights {
    fn model(&self) -> &Model;
    /// Unit `kind`'s tensors, named relative to [`Layout::unit_prefix`], and the hook its linears
    /// run through (empty for float weights). A unit the checkpoint lacks has no tensors.
    ///
    /// [`Layout::unit_prefix`]: crate::model::layout::Layout::unit_prefix
    fn weights(&self, kind: UnitKind) -> Result<(Weights, Simulate)>;
    /// Gives a unit's memory back once it is done with.
    fn release(&self, _kind: UnitKind) {}
    /// Starts reading a unit ahead of use.
    fn prefetch(&self, _kind: UnitKind) {}
    /// Whether these weights have their own output projection although the model ties it to the
    /// embeddings (an output whose rotation untied them).
    fn untied(&self) -> bool {
        false
    }
}

/// The token embedding table `[vocab, hidden]`.
pub fn embedding_table(src: &dyn ModelWeights) -> Result<Array2<f32>> {
    let (mut w, _) = src.weights(UnitKind::Embed)?;
    let name = src.model().layout.embed_tokens();
    let table = w.map.remove(&name).with_context(|| format!("tensor {name} is missing"))?;
    let shape = table.shape().to_vec();
    table.into_dimensionality().with_context(|| format!("tensor {name} has shape {shape:?}, expected 2D"))
}

/// Decoder layer `i`, and the hook its linears run through.
pub fn decoder_layer(src: &dyn ModelWeights, i: usize) -> Result<(Box<dyn DecoderBlock>, Simulate)> {
    let (w, hook) = src.weights(UnitKind::TextLayer(i))?;
    let prefix = w.prefix.clone();
    let layer =
        decoder::layer(src.model(), i, w).with_context(|| format!("building {}", prefix.trim_end_matches('.')))?;
    Ok((layer, hook))
}

/// The final norm and output projection (the embedding table when tied).
pub fn head(src: &dyn ModelWeights) -> Result<Head> {
    let (w, _) = src.weights(UnitKind::Head)?;
    let model = src.model();
    let mut text = model.text.clone();
    text.tie_word_embeddings &= !src.untied();
    Head::new(&text, &model.layout, w, || embedding_table(src))
}

/// A checkpoint opened for float forwards: its units are loaded one at a time on demand.
pub struct FloatModel {
    pub ckpt: Checkpoint,
    pub model: Model,
    pub units: Vec<Unit>,
}

impl FloatModel {
    pub fn open(model_path: &Path, model_type: Option<&str>) -> Result<FloatModel> {
        let mut ckpt = Checkpoint::open(model_path)?;
        crate::data::calib::complete_image_tokens(&ckpt.dir, &mut ckpt.config)?;
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
}

impl ModelWeights for FloatModel {
    fn model(&self) -> &Model {
        &self.model
    }

    fn weights(&self, kind: UnitKind) -> Result<(Weights, Simulate)> {
        let w = match self.units.iter().find(|u| u.kind == kind) {
            Some(u) => vision::load_unit(&self.ckpt, &self.model.layout, u)?,
            None => Weights { prefix: self.model.layout.unit_prefix(kind), ..Weights::default() },
        };
        Ok((w, Simulate::default()))
    }

    fn release(&self, kind: UnitKind) {
        if let Ok(u) = self.unit(kind) {
            u.tensors.iter().for_each(|t| load::release(&self.ckpt, t));
        }
    }

    fn prefetch(&self, kind: UnitKind) {
        if let Ok(u) = self.unit(kind) {
            load::prefetch(&self.ckpt, u);
        }
    }
}

/// A lamina output read back as the NPU computes it: dequantized weights, simulated activation
/// quantization, the static kernel's effective bias. Its architecture is the float model's.
pub struct QuantizedModel<'a> {
    pub float: &'a FloatModel,
    pub output: Box<dyn QuantizedOutput>,
}

impl ModelWeights for QuantizedModel<'_> {
    fn model(&self) -> &Model {
        &self.float.model
    }

    fn untied(&self) -> bool {
        let config = crate::io::checkpoint::read_config(self.output.dir()).ok();
        let tied = |c: &serde_json::Value| c.get("tie_word_embeddings").and_then(|v| v.as_bool());
        let flag = config.as_ref().and_then(|c| tied(c).or_else(|| c.get("text_config").and_then(tied)));
        flag == Some(false) && self.float.model.text.tie_word_embeddings
    }

    fn weights(&self, kind: UnitKind) -> Result<(Weights, Simulate)> {
        let layout = &self.float.model.layout;
        let prefix = layout.unit_prefix(kind);
        let (w, acts) = self.output.weights(&prefix, &|name| layout.classify(name) == kind)?;
        let mut sim = Simulate { kv: self.output.kv_caches(&prefix)?, ..Simulate::default() };
        for (m, act) in acts {
            let linear = w.linear(&m).with_context(|| format!("{prefix}{m} in {}", self.output.dir().display()))?;
            sim.linears.insert(m, SimLinear { linear, act });
        }
        Ok((w, sim))
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
    /// What the layers run so far left for later ones (cross-layer attention's keys and values).
    pub carry: Carry,
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
    pub fn apply(&self, h: &mut Array2<f32>) {
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
    let quantized = match &args.quantized {
        Some(dir) => Some(QuantizedModel { float: &fm, output: crate::export::read::open(dir)? }),
        None => None,
    };
    let src: &dyn ModelWeights = match &quantized {
        Some(q) => q,
        None => &fm,
    };
    let mut outputs = Vec::new();
    let seqs = decoder_inputs(src, device.as_ref(), &inputs, &args.inputs, &batch, &mut outputs)?;
    outputs.extend(forward(src, device.as_ref(), seqs)?);
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
pub fn input_ids(inputs: &BTreeMap<String, Tensor>, file: &Path) -> Result<Vec<Vec<i64>>> {
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

/// Embeds each sequence and gives it its positions. With `pixel_values` the vision tower runs
/// first, block by block, and each sequence gets its images' features (see [`with_image_features`]).
/// The tower's activations are added to `outputs` under the reference names.
pub fn decoder_inputs(
    src: &dyn ModelWeights,
    device: &dyn Device,
    inputs: &BTreeMap<String, Tensor>,
    file: &Path,
    batch: &[Vec<i64>],
    outputs: &mut Vec<(String, Tensor)>,
) -> Result<Vec<DecoderInput>> {
    let model = src.model();
    let vision = match inputs.get("pixel_values") {
        None => None,
        Some(pv) => {
            ensure!(
                model.family.is_vision_language(),
                "{} holds pixel_values but the model has no vision tower",
                file.display()
            );
            let input = VisionInput::from_tensors(pv, inputs.get("image_grid_thw"))
                .with_context(|| format!("reading the images of {}", file.display()))?;
            Some((vision_forward(src, device, &input, outputs)?, input.image_grid_thw))
        }
    };
    let table = embedding_table(src)?;
    let rope_index = rope_index(model, vision.is_some())?;
    let (mut feature_row, mut grid) = (0usize, 0usize);
    let mut seqs = Vec::with_capacity(batch.len());
    for (b, ids) in batch.iter().enumerate() {
        let embeds = embed(table.view(), ids)
            .with_context(|| format!("tensor input_ids of sequence {b} in {}", file.display()))?;
        let Some((features, grids)) = &vision else {
            seqs.push(text_only(model, ids, embeds).with_context(|| format!("sequence {b} in {}", file.display()))?);
            continue;
        };
        // This sequence's share of the image features and grids, in order.
        let n = ImageSlots::of(&model.config)?
            .positions(ids)
            .with_context(|| format!("input_ids of sequence {b} in {}", file.display()))?
            .len();
        ensure!(
            feature_row + n <= features.embeds.nrows(),
            "input_ids in {} hold more image tokens than the images give features",
            file.display()
        );
        let first = grid;
        let mut take = 0;
        let merge = rope_index.as_ref().map_or(1, |ri| ri.spatial_merge_size * ri.spatial_merge_size);
        while take < n && grid < grids.len() {
            take += grids[grid].iter().product::<usize>() / merge;
            grid += 1;
        }
        let mine = VisionOutput {
            embeds: features.embeds.slice(s![feature_row..feature_row + n, ..]).to_owned(),
            deepstack: features
                .deepstack
                .iter()
                .map(|d| d.slice(s![feature_row..feature_row + n, ..]).to_owned())
                .collect(),
        };
        let d = with_image_features(model, rope_index.as_ref(), ids, embeds, &mine, &grids[first..grid])
            .with_context(|| format!("sequence {b} in {}", file.display()))?;
        feature_row += n;
        seqs.push(d);
    }
    if let Some((features, _)) = &vision {
        ensure!(
            feature_row == features.embeds.nrows(),
            "the images of {} give {} features but input_ids hold {feature_row} image tokens",
            file.display(),
            features.embeds.nrows()
        );
    }
    src.release(UnitKind::Embed);
    Ok(seqs)
}

/// `get_rope_index` for Qwen VL models fed images (LLaVA, InternVL and text-only inputs use 1D
/// positions).
pub fn rope_index(model: &Model, with_images: bool) -> Result<Option<RopeIndex>> {
    match model.layout.vision_kind {
        Some(kind) if with_images && kind.uses_mrope() => Ok(Some(RopeIndex::from_model(model)?)),
        _ => Ok(None),
    }
}

/// A sequence without images; image tokens in it are an error.
pub fn text_only(model: &Model, ids: &[i64], embeds: Array2<f32>) -> Result<DecoderInput> {
    let mut image_tokens: Vec<i64> = ["image_token_id", "image_token_index", "img_context_token_id", "video_token_id"]
        .iter()
        .filter_map(|k| model.config.get(*k).and_then(|v| v.as_i64()))
        .collect();
    if let Ok(slots @ ImageSlots::Between { .. }) = ImageSlots::of(&model.config) {
        image_tokens.push(slots.marker());
    }
    if let Some(t) = ids.iter().position(|id| image_tokens.contains(id)) {
        bail!("input_ids hold the image token {} at position {t} but no image was given", ids[t]);
    }
    Ok(DecoderInput {
        embeds,
        positions: Positions::sequential(ids.len()),
        injections: vec![],
        carry: Carry::default(),
    })
}

/// One sequence with its images' features (exactly its share, in order) spliced in at the image
/// tokens; M-RoPE positions from `get_rope_index` over its image grids; Qwen3-VL's deepstack
/// features become injections after the first text layers.
pub fn with_image_features(
    model: &Model,
    rope_index: Option<&RopeIndex>,
    ids: &[i64],
    mut embeds: Array2<f32>,
    features: &VisionOutput,
    grids: &[[usize; 3]],
) -> Result<DecoderInput> {
    let rows = splice_image_embeds(&mut embeds, ids, ImageSlots::of(&model.config)?, features.embeds.view())?;
    let positions = match rope_index {
        Some(ri) => Positions::from_ids(ri.get_rope_index(ids, grids, &[], &[])?.0)?,
        None => Positions::sequential(ids.len()),
    };
    let injections = features
        .deepstack
        .iter()
        .enumerate()
        .map(|(k, d)| Injection { after_layer: k, rows: rows.clone(), values: d.clone() })
        .collect();
    Ok(DecoderInput { embeds, positions, injections, carry: Carry::default() })
}

/// The vision tower, one unit at a time, recording every block's input and output.
fn vision_forward(
    src: &dyn ModelWeights,
    device: &dyn Device,
    input: &VisionInput,
    outputs: &mut Vec<(String, Tensor)>,
) -> Result<VisionOutput> {
    let layout = &src.model().layout;
    let tower = VisionTower::from_model(src.model())?;
    let load = |kind: UnitKind| -> Result<(Weights, Simulate)> {
        let w = src.weights(kind)?;
        src.release(kind);
        Ok(w)
    };
    // CLIP (and InternViT's tile) states are `[images · tokens, dim]`; the reference keeps the image axis.
    let per_image = matches!(tower, VisionTower::Clip(_) | VisionTower::InternVit(_) | VisionTower::QwenVl(_));
    let images = if per_image { input.pixel_values.shape()[0] } else { 1 };
    let as_tensor = |h: &Array2<f32>| {
        let (rows, dim) = h.dim();
        let shape: Vec<usize> =
            if images > 1 || per_image { vec![images, rows / images, dim] } else { vec![rows, dim] };
        Tensor::from_f32(&shape, h.as_slice().expect("hidden states are contiguous"))
    };
    let mut state = tower.embed(device, &load(UnitKind::VisionPre)?.0, input)?;
    for i in 0..tower.depth() {
        let name = layout.vision_block(i).unwrap_or_default();
        outputs.push((format!("{name}.in"), as_tensor(&state.hidden)));
        let (w, mut hook) = load(UnitKind::VisionBlock(i))?;
        tower.block(device, i, &w, &mut state, &mut hook)?;
        outputs.push((format!("{name}.out"), as_tensor(&state.hidden)));
    }
    let (w, mut hook) = load(UnitKind::VisionPost)?;
    let out = tower.finish(device, &w, state, &mut hook)?;
    let flat = |a: &Array2<f32>| Tensor::from_f32(&[a.nrows(), a.ncols()], &a.iter().copied().collect::<Vec<_>>());
    outputs.push(("visual.out".to_string(), flat(&out.embeds)));
    for (k, d) in out.deepstack.iter().enumerate() {
        outputs.push((format!("visual.deepstack.{k}"), flat(d)));
    }
    Ok(out)
}

/// Runs the text decoder layer by layer over every sequence; returns the named outputs.
pub fn forward(
    src: &dyn ModelWeights,
    device: &dyn Device,
    mut seqs: Vec<DecoderInput>,
) -> Result<Vec<(String, Tensor)>> {
    let model = src.model();
    let cfg = &model.text;
    let layout = &model.layout;
    let mut out = Vec::new();
    let mut hidden: Vec<Array2<f32>> = seqs.iter().map(|s| s.embeds.clone()).collect();
    if model.family.is_vision_language() {
        out.push(("lm.inputs_embeds".to_string(), stack(&hidden)?));
    }
    if cfg.rope.mrope_section.is_some() {
        out.push(("lm.position_ids".to_string(), position_ids(&seqs)?));
    }
    for i in 0..cfg.num_layers {
        let next = if i + 1 < cfg.num_layers { UnitKind::TextLayer(i + 1) } else { UnitKind::Head };
        src.prefetch(next);
        let (layer, mut hook) = decoder_layer(src, i)?;
        let name = layout.text_layer(i);
        out.push((format!("{name}.in"), stack(&hidden)?));
        for (b, (h, s)) in hidden.iter_mut().zip(seqs.iter_mut()).enumerate() {
            *h = layer
                .forward(device, h.view(), &s.positions, &mut s.carry, &mut hook, ForwardOptions::default())
                .with_context(|| format!("{name} on sequence {b}"))?;
        }
        out.push((format!("{name}.out"), stack(&hidden)?));
        for (s, h) in seqs.iter().zip(hidden.iter_mut()) {
            s.injections.iter().filter(|j| j.after_layer == i).for_each(|j| j.apply(h));
        }
        drop(layer);
        src.release(UnitKind::TextLayer(i));
    }
    let head = head(src)?;
    let normed: Vec<Array2<f32>> = hidden.iter().map(|h| head.final_norm(h.view())).collect();
    out.push(("final_norm.out".to_string(), stack(&normed)?));
    drop(hidden);
    let logits: Vec<Array2<f32>> = normed.iter().map(|h| head.logits(device, h.view(), &mut Plain)).collect();
    out.push(("logits".to_string(), stack(&logits)?));
    src.release(UnitKind::Head);
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
