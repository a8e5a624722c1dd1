//! DeepSeek's decoder layer with multi-head latent attention (MLA): DeepSeek-V2, V2-Lite,
//! Coder-V2, V3, R1, V3.1 and Kimi-K2, as transformers' `DeepseekV2Attention` /
//! `DeepseekV3Attention` compute it.
//!
//! ```text
//! x ─ RMSNorm ─┬ q_a_proj ─ q_a_layernorm ─ q_b_proj ┐ (or q_proj)   q = [q_nope | RoPE(q_pe)] per head
//!              └ kv_a_proj_with_mqa ─┬ kv_a_layernorm ─ latent ─ kv_b_proj ─ [k_nope | v] per head
//!                                    └ k_pe ─ RoPE ── one key head shared by all heads
//!   causal attention over k = [k_nope | k_pe], scale (qk_head_dim)^-½ · mscale² ─ o_proj ─ + ─┐
//! h ─ RMSNorm ─ SwiGLU (the first `first_k_dense_replace` layers) or routed experts + shared ─ + ─ out
//! ```
//!
//! - The rotary part uses `qk_rope_head_dim` dims, YaRN-scaled in the releases (cos/sin times its
//!   attention factor) and turned in adjacent pairs `(x0, x1), (x2, x3), ...` unless
//!   `rope_interleave` is false (transformers' V3 then de-interleaves the pairs, its V2 keeps them
//!   as complex numbers: both give the same products of queries and keys, and adjacent pairs in
//!   place are what vLLM computes, `is_neox_style=False`); the softmax scale is multiplied by
//!   `yarn_get_mscale(factor, mscale_all_dim)²`.
//! - What a server caches is the normalised latent `[tokens, kv_lora_rank]` and the rotated shared
//!   key `[tokens, qk_rope_head_dim]`: they go through [`LinearHook::kv_cache`] as `v` and `k`.
//! - The router scores with a softmax (V2: greedy or group-limited greedy) or a sigmoid plus
//!   `e_score_correction_bias` (V3: group-limited by the sum of each group's two best), see
//!   [`super::parts::Routing`]; `n_shared_experts` shared experts run on every token.
//!
//! The multi-token-prediction layer after the decoder layers (`model.layers.{num_hidden_layers}`)
//! is not part of this forward; it is its own unit ([`crate::model::layout::MtpLayout`]), written float.

use super::parts::{causal_attention, check_input, ffn_graph, project, require_silu, residual, Ffn, Heads, Norm, Take};
use super::{Carry, DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::{MlaConfig, TextConfig};
use crate::model::layout::DecoderNames;
use crate::model::nn::{Linear, LinearHook};
use crate::model::rope::{Positions, Rope, RopeAngles};
use crate::model::weights::Weights;
use anyhow::{Context, Result};
use ndarray::{s, Array2, ArrayView2};

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

/// Where the queries come from.
#[derive(Debug, Clone)]
enum Query {
    /// `q_proj` (no `q_lora_rank`: V2-Lite, Coder-V2-Lite).
    Direct(Linear),
    /// `q_a_proj` → `q_a_layernorm` → `q_b_proj`.
    LowRank(Box<(Linear, Norm, Linear)>),
}

#[derive(Debug, Clone)]
struct Attention {
    query: Query,
    kv_a_proj_with_mqa: Linear,
    kv_a_layernorm: Norm,
    kv_b_proj: Linear,
    o_proj: Linear,
    dims: MlaConfig,
    num_heads: usize,
    /// The softmax scale: `qk_head_dim^-½`, times YaRN's `mscale²`.
    scale: f32,
    eps: f32,
}

/// The MLA dimensions of a config, or an error saying what is missing.
fn dims(cfg: &TextConfig) -> Result<&MlaConfig> {
    cfg.mla.as_ref().context(
        "config.json: a DeepSeek (MLA) model needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim",
    )
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over.
    /// Every tensor of the layer must be used.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        require_silu(cfg, "text")?;
        let d = dims(cfg)?.clone();
        let (hidden, nh) = (cfg.hidden_size, cfg.num_heads);
        let qk = d.qk_head_dim();
        let eps = cfg.rms_norm_eps as f32;
        let mut w = Take::new(weights);
        let query = match d.q_lora_rank {
            Some(r) => Query::LowRank(Box::new((
                w.linear("self_attn.q_a_proj", r, hidden)?,
                w.norm("self_attn.q_a_layernorm", r)?,
                w.linear("self_attn.q_b_proj", nh * qk, r)?,
            ))),
            None => Query::Direct(w.linear("self_attn.q_proj", nh * qk, hidden)?),
        };
        let rope = Rope::new(&cfg.rope, d.qk_rope_head_dim)?;
        let rope = if d.rope_interleave { rope.with_adjacent_pairs() } else { rope };
        let mscale = cfg.rope.yarn.as_ref().filter(|_| cfg.rope.kind == "yarn").map_or(1.0, |y| y.softmax_mscale());
        let attn = Attention {
            query,
            kv_a_proj_with_mqa: w.linear(
                "self_attn.kv_a_proj_with_mqa",
                d.kv_lora_rank + d.qk_rope_head_dim,
                hidden,
            )?,
            kv_a_layernorm: w.norm("self_attn.kv_a_layernorm", d.kv_lora_rank)?,
            kv_b_proj: w.linear("self_attn.kv_b_proj", nh * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank)?,
            o_proj: w.linear("self_attn.o_proj", hidden, nh * d.v_head_dim)?,
            scale: ((qk as f64).powf(-0.5) * mscale) as f32,
            dims: d,
            num_heads: nh,
            eps,
        };
        let layer = Layer {
            index,
            input_layernorm: w.norm("input_layernorm", hidden)?,
            post_attention_layernorm: w.norm("post_attention_layernorm", hidden)?,
            attn,
            mlp: w.ffn(cfg, index, DecoderNames::STANDARD.router)?,
            rope,
            eps,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How layer `index` connects its linears: the layer norm feeds the query and the latent
    /// projections (which vLLM serves fused as `fused_qkv_a_proj` when there is a `q_a_proj`), the
    /// two low-rank norms feed `q_b_proj` and `kv_b_proj`, the value rows of `kv_b_proj` reach
    /// `o_proj` head by head, and the attention caches the latent and the rotated key.
    pub fn graph(cfg: &TextConfig, index: usize) -> LayerGraph {
        let a = |p: &str| format!("self_attn.{p}");
        let lora = cfg.mla.as_ref().is_some_and(|m| m.q_lora_rank.is_some());
        let first = if lora { a("q_a_proj") } else { a("q_proj") };
        let mut g = LayerGraph {
            norm_linears: vec![NormLinears {
                norm: "input_layernorm".into(),
                consumers: vec![first.clone(), a("kv_a_proj_with_mqa")],
            }],
            linear_linears: vec![(a("kv_b_proj"), a("o_proj"), LinearPath::LatentValueOutput)],
            residual_writers: vec![a("o_proj")],
            kv_cache: vec!["self_attn".into()],
            ..LayerGraph::default()
        };
        if lora {
            g.norm_linears.push(NormLinears { norm: a("q_a_layernorm"), consumers: vec![a("q_b_proj")] });
            g.fused.push(vec![first, a("kv_a_proj_with_mqa")]);
        }
        g.norm_linears.push(NormLinears { norm: a("kv_a_layernorm"), consumers: vec![a("kv_b_proj")] });
        ffn_graph(cfg, index, "post_attention_layernorm", DecoderNames::STANDARD.router, &mut g);
        g
    }
}

impl DecoderBlock for Layer {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        _carry: &mut Carry,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let rope = self.rope.angles(positions)?;
        let out = residual(self.index, x, &self.input_layernorm, self.eps, "self_attn.o_proj", |h| {
            self.attn.forward(device, h, &rope, hook)
        })?;
        residual(self.index, out.view(), &self.post_attention_layernorm, self.eps, "the MLP", |h| {
            self.mlp.forward(device, h, hook, opts)
        })
    }
}

impl Attention {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        rope: &RopeAngles,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let MlaConfig { kv_lora_rank, qk_nope_head_dim: nope, qk_rope_head_dim: rd, v_head_dim: vd, .. } = self.dims;
        let (nh, qk, seq) = (self.num_heads, nope + rd, x.nrows());
        let mut q = match &self.query {
            Query::Direct(q) => project(device, hook, "self_attn.q_proj", q, x)?,
            Query::LowRank(low) => {
                let (a, norm, b) = &**low;
                let qa = project(device, hook, "self_attn.q_a_proj", a, x)?;
                let qa = norm.forward(qa.view(), self.eps);
                project(device, hook, "self_attn.q_b_proj", b, qa.view())?
            }
        };
        let ckv = project(device, hook, "self_attn.kv_a_proj_with_mqa", &self.kv_a_proj_with_mqa, x)?;
        let mut latent = self.kv_a_layernorm.forward(ckv.slice(s![.., ..kv_lora_rank]), self.eps);
        let mut k_pe = ckv.slice(s![.., kv_lora_rank..]).to_owned();
        for (t, mut row) in k_pe.rows_mut().into_iter().enumerate() {
            rope.rotate(t, row.as_slice_mut().expect("an owned row is contiguous"));
        }
        for (t, mut row) in q.rows_mut().into_iter().enumerate() {
            let row = row.as_slice_mut().expect("projections are in standard layout");
            for head in row.chunks_mut(qk) {
                rope.rotate(t, &mut head[nope..]);
            }
        }
        hook.kv_cache("self_attn", &mut k_pe, &mut latent);
        let kv = project(device, hook, "self_attn.kv_b_proj", &self.kv_b_proj, latent.view())?;
        if hook.finished() {
            return Ok(Array2::zeros((seq, self.o_proj.out_features())));
        }
        // Every head's key is its own no-rope part and the shared rotated part.
        let mut k = Array2::<f32>::zeros((seq, nh * qk));
        let mut v = Array2::<f32>::zeros((seq, nh * vd));
        for h in 0..nh {
            let kv_h = kv.slice(s![.., h * (nope + vd)..(h + 1) * (nope + vd)]);
            k.slice_mut(s![.., h * qk..h * qk + nope]).assign(&kv_h.slice(s![.., ..nope]));
            k.slice_mut(s![.., h * qk + nope..(h + 1) * qk]).assign(&k_pe);
            v.slice_mut(s![.., h * vd..(h + 1) * vd]).assign(&kv_h.slice(s![.., nope..]));
        }
        let heads = Heads { num_heads: nh, num_kv_heads: nh, qk_dim: qk, v_dim: vd };
        let context = causal_attention(device, q.view(), k.view(), v.view(), heads, self.scale);
        Ok(hook.linear(device, "self_attn.o_proj", &self.o_proj, context.view()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::model::decoder::tests::fixture;

    #[test]
    fn graph_of_both_query_forms() {
        let v3 = fixture("deepseek_v3");
        let g = Layer::graph(&v3.model.text, 1);
        let norm = |n: &str| g.norm_linears.iter().find(|nl| nl.norm == n).map(|nl| nl.consumers.clone());
        assert_eq!(norm("input_layernorm").unwrap(), ["self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"]);
        assert_eq!(norm("self_attn.q_a_layernorm").unwrap(), ["self_attn.q_b_proj"]);
        assert_eq!(norm("self_attn.kv_a_layernorm").unwrap(), ["self_attn.kv_b_proj"]);
        let post = norm("post_attention_layernorm").unwrap();
        assert!(post.contains(&"mlp.gate".into()) && post.contains(&"mlp.shared_experts.up_proj".into()));
        assert!(g.fused.contains(&vec!["self_attn.q_a_proj".into(), "self_attn.kv_a_proj_with_mqa".into()]));
        assert!(g.fused.contains(&vec!["mlp.shared_experts.gate_proj".into(), "mlp.shared_experts.up_proj".into()]));
        assert!(g.residual_writers.contains(&"mlp.shared_experts.down_proj".into()));
        assert_eq!(g.kv_cache, ["self_attn"]);
        // Layer 0 is dense (first_k_dense_replace 1).
        let g0 = Layer::graph(&v3.model.text, 0);
        assert!(g0.fused.contains(&vec!["mlp.gate_proj".into(), "mlp.up_proj".into()]));

        let v2 = fixture("deepseek_v2");
        let g = Layer::graph(&v2.model.text, 1);
        assert_eq!(g.norm_linears[0].consumers, ["self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"]);
        assert!(!g.norm_linears.iter().any(|nl| nl.norm == "self_attn.q_a_layernorm"));
        assert!(!g.fused.iter().any(|f| f.contains(&"self_attn.q_proj".into())), "q_proj is not fused in V2-Lite");
    }

    /// What the attention caches: the normalised latent as values and the one rotated key head as
    /// keys, for every token; a hook that changes them changes the layer's output.
    #[test]
    fn the_cache_holds_the_latent_and_the_rotated_key() {
        struct Cache(Vec<(usize, usize, usize, usize)>, bool);
        impl LinearHook for Cache {
            fn linear(&mut self, d: &dyn Device, _: &str, l: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
                l.forward(d, x)
            }
            fn kv_cache(&mut self, _: &str, k: &mut Array2<f32>, v: &mut Array2<f32>) {
                self.0.push((k.nrows(), k.ncols(), v.nrows(), v.ncols()));
                if self.1 {
                    v.fill(0.0);
                }
            }
        }
        let f = fixture("deepseek_v2");
        let x = f.reference["model.layers.1.in"].to_f32().unwrap();
        let x = Array2::from_shape_vec((x.len() / 64, 64), x).unwrap();
        let pos = Positions::sequential(x.nrows());
        let layer = crate::model::decoder::layer(&f.model, 1, f.weights(1)).unwrap();
        let (mut plain, mut zero) = (Cache(vec![], false), Cache(vec![], true));
        let a = layer.forward(&Cpu, x.view(), &pos, &mut Carry::default(), &mut plain, Default::default()).unwrap();
        let b = layer.forward(&Cpu, x.view(), &pos, &mut Carry::default(), &mut zero, Default::default()).unwrap();
        assert_eq!(
            plain.0,
            [(x.nrows(), 8, x.nrows(), 32)],
            "k_pe [seq, qk_rope_head_dim], latent [seq, kv_lora_rank]"
        );
        assert!(a.iter().zip(&b).any(|(p, q)| (p - q).abs() > 1e-3), "the cached latent is what the attention reads");
    }
}
