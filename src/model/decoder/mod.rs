//! Text decoder layers in f32, one layer at a time: one file per architecture whose math differs,
//! behind one trait.
//!
//! | architecture | file | families |
//! |---|---|---|
//! | [`Arch::Standard`] | [`standard`] | llama, qwen2, qwen3, qwen3_moe, glm4_moe (GLM-4.5/4.6), internlm2, qwen (1), the language models of qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava, internvl_chat (by its `llm_config`) and internvl (`-hf`, by its `text_config`) |
//! | [`Arch::Glm4`] | [`glm4`] | glm4 (sandwich norms, adjacent-pair partial rotary) |
//! | [`Arch::Mla`] | [`mla`] | deepseek_v2, deepseek_v3 (V2, V2-Lite, Coder-V2, V3, R1, V3.1, Kimi-K2) |
//! | [`Arch::Qwen3Next`] | [`qwen3_next`] (+ [`gated_delta`]) | qwen3_next (Gated DeltaNet and gated attention layers, zero-centred norms) |
//! | [`Arch::HunYuan`] | [`hunyuan`] | hunyuan_v1_moe (Hunyuan-A13B: q/k norms after RoPE, experts beside a shared MLP), hunyuan (Hunyuan-Large: the same with cross-layer attention) |
//!
//! An architecture gives two things:
//! - a layer built from its weights ([`DecoderBlock`]) that runs one sequence. Every linear (a
//!   router's and each expert's included) is computed through a [`LinearHook`], named relative to
//!   its layer (`self_attn.q_proj`, `mlp.gate`, `mlp.experts.3.up_proj`), so calibration can observe
//!   inputs and substitute quantized weights; what the attention caches goes through
//!   [`LinearHook::kv_cache`].
//! - the layer's [`LayerGraph`]: which linears read a norm's output, which linear feeds another
//!   channel for channel, which write the residual stream, which a server fuses into one module.
//!   Smoothing, rotation and the loaders' rules read it instead of knowing module names.
//!
//! Adding an architecture: a file here with a layer type implementing [`DecoderBlock`] and its
//! graph, a variant of [`Arch`], and the families that use it in [`Arch::of`]. Weights come from
//! [`Weights`]; which checkpoint names they have is [`crate::model::layout::Layout`]'s business
//! (a family whose math is the standard layer's but whose names or fused projections differ is a
//! [`crate::model::layout::DecoderNames`] there, not a file here). A vision-language model's
//! decoder is its language model's: [`Arch::of`] takes the layout's `text_family`.

pub mod gated_delta;
pub mod glm4;
pub mod hunyuan;
pub mod mla;
pub mod parts;
pub mod qwen3_next;
pub mod standard;

pub use parts::embed;

use super::config::TextConfig;
use super::layout::{Family, Layout};
use super::nn::{Linear, LinearHook};
use super::rope::Positions;
use super::weights::Weights;
use super::Model;
use crate::device::Device;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{Array1, Array2, ArrayView2};
use std::collections::BTreeMap;

/// Choices of a forward that do not change its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Run every expert on every token, so calibration sees all experts; the layer's output still
    /// combines only the router's top-k.
    pub moe_all_experts: bool,
}

/// One decoder layer of any architecture, with its weights, ready to run.
pub trait DecoderBlock: Send + Sync {
    /// Runs the layer on one sequence `x [seq, hidden]` whose tokens sit at `positions`. `carry`
    /// is what the sequence's earlier layers left for this one, and takes what this layer leaves
    /// for later ones ([`Carry`]).
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        carry: &mut Carry,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>>;
}

/// What one sequence carries from a decoder layer to later layers besides its hidden states,
/// named: Hunyuan-Large's cross-layer attention hands one layer's keys and values to the layers
/// after it ([`hunyuan`]). Every forward keeps one per sequence beside the hidden states and
/// moves it from layer to layer (calibration saves it in the activation snapshots, so a resumed
/// run has it too). Empty for architectures whose layers only read the hidden states.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Carry(BTreeMap<String, Array2<f32>>);

impl Carry {
    pub fn insert(&mut self, name: &str, value: Array2<f32>) {
        self.0.insert(name.to_string(), value);
    }

    pub fn get(&self, name: &str) -> Option<&Array2<f32>> {
        self.0.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Array2<f32>)> {
        self.0.iter()
    }
}

/// The decoder architectures lamina computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Standard,
    Glm4,
    /// DeepSeek's multi-head latent attention.
    Mla,
    Qwen3Next,
    /// q/k norms after RoPE, every layer MoE with a shared MLP.
    HunYuan,
}

impl Arch {
    pub fn of(family: Family) -> Arch {
        match family {
            Family::Llama
            | Family::Qwen2
            | Family::Qwen3
            | Family::Qwen3Moe
            | Family::InternLm2
            | Family::Qwen
            | Family::QwenVl
            | Family::Qwen2Vl
            | Family::Qwen25Vl
            | Family::Qwen3Vl
            | Family::Qwen3VlMoe
            | Family::Llava
            | Family::InternVlChat
            | Family::InternVl
            | Family::Glm4Moe
            | Family::Glm4vMoe
            | Family::Generic => Arch::Standard,
            Family::Glm4 | Family::Glm4v => Arch::Glm4,
            Family::DeepseekV2 | Family::DeepseekV3 => Arch::Mla,
            Family::Qwen3Next => Arch::Qwen3Next,
            Family::HunyuanV1Moe | Family::Hunyuan => Arch::HunYuan,
        }
    }
}

/// Builds decoder layer `index` of `model` from its weights (names relative to the layer),
/// taking them over.
pub fn layer(model: &Model, index: usize, weights: Weights) -> Result<Box<dyn DecoderBlock>> {
    let names = &model.layout.names.decoder;
    Ok(match Arch::of(model.layout.text_family) {
        Arch::Standard => Box::new(standard::Layer::new(&model.text, names, index, weights)?),
        Arch::Glm4 => Box::new(glm4::Layer::new(&model.text, index, weights)?),
        Arch::Mla => Box::new(mla::Layer::new(&model.text, index, weights)?),
        Arch::Qwen3Next => Box::new(qwen3_next::Layer::new(&model.text, index, weights)?),
        Arch::HunYuan => Box::new(hunyuan::Layer::new(&model.text, index, weights)?),
    })
}

/// How decoder layer `index` of `model` connects its linears.
pub fn graph(model: &Model, index: usize) -> LayerGraph {
    match Arch::of(model.layout.text_family) {
        Arch::Standard => standard::Layer::graph(&model.text, &model.layout.names.decoder, index),
        Arch::Glm4 => glm4::Layer::graph(&model.text, index),
        Arch::Mla => mla::Layer::graph(&model.text, index),
        Arch::Qwen3Next => qwen3_next::Layer::graph(&model.text, index),
        Arch::HunYuan => hunyuan::Layer::graph(&model.text, index),
    }
}

/// A norm and the linears that read its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormLinears {
    pub norm: String,
    pub consumers: Vec<String>,
}

/// How a producer's output channels reach a consumer's input channels one for one, so that a
/// per-channel scale can move from one to the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearPath {
    /// The value projection through attention to the output projection (per key/value head group).
    ValueOutput,
    /// The up projection through the gated product (SwiGLU) to the down projection.
    GatedProduct,
    /// MLA's `kv_b_proj` to `o_proj`: the value rows of each head's `[k_nope | v]` block of
    /// `kv_b_proj` reach that head's columns of `o_proj` (the no-rope key rows do not).
    LatentValueOutput,
}

/// How a decoder layer's linears connect, names relative to the layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerGraph {
    /// Norms and the linears reading their output (`input_layernorm` → q, k, v). The consumers of
    /// one norm share one input: one set of statistics, one Hessian.
    pub norm_linears: Vec<NormLinears>,
    /// (producer, consumer, path) pairs where a channel scale can move through (v→o, up→down).
    pub linear_linears: Vec<(String, String, LinearPath)>,
    /// Linears whose outputs are added to the residual stream (o_proj, down_proj, every expert's
    /// down_proj).
    pub residual_writers: Vec<String>,
    /// (linear, norm) pairs where the linear's output is normalized before it reaches the residual
    /// stream (GLM-4's sandwich norms: o_proj → post_self_attn_layernorm, down_proj →
    /// post_mlp_layernorm). Such a linear is no residual writer: a rotation of the residual stream
    /// cannot be folded into it.
    pub post_norms: Vec<(String, String)>,
    /// Linears a server fuses into one module and serves with one quantization type: q/k/v,
    /// gate/up, all the experts of a MoE layer.
    pub fused: Vec<Vec<String>>,
    /// Attention modules whose keys and values are cached (`self_attn`): they call
    /// [`LinearHook::kv_cache`] (MLA caches its latent as the values and its one rotated key head
    /// as the keys).
    pub kv_cache: Vec<String>,
}

impl LayerGraph {
    /// Which linears read the same input: every consumer of a norm maps to the norm's first
    /// consumer. Linears outside the graph read their own input.
    pub fn input_groups(&self) -> InputGroups {
        let mut map = BTreeMap::new();
        for nl in &self.norm_linears {
            for c in &nl.consumers {
                map.insert(c.clone(), nl.consumers[0].clone());
            }
        }
        InputGroups(map)
    }
}

/// The name under which a linear's input is observed: linears reading the same tensor share it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputGroups(BTreeMap<String, String>);

impl InputGroups {
    /// The group of `module`: from the layer graph where it names the module, else by the usual
    /// names (k/v read what q reads, up reads what gate reads), which serves the vision blocks.
    pub fn of(&self, module: &str) -> String {
        match self.0.get(module) {
            Some(g) => g.clone(),
            None => input_group_by_name(module),
        }
    }
}

/// The naming convention of sibling projections: `k_proj`/`v_proj` read what `q_proj` reads,
/// `up_proj` what `gate_proj` reads, and in a MoE layer every expert's gate/up what the router
/// `mlp.gate` reads.
pub fn input_group_by_name(name: &str) -> String {
    let (parent, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let join = |l: &str| if parent.is_empty() { l.to_string() } else { format!("{parent}.{l}") };
    let canonical = match leaf {
        "k_proj" | "v_proj" => join("q_proj"),
        "up_proj" => join("gate_proj"),
        _ => name.to_string(),
    };
    if let Some(rest) = canonical.strip_suffix(".gate_proj") {
        if let Some((mlp, idx)) = rest.rsplit_once(".experts.") {
            if idx.parse::<usize>().is_ok() {
                return format!("{mlp}.gate");
            }
        }
    }
    canonical
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
        let mut w = parts::Take::new(weights);
        // Zero-centred final norms (Qwen3-Next) compute with `1 + w`.
        let norm = w.vector(&layout.final_norm(), cfg.hidden_size)? + cfg.norm_offset;
        let lm_head = if cfg.tie_word_embeddings || !w.has(&layout.lm_head_weight()) {
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
        parts::rms_norm(x, self.norm.view(), self.eps)
    }

    /// `[seq, vocab]` from the final norm's output.
    pub fn logits(&self, device: &dyn Device, normed: ArrayView2<f32>, hook: &mut dyn LinearHook) -> Array2<f32> {
        hook.linear(device, &self.lm_head_name, &self.lm_head, normed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::io::checkpoint::Checkpoint;
    use crate::io::safetensors::load_all;
    use crate::model::layout::UnitKind;
    use crate::model::nn::Plain;
    use crate::model::{build_units, Unit};
    use crate::tensor::Tensor;
    use ndarray::{ArrayD, Axis};
    use std::path::Path;

    pub(crate) struct Fixture {
        pub name: &'static str,
        pub ckpt: Checkpoint,
        pub model: Model,
        pub units: Vec<Unit>,
        pub reference: BTreeMap<String, Tensor>,
    }

    pub(crate) fn fixture(name: &'static str) -> Fixture {
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
        pub(crate) fn weights(&self, i: usize) -> Weights {
            let prefix = format!("{}.", self.model.layout.text_layer(i));
            Weights::load(&self.ckpt, self.unit(UnitKind::TextLayer(i)), &prefix).unwrap()
        }
        fn layer(&self, i: usize) -> Box<dyn DecoderBlock> {
            layer(&self.model, i, self.weights(i)).unwrap()
        }
        fn embed_table(&self) -> Array2<f32> {
            let w = Weights::load(&self.ckpt, self.unit(UnitKind::Embed), "").unwrap();
            w.matrix(&self.model.layout.embed_tokens()).unwrap()
        }
        /// Where the image embeddings sit (none for text models).
        fn image_rows(&self) -> Vec<usize> {
            crate::model::vision::splice::ImageSlots::of(&self.ckpt.config)
                .map(|s| s.positions(&self.ids()).unwrap())
                .unwrap_or_default()
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
        let layout = &f.model.layout;
        let mut report = vec![];

        // Embedding: at VL models' image positions the reference holds spliced image features.
        let embedded = embed(f.embed_table().view(), &f.ids()).unwrap();
        let first_in = format!("{}.in", layout.text_layer(0));
        let reference =
            f.states(if f.reference.contains_key("lm.inputs_embeds") { "lm.inputs_embeds" } else { &first_in });
        let image_rows = f.image_rows();
        let text_rows: Vec<usize> = (0..f.ids().len()).filter(|t| !image_rows.contains(t)).collect();
        let e = rel_err(embedded.select(Axis(0), &text_rows).view(), reference.select(Axis(0), &text_rows).view());
        report.push(format!("embed {e:.2e}"));
        assert!(e <= TOLERANCE, "{name}: embedding error {e}");

        let positions = f.positions();
        let n = f.model.text.num_layers;
        // Layers run in order, so a layer's carry (cross-layer attention's keys and values) reaches the next.
        let mut carry = Carry::default();
        for i in 0..n {
            let x = f.states(&format!("{}.in", layout.text_layer(i)));
            let out =
                f.layer(i).forward(&Cpu, x.view(), &positions, &mut carry, &mut Plain, Default::default()).unwrap();
            let e = rel_err(out.view(), f.states(&format!("{}.out", layout.text_layer(i))).view());
            report.push(format!("layer {i} {e:.2e}"));
            assert!(e <= TOLERANCE, "{name}: layer {i} error {e}");
        }

        // Qwen3-VL adds deepstack features at the image positions after the first layers, the
        // last layer included when there are as many deepstack levels as layers.
        let mut last = f.states(&format!("{}.out", layout.text_layer(n - 1)));
        if let Some(d) = f.reference.get(&format!("visual.deepstack.{}", n - 1)) {
            let feats = Array2::from_shape_vec((d.shape[0], d.shape[1]), d.to_f32().unwrap()).unwrap();
            for (k, &t) in image_rows.iter().enumerate() {
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
    fn parity_internlm2() {
        parity("internlm2");
    }
    #[test]
    fn parity_qwen1() {
        parity("qwen1");
    }
    #[test]
    fn parity_llava() {
        parity("llava");
    }
    #[test]
    fn parity_qwen3_vl_realvocab() {
        parity("qwen3_vl_realvocab");
    }
    #[test]
    fn parity_glm4() {
        parity("glm4");
    }
    /// FP8 block-scaled linears (dequantized as they load), MLA with q_lora_rank, interleaved
    /// rotary pairs, YaRN, sigmoid routing limited to groups, a shared expert.
    #[test]
    fn parity_deepseek_v3() {
        parity("deepseek_v3");
    }
    /// bf16, rope_interleave false, a non-zero correction bias, 2 of 4 groups eligible.
    #[test]
    fn parity_deepseek_v3_bf16() {
        parity("deepseek_v3_bf16");
    }
    /// MLA without q_lora_rank, softmax group-limited greedy routing, two shared experts, YaRN with
    /// mscale != mscale_all_dim.
    #[test]
    fn parity_deepseek_v2() {
        parity("deepseek_v2");
    }
    /// A Qwen3 FP8 release: block scales of 32 × 48, ragged on both axes.
    #[test]
    fn parity_qwen3_fp8() {
        parity("qwen3_fp8");
    }
    /// GLM-4.1V's GLM-4 decoder with its M-RoPE positions (sections of a partial rotary turning
    /// adjacent pairs): one image (shared fixture) and two images spanning several rows.
    #[test]
    fn parity_glm4v() {
        parity("glm4v");
        parity("glm4v_wide");
    }
    #[test]
    fn parity_internvl() {
        parity("internvl_chat");
        parity("internvl_chat_6b");
        parity("internvl_hf");
    }
    /// Qwen-VL's Qwen (1) decoder on the prompt with the resampler's outputs spliced in (the
    /// reference: tests/fixtures/gen/qwen_vl.py's port of the remote code).
    #[test]
    fn parity_qwen_vl() {
        parity("qwen_vl");
    }
    #[test]
    fn parity_glm4_moe() {
        parity("glm4_moe");
    }
    /// GLM-4.5V / 4.6V (glm4v_moe): GLM-4.5's MoE decoder (sigmoid router with a non-zero correction
    /// bias, routed_scaling_factor 2.5, a shared expert, layer 0 dense, no q/k norms) under M-RoPE
    /// sections of a partial rotary turning halves (`rotate_half`), per-expert release names.
    #[test]
    fn parity_glm4v_moe() {
        parity("glm4v_moe");
    }
    /// Gated DeltaNet (conv, delta rule, gated norm) in layers 0-2, gated attention in layer 3,
    /// zero-centred norms, MoE with a gated shared expert.
    #[test]
    fn parity_qwen3_next() {
        parity("qwen3_next");
    }
    /// Hunyuan-A13B: q/k norms after RoPE, NTK-alpha base, router `mlp.gate.wg`, a shared MLP,
    /// tied embeddings.
    #[test]
    fn parity_hunyuan_v1_moe() {
        parity("hunyuan_v1_moe");
    }
    /// Hunyuan-Large: cross-layer attention (layers 1 and 3 attend to the keys and values layers 0
    /// and 2 carry to them, through their own key norms), top-1 routing by the softmax probability,
    /// untied head; against tests/fixtures/gen/hunyuan_large.py.
    #[test]
    fn parity_hunyuan_large() {
        parity("hunyuan");
    }

    /// A CLA layer run without the keys and values of the layer before it fails, naming that layer.
    #[test]
    fn cla_layer_without_carried_keys_is_an_error() {
        let f = fixture("hunyuan");
        let x = f.states("model.layers.1.in");
        let e = f
            .layer(1)
            .forward(&Cpu, x.view(), &f.positions(), &mut Carry::default(), &mut Plain, Default::default())
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("cross-layer attention") && e.contains("layer 0"), "{e}");
    }

    /// The scalings that act only beyond the trained length, switched on by a shorter trained
    /// length in the config: every layer and the logits against tests/fixtures/gen/long_context.py.
    fn long_context(name: &'static str, overrides: serde_json::Value) {
        let mut f = fixture(name);
        let mut config = f.ckpt.config.clone();
        for (k, v) in overrides.as_object().unwrap() {
            config[k] = v.clone();
        }
        let names: Vec<&str> = f.ckpt.names().collect();
        f.model = Model::new(&config, None, &names).unwrap();
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name);
        f.reference = load_all(&dir.join("long.safetensors")).unwrap();
        let positions = Positions::sequential(f.ids().len());
        let mut x = embed(f.embed_table().view(), &f.ids()).unwrap();
        let (mut from_ref_carry, mut carry) = (Carry::default(), Carry::default());
        for i in 0..f.model.text.num_layers {
            let layer = f.layer(i);
            let key = f.model.layout.text_layer(i);
            let opts = ForwardOptions::default();
            let from_ref = layer
                .forward(&Cpu, f.states(&format!("{key}.in")).view(), &positions, &mut from_ref_carry, &mut Plain, opts)
                .unwrap();
            let e = rel_err(from_ref.view(), f.states(&format!("{key}.out")).view());
            assert!(e <= TOLERANCE, "{name}: long-context layer {i} error {e}");
            x = layer.forward(&Cpu, x.view(), &positions, &mut carry, &mut Plain, opts).unwrap();
        }
        let head_w = Weights::load(&f.ckpt, f.unit(UnitKind::Head), "").unwrap();
        let head = Head::new(&f.model.text, &f.model.layout, head_w, || Ok(f.embed_table())).unwrap();
        let logits = head.logits(&Cpu, head.final_norm(x.view()).view(), &mut Plain);
        let e = rel_err(logits.view(), f.states("logits").view());
        assert!(e <= TOLERANCE, "{name}: long-context logits error {e}");
    }

    #[test]
    fn internlm2_dynamic_ntk_beyond_the_trained_length() {
        let rope = serde_json::json!({"type": "dynamic", "factor": 2.0});
        long_context("internlm2", serde_json::json!({"max_position_embeddings": 16, "rope_scaling": rope}));
    }

    #[test]
    fn qwen1_logn_and_dynamic_ntk_beyond_the_trained_length() {
        long_context("qwen1", serde_json::json!({"seq_length": 8}));
    }

    /// Records which linears ran and on how many tokens, and the cached keys' shapes.
    struct Recorder(BTreeMap<String, usize>);

    impl LinearHook for Recorder {
        fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
            *self.0.entry(name.to_string()).or_default() += x.nrows();
            layer.forward(device, x)
        }
        fn kv_cache(&mut self, module: &str, k: &mut Array2<f32>, v: &mut Array2<f32>) {
            *self.0.entry(format!("{module}.kv_cache")).or_default() += k.nrows().min(v.nrows());
        }
    }

    #[test]
    fn all_experts_see_every_token_and_change_nothing() {
        for (name, i) in [
            ("qwen3_moe", 0),
            ("qwen3_vl_moe", 0),
            ("glm4_moe", 1),
            ("glm4v_moe", 2),
            ("deepseek_v3", 1),
            ("deepseek_v2", 2),
            ("qwen3_next", 3),
            ("hunyuan_v1_moe", 1),
            ("hunyuan", 2),
        ] {
            let f = fixture(name);
            let positions = f.positions();
            let x = f.states(&format!("{}.in", f.model.layout.text_layer(i)));
            let layer = f.layer(i);
            let (mut routed, mut all) = (Recorder(BTreeMap::new()), Recorder(BTreeMap::new()));
            let routed_opts = ForwardOptions { moe_all_experts: false };
            let a = layer.forward(&Cpu, x.view(), &positions, &mut Carry::default(), &mut routed, routed_opts).unwrap();
            let all_opts = ForwardOptions { moe_all_experts: true };
            let b = layer.forward(&Cpu, x.view(), &positions, &mut Carry::default(), &mut all, all_opts).unwrap();
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
            assert_eq!(routed.0[f.model.layout.names.decoder.router], seq);
            let first = if f.model.text.mla.as_ref().is_some_and(|m| m.q_lora_rank.is_some()) { "q_a" } else { "q" };
            assert_eq!(all.0[&format!("self_attn.{first}_proj")], seq);
            assert_eq!(all.0["self_attn.kv_cache"], seq);
            if let Some(shared) = &moe.shared {
                for p in ["gate_proj", "up_proj", "down_proj"] {
                    assert_eq!(
                        routed.0[&format!("{}.{p}", shared.module)],
                        seq,
                        "{name}: shared experts see every token"
                    );
                }
            }
        }
    }

    /// Every linear a layer computes is named in its graph, and every name in the graph is a
    /// linear the layer computes: the graph is the layer's, not a guess.
    #[test]
    fn graphs_name_exactly_the_linears_the_layers_run() {
        for name in [
            "llama",
            "qwen2",
            "qwen3_moe",
            "qwen3_vl_moe",
            "internlm2",
            "qwen1",
            "glm4",
            "glm4_moe",
            "glm4v_moe",
            "deepseek_v3",
            "deepseek_v2",
            "qwen3_next",
            "hunyuan_v1_moe",
            "hunyuan",
        ] {
            let f = fixture(name);
            let mut carry = Carry::default();
            for i in 0..f.model.text.num_layers {
                let mut rec = Recorder(BTreeMap::new());
                let x = f.states(&format!("{}.in", f.model.layout.text_layer(i)));
                let opts = ForwardOptions { moe_all_experts: true };
                f.layer(i).forward(&Cpu, x.view(), &f.positions(), &mut carry, &mut rec, opts).unwrap();
                let ran: std::collections::BTreeSet<&str> =
                    rec.0.keys().filter_map(|k| (!k.ends_with(".kv_cache")).then_some(k.as_str())).collect();
                let g = graph(&f.model, i);
                let mut named: std::collections::BTreeSet<&str> = Default::default();
                g.norm_linears.iter().for_each(|nl| named.extend(nl.consumers.iter().map(|s| s.as_str())));
                g.linear_linears.iter().for_each(|(p, c, _)| named.extend([p.as_str(), c.as_str()]));
                named.extend(g.residual_writers.iter().map(|s| s.as_str()));
                named.extend(g.post_norms.iter().map(|(l, _)| l.as_str()));
                g.fused.iter().for_each(|f| named.extend(f.iter().map(|s| s.as_str())));
                assert_eq!(ran, named, "{name} layer {i}");
                let w = f.weights(i);
                for nl in &g.norm_linears {
                    assert!(w.has(&format!("{}.weight", nl.norm)), "{name} layer {i}: {}", nl.norm);
                }
                for (_, norm) in &g.post_norms {
                    assert!(w.has(&format!("{norm}.weight")), "{name} layer {i}: {norm}");
                }
                // The linears reading one norm share one input group; the output projection reads its own.
                let groups = g.input_groups();
                let d = f.model.layout.names.decoder;
                let qkv = d.qkv_modules();
                assert!(qkv.iter().all(|m| groups.of(m) == qkv[0]), "{name}");
                assert_eq!(groups.of(d.up), d.gate, "{name}");
                assert_eq!(groups.of(d.o_proj), d.o_proj, "{name}");
            }
        }
    }

    #[test]
    fn inputs_are_grouped_by_what_they_read() {
        let g = InputGroups::default();
        assert_eq!(g.of("self_attn.v_proj"), "self_attn.q_proj");
        assert_eq!(g.of("self_attn.o_proj"), "self_attn.o_proj");
        assert_eq!(g.of("mlp.up_proj"), "mlp.gate_proj");
        assert_eq!(g.of("mlp.experts.7.up_proj"), "mlp.gate");
        assert_eq!(g.of("mlp.experts.7.gate_proj"), "mlp.gate");
        assert_eq!(g.of("mlp.experts.7.down_proj"), "mlp.experts.7.down_proj");
        assert_eq!(g.of("attn.qkv"), "attn.qkv");
        assert_eq!(g.of("q_proj"), "q_proj");
    }

    #[test]
    fn unknown_layer_tensors_are_refused() {
        let f = fixture("qwen2");
        let mut w = f.weights(0);
        w.set("mlp.shared_expert_gate.weight", ArrayD::zeros(ndarray::IxDyn(&[1, 64])));
        let e = layer(&f.model, 0, w.clone()).err().unwrap().to_string();
        assert!(e.contains("mlp.shared_expert_gate.weight") && e.contains("model.layers.0"), "{e}");
        w.map.remove("mlp.shared_expert_gate.weight");
        w.map.remove("self_attn.k_proj.weight");
        let e = layer(&f.model, 0, w).err().unwrap().to_string();
        assert!(e.contains("model.layers.0.self_attn.k_proj.weight"), "{e}");
    }
}
