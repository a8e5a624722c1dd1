//! HunYuan (`hunyuan_v1_moe`: Hunyuan-A13B, `HunYuanMoEV1ForCausalLM`): a pre-norm decoder whose
//! per-head query and key RMSNorms act on the *rotated* heads, and whose every layer is a mixture of
//! experts beside a shared MLP.
//!
//! ```text
//! x ─ input_layernorm ─ q,k,v ─ RoPE (NTK-alpha base) ─ query_layernorm / key_layernorm ─ GQA ─ o ─ + ─┐
//! └─────────────────────────────────────────────────────────────────────────────────────────────┘   │
//! h ─ post_attention_layernorm ─┬─ mlp.gate.wg ─ softmax ─ top-k, renormalised ─ Σ wⱼ·expertⱼ ─┐     │
//!                               └─ mlp.shared_mlp (SwiGLU, every token) ──────────────────── + ─ + ─ out
//! ```
//!
//! - The order is the family's own: transformers' `HunYuanMoEV1Attention` and vLLM's `hunyuan_v1.py`
//!   both apply `apply_rotary_pos_emb` first and `query_layernorm` / `key_layernorm` after it (Qwen3
//!   and GLM-4.5 normalise before RoPE). Normalising a rotated head is not the same function: the
//!   norm's per-channel weights do not commute with the rotation.
//! - The rotary base is HunYuan's NTK-alpha, `rope_theta · alpha^(d/(d−2))`
//!   ([`crate::model::rope`]).
//! - The router `mlp.gate.wg` scores the experts with a softmax; each token takes its top-k, whose
//!   weights are renormalised to sum to 1 (`HunYuanMoEV1Gate`, vLLM's `renormalize=top_k > 1`). The
//!   shared MLP `mlp.shared_mlp` (`num_shared_expert · intermediate_size` wide, ungated) is added for
//!   every token. The routed experts are `mlp.experts.J.{gate,up,down}_proj` in the release.
//! - Hunyuan-Large (`hunyuan`, remote code `HunYuanForCausalLM`) is the same layer with cross-layer
//!   attention (CLA, `use_cla` with `cla_share_factor` f): layer i computes keys and values only when
//!   i % f == 0, and the f − 1 layers after it have no `k_proj` / `v_proj` and attend to its keys and
//!   values. What is shared (the remote code's `kv_states`, vLLM's `(ori_k, v)`): the keys after RoPE
//!   and *before* `key_layernorm`, and the values as projected; each layer then applies its own
//!   `key_layernorm` to the shared keys (every layer stores one: MindIE's `FlashHunyuanAttention`
//!   loads `query_layernorm` and `key_layernorm` for the `cross` layers too) and its own queries
//!   and `o_proj`. The shared keys and values travel in the sequence's [`Carry`], so a layer-at-a-
//!   time forward gives the next unit what the remote code's layer loop gives the next layer.
//! - Top-k routing: Hunyuan-A13B renormalises its top-k weights; Hunyuan-Large routes every token to
//!   one expert (`moe_topk: 1`) weighted by its softmax probability (the remote code's `top1gating`,
//!   vLLM's `renormalize=top_k > 1`): [`crate::model::config`] reads which.

use super::parts::{
    causal_attention, check_input, ffn_graph, project, require_silu, residual, rms_norm_in_place, rotate_and_norm, Ffn,
    Heads, Norm, Take,
};
use super::{Carry, DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::layout::DecoderNames;
use crate::model::nn::{Linear, LinearHook};
use crate::model::rope::{Positions, Rope, RopeAngles};
use crate::model::weights::Weights;
use anyhow::{ensure, Context, Result};
use ndarray::{Array1, Array2, ArrayView2};

const NAMES: DecoderNames = DecoderNames::HUNYUAN;
const Q_PROJ: &str = "self_attn.q_proj";
const K_PROJ: &str = "self_attn.k_proj";
const V_PROJ: &str = "self_attn.v_proj";
/// The names under which a CLA layer's keys (rotated, not normalised) and values are carried.
const CARRIED_KEYS: &str = "cla.keys";
const CARRIED_VALUES: &str = "cla.values";

/// One HunYuan decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    attn: SelfAttention,
    mlp: Ffn,
    rope: Rope,
    eps: f32,
}

/// HunYuan's attention: RoPE, then the per-head `query_layernorm` / `key_layernorm`.
#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Linear,
    /// `k_proj` and `v_proj`; `None` in a CLA layer that attends to an earlier layer's keys and values.
    kv: Option<(Linear, Linear)>,
    o_proj: Linear,
    q_norm: Option<Array1<f32>>,
    k_norm: Option<Array1<f32>>,
    heads: Heads,
    eps: f32,
    /// Whether this layer's keys and values serve the layers after it (CLA, a layer with `k_proj`).
    shares: bool,
    /// The layer whose keys and values a CLA layer attends to, for errors.
    source: usize,
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over; a
    /// tensor the layer does not use is an error.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        require_silu(cfg, "HunYuan")?;
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut w = Take::new(weights);
        let heads = Heads::of(cfg);
        let owns_kv = cfg.owns_kv(index);
        let kv_rows = cfg.num_kv_heads * hd;
        let attn = SelfAttention {
            q_proj: w.linear(Q_PROJ, cfg.num_heads * hd, hidden)?,
            kv: match owns_kv {
                true => Some((w.linear(K_PROJ, kv_rows, hidden)?, w.linear(V_PROJ, kv_rows, hidden)?)),
                false => None,
            },
            o_proj: w.linear(NAMES.o_proj, hidden, cfg.num_heads * hd)?,
            q_norm: w.optional_vector(&format!("{}.weight", NAMES.q_norm), hd)?,
            k_norm: w.optional_vector(&format!("{}.weight", NAMES.k_norm), hd)?,
            heads,
            eps: cfg.rms_norm_eps as f32,
            shares: owns_kv && cfg.cla_share_factor > 1,
            source: index - index % cfg.cla_share_factor.max(1),
        };
        let layer = Layer {
            index,
            input_layernorm: w.norm(NAMES.attn_norm, hidden)?,
            post_attention_layernorm: w.norm(NAMES.mlp_norm, hidden)?,
            attn,
            mlp: w.ffn(cfg, index, NAMES.router)?,
            rope: Rope::new(&cfg.rope, hd)?,
            eps: cfg.rms_norm_eps as f32,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How a HunYuan layer connects its linears: q/k/v read the input norm and are fused by the
    /// servers (vLLM's `qkv_proj`), v feeds o; the router, every expert and the shared MLP read the
    /// post-attention norm ([`ffn_graph`]). With cross-layer attention a layer without keys and
    /// values has its `q_proj` alone on the input norm (vLLM loads it unfused), and no layer has a
    /// v→o path: a layer's values also reach the `o_proj` of the layers that share them, so a
    /// channel scale moved from one `v_proj` into one `o_proj` would change the others' output.
    pub fn graph(cfg: &TextConfig, index: usize) -> LayerGraph {
        let cla = cfg.cla_share_factor > 1;
        let (attn_inputs, kv_cache) = match cfg.owns_kv(index) {
            true => (NAMES.qkv_modules(), vec![NAMES.attn.to_string()]),
            false => (vec![Q_PROJ.to_string()], vec![]),
        };
        let mut g = LayerGraph {
            norm_linears: vec![NormLinears { norm: NAMES.attn_norm.into(), consumers: attn_inputs.clone() }],
            linear_linears: match cla {
                false => vec![(V_PROJ.into(), NAMES.o_proj.into(), LinearPath::ValueOutput)],
                true => vec![],
            },
            residual_writers: vec![NAMES.o_proj.into()],
            fused: if attn_inputs.len() > 1 { vec![attn_inputs] } else { vec![] },
            kv_cache,
            ..LayerGraph::default()
        };
        ffn_graph(cfg, index, NAMES.mlp_norm, NAMES.router, &mut g);
        g
    }
}

impl SelfAttention {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        rope: &RopeAngles,
        carry: &mut Carry,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let (hd, eps) = (self.heads.qk_dim, self.eps);
        let mut q = project(device, hook, Q_PROJ, &self.q_proj, x)?;
        rotate_and_norm(&mut q, hd, self.q_norm.as_ref(), eps, rope);
        let (mut k, mut v) = match &self.kv {
            Some((k_proj, v_proj)) => {
                let mut k = project(device, hook, K_PROJ, k_proj, x)?;
                let v = project(device, hook, V_PROJ, v_proj, x)?;
                rotate_and_norm(&mut k, hd, None, eps, rope);
                if self.shares {
                    carry.insert(CARRIED_KEYS, k.clone());
                    carry.insert(CARRIED_VALUES, v.clone());
                }
                (k, v)
            }
            None => {
                let missing = || {
                    format!(
                        "cross-layer attention: this layer attends to the keys and values of layer {}, which the \
                         forward did not carry to it (layers must run in order)",
                        self.source
                    )
                };
                let k = carry.get(CARRIED_KEYS).with_context(missing)?.clone();
                let v = carry.get(CARRIED_VALUES).with_context(missing)?.clone();
                let width = self.heads.num_kv_heads * hd;
                ensure!(
                    k.dim() == (x.nrows(), width) && v.dim() == (x.nrows(), width),
                    "cross-layer attention: the carried keys {:?} and values {:?} do not fit {} tokens of {width} \
                     key/value channels",
                    k.dim(),
                    v.dim(),
                    x.nrows()
                );
                (k, v)
            }
        };
        if let Some(w) = &self.k_norm {
            let width = k.ncols();
            let rows = k.as_slice_mut().expect("keys are in standard layout");
            rows.chunks_mut(width).for_each(|row| row.chunks_mut(hd).for_each(|h| rms_norm_in_place(h, w.view(), eps)));
        }
        // What a layer with keys and values caches; a CLA layer reusing them caches nothing of its own.
        if self.kv.is_some() {
            hook.kv_cache(NAMES.attn, &mut k, &mut v);
        }
        let scale = (hd as f32).powf(-0.5);
        let context = causal_attention(device, q.view(), k.view(), v.view(), self.heads, scale);
        Ok(hook.linear(device, NAMES.o_proj, &self.o_proj, context.view()))
    }
}

impl DecoderBlock for Layer {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        carry: &mut Carry,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let rope = self.rope.angles(positions)?;
        let out = residual(self.index, x, &self.input_layernorm, self.eps, "self_attn.o_proj", |h| {
            self.attn.forward(device, h, &rope, carry, hook)
        })?;
        residual(self.index, out.view(), &self.post_attention_layernorm, self.eps, "the MoE block", |h| {
            self.mlp.forward(device, h, hook, opts)
        })
    }
}
