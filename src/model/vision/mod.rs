//! The float forward of the vision towers, unit by unit, so the pipeline holds one vision block's
//! weights at a time, exactly as it streams the text decoder:
//!
//! ```text
//! let mut state = tower.embed(dev, &pre_weights, &input)?;           // UnitKind::VisionPre
//! for i in 0..tower.depth() { tower.block(dev, i, &block_weights(i), &mut state, hook)?; }
//! let out = tower.finish(dev, &post_weights, state, hook)?;          // UnitKind::VisionPost
//! ```
//!
//! Each architecture is one file: [`qwen2_vl`], [`qwen2_5_vl`], [`qwen3_vl`] (also Qwen3-VL-MoE)
//! [`clip`] (LLaVA), [`internvit`] (InternVL), [`glm4v`] (GLM-4.1V, 4.5V, 4.6V) and [`qwen_vl`]
//! (Qwen-VL's ViT and resampler). Weights are looked up by names relative to [`Layout::unit_prefix`]; every 2D
//! linear is computed through the [`LinearHook`] under that relative name (`attn.qkv`,
//! `merger.linear_fc1`, `multi_modal_projector.linear_1`). The patch-embedding convolutions are
//! computed as linears over flattened patches but not through the hook: they are not 2D linears
//! and no recipe quantizes them.
//!
//! The text side: [`mrope`] computes the M-RoPE position ids (`get_rope_index`), [`splice`] puts the
//! image embeddings at the image tokens and adds Qwen3-VL's deepstack features after the first
//! text layers.

pub mod clip;
pub mod glm4v;
pub mod internvit;
pub mod mrope;
pub mod ops;
pub mod patch_tower;
pub mod qwen2_5_vl;
pub mod qwen2_vl;
pub mod qwen3_vl;
pub mod qwen_vl;
pub mod splice;

use super::layout::{Layout, UnitKind, VisionKind};
use super::nn::{Linear, LinearHook};
use super::weights::Weights;
use super::{Model, Unit};
use crate::device::Device;
use crate::io::checkpoint::Checkpoint;
use crate::tensor::Tensor;
use anyhow::{bail, Context, Result};
use ndarray::{Array1, Array2, ArrayD};
use ops::{Rotary, Spans};

/// What the image processor produced.
#[derive(Debug, Clone)]
pub struct VisionInput {
    /// Qwen: `[patches, channels·temporal_patch·patch·patch]` in merge-window order.
    /// CLIP, Qwen-VL: `[images, channels, height, width]`; InternVL: `[tiles, channels, size, size]`.
    pub pixel_values: ArrayD<f32>,
    /// Qwen: `(t, h, w)` of every image in patches. Empty for CLIP.
    pub image_grid_thw: Vec<[usize; 3]>,
}

impl VisionInput {
    /// From the `pixel_values` and (Qwen) `image_grid_thw` tensors of an inputs file.
    pub fn from_tensors(pixel_values: &Tensor, image_grid_thw: Option<&Tensor>) -> Result<VisionInput> {
        let pixel_values = pixel_values.to_array().context("reading pixel_values")?;
        let image_grid_thw = match image_grid_thw {
            None => Vec::new(),
            Some(g) => {
                let v = g.to_i64().context("reading image_grid_thw")?;
                if g.shape.len() != 2 || g.shape[1] != 3 || v.iter().any(|&x| x <= 0) {
                    bail!("image_grid_thw must be [images, 3] of positive sizes, got shape {:?}: {v:?}", g.shape);
                }
                v.chunks(3).map(|c| [c[0] as usize, c[1] as usize, c[2] as usize]).collect()
            }
        };
        Ok(VisionInput { pixel_values, image_grid_thw })
    }
}

/// Everything the blocks of a tower carry from one to the next.
#[derive(Debug, Clone)]
pub struct VisionState {
    /// `[tokens, dim]`, in the order the blocks see them (Qwen2.5-VL: window order).
    pub hidden: Array2<f32>,
    /// Per-token rotary table (Qwen towers), in the same order as `hidden`.
    pub rotary: Option<Rotary>,
    /// Full-attention spans (`cu_seqlens`): one per image (CLIP, Qwen3-VL) or frame (Qwen2-VL, 2.5).
    pub spans: Vec<usize>,
    /// Window-attention spans (Qwen2.5-VL's `cu_window_seqlens`).
    pub window_spans: Option<Vec<usize>>,
    /// Qwen2.5-VL: `window_index[k]` is the merged patch that sits at place `k` of the window
    /// order; the merger's output is put back in image order with it.
    pub window_index: Option<Vec<usize>>,
    /// Hidden states kept for [`VisionTower::finish`], by hidden-state index (0 = the embeddings,
    /// `i + 1` = block `i`'s output): Qwen3-VL's deepstack inputs, LLaVA's feature layers.
    pub kept: Vec<(usize, Array2<f32>)>,
    pub image_grid_thw: Vec<[usize; 3]>,
}

impl VisionState {
    fn new(hidden: Array2<f32>, spans: Vec<usize>, image_grid_thw: Vec<[usize; 3]>) -> VisionState {
        VisionState {
            hidden,
            rotary: None,
            spans,
            window_spans: None,
            window_index: None,
            kept: Vec::new(),
            image_grid_thw,
        }
    }

    /// The kept hidden state of index `index`.
    pub fn kept(&self, index: usize) -> Result<&Array2<f32>> {
        self.kept
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, h)| h)
            .with_context(|| format!("the vision blocks did not keep hidden state {index}; were all blocks run?"))
    }
}

/// What the tower hands to the language model.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[image tokens, text hidden]`, all images in order (`visual.out`).
    pub embeds: Array2<f32>,
    /// Qwen3-VL: one `[image tokens, text hidden]` per deepstack layer (`visual.deepstack.K`).
    pub deepstack: Vec<Array2<f32>>,
}

/// A vision tower with its configuration.
#[derive(Debug, Clone)]
pub enum VisionTower {
    Qwen2Vl(qwen2_vl::Config),
    Qwen25Vl(qwen2_5_vl::Config),
    Qwen3Vl(qwen3_vl::Config),
    Clip(clip::Config),
    InternVit(internvit::Config),
    Glm4v(glm4v::Config),
    QwenVl(qwen_vl::Config),
}

impl VisionTower {
    pub fn from_model(model: &Model) -> Result<VisionTower> {
        let kind = model
            .layout
            .vision_kind
            .with_context(|| format!("model_type {} has no vision tower", model.family.model_type()))?;
        Ok(match kind {
            VisionKind::Qwen2Vl => VisionTower::Qwen2Vl(qwen2_vl::Config::from_json(&model.config)?),
            VisionKind::Qwen25Vl => VisionTower::Qwen25Vl(qwen2_5_vl::Config::from_json(&model.config)?),
            VisionKind::Qwen3Vl => VisionTower::Qwen3Vl(qwen3_vl::Config::from_json(&model.config)?),
            VisionKind::Clip => VisionTower::Clip(clip::Config::from_json(&model.config, &model.layout)?),
            VisionKind::InternVit => {
                VisionTower::InternVit(internvit::Config::from_json(&model.config, &model.layout)?)
            }
            VisionKind::Glm4v => VisionTower::Glm4v(glm4v::Config::from_json(&model.config)?),
            VisionKind::QwenVl => VisionTower::QwenVl(qwen_vl::Config::from_json(&model.config)?),
        })
    }

    /// The number of blocks.
    pub fn depth(&self) -> usize {
        match self {
            VisionTower::Qwen2Vl(c) => c.tower.depth,
            VisionTower::Qwen25Vl(c) => c.tower.depth,
            VisionTower::Qwen3Vl(c) => c.tower.depth,
            VisionTower::Clip(c) => c.depth,
            VisionTower::InternVit(c) => c.depth,
            VisionTower::Glm4v(c) => c.tower.depth,
            VisionTower::QwenVl(c) => c.depth,
        }
    }

    /// Patch (and position) embeddings, with the weights of the [`UnitKind::VisionPre`] unit.
    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        match self {
            VisionTower::Qwen2Vl(c) => c.embed(device, w, input),
            VisionTower::Qwen25Vl(c) => c.embed(device, w, input),
            VisionTower::Qwen3Vl(c) => c.embed(device, w, input),
            VisionTower::Clip(c) => c.embed(device, w, input),
            VisionTower::InternVit(c) => c.embed(device, w, input),
            VisionTower::Glm4v(c) => c.embed(device, w, input),
            VisionTower::QwenVl(c) => c.embed(device, w, input),
        }
        .with_context(|| format!("vision embeddings ({})", w.prefix))
    }

    /// Block `i`, with the weights of the [`UnitKind::VisionBlock`] unit `i`.
    pub fn block(
        &self,
        device: &dyn Device,
        i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        if i >= self.depth() {
            bail!("vision block {i} does not exist (the tower has {})", self.depth());
        }
        match self {
            VisionTower::Qwen2Vl(c) => c.block(device, w, state, hook),
            VisionTower::Qwen25Vl(c) => c.block(device, i, w, state, hook),
            VisionTower::Qwen3Vl(c) => c.block(device, i, w, state, hook),
            VisionTower::Clip(c) => c.block(device, i, w, state, hook),
            VisionTower::InternVit(c) => c.block(device, i, w, state, hook),
            VisionTower::Glm4v(c) => c.block(device, i, w, state, hook),
            VisionTower::QwenVl(c) => c.block(device, i, w, state, hook),
        }
        .with_context(|| format!("vision block {}", w.prefix))
    }

    /// Mergers / projector, with the weights of the [`UnitKind::VisionPost`] unit.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        match self {
            VisionTower::Qwen2Vl(c) => c.finish(device, w, state, hook),
            VisionTower::Qwen25Vl(c) => c.finish(device, w, state, hook),
            VisionTower::Qwen3Vl(c) => c.finish(device, w, state, hook),
            VisionTower::Clip(c) => c.finish(device, w, state, hook),
            VisionTower::InternVit(c) => c.finish(device, w, state, hook),
            VisionTower::Glm4v(c) => c.finish(device, w, state, hook),
            VisionTower::QwenVl(c) => c.finish(device, w, state, hook),
        }
        .with_context(|| {
            format!("vision mergers / projector ({})", if w.prefix.is_empty() { "whole names" } else { &w.prefix })
        })
    }

    /// The whole tower, loading one unit's weights at a time from `ckpt`.
    pub fn forward(
        &self,
        device: &dyn Device,
        ckpt: &Checkpoint,
        layout: &Layout,
        units: &[Unit],
        input: &VisionInput,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let load = |kind: UnitKind| -> Result<Weights> {
            match units.iter().find(|u| u.kind == kind) {
                Some(u) => load_unit(ckpt, layout, u),
                None => Ok(Weights { prefix: layout.unit_prefix(kind), ..Weights::default() }),
            }
        };
        let mut state = self.embed(device, &load(UnitKind::VisionPre)?, input)?;
        for i in 0..self.depth() {
            self.block(device, i, &load(UnitKind::VisionBlock(i))?, &mut state, hook)?;
        }
        self.finish(device, &load(UnitKind::VisionPost)?, state, hook)
    }
}

/// A unit's weights under the names the towers use (relative to [`Layout::unit_prefix`]). Each
/// tensor's mapped pages are given back as soon as it is widened, so a unit costs its f32 size
/// and not that plus its stored bytes.
pub fn load_unit(ckpt: &Checkpoint, layout: &Layout, unit: &Unit) -> Result<Weights> {
    Weights::load(ckpt, unit, &layout.unit_prefix(unit.kind))
}

/// The non-overlapping `patch × patch` squares of `[images, channels, height, width]` pixel
/// values (CLIP, InternViT and Qwen-VL), each flattened `[channel][row][column]` as a patch
/// convolution reads it; for each image its grid in row order.
struct ImagePatches {
    /// `[images · grid rows · grid columns, channels · patch · patch]`.
    patches: Array2<f32>,
    images: usize,
    /// Rows and columns of patches per image.
    grid: (usize, usize),
}

fn image_patches(input: &VisionInput, patch: usize) -> Result<ImagePatches> {
    let pv = input.pixel_values.view().into_dimensionality::<ndarray::Ix4>().with_context(|| {
        format!("pixel_values has shape {:?}, expected [images, channels, height, width]", input.pixel_values.shape())
    })?;
    let (images, channels, height, width) = pv.dim();
    if patch == 0 || height % patch != 0 || width % patch != 0 {
        bail!("a {height}×{width} image is not a whole number of {patch}×{patch} patches");
    }
    let (gh, gw) = (height / patch, width / patch);
    let mut patches = Array2::<f32>::zeros((images * gh * gw, channels * patch * patch));
    for (r, mut row) in patches.rows_mut().into_iter().enumerate() {
        let (b, gi) = (r / (gh * gw), r % (gh * gw));
        let (y, x) = ((gi / gw) * patch, (gi % gw) * patch);
        let block = pv.slice(ndarray::s![b, .., y..y + patch, x..x + patch]);
        row.iter_mut().zip(block.iter()).for_each(|(d, &v)| *d = v);
    }
    Ok(ImagePatches { patches, images, grid: (gh, gw) })
}

/// A convolution whose stride equals its kernel, as a linear over flattened patches:
/// `[out, in, k…]` becomes `[out, in·Πk]`.
fn conv_as_linear(w: &Weights, module: &str) -> Result<Linear> {
    let weight = w.get(&format!("{module}.weight"))?;
    let out = weight.shape()[0];
    let flat = weight.len() / out.max(1);
    let weight = weight.to_shape((out, flat))?.to_owned();
    let bias_name = format!("{module}.bias");
    let bias = if w.has(&bias_name) { Some(w.vector(&bias_name)?) } else { None };
    Ok(Linear { weight, bias })
}

/// A norm's weight and optional bias.
fn norm_params(w: &Weights, module: &str) -> Result<(Array1<f32>, Option<Array1<f32>>)> {
    let bias_name = format!("{module}.bias");
    let bias = if w.has(&bias_name) { Some(w.vector(&bias_name)?) } else { None };
    Ok((w.vector(&format!("{module}.weight"))?, bias))
}

fn layer_norm(w: &Weights, module: &str, x: &Array2<f32>, eps: f64) -> Result<Array2<f32>> {
    let (weight, bias) = norm_params(w, module)?;
    check_width(module, weight.len(), x.ncols())?;
    Ok(ops::layer_norm(x.view(), &weight, bias.as_ref(), eps))
}

fn rms_norm(w: &Weights, module: &str, x: &Array2<f32>, eps: f64) -> Result<Array2<f32>> {
    let weight = w.vector(&format!("{module}.weight"))?;
    check_width(module, weight.len(), x.ncols())?;
    Ok(ops::rms_norm(x.view(), &weight, eps))
}

fn check_width(module: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        bail!("{module} expects {expected} features, the hidden states have {got}");
    }
    Ok(())
}

/// `linear` through the hook, after checking its input width.
fn linear(
    device: &dyn Device,
    w: &Weights,
    module: &str,
    x: &Array2<f32>,
    hook: &mut dyn LinearHook,
) -> Result<Array2<f32>> {
    let l = w.linear(module)?;
    check_width(module, l.in_features(), x.ncols())?;
    Ok(hook.linear(device, module, &l, x.view()))
}

/// The attention of the Qwen vision blocks: fused `attn.qkv`, rotary, attention inside `spans`,
/// `attn.proj`.
fn fused_qkv_attention(
    device: &dyn Device,
    w: &Weights,
    x: &Array2<f32>,
    heads: usize,
    rotary: Option<&Rotary>,
    spans: &Spans,
    hook: &mut dyn LinearHook,
) -> Result<Array2<f32>> {
    let qkv = linear(device, w, "attn.qkv", x, hook)?;
    if qkv.ncols() % (3 * heads) != 0 {
        bail!("attn.qkv gives {} features, not three times a multiple of {heads} heads", qkv.ncols());
    }
    let (q, k, v) = ops::split_qkv(&qkv);
    let o = ops::span_attention(device, q, k, v, heads, rotary, spans);
    linear(device, w, "attn.proj", &o, hook)
}

/// `x + f(x)` in place.
fn residual(x: &mut Array2<f32>, delta: Array2<f32>) {
    ops::add_into(x, &delta);
}

/// Qwen `pixel_values` `[patches, C·T·P·P]` as a matrix, checked against the grids.
fn qwen_patches(input: &VisionInput, patch_features: usize) -> Result<Array2<f32>> {
    let pv = &input.pixel_values;
    if pv.ndim() != 2 || pv.shape()[1] != patch_features {
        bail!("pixel_values has shape {:?}, expected [patches, {patch_features}]", pv.shape());
    }
    let patches: usize = input.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
    if input.image_grid_thw.is_empty() || patches != pv.shape()[0] {
        bail!(
            "image_grid_thw {:?} describes {patches} patches, pixel_values holds {}",
            input.image_grid_thw,
            pv.shape()[0]
        );
    }
    Ok(pv.view().into_dimensionality()?.to_owned())
}

/// `[0, n₁, n₁+n₂, …]` with one span of `h·w` patches per frame.
fn frame_spans(grid_thw: &[[usize; 3]]) -> Vec<usize> {
    let mut spans = vec![0];
    for &[t, h, w] in grid_thw {
        for _ in 0..t {
            spans.push(spans.last().unwrap() + h * w);
        }
    }
    spans
}

fn check_grids(grid_thw: &[[usize; 3]], merge: usize) -> Result<()> {
    for g in grid_thw {
        if g[1] % merge != 0 || g[2] % merge != 0 {
            bail!("image grid {g:?} is not a multiple of spatial_merge_size {merge}");
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod parity;
