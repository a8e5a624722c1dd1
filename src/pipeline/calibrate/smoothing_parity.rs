//! Folded outlier suppression leaves the float model's output unchanged, checked on the fixtures'
//! real decoder layers, whose norms carry planted 30x outlier channels: statistics gathered from
//! the transformers reference inputs of each layer drive the calibrator's own subgraph choice
//! ([`layer_subgraphs`]) and folding ([`Calibrator::apply_smoothing`]); the smoothed layer's
//! f32 output must match the original's, which itself matches the reference.

use super::hooks::Observe;
use super::smoothing::{layer_subgraphs, Kind};
use super::Calibrator;
use crate::device::Cpu;
use crate::export::ascend::AscendExporter;
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::load_all;
use crate::model::decoder::{self, ForwardOptions};
use crate::model::layout::UnitKind;
use crate::model::nn::Plain;
use crate::model::rope::Positions;
use crate::model::weights::Weights;
use crate::model::{build_units, Model};
use crate::quant::Recipe;
use crate::tensor::{DType, Tensor};
use ndarray::{Array2, ArrayView2, IxDyn};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// max |a - b| / max |b|.
fn rel_err(a: ArrayView2<f32>, b: ArrayView2<f32>) -> f32 {
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / b.iter().fold(0f32, |m, y| m.max(y.abs()))
}

/// A recipe with one smoothing step on every subgraph type, and static W8A8 on every linear but
/// the router (static consumers are what lets a norm-linear subgraph take a shift).
fn recipe(step: &str) -> Recipe {
    let y = format!(
        "apiversion: modelslim_v1\nspec:\n  process:\n    - {step}\n    - type: linear_quant\n      qconfig:\n        act: {{scope: per_tensor, dtype: int8, symmetric: false}}\n        weight: {{scope: per_channel, dtype: int8}}\n      include: ['*']\n      exclude: ['*mlp.gate']\n"
    );
    Recipe::parse(&y, "smoothing parity").unwrap()
}

/// What folding one recipe into one layer did.
struct Folded {
    /// The smoothed layer's output against the original's.
    f32_err: f32,
    /// The same, with the changed tensors that stay float (norms, the router, biases) rounded to
    /// their stored dtype (bf16) as the calibrator writes them.
    stored_err: f32,
    kinds: BTreeSet<&'static str>,
    /// The norms whose output was shifted.
    shifted: BTreeSet<String>,
    /// Largest ratio between two channels' scales of the input_layernorm subgraph.
    scale_spread: f32,
}

struct Fixture {
    ckpt: Checkpoint,
    model: Model,
    units: Vec<crate::model::Unit>,
    reference: std::collections::BTreeMap<String, Tensor>,
}

impl Fixture {
    fn open(name: &str) -> Fixture {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, None, &names).unwrap();
        let inventory: Vec<_> = names.iter().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory).unwrap();
        let reference = load_all(&dir.join("reference.safetensors")).unwrap();
        Fixture { ckpt, model, units, reference }
    }

    fn states(&self, name: &str) -> Array2<f32> {
        let t = &self.reference[name];
        Array2::from_shape_vec((t.shape[1], t.shape[2]), t.to_f32().unwrap()).unwrap()
    }

    /// The reference's M-RoPE ids (VL models), else `0..seq`.
    fn positions(&self, seq: usize) -> Positions {
        match self.reference.get("lm.position_ids") {
            Some(p) => Positions::from_ids(Array2::from_shape_vec((3, seq), p.to_i64().unwrap()).unwrap()).unwrap(),
            None => Positions::sequential(seq),
        }
    }

    fn fold(&self, layer: usize, recipe: &Recipe) -> Folded {
        let prefix = format!("{}.", self.model.layout.text_layer(layer));
        let unit = self.units.iter().find(|u| u.kind == UnitKind::TextLayer(layer)).unwrap();
        let weights = Weights::load(&self.ckpt, unit, &prefix).unwrap();
        let x = self.states(&format!("{}.in", self.model.layout.text_layer(layer)));
        let reference_out = self.states(&format!("{}.out", self.model.layout.text_layer(layer)));
        let positions = self.positions(x.nrows());
        let run = |w: &Weights, hook: &mut dyn crate::model::nn::LinearHook, opts| {
            let l = decoder::layer(&self.model, layer, w.clone()).unwrap();
            l.forward(&Cpu, x.view(), &positions, &mut decoder::Carry::default(), hook, opts).unwrap()
        };

        // The float layer, observed as calibration observes it (every expert on every token).
        let mut obs = Observe::default();
        obs.next_sequence();
        let before = run(&weights, &mut obs, ForwardOptions { moe_all_experts: true });
        let e = rel_err(before.view(), reference_out.view());
        assert!(e <= 1e-4, "{prefix}: the float layer is {e} off the reference");

        let exporter =
            AscendExporter { serving: crate::tensor::DType::BF16, target: crate::export::rules::Target::VllmAscend };
        let save = std::env::temp_dir().join(format!("lamina-smoothing-parity-{}", std::process::id()));
        let cal = Calibrator::new(
            &self.ckpt,
            &self.model,
            recipe,
            &exporter,
            &Cpu,
            Vec::new(),
            save,
            0,
            Arc::new(AtomicUsize::new(0)),
        )
        .unwrap();
        let smoothing = cal.smoothing.as_ref().unwrap();
        let biased: BTreeSet<String> =
            weights.map.keys().filter_map(|k| k.strip_suffix(".bias")).map(String::from).collect();
        let full = |r: &str| format!("{prefix}{r}");
        let graph = decoder::graph(&self.model, layer);
        let subgraphs = layer_subgraphs(smoothing, &graph, recipe, &full, &|r| biased.contains(r));

        let mut w = weights.clone();
        let mut modified = BTreeSet::new();
        let mut folded = Folded {
            f32_err: 0.0,
            stored_err: 0.0,
            kinds: BTreeSet::new(),
            shifted: BTreeSet::new(),
            scale_spread: 1.0,
        };
        for sg in &subgraphs {
            let (shift, scales) = cal
                .apply_smoothing(
                    &mut w,
                    sg,
                    &obs,
                    &graph.input_groups(),
                    &mut modified,
                    &|n| self.ckpt.entry(&full(n)).map(|(_, e)| e.dtype),
                    None,
                )
                .unwrap();
            folded.kinds.insert(match sg.kind {
                Kind::NormLinear { .. } => "norm-linear",
                Kind::Ov { .. } => "ov",
                Kind::UpDown { .. } => "up-down",
            });
            if let (Kind::NormLinear { norm }, Some(z)) = (&sg.kind, &shift) {
                if z.iter().any(|&v| v != 0.0) {
                    folded.shifted.insert(norm.clone());
                }
            }
            if sg.kind == (Kind::NormLinear { norm: "input_layernorm".into() }) {
                let (lo, hi) = scales.iter().fold((f32::MAX, 0f32), |(l, h), &s| (l.min(s), h.max(s)));
                folded.scale_spread = hi / lo;
            }
        }
        let after = run(&w, &mut Plain, ForwardOptions::default());
        folded.f32_err = rel_err(after.view(), before.view());

        // As the calibrator goes on: the changed tensors that are not the weight of a quantized
        // linear (norms, the router, biases) rounded to the checkpoint's dtype (bf16).
        // (A quantized linear's bias is written in f32, as the calibrator does.)
        let quantized = |name: &str| {
            let module = name.strip_suffix(".weight").or_else(|| name.strip_suffix(".bias"));
            let linear = module.is_some_and(|m| w.get(&format!("{m}.weight")).is_ok_and(|v| v.ndim() == 2));
            linear && module.is_some_and(|m| recipe.linear_spec(&full(m)).is_some())
        };
        let stored: Vec<String> = modified.iter().filter(|n| !quantized(n)).cloned().collect();
        for name in stored {
            let dtype = self.ckpt.entry(&full(&name)).map(|(_, e)| e.dtype).unwrap_or(DType::BF16);
            let v = w.get(&name).unwrap().clone();
            let flat: Vec<f32> = v.iter().copied().collect();
            let rounded = Tensor::from_f32_as(dtype, v.shape(), &flat).unwrap().to_f32().unwrap();
            w.set(&name, ndarray::ArrayD::from_shape_vec(IxDyn(v.shape()), rounded).unwrap());
        }
        folded.stored_err = rel_err(run(&w, &mut Plain, ForwardOptions::default()).view(), before.view());
        folded
    }
}

#[test]
fn folded_smoothing_leaves_every_fixture_layer_unchanged() {
    let steps = [
        (
            "smooth_quant",
            "type: smooth_quant\n      alpha: 0.8\n      enable_subgraph_type: [norm-linear, ov, up-down]",
        ),
        ("m2", "type: m2\n      alpha: 0.5\n      enable_subgraph_type: [norm-linear, ov, up-down]"),
        ("iter_smooth asymmetric", "type: iter_smooth\n      symmetric: false"),
    ];
    let mut report = Vec::new();
    for name in ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen3_vl", "qwen3_vl_moe"] {
        let f = Fixture::open(name);
        for (step, yaml) in steps {
            let r = recipe(yaml);
            for layer in 0..f.model.text.num_layers {
                let folded = f.fold(layer, &r);
                let what = format!("{name} layer {layer} {step}");
                let want: BTreeSet<&str> = ["norm-linear", "ov", "up-down"].into();
                assert_eq!(folded.kinds, want, "{what}: subgraphs folded");
                // A shift needs every consumer's bias to have somewhere to go: the MoE router is
                // float and has none, so MoE layers shift only the input norm (q/k/v).
                let shifted: Vec<&str> = match (step, f.model.text.moe.is_some()) {
                    ("smooth_quant", _) => vec![],
                    (_, true) => vec!["input_layernorm"],
                    (_, false) => vec!["input_layernorm", "post_attention_layernorm"],
                };
                assert_eq!(folded.shifted.iter().map(|s| s.as_str()).collect::<Vec<_>>(), shifted, "{what}: shifted");
                // The planted outlier channels make the scales anything but uniform.
                assert!(folded.scale_spread > 4.0, "{what}: scales spread only {}", folded.scale_spread);
                assert!(folded.f32_err <= 1e-4, "{what}: the smoothed layer's output moved by {}", folded.f32_err);
                // The calibrator folds what the norms store (bf16), so dense layers stay exact; an
                // MoE router is float and stored in bf16 after smoothing, which moves the routing
                // weights a little (measured ≤ 8e-4).
                let bound = if f.model.text.moe.is_some() { 2e-3 } else { 1e-4 };
                assert!(folded.stored_err <= bound, "{what}: stored in bf16 it moved by {}", folded.stored_err);
                report.push(format!("{what}: f32 {:.1e}, bf16-stored {:.1e}", folded.f32_err, folded.stored_err));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}

/// The same for MLA (DeepSeek-V3 from its FP8 release, DeepSeek-V2-Lite without `q_lora_rank`):
/// under the family's recipe (deepseek_v3-w8a8: m2 on the attention's norms, whose static
/// consumers take the shift) and under m2 on every subgraph MLA has. MLA has no v_proj → o_proj
/// pair (the values come out of kv_b_proj, absorbed by the server), so no ov subgraph; the
/// low-rank norms q_a_layernorm and kv_a_layernorm smooth q_b_proj and kv_b_proj.
#[test]
fn folded_smoothing_leaves_mla_layers_unchanged() {
    let family =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/deepseek_v3-w8a8.yaml")).unwrap();
    let family = Recipe::parse(&family, "deepseek_v3-w8a8").unwrap();
    let every = recipe("type: m2\n      alpha: 0.5\n      enable_subgraph_type: [norm-linear, ov, up-down]");
    let mut report = Vec::new();
    for name in ["deepseek_v3", "deepseek_v2"] {
        let f = Fixture::open(name);
        let lora = f.model.text.mla.as_ref().unwrap().q_lora_rank.is_some();
        for layer in 0..f.model.text.num_layers {
            let moe = f.model.text.moe.as_ref().is_some_and(|m| m.is_moe_layer(layer));
            for (step, r) in [("family recipe", &family), ("m2 everywhere", &every)] {
                let folded = f.fold(layer, r);
                let what = format!("{name} layer {layer} {step}");
                let mut shifted = vec!["input_layernorm"];
                if lora {
                    shifted.push("self_attn.q_a_layernorm");
                }
                let kinds: BTreeSet<&str> = if step == "family recipe" {
                    ["norm-linear"].into()
                } else {
                    // Every static consumer takes the shift; a MoE layer's float router has no
                    // bias for it, so its norm is only scaled.
                    shifted.push("self_attn.kv_a_layernorm");
                    if !moe {
                        shifted.push("post_attention_layernorm");
                    }
                    ["norm-linear", "up-down"].into()
                };
                shifted.sort();
                assert_eq!(folded.kinds, kinds, "{what}: subgraphs folded");
                assert_eq!(folded.shifted.iter().map(|s| s.as_str()).collect::<Vec<_>>(), shifted, "{what}: shifted");
                assert!(folded.scale_spread > 4.0, "{what}: scales spread only {}", folded.scale_spread);
                assert!(folded.f32_err <= 1e-4, "{what}: the smoothed layer's output moved by {}", folded.f32_err);
                let bound = if moe { 2e-3 } else { 1e-4 };
                assert!(folded.stored_err <= bound, "{what}: stored in bf16 it moved by {}", folded.stored_err);
                report.push(format!("{what}: f32 {:.1e}, bf16-stored {:.1e}", folded.f32_err, folded.stored_err));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
}
