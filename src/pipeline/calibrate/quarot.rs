//! QuaRot in the streamed pipeline: the rotation `Q` of the residual stream (a randomized Hadamard
//! matrix of the hidden size, or msModelSlim's block-diagonal variant) is rebuilt from its seed in
//! every unit, so each unit folds its share without seeing the others:
//!
//! | unit | what is folded |
//! |---|---|
//! | embeddings | `E ← E Q`: the stream starts rotated |
//! | decoder layer | every norm's weight into the linears reading it (the norm becomes `x / rms(x)`, weight 1), those linears `W ← W Q`; the residual writers (the graph's `residual_writers`: o_proj, down_proj, every expert's down_proj) `W ← Qᵀ W`, `b ← Qᵀ b`; each value → output pair per head: `W_v ← blockdiag(Q_hᵀ) W_v`, `W_o ← W_o blockdiag(Q_h)` |
//! | head | the final norm into `lm_head`, `lm_head ← lm_head diag(g) Q`; tied embeddings are untied (the rotated head is written as `lm_head.weight`, config.json says `tie_word_embeddings: false`) |
//! | vision mergers | the projections whose outputs enter the text stream (Qwen2/2.5-VL `merger.mlp.2`, Qwen3-VL `merger.linear_fc2` and every `deepstack_merger_list.N.linear_fc2`, LLaVA `multi_modal_projector.linear_2`) `W ← Qᵀ W`, `b ← Qᵀ b` |
//!
//! The float model computes the same logits up to rounding (the rotated tensors are stored in the
//! checkpoint's dtype). What a layer connects to what is the decoder graph's business
//! (`model::decoder::LayerGraph`), not names here, so every architecture whose graph lists its
//! norms, residual writers and value paths is rotated the same way.
//!
//! **Only offline rotations.** QuaRot's online rotations (a Hadamard transform of `down_proj`'s
//! input, of `o_proj`'s per-head input, and of the queries and keys for a quantized KV cache) need
//! a kernel at inference. vLLM-Ascend's main branch has none for the types lamina writes (its W8A8,
//! W8A8_DYNAMIC and W4A4_DYNAMIC methods multiply the stored weights as they are), so a recipe
//! asking for `online: true` or `down_proj_online_layers` is refused rather than written in a form
//! no server computes correctly. msModelSlim's optional export of `Q` is written (`export_extra_info`,
//! default on): `optional/quarot.safetensors` with the tensor `global_rotation` and the description
//! entry `optional.quarot.rotation_map.global_rotation`, which vLLM-Ascend's EAGLE-3 drafter reads to
//! un-rotate the target model's hidden states.

use crate::model::decoder::{LayerGraph, LinearPath};
use crate::model::layout::Layout;
use crate::model::weights::Weights;
use crate::model::Model;
use crate::quant::recipe::Step;
use crate::quant::rotation::{fuse_norm, rotate_heads, rotate_input, rotate_output, Kind, Rotation};
use anyhow::{bail, Context, Result};
use ndarray::Array1;
use std::collections::BTreeSet;

/// A recipe's `quarot` step.
#[derive(Debug, Clone, PartialEq)]
pub struct QuaRotStep {
    /// msModelSlim's `block_size`: `None` (-1) rotates with one Hadamard of the hidden size,
    /// `Some(b)` with `hidden / b` copies of one of order `b` along the diagonal.
    pub block_size: Option<usize>,
    /// The seed of the random signs (msModelSlim seeds its rotations with 1234).
    pub seed: u64,
    /// Write `optional/quarot.safetensors` and its description entry.
    pub export: bool,
}

/// Where the exported global rotation goes, relative to the save folder.
pub const GLOBAL_ROTATION_FILE: &str = "optional/quarot.safetensors";

impl QuaRotStep {
    pub fn from_step(step: &Step) -> Result<QuaRotStep> {
        let p = &step.params;
        if p.get("online").and_then(|v| v.as_bool()).unwrap_or(false)
            || p.get("down_proj_online_layers").and_then(|v| v.as_sequence()).is_some_and(|s| !s.is_empty())
        {
            bail!(
                "quarot: online rotations need a rotation kernel at inference, and vLLM-Ascend's methods for the \
                 types lamina writes apply none; lamina folds the offline rotations only (set online: false and \
                 down_proj_online_layers: [])"
            );
        }
        let block_size = match p.get("block_size").and_then(|v| v.as_i64()) {
            None | Some(-1) => None,
            Some(b) if b > 0 && (b as u64).is_power_of_two() => Some(b as usize),
            Some(b) => bail!("quarot: block_size must be -1 or a power of two, not {b}"),
        };
        let seed = p.get("seed").and_then(|v| v.as_u64()).unwrap_or(1234);
        let export = p.get("export_extra_info").and_then(|v| v.as_bool()).unwrap_or(true);
        Ok(QuaRotStep { block_size, seed, export })
    }

    /// The rotations of `model`: the residual stream's and the per-head one of the values.
    pub fn rotations(&self, model: &Model) -> Result<Rotations> {
        if model.family == crate::model::layout::Family::QwenVl {
            // Its image embeddings leave the tower through `transformer.visual.proj`, a bare matrix
            // (`x @ proj`), not a linear module that rotate_vision_outputs could rotate.
            bail!(
                "quarot: Qwen-VL's tower output `transformer.visual.proj` is a bare matrix, which lamina does not \
                 rotate; a rotated text stream would receive unrotated image embeddings. Use a recipe without quarot"
            );
        }
        let hidden = model.text.hidden_size;
        let residual = match self.block_size {
            None => Rotation::new(hidden, self.seed),
            Some(b) => Rotation::block_diagonal(hidden, b, self.seed)
                .with_context(|| format!("quarot: hidden size {hidden} and block_size {b}"))?,
        };
        let head = Rotation::new(model.text.head_dim, self.seed.wrapping_add(1));
        Ok(Rotations { residual, head })
    }
}

/// The rotations one run folds.
#[derive(Debug, Clone)]
pub struct Rotations {
    pub residual: Rotation,
    pub head: Rotation,
}

impl Rotations {
    /// A line for the log: which construction each rotation used.
    pub fn describe(&self) -> String {
        let k = |r: &Rotation| match r.kind() {
            Kind::Hadamard { m: 1, pow2 } => format!("Hadamard {pow2}"),
            Kind::Hadamard { m, pow2 } => format!("Hadamard {m}·{pow2}"),
            Kind::RandomOrthogonal => "random orthogonal (no Hadamard matrix of this order)".into(),
        };
        format!(
            "residual {} ({}), value heads {} ({})",
            self.residual.order(),
            k(&self.residual),
            self.head.order(),
            k(&self.head)
        )
    }
}

/// Folds the rotation into one decoder layer's weights as its graph says. Returns the names of
/// the tensors changed (relative to the layer).
pub fn rotate_layer(
    w: &mut Weights,
    graph: &LayerGraph,
    r: &Rotations,
    num_heads: usize,
    num_kv_heads: usize,
) -> Result<BTreeSet<String>> {
    let mut modified = BTreeSet::new();
    let prefix = w.prefix.clone();
    for nl in &graph.norm_linears {
        let norm = format!("{}.weight", nl.norm);
        let mut g: Array1<f32> = w.vector(&norm)?;
        let bias_name = format!("{}.bias", nl.norm);
        let mut bias = if w.has(&bias_name) { Some(w.vector(&bias_name)?) } else { None };
        let mut linears = nl.consumers.iter().map(|c| w.linear(c)).collect::<Result<Vec<_>>>()?;
        let mut refs: Vec<_> = linears.iter_mut().collect();
        fuse_norm(&mut g, &mut bias, &mut refs).with_context(|| format!("quarot: folding {prefix}{}", nl.norm))?;
        if bias.is_none() && w.has(&bias_name) {
            bail!("quarot: {prefix}{bias_name} cannot be dropped from the output (a LayerNorm's bias); not supported");
        }
        for (c, l) in nl.consumers.iter().zip(linears.iter_mut()) {
            rotate_input(l, &r.residual).with_context(|| format!("quarot: {prefix}{c}"))?;
        }
        for (c, l) in nl.consumers.iter().zip(linears) {
            put(w, c, l, &mut modified);
        }
        w.set(&norm, g.into_dyn());
        modified.insert(norm);
    }
    for m in &graph.residual_writers {
        let mut l = w.linear(m)?;
        rotate_output(&mut l, &r.residual).with_context(|| format!("quarot: {prefix}{m}"))?;
        put(w, m, l, &mut modified);
    }
    for (v, o, path) in &graph.linear_linears {
        if *path != LinearPath::ValueOutput {
            continue;
        }
        let (mut lv, mut lo) = (w.linear(v)?, w.linear(o)?);
        let d = r.head.order();
        if lv.out_features() != num_kv_heads * d || lo.in_features() != num_heads * d {
            // Not plain heads of head_dim values (an attention whose values are laid out otherwise):
            // the residual rotation still holds; only this optional one is skipped.
            continue;
        }
        rotate_heads(&mut lv, &mut lo, &r.head, num_heads, num_kv_heads)
            .with_context(|| format!("quarot: heads of {prefix}{v} → {o}"))?;
        put(w, v, lv, &mut modified);
        put(w, o, lo, &mut modified);
    }
    Ok(modified)
}

fn put(w: &mut Weights, module: &str, l: crate::model::nn::Linear, modified: &mut BTreeSet<String>) {
    w.set(&format!("{module}.weight"), l.weight.into_dyn());
    modified.insert(format!("{module}.weight"));
    if let Some(b) = l.bias {
        w.set(&format!("{module}.bias"), b.into_dyn());
        modified.insert(format!("{module}.bias"));
    }
}

/// Rotates the outputs of the vision linears that feed the text stream (names as loaded in `w`,
/// whose prefix is the unit's). Returns the changed names.
pub fn rotate_vision_outputs(w: &mut Weights, layout: &Layout, r: &Rotations) -> Result<BTreeSet<String>> {
    let mut modified = BTreeSet::new();
    let modules: Vec<String> = w
        .map
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .filter(|m| layout.is_vision_output(&format!("{}{m}", w.prefix)))
        .map(String::from)
        .collect();
    for m in modules {
        let mut l = w.linear(&m)?;
        rotate_output(&mut l, &r.residual).with_context(|| format!("quarot: {}{m}", w.prefix))?;
        put(w, &m, l, &mut modified);
    }
    Ok(modified)
}
