//! Parity of the vision forward with the fixtures' transformers activations (fp32 on the
//! bf16-rounded weights): every block's `.in → .out`, `pixel_values →` the first block's `.in`,
//! the last block's `.out → visual.out` (and `visual.deepstack.K`), the whole tower end to end,
//! `get_rope_index`, the splice into `lm.inputs_embeds`, and the deepstack addition between text
//! layers. The metric is `max|ours - ref| / max|ref|`.

use super::mrope::RopeIndex;
use super::splice::{add_deepstack, splice_image_embeds, ImageSlots};
use super::{load_unit, VisionInput, VisionTower};
use crate::device::Cpu;
use crate::device::Device;
use crate::io::checkpoint::Checkpoint;
use crate::io::safetensors::load_all;
use crate::model::layout::UnitKind;
use crate::model::nn::{Linear, LinearHook, Plain};
use crate::model::{build_units, Model, Unit};
use crate::tensor::{Tensor, TensorMeta};
use ndarray::{Array2, ArrayView2, Axis};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const TOLERANCE: f32 = 1e-4;

fn relative_error(ours: ArrayView2<f32>, reference: ArrayView2<f32>) -> f32 {
    assert_eq!(ours.dim(), reference.dim(), "shapes differ");
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours.iter().zip(reference.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    err / scale
}

struct Fixture {
    name: String,
    ckpt: Checkpoint,
    model: Model,
    units: Vec<Unit>,
    reference: BTreeMap<String, Tensor>,
}

impl Fixture {
    fn open(name: &str) -> Fixture {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")).join(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, None, &names).unwrap();
        let inventory: Vec<TensorMeta> = ckpt.names().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory).unwrap();
        let reference = load_all(&dir.join("reference.safetensors")).unwrap();
        Fixture { name: name.to_string(), ckpt, model, units, reference }
    }

    fn has(&self, key: &str) -> bool {
        self.reference.contains_key(key)
    }

    /// A reference activation as `[rows, last dim]`.
    fn matrix(&self, key: &str) -> Array2<f32> {
        let t = self.reference.get(key).unwrap_or_else(|| panic!("{}: reference has no {key}", self.name));
        let cols = *t.shape.last().unwrap();
        Array2::from_shape_vec((t.numel() / cols, cols), t.to_f32().unwrap()).unwrap()
    }

    fn ids(&self, key: &str) -> Vec<i64> {
        self.reference[key].to_i64().unwrap()
    }

    fn weights(&self, kind: UnitKind) -> crate::model::weights::Weights {
        let unit = self.units.iter().find(|u| u.kind == kind).unwrap_or_else(|| panic!("no unit {kind:?}"));
        load_unit(&self.ckpt, &self.model.layout, unit).unwrap()
    }

    fn input(&self) -> VisionInput {
        VisionInput::from_tensors(&self.reference["pixel_values"], self.reference.get("image_grid_thw")).unwrap()
    }

    /// The linear modules of a unit, by the names the hook should see.
    fn linears(&self, kind: UnitKind) -> BTreeSet<String> {
        let prefix = self.model.layout.unit_prefix(kind);
        let unit = self.units.iter().find(|u| u.kind == kind);
        unit.into_iter()
            .flat_map(|u| u.tensors.iter())
            .filter_map(|t| t.linear_module())
            .map(|m| m.strip_prefix(prefix.as_str()).unwrap_or(m).to_string())
            .collect()
    }

    fn check(&self, what: &str, ours: ArrayView2<f32>, reference: ArrayView2<f32>) {
        let e = relative_error(ours, reference);
        println!("{:>20}  {what:<48} {e:.2e}", self.name);
        assert!(e <= TOLERANCE, "{}: {what}: relative error {e:.3e} > {TOLERANCE:e}", self.name);
    }
}

/// A float forward that notes the name of every linear it computes.
#[derive(Default)]
struct Recorder(BTreeSet<String>);

impl LinearHook for Recorder {
    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        self.0.insert(name.to_string());
        layer.forward(device, x)
    }
}

/// Runs every parity check of one VL fixture.
pub(crate) fn check_tower(name: &str) {
    let f = Fixture::open(name);
    let tower = VisionTower::from_model(&f.model).unwrap();
    let layout = &f.model.layout;
    let dev = &Cpu;
    let input = f.input();

    // pixel_values → the first block's input.
    let mut state = tower.embed(dev, &f.weights(UnitKind::VisionPre), &input).unwrap();
    let block_key = |i: usize| layout.vision_block(i).unwrap();
    f.check("pixel_values -> block 0 .in", state.hidden.view(), f.matrix(&format!("{}.in", block_key(0))).view());

    // Each block alone, from the reference's input.
    for i in 0..tower.depth() {
        state.hidden = f.matrix(&format!("{}.in", block_key(i)));
        let mut seen = Recorder::default();
        tower.block(dev, i, &f.weights(UnitKind::VisionBlock(i)), &mut state, &mut seen).unwrap();
        assert_eq!(
            seen.0,
            f.linears(UnitKind::VisionBlock(i)),
            "{name}: block {i} computes each linear through the hook"
        );
        let reference = f.matrix(&format!("{}.out", block_key(i)));
        f.check(&format!("block {i} .in -> .out"), state.hidden.view(), reference.view());
    }

    // The mergers / projector alone, from the reference's block outputs.
    state.hidden = f.matrix(&format!("{}.out", block_key(tower.depth() - 1)));
    for (index, kept) in state.kept.iter_mut() {
        *kept = if *index == 0 {
            f.matrix(&format!("{}.in", block_key(0)))
        } else {
            f.matrix(&format!("{}.out", block_key(*index - 1)))
        };
    }
    let post = f.weights(UnitKind::VisionPost);
    let mut seen = Recorder::default();
    let out = tower.finish(dev, &post, state, &mut seen).unwrap();
    assert_eq!(seen.0, f.linears(UnitKind::VisionPost), "{name}: the post unit computes each linear through the hook");
    if f.has("visual.out") {
        f.check("last block .out -> visual.out", out.embeds.view(), f.matrix("visual.out").view());
    }
    for (k, d) in out.deepstack.iter().enumerate() {
        f.check(
            &format!("block outputs -> visual.deepstack.{k}"),
            d.view(),
            f.matrix(&format!("visual.deepstack.{k}")).view(),
        );
    }

    // The whole tower, unit by unit, from pixel_values.
    let out = tower.forward(dev, &f.ckpt, layout, &f.units, &input, &mut Plain).unwrap();
    if f.has("visual.out") {
        f.check("end to end: visual.out", out.embeds.view(), f.matrix("visual.out").view());
    }
    let ds_keys: Vec<String> = (0..).map(|k| format!("visual.deepstack.{k}")).take_while(|k| f.has(k)).collect();
    assert_eq!(out.deepstack.len(), ds_keys.len(), "{name}: deepstack outputs");
    for (d, key) in out.deepstack.iter().zip(&ds_keys) {
        f.check(&format!("end to end: {key}"), d.view(), f.matrix(key).view());
    }

    // M-RoPE position ids, exactly.
    let input_ids = f.ids("input_ids");
    if f.has("lm.position_ids") {
        let rope = RopeIndex::from_model(&f.model).unwrap();
        let (ids, _) = rope.get_rope_index(&input_ids, &input.image_grid_thw, &[], &[]).unwrap();
        let reference = f.ids("lm.position_ids");
        assert_eq!(ids.iter().copied().collect::<Vec<_>>(), reference, "{name}: lm.position_ids");
        println!("{:>20}  get_rope_index == lm.position_ids {:?}", f.name, ids.dim());
    }

    // Token embeddings with the (end-to-end) image embeddings spliced in.
    let (shape, table) = f.ckpt.read_f32(&layout.embed_tokens()).unwrap();
    let table = Array2::from_shape_vec((shape[0], shape[1]), table).unwrap();
    let rows: Vec<usize> = input_ids.iter().map(|&t| t as usize).collect();
    let mut embeds = table.select(Axis(0), &rows);
    let slots = ImageSlots::of(&f.model.config).unwrap();
    let positions = splice_image_embeds(&mut embeds, &input_ids, slots, out.embeds.view()).unwrap();
    f.check("embed_tokens + visual.out -> lm.inputs_embeds", embeds.view(), f.matrix("lm.inputs_embeds").view());

    // DeepStack between text layers: layer k's output plus deepstack k is layer k+1's input.
    for k in 0..out.deepstack.len() {
        let (after, next) = (format!("{}.out", layout.text_layer(k)), format!("{}.in", layout.text_layer(k + 1)));
        if f.has(&after) && f.has(&next) {
            let mut hidden = f.matrix(&after);
            add_deepstack(&mut hidden, &positions, k, &out.deepstack).unwrap();
            f.check(
                &format!("text layer {k} .out + deepstack.{k} -> layer {} .in", k + 1),
                hidden.view(),
                f.matrix(&next).view(),
            );
        }
    }
}

/// Images do not see each other: a batch of two images of different shapes gives what each gives
/// alone (per-image attention spans, windows, position embeddings and rotary tables).
pub(crate) fn check_images_are_independent(name: &str, sizes: &[[usize; 3]]) {
    let f = Fixture::open(name);
    let tower = VisionTower::from_model(&f.model).unwrap();
    let reference = f.input();
    let pseudo_random = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0).collect()
    };
    let single = |size: [usize; 3], seed: usize| -> VisionInput {
        if reference.image_grid_thw.is_empty() {
            // CLIP: [1, C, H, W] of the size the tower was built for.
            let shape = reference.pixel_values.shape().to_vec();
            let data = pseudo_random(shape.iter().product(), seed);
            VisionInput { pixel_values: ndarray::ArrayD::from_shape_vec(shape, data).unwrap(), image_grid_thw: vec![] }
        } else {
            let cols = reference.pixel_values.shape()[1];
            let rows = size.iter().product::<usize>();
            let pv = ndarray::ArrayD::from_shape_vec(vec![rows, cols], pseudo_random(rows * cols, seed)).unwrap();
            VisionInput { pixel_values: pv, image_grid_thw: vec![size] }
        }
    };
    let run = |input: &VisionInput| tower.forward(&Cpu, &f.ckpt, &f.model.layout, &f.units, input, &mut Plain).unwrap();
    let inputs: Vec<VisionInput> = sizes.iter().enumerate().map(|(i, &s)| single(s, i + 1)).collect();
    let views: Vec<_> = inputs.iter().map(|i| i.pixel_values.view()).collect();
    let batch = VisionInput {
        pixel_values: ndarray::concatenate(Axis(0), &views).unwrap(),
        image_grid_thw: inputs.iter().flat_map(|i| i.image_grid_thw.clone()).collect(),
    };
    let together = run(&batch);
    let alone: Vec<_> = inputs.iter().map(run).collect();
    let cat = |parts: Vec<&Array2<f32>>| {
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        ndarray::concatenate(Axis(0), &views).unwrap()
    };
    let expected = cat(alone.iter().map(|o| &o.embeds).collect());
    f.check(&format!("images {sizes:?} together vs alone"), together.embeds.view(), expected.view());
    for k in 0..together.deepstack.len() {
        let expected = cat(alone.iter().map(|o| &o.deepstack[k]).collect());
        f.check(&format!("deepstack.{k} together vs alone"), together.deepstack[k].view(), expected.view());
    }
}
