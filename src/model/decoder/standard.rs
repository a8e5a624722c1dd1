//! The standard pre-norm decoder layer: Llama, Qwen2, Qwen3, Qwen3-MoE, and the language models
//! of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and LLaVA.
//!
//! ```text
//! x ─ RMSNorm ─ q,k,v (+bias) ─ [q/k RMSNorm] ─ RoPE ─ causal GQA attention ─ o ─ + ─┐
//! └───────────────────────────────────────────────────────────────────────────────┘  │
//! h ─ RMSNorm ─ SwiGLU MLP, or MoE (router softmax, top-k, experts) ──────────────── + ─ out
//! ```

use super::parts::{ffn_graph, Attention, Ffn, Heads, Norm, Take};
use super::{DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::nn::LinearHook;
use crate::model::rope::{Positions, Rope};
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Result};
use ndarray::{Array2, ArrayView2};

/// One decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    attn: Attention,
    mlp: Ffn,
    rope: Rope,
    eps: f32,
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over.
    /// Every tensor of the layer must be used: a tensor this forward does not know (a shared
    /// expert, an extra norm) is an error rather than a silently different model.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        if !matches!(cfg.hidden_act.as_str(), "silu" | "swish") {
            bail!("hidden_act {:?} is not supported by lamina's text forward (only silu)", cfg.hidden_act);
        }
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let mut w = Take::new(weights);
        let heads = Heads { num_heads: nh, num_kv_heads: nkv, qk_dim: hd, v_dim: hd };
        let attn = Attention::take(&mut w, hidden, heads, ("q_norm", "k_norm"), cfg.rms_norm_eps as f32)?;
        let mlp = w.ffn(cfg, index)?;
        let layer = Layer {
            index,
            input_layernorm: w.norm("input_layernorm", hidden)?,
            post_attention_layernorm: w.norm("post_attention_layernorm", hidden)?,
            attn,
            mlp,
            rope: Rope::new(&cfg.rope, hd)?,
            eps: cfg.rms_norm_eps as f32,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How this family's layer `index` connects its linears.
    pub fn graph(cfg: &TextConfig, index: usize) -> LayerGraph {
        let attn = |p: &str| format!("self_attn.{p}_proj");
        let qkv: Vec<String> = ["q", "k", "v"].iter().map(|p| attn(p)).collect();
        let mut g = LayerGraph {
            norm_linears: vec![NormLinears { norm: "input_layernorm".into(), consumers: qkv.clone() }],
            linear_linears: vec![(attn("v"), attn("o"), LinearPath::ValueOutput)],
            residual_writers: vec![attn("o")],
            fused: vec![qkv],
            kv_cache: vec!["self_attn".into()],
            ..LayerGraph::default()
        };
        ffn_graph(cfg, index, "post_attention_layernorm", &mut g);
        g
    }
}

impl DecoderBlock for Layer {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        let hidden = self.input_layernorm.len();
        ensure!(
            x.ncols() == hidden,
            "layer {} got hidden states of width {}, expected {hidden}",
            self.index,
            x.ncols()
        );
        ensure!(
            positions.len() == x.nrows(),
            "layer {}: {} positions given for {} tokens",
            self.index,
            positions.len(),
            x.nrows()
        );
        let rope = self.rope.angles(positions)?;
        let h = self.input_layernorm.forward(x, self.eps);
        let mut out = self.attn.forward(device, h.view(), &rope, hook)?;
        ensure!(out.dim() == x.dim(), "layer {}: self_attn.o_proj returned shape {:?}", self.index, out.dim());
        out += &x;
        let h = self.post_attention_layernorm.forward(out.view(), self.eps);
        let m = self.mlp.forward(device, h.view(), hook, opts)?;
        ensure!(m.dim() == x.dim(), "layer {}: the MLP returned shape {:?}", self.index, m.dim());
        out += &m;
        Ok(out)
    }
}
