//! The text decoder of every supported family (Llama, Qwen2, Qwen3, Qwen3-MoE and the language
//! models of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and LLaVA), in f32, one layer at a time:
//!
//! ```text
//! x ─ RMSNorm ─ q,k,v (+bias) ─ [q/k RMSNorm] ─ RoPE ─ causal GQA attention ─ o ─ + ─┐
//! └───────────────────────────────────────────────────────────────────────────────┘  │
//! h ─ RMSNorm ─ SwiGLU MLP, or MoE (router softmax, top-k, experts) ──────────────── + ─ out
//! ```
//!
//! Every linear (the router and each expert's included) is computed through a [`LinearHook`],
//! named relative to its layer (`self_attn.q_proj`, `mlp.gate`, `mlp.experts.3.up_proj`), so
//! calibration can observe inputs and substitute quantized weights. Weights come from
//! [`Weights`]; which checkpoint names they have is [`super::layout::Layout`]'s business.

use super::config::TextConfig;
use super::layout::Layout;
use super::nn::{Linear, LinearHook};
use super::rope::RopeAngles;
use super::weights::Weights;
use crate::device::Device;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array1, Array2, ArrayD, ArrayView1, ArrayView2, Axis};

/// Choices of a forward that do not change its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Run every expert on every token, so calibration sees all experts; the layer's output still
    /// combines only the router's top-k.
    pub moe_all_experts: bool,
}

/// One decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    attn: Attention,
    mlp: Mlp,
    eps: f32,
}

/// An RMSNorm, with the bias that outlier suppression (m2) may fold into it.
#[derive(Debug, Clone)]
struct Norm {
    weight: Array1<f32>,
    bias: Option<Array1<f32>>,
}

impl Norm {
    fn forward(&self, x: ArrayView2<f32>, eps: f32) -> Array2<f32> {
        let mut y = rms_norm(x, self.weight.view(), eps);
        if let Some(b) = &self.bias {
            y += &b.view().insert_axis(Axis(0));
        }
        y
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Qwen3's per-head RMSNorms on queries and keys, before RoPE.
    q_norm: Option<Array1<f32>>,
    k_norm: Option<Array1<f32>>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    eps: f32,
}

#[derive(Debug, Clone)]
enum Mlp {
    Dense(Box<SwiGlu>),
    Moe(SparseMoe),
}

/// `down(silu(gate(x)) · up(x))`; `name` is the module (`mlp`, `mlp.experts.3`).
#[derive(Debug, Clone)]
struct SwiGlu {
    name: String,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct SparseMoe {
    /// `mlp.gate`: `[experts, hidden]`.
    router: Linear,
    experts: Vec<SwiGlu>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl DecoderLayer {
    /// Builds layer `index` from its weights (names relative to the layer). Every tensor of the
    /// layer must be used: a tensor this forward does not know (a shared expert, an extra norm)
    /// is an error rather than a silently different model.
    pub fn new(cfg: &TextConfig, index: usize, weights: &Weights) -> Result<DecoderLayer> {
        DecoderLayer::from_weights(cfg, index, weights.clone())
    }

    /// As [`DecoderLayer::new`], taking the weights over instead of copying them.
    pub fn from_weights(cfg: &TextConfig, index: usize, weights: Weights) -> Result<DecoderLayer> {
        if !matches!(cfg.hidden_act.as_str(), "silu" | "swish") {
            bail!("hidden_act {:?} is not supported by lamina's text forward (only silu)", cfg.hidden_act);
        }
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let mut w = Take { weights };
        let attn = Attention {
            q_proj: w.linear("self_attn.q_proj", nh * hd, hidden)?,
            k_proj: w.linear("self_attn.k_proj", nkv * hd, hidden)?,
            v_proj: w.linear("self_attn.v_proj", nkv * hd, hidden)?,
            o_proj: w.linear("self_attn.o_proj", hidden, nh * hd)?,
            q_norm: w.optional_vector("self_attn.q_norm.weight", hd)?,
            k_norm: w.optional_vector("self_attn.k_norm.weight", hd)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            eps: cfg.rms_norm_eps as f32,
        };
        let mlp = match &cfg.moe {
            Some(moe) if moe.is_moe_layer(index) => {
                let inter = moe.moe_intermediate_size;
                let experts = (0..moe.num_experts)
                    .map(|j| w.swiglu(&format!("mlp.experts.{j}"), hidden, inter))
                    .collect::<Result<Vec<_>>>()?;
                ensure!(
                    (1..=moe.num_experts).contains(&moe.top_k),
                    "num_experts_per_tok {} does not fit {} experts",
                    moe.top_k,
                    moe.num_experts
                );
                Mlp::Moe(SparseMoe {
                    router: w.linear("mlp.gate", moe.num_experts, hidden)?,
                    experts,
                    top_k: moe.top_k,
                    norm_topk_prob: moe.norm_topk_prob,
                })
            }
            _ => Mlp::Dense(Box::new(w.swiglu("mlp", hidden, cfg.intermediate_size)?)),
        };
        let layer = DecoderLayer {
            index,
            input_layernorm: w.norm("input_layernorm", hidden)?,
            post_attention_layernorm: w.norm("post_attention_layernorm", hidden)?,
            attn,
            mlp,
            eps: cfg.rms_norm_eps as f32,
        };
        w.finish()?;
        Ok(layer)
    }

    /// Runs the layer on one sequence `x [seq, hidden]` whose rotary angles are `rope`.
    pub fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        rope: &RopeAngles,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        let hidden = self.input_layernorm.weight.len();
        ensure!(
            x.ncols() == hidden,
            "layer {} got hidden states of width {}, expected {hidden}",
            self.index,
            x.ncols()
        );
        ensure!(
            rope.len() == x.nrows() && rope.head_dim() == self.attn.head_dim,
            "layer {}: rotary angles for {} tokens of head_dim {} given for {} tokens of head_dim {}",
            self.index,
            rope.len(),
            rope.head_dim(),
            x.nrows(),
            self.attn.head_dim
        );
        let h = self.input_layernorm.forward(x, self.eps);
        let mut out = self.attn.forward(device, h.view(), rope, hook)?;
        ensure!(out.dim() == x.dim(), "layer {}: self_attn.o_proj returned shape {:?}", self.index, out.dim());
        out += &x;
        let h = self.post_attention_layernorm.forward(out.view(), self.eps);
        let m = match &self.mlp {
            Mlp::Dense(mlp) => mlp.forward(device, h.view(), hook)?,
            Mlp::Moe(moe) => moe.forward(device, h.view(), hook, opts)?,
        };
        ensure!(m.dim() == x.dim(), "layer {}: the MLP returned shape {:?}", self.index, m.dim());
        out += &m;
        Ok(out)
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
        let (seq, hd) = (x.nrows(), self.head_dim);
        let mut project = |name: &str, layer: &Linear| {
            let y = hook.linear(device, name, layer, x);
            ensure!(y.dim() == (seq, layer.out_features()), "{name} returned shape {:?} for {seq} tokens", y.dim());
            Ok(if y.is_standard_layout() { y } else { y.as_standard_layout().into_owned() })
        };
        let mut q = project("self_attn.q_proj", &self.q_proj)?;
        let mut k = project("self_attn.k_proj", &self.k_proj)?;
        let v = project("self_attn.v_proj", &self.v_proj)?;
        self.norm_and_rotate(&mut q, self.q_norm.as_ref(), rope);
        self.norm_and_rotate(&mut k, self.k_norm.as_ref(), rope);

        let scale = (hd as f32).powf(-0.5);
        let group = self.num_heads / self.num_kv_heads;
        let mut context = Array2::<f32>::zeros((seq, self.num_heads * hd));
        for h in 0..self.num_heads {
            let kv = h / group;
            let (qh, kh) = (q.slice(s![.., h * hd..(h + 1) * hd]), k.slice(s![.., kv * hd..(kv + 1) * hd]));
            let mut scores = device.matmul(qh, kh.t());
            causal_softmax(&mut scores, scale);
            let out = device.matmul(scores.view(), v.slice(s![.., kv * hd..(kv + 1) * hd]));
            context.slice_mut(s![.., h * hd..(h + 1) * hd]).assign(&out);
        }
        Ok(hook.linear(device, "self_attn.o_proj", &self.o_proj, context.view()))
    }

    /// Applies the optional per-head RMSNorm, then RoPE, to every head of every token of `m`
    /// (`[seq, heads · head_dim]`, standard layout).
    fn norm_and_rotate(&self, m: &mut Array2<f32>, norm: Option<&Array1<f32>>, rope: &RopeAngles) {
        let (hd, width) = (self.head_dim, m.ncols());
        let rows = m.as_slice_mut().expect("projections are in standard layout");
        rows.chunks_mut(width).enumerate().for_each(|(t, row)| {
            for head in row.chunks_mut(hd) {
                if let Some(w) = norm {
                    rms_norm_in_place(head, w.view(), self.eps);
                }
                rope.rotate(t, head);
            }
        });
    }
}

/// Scales each row of `scores [seq, seq]`, keeps keys `0..=t` for query `t` and takes their
/// softmax; the masked entries become 0.
fn causal_softmax(scores: &mut Array2<f32>, scale: f32) {
    let n = scores.ncols();
    let rows = scores.as_slice_mut().expect("matmul output is in standard layout");
    // Sequential on purpose: the GEMM's worker threads spin between calls, and a rayon loop
    // here competes with them (measured 3x slower than this loop on 2 cores).
    for (t, row) in rows.chunks_mut(n).enumerate() {
        let (keep, masked) = row.split_at_mut(t + 1);
        let mut max = f32::NEG_INFINITY;
        for s in keep.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0.0f32;
        for s in keep.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        keep.iter_mut().for_each(|s| *s *= inv);
        masked.fill(0.0);
    }
}

impl SwiGlu {
    fn forward(&self, device: &dyn Device, x: ArrayView2<f32>, hook: &mut dyn LinearHook) -> Result<Array2<f32>> {
        let name = |p: &str| format!("{}.{p}", self.name);
        let gate = hook.linear(device, &name("gate_proj"), &self.gate_proj, x);
        let up = hook.linear(device, &name("up_proj"), &self.up_proj, x);
        ensure!(gate.dim() == up.dim(), "{} and {} disagree in shape", name("gate_proj"), name("up_proj"));
        let mut act = gate;
        act.zip_mut_with(&up, |g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
        Ok(hook.linear(device, &name("down_proj"), &self.down_proj, act.view()))
    }
}

impl SparseMoe {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        let logits = hook.linear(device, "mlp.gate", &self.router, x);
        ensure!(logits.dim() == (x.nrows(), self.experts.len()), "mlp.gate returned shape {:?}", logits.dim());
        let routes = self.route(logits.view());
        let mut out = Array2::<f32>::zeros(x.raw_dim());
        for (e, expert) in self.experts.iter().enumerate() {
            let chosen = &routes[e];
            if opts.moe_all_experts {
                let y = expert.forward(device, x, hook)?;
                for &(t, w) in chosen {
                    out.row_mut(t).scaled_add(w, &y.row(t));
                }
            } else if !chosen.is_empty() {
                let tokens: Vec<usize> = chosen.iter().map(|&(t, _)| t).collect();
                let y = expert.forward(device, x.select(Axis(0), &tokens).view(), hook)?;
                for (i, &(t, w)) in chosen.iter().enumerate() {
                    out.row_mut(t).scaled_add(w, &y.row(i));
                }
            }
        }
        Ok(out)
    }

    /// For each expert, the tokens routed to it and their weights: softmax over the router's
    /// logits, the top-k of each token, renormalised to sum 1 when `norm_topk_prob`.
    fn route(&self, logits: ArrayView2<f32>) -> Vec<Vec<(usize, f32)>> {
        let mut routes = vec![Vec::new(); self.experts.len()];
        for (t, row) in logits.outer_iter().enumerate() {
            let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let exp: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let probs: Vec<f32> = exp.iter().map(|&v| v / sum).collect();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let top = &order[..self.top_k];
            let norm = if self.norm_topk_prob { top.iter().map(|&e| probs[e]).sum::<f32>() } else { 1.0 };
            for &e in top {
                routes[e].push((t, probs[e] / norm));
            }
        }
        routes
    }
}

/// `x / sqrt(mean(x²) + eps) · weight`, row by row.
pub fn rms_norm(x: ArrayView2<f32>, weight: ArrayView1<f32>, eps: f32) -> Array2<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let width = out.ncols();
    if width > 0 {
        out.as_slice_mut().unwrap().chunks_mut(width).for_each(|row| rms_norm_in_place(row, weight, eps));
    }
    out
}

fn rms_norm_in_place(x: &mut [f32], weight: ArrayView1<f32>, eps: f32) {
    let mean = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// Looks token ids up in the embedding table `[vocab, hidden]`.
pub fn embed(table: ArrayView2<f32>, ids: &[i64]) -> Result<Array2<f32>> {
    let vocab = table.nrows();
    let mut out = Array2::zeros((ids.len(), table.ncols()));
    for (t, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= vocab {
            bail!("token id {id} at position {t} is outside the vocabulary (0..{vocab}) of the embedding table");
        }
        out.row_mut(t).assign(&table.row(id as usize));
    }
    Ok(out)
}

/// The final norm and the output projection.
#[derive(Debug, Clone)]
pub struct Head {
    norm: Array1<f32>,
    eps: f32,
    /// The module name (`lm_head`, `language_model.lm_head`), for the hook.
    lm_head_name: String,
    lm_head: Linear,
}

impl Head {
    /// From the head unit's weights (loaded with their full names, taken over without a copy).
    /// Tied models (`tie_word_embeddings`) project with the embedding table, which `embeddings`
    /// provides when asked.
    pub fn new(
        cfg: &TextConfig,
        layout: &Layout,
        weights: Weights,
        embeddings: impl FnOnce() -> Result<Array2<f32>>,
    ) -> Result<Head> {
        let mut w = Take { weights };
        let norm = w.vector(&layout.final_norm(), cfg.hidden_size)?;
        let lm_head = if cfg.tie_word_embeddings || !w.weights.has(&layout.lm_head_weight()) {
            if !cfg.tie_word_embeddings {
                bail!(
                    "tensor {} is missing and config.json does not tie the word embeddings (tie_word_embeddings)",
                    layout.lm_head_weight()
                );
            }
            Linear {
                weight: embeddings().context("reading the tied embedding table for the output projection")?,
                bias: None,
            }
        } else {
            let vocab = w.weights.get(&layout.lm_head_weight())?.shape().first().copied().unwrap_or(0);
            w.linear(&layout.lm_head, vocab, cfg.hidden_size)?
        };
        ensure!(
            lm_head.in_features() == cfg.hidden_size,
            "the embedding table used as output projection has {} columns, expected {}",
            lm_head.in_features(),
            cfg.hidden_size
        );
        Ok(Head { norm, eps: cfg.rms_norm_eps as f32, lm_head_name: layout.lm_head.clone(), lm_head })
    }

    pub fn final_norm(&self, x: ArrayView2<f32>) -> Array2<f32> {
        rms_norm(x, self.norm.view(), self.eps)
    }

    /// `[seq, vocab]` from the final norm's output.
    pub fn logits(&self, device: &dyn Device, normed: ArrayView2<f32>, hook: &mut dyn LinearHook) -> Array2<f32> {
        hook.linear(device, &self.lm_head_name, &self.lm_head, normed)
    }
}

/// Takes a layer's tensors out of its [`Weights`] by relative name (no copy), checking shapes;
/// whatever is left at the end is a tensor the forward does not know.
struct Take {
    weights: Weights,
}

impl Take {
    fn tensor(&mut self, name: &str) -> Result<ArrayD<f32>> {
        self.weights.map.remove(name).with_context(|| format!("tensor {}{name} is missing", self.weights.prefix))
    }

    fn linear(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let p = self.weights.prefix.clone();
        let weight = self.tensor(&format!("{module}.weight"))?;
        ensure!(
            weight.shape() == [out, inp],
            "tensor {p}{module}.weight has shape {:?}, expected [{out}, {inp}] from config.json",
            weight.shape()
        );
        let bias = match self.weights.map.remove(&format!("{module}.bias")) {
            Some(b) => {
                ensure!(b.shape() == [out], "tensor {p}{module}.bias has shape {:?}, expected [{out}]", b.shape());
                Some(b.into_dimensionality()?)
            }
            None => None,
        };
        Ok(Linear { weight: weight.into_dimensionality()?, bias })
    }

    fn swiglu(&mut self, module: &str, hidden: usize, inter: usize) -> Result<SwiGlu> {
        Ok(SwiGlu {
            name: module.to_string(),
            gate_proj: self.linear(&format!("{module}.gate_proj"), inter, hidden)?,
            up_proj: self.linear(&format!("{module}.up_proj"), inter, hidden)?,
            down_proj: self.linear(&format!("{module}.down_proj"), hidden, inter)?,
        })
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let v = self.tensor(name)?;
        ensure!(v.shape() == [len], "tensor {}{name} has shape {:?}, expected [{len}]", self.weights.prefix, v.shape());
        Ok(v.into_dimensionality()?)
    }

    fn norm(&mut self, module: &str, len: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.vector(&format!("{module}.weight"), len)?,
            bias: self.optional_vector(&format!("{module}.bias"), len)?,
        })
    }

    fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Array1<f32>>> {
        if self.weights.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fails on tensors nothing took (old checkpoints' `rotary_emb.inv_freq` buffers excepted).
    fn finish(self) -> Result<()> {
        let unknown: Vec<&str> =
            self.weights.map.keys().filter(|k| !k.ends_with("rotary_emb.inv_freq")).map(|k| k.as_str()).collect();
        if !unknown.is_empty() {
            bail!(
                "layer {} holds tensors lamina's text forward does not know: {}",
                self.weights.prefix.trim_end_matches('.'),
                unknown.join(", ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::io::checkpoint::Checkpoint;
    use crate::io::safetensors::load_all;
    use crate::model::layout::UnitKind;
    use crate::model::nn::Plain;
    use crate::model::rope::{Positions, Rope};
    use crate::model::{build_units, Model, Unit};
    use crate::tensor::Tensor;
    use std::collections::BTreeMap;
    use std::path::Path;

    struct Fixture {
        name: &'static str,
        ckpt: Checkpoint,
        model: Model,
        units: Vec<Unit>,
        reference: BTreeMap<String, Tensor>,
    }

    fn fixture(name: &'static str) -> Fixture {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, None, &names).unwrap();
        let inventory: Vec<_> = names.iter().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory).unwrap();
        let reference = load_all(&dir.join("reference.safetensors")).unwrap();
        Fixture { name, ckpt, model, units, reference }
    }

    impl Fixture {
        fn unit(&self, kind: UnitKind) -> &Unit {
            self.units.iter().find(|u| u.kind == kind).unwrap()
        }
        /// A `[1, seq, width]` reference as `[seq, width]`.
        fn states(&self, name: &str) -> Array2<f32> {
            let t = &self.reference[name];
            assert_eq!(t.shape[0], 1, "{name}");
            Array2::from_shape_vec((t.shape[1], t.shape[2]), t.to_f32().unwrap()).unwrap()
        }
        fn ids(&self) -> Vec<i64> {
            self.reference["input_ids"].to_i64().unwrap()
        }
        /// The fixture's M-RoPE ids (`[3, 1, seq]`), else `0..seq`.
        fn positions(&self) -> Positions {
            match self.reference.get("lm.position_ids") {
                Some(p) => {
                    let seq = p.shape[2];
                    Positions::from_ids(Array2::from_shape_vec((3, seq), p.to_i64().unwrap()).unwrap()).unwrap()
                }
                None => Positions::sequential(self.ids().len()),
            }
        }
        fn layer(&self, i: usize) -> DecoderLayer {
            let prefix = format!("{}.", self.model.layout.text_layer(i));
            let w = Weights::load(&self.ckpt, self.unit(UnitKind::TextLayer(i)), &prefix).unwrap();
            DecoderLayer::new(&self.model.text, i, &w).unwrap()
        }
        fn embed_table(&self) -> Array2<f32> {
            let w = Weights::load(&self.ckpt, self.unit(UnitKind::Embed), "").unwrap();
            w.matrix(&self.model.layout.embed_tokens()).unwrap()
        }
        fn image_token(&self) -> Option<i64> {
            let c = &self.ckpt.config;
            c.get("image_token_id").or(c.get("image_token_index")).and_then(|v| v.as_i64())
        }
    }

    /// max |ours - ref| / max |ref|.
    fn rel_err(ours: ArrayView2<f32>, reference: ArrayView2<f32>) -> f32 {
        assert_eq!(ours.dim(), reference.dim());
        let diff = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / reference.iter().fold(0f32, |m, b| m.max(b.abs()))
    }

    const TOLERANCE: f32 = 1e-4;

    /// Embedding, every layer, final norm and logits against the transformers reference.
    fn parity(name: &'static str) {
        let f = fixture(name);
        let text = &f.model.layout.text;
        let mut report = vec![];

        // Embedding: at VL models' image positions the reference holds spliced image features.
        let embedded = embed(f.embed_table().view(), &f.ids()).unwrap();
        let first_in = format!("{text}.layers.0.in");
        let reference =
            f.states(if f.reference.contains_key("lm.inputs_embeds") { "lm.inputs_embeds" } else { &first_in });
        let text_rows: Vec<usize> = (0..f.ids().len()).filter(|&t| Some(f.ids()[t]) != f.image_token()).collect();
        let e = rel_err(embedded.select(Axis(0), &text_rows).view(), reference.select(Axis(0), &text_rows).view());
        report.push(format!("embed {e:.2e}"));
        assert!(e <= TOLERANCE, "{name}: embedding error {e}");

        let rope = Rope::new(&f.model.text.rope, f.model.text.head_dim).unwrap().angles(&f.positions()).unwrap();
        let n = f.model.text.num_layers;
        for i in 0..n {
            let x = f.states(&format!("{text}.layers.{i}.in"));
            let out = f.layer(i).forward(&Cpu, x.view(), &rope, &mut Plain, ForwardOptions::default()).unwrap();
            let e = rel_err(out.view(), f.states(&format!("{text}.layers.{i}.out")).view());
            report.push(format!("layer {i} {e:.2e}"));
            assert!(e <= TOLERANCE, "{name}: layer {i} error {e}");
        }

        // Qwen3-VL adds deepstack features at the image positions after the first layers, the
        // last layer included when there are as many deepstack levels as layers.
        let mut last = f.states(&format!("{text}.layers.{}.out", n - 1));
        if let Some(d) = f.reference.get(&format!("visual.deepstack.{}", n - 1)) {
            let feats = Array2::from_shape_vec((d.shape[0], d.shape[1]), d.to_f32().unwrap()).unwrap();
            let image_rows = (0..f.ids().len()).filter(|&t| Some(f.ids()[t]) == f.image_token());
            for (k, t) in image_rows.enumerate() {
                let mut row = last.row_mut(t);
                row += &feats.row(k);
            }
        }
        let head_w = Weights::load(&f.ckpt, f.unit(UnitKind::Head), "").unwrap();
        let head = Head::new(&f.model.text, &f.model.layout, head_w, || Ok(f.embed_table())).unwrap();
        let normed = head.final_norm(last.view());
        let e = rel_err(normed.view(), f.states("final_norm.out").view());
        report.push(format!("final_norm {e:.2e}"));
        assert!(e <= TOLERANCE, "{name}: final norm error {e}");
        let logits = head.logits(&Cpu, f.states("final_norm.out").view(), &mut Plain);
        let e = rel_err(logits.view(), f.states("logits").view());
        report.push(format!("logits {e:.2e}"));
        assert!(e <= TOLERANCE, "{name}: logits error {e}");
        eprintln!("parity {}: {}", f.name, report.join(", "));
    }

    #[test]
    fn parity_llama() {
        parity("llama");
    }
    #[test]
    fn parity_qwen2() {
        parity("qwen2");
    }
    #[test]
    fn parity_qwen3() {
        parity("qwen3");
    }
    #[test]
    fn parity_qwen3_moe() {
        parity("qwen3_moe");
    }
    #[test]
    fn parity_qwen2_vl() {
        parity("qwen2_vl");
    }
    #[test]
    fn parity_qwen2_5_vl() {
        parity("qwen2_5_vl");
    }
    #[test]
    fn parity_qwen3_vl() {
        parity("qwen3_vl");
    }
    #[test]
    fn parity_qwen3_vl_moe() {
        parity("qwen3_vl_moe");
    }
    #[test]
    fn parity_llava() {
        parity("llava");
    }
    #[test]
    fn parity_qwen3_vl_realvocab() {
        parity("qwen3_vl_realvocab");
    }

    /// Records which linears ran and on how many tokens.
    struct Recorder(BTreeMap<String, usize>);

    impl LinearHook for Recorder {
        fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
            *self.0.entry(name.to_string()).or_default() += x.nrows();
            layer.forward(device, x)
        }
    }

    #[test]
    fn all_experts_see_every_token_and_change_nothing() {
        for name in ["qwen3_moe", "qwen3_vl_moe"] {
            let f = fixture(name);
            let text = &f.model.layout.text;
            let rope = Rope::new(&f.model.text.rope, f.model.text.head_dim).unwrap().angles(&f.positions()).unwrap();
            let x = f.states(&format!("{text}.layers.0.in"));
            let layer = f.layer(0);
            let (mut routed, mut all) = (Recorder(BTreeMap::new()), Recorder(BTreeMap::new()));
            let a =
                layer.forward(&Cpu, x.view(), &rope, &mut routed, ForwardOptions { moe_all_experts: false }).unwrap();
            let b = layer.forward(&Cpu, x.view(), &rope, &mut all, ForwardOptions { moe_all_experts: true }).unwrap();
            assert!(rel_err(a.view(), b.view()) <= 1e-6, "{name}");
            let seq = x.nrows();
            let moe = f.model.text.moe.as_ref().unwrap();
            let mut routed_tokens = 0;
            for j in 0..moe.num_experts {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    assert_eq!(all.0[&format!("mlp.experts.{j}.{p}")], seq, "{name} expert {j}");
                }
                routed_tokens += routed.0.get(&format!("mlp.experts.{j}.up_proj")).copied().unwrap_or(0);
            }
            assert_eq!(routed_tokens, seq * moe.top_k);
            assert_eq!(routed.0["mlp.gate"], seq);
            assert_eq!(all.0["self_attn.q_proj"], seq);
        }
    }

    #[test]
    fn router_picks_top_k_and_renormalises() {
        let expert = |n: &str| SwiGlu {
            name: n.into(),
            gate_proj: Linear { weight: Array2::zeros((1, 1)), bias: None },
            up_proj: Linear { weight: Array2::zeros((1, 1)), bias: None },
            down_proj: Linear { weight: Array2::zeros((1, 1)), bias: None },
        };
        let mut moe = SparseMoe {
            router: Linear { weight: Array2::zeros((3, 1)), bias: None },
            experts: vec![expert("a"), expert("b"), expert("c")],
            top_k: 2,
            norm_topk_prob: false,
        };
        // Logits ln 1, ln 2, ln 5: probabilities 0.125, 0.25, 0.625.
        let logits = ndarray::array![[0f32, 2f32.ln(), 5f32.ln()]];
        let r = moe.route(logits.view());
        assert!(r[0].is_empty());
        assert!((r[1][0].1 - 0.25).abs() < 1e-6 && (r[2][0].1 - 0.625).abs() < 1e-6);
        moe.norm_topk_prob = true;
        let r = moe.route(logits.view());
        assert!((r[1][0].1 - 0.25 / 0.875).abs() < 1e-6 && (r[2][0].1 - 0.625 / 0.875).abs() < 1e-6);
    }

    #[test]
    fn causal_softmax_masks_the_future() {
        let mut s = ndarray::array![[1.0f32, 9.0, 9.0], [0.0, 2f32.ln() * 2.0, 9.0], [0.0, 0.0, 0.0]];
        causal_softmax(&mut s, 0.5);
        // Row 1 scaled: 0 and ln 2, so softmax 1/3, 2/3.
        let want = ndarray::array![[1.0f32, 0.0, 0.0], [1.0 / 3.0, 2.0 / 3.0, 0.0], [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]];
        assert!(rel_err(s.view(), want.view()) < 1e-6, "{s:?}");
    }

    #[test]
    fn ids_beyond_the_vocabulary_are_refused() {
        let table = Array2::<f32>::zeros((10, 4));
        let e = embed(table.view(), &[1, 10]).unwrap_err().to_string();
        assert!(e.contains("10") && e.contains("vocabulary"), "{e}");
        assert!(embed(table.view(), &[-1]).is_err());
    }

    #[test]
    fn unknown_layer_tensors_are_refused() {
        let f = fixture("qwen2");
        let prefix = format!("{}.", f.model.layout.text_layer(0));
        let mut w = Weights::load(&f.ckpt, f.unit(UnitKind::TextLayer(0)), &prefix).unwrap();
        w.set("mlp.shared_expert_gate.weight", ArrayD::zeros(ndarray::IxDyn(&[1, 64])));
        let e = DecoderLayer::new(&f.model.text, 0, &w).unwrap_err().to_string();
        assert!(e.contains("mlp.shared_expert_gate.weight") && e.contains("model.layers.0"), "{e}");
        w.map.remove("mlp.shared_expert_gate.weight");
        w.map.remove("self_attn.k_proj.weight");
        let e = DecoderLayer::new(&f.model.text, 0, &w).unwrap_err().to_string();
        assert!(e.contains("model.layers.0.self_attn.k_proj.weight"), "{e}");
    }
}
