//! The two ways calibration computes a layer's linears: observing their inputs on the float
//! weights ([`Observe`]), and running them as the quantized model will ([`Simulate`]).

use crate::device::Device;
use crate::model::decoder::InputGroups;
use crate::model::nn::{Linear, LinearHook};
pub use crate::quant::act_sim::ActSim;
use crate::quant::kv_cache::{KvCacheQuant, KvCacheStats};
use crate::quant::observer::{ChannelStats, Hessian, Histogram};
use ndarray::{Array2, ArrayView2};
use std::collections::{BTreeMap, BTreeSet};

/// Collects statistics of every linear's input, once per distinct input (q/k/v share one).
#[derive(Default)]
pub struct Observe<'a> {
    /// Which linears read the same input (observed once, under the group's name).
    pub groups: InputGroups,
    pub stats: BTreeMap<String, ChannelStats>,
    /// Inputs whose Hessian GPTQ needs.
    pub hessian_groups: BTreeSet<String>,
    pub hessians: BTreeMap<String, Hessian>,
    /// When set, only these histograms are filled (the second pass, on the smoothed layer).
    pub histograms: Option<BTreeMap<String, Histogram>>,
    /// Linears already quantized, computed as the quantized model will (GPTQ's true-sequential
    /// passes); the others compute in float.
    pub through: Option<&'a Simulate>,
    /// The input groups in the order the forward first reached them.
    pub order: Vec<String>,
    /// When set, the pass needs nothing after these input groups: once the current sequence has
    /// reached all of them, the remaining linears return zeros instead of being computed and the
    /// forward may skip the rest of its work ([`LinearHook::finished`]). GPTQ's true-sequential
    /// passes, which only gather one stage's Hessians.
    pub stop_after: Option<BTreeSet<String>>,
    seen: BTreeSet<String>,
}

impl<'a> Observe<'a> {
    /// An observer of the linears' inputs, grouped as `groups` says.
    pub fn new(groups: InputGroups) -> Observe<'static> {
        Observe { groups, ..Observe::default() }
    }

    /// Call between sequences: each input is observed once per sequence.
    pub fn next_sequence(&mut self) {
        self.seen.clear();
    }

    /// A fresh observer set up as this one (the same groups, Hessians, histogram grids, quantized
    /// linears and stopping point) with nothing observed yet: one per calibration sample, so that
    /// samples run side by side, each merged back with [`Observe::merge`] in sample order.
    pub fn fork(&self) -> Observe<'a> {
        Observe {
            groups: self.groups.clone(),
            stats: BTreeMap::new(),
            hessian_groups: self.hessian_groups.clone(),
            hessians: BTreeMap::new(),
            histograms: self.histograms.as_ref().map(|hs| hs.iter().map(|(g, h)| (g.clone(), h.emptied())).collect()),
            through: self.through,
            order: Vec::new(),
            stop_after: self.stop_after.clone(),
            seen: BTreeSet::new(),
        }
    }

    /// Bytes of the Hessians this observer holds: what each fork of it allocates again as it
    /// observes the same linears.
    pub fn hessian_bytes(&self) -> u64 {
        self.hessians.values().map(|h| (h.channels() as u64).pow(2) * 4).sum()
    }

    /// Adds what `other` (a [`Observe::fork`] of this one) observed, as if this observer had seen
    /// its sequences after its own: statistics and Hessians merge exactly (up to the order of float
    /// additions), histograms on the same grid add their counts, and the groups `other` reached
    /// first are appended to the order.
    pub fn merge(&mut self, other: Observe<'a>) {
        for (g, st) in other.stats {
            match self.stats.get_mut(&g) {
                Some(mine) => mine.merge(&st),
                None => drop(self.stats.insert(g, st)),
            }
        }
        for (g, h) in other.hessians {
            match self.hessians.get_mut(&g) {
                Some(mine) => mine.merge(&h),
                None => drop(self.hessians.insert(g, h)),
            }
        }
        if let (Some(mine), Some(theirs)) = (&mut self.histograms, other.histograms) {
            for (g, h) in theirs {
                match mine.get_mut(&g) {
                    Some(m) => m.merge(&h),
                    None => drop(mine.insert(g, h)),
                }
            }
        }
        for g in other.order {
            if !self.order.contains(&g) {
                self.order.push(g);
            }
        }
    }
}

impl LinearHook for Observe<'_> {
    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        // Past the groups a stopping pass gathers, inputs mean nothing: neither observed nor computed.
        if self.finished() {
            return Array2::zeros((x.nrows(), layer.out_features()));
        }
        let group = self.groups.of(name);
        if self.seen.insert(group.clone()) {
            if !self.order.contains(&group) {
                self.order.push(group.clone());
            }
            match &mut self.histograms {
                Some(hs) => {
                    if let Some(h) = hs.get_mut(&group) {
                        h.update(x);
                    }
                }
                None => {
                    self.stats.entry(group.clone()).or_insert_with(|| ChannelStats::new(x.ncols())).update(x);
                    if self.hessian_groups.contains(&group) {
                        self.hessians.entry(group).or_insert_with(|| Hessian::new(x.ncols())).update(device, x);
                    }
                }
            }
        }
        if self.finished() {
            return Array2::zeros((x.nrows(), layer.out_features()));
        }
        match self.through.and_then(|s| s.linears.get(name)) {
            Some(q) => q.forward(device, x),
            None => layer.forward(device, x),
        }
    }

    /// Observing needs no expert outputs (nothing after a layer's experts reads them), and experts
    /// streamed in groups ([`super::experts`]) need no statistics.
    fn defer_experts(&mut self, _module: &str, _x: ArrayView2<f32>, _routes: &[Vec<(usize, f32)>]) -> bool {
        true
    }

    fn finished(&self) -> bool {
        self.stop_after.as_ref().is_some_and(|groups| groups.iter().all(|g| self.seen.contains(g)))
    }
}

/// A linear as the quantized model computes it: dequantized weights and simulated activations.
#[derive(Debug, Clone)]
pub struct SimLinear {
    pub linear: Linear,
    pub act: ActSim,
}

impl SimLinear {
    /// The linear as the quantized kernel computes it.
    pub fn forward(&self, device: &dyn Device, x: ArrayView2<f32>) -> Array2<f32> {
        let xq = self.act.apply(x);
        self.linear.forward(device, xq.view())
    }
}

/// Runs the named linears as quantized, the others in float, and the KV caches as C8 stores them.
#[derive(Default)]
pub struct Simulate {
    pub linears: BTreeMap<String, SimLinear>,
    /// The C8 quantizers of attention modules (`self_attn`): what they cache is rounded to its int8 grid.
    pub kv: BTreeMap<String, KvCacheQuant>,
    /// When set, the per-channel ranges of what each attention module caches (before any rounding) are
    /// gathered here: calibration of the KV cache.
    pub kv_stats: Option<BTreeMap<String, KvCacheStats>>,
}

impl LinearHook for Simulate {
    fn kv_cache(&mut self, module: &str, k: &mut Array2<f32>, v: &mut Array2<f32>) {
        if let Some(stats) = &mut self.kv_stats {
            stats.entry(module.to_string()).or_insert_with(|| KvCacheStats::new(k.ncols(), v.ncols())).update(k, v);
        }
        (&*self).kv_cache(module, k, v);
    }

    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        (&*self).linear(device, name, layer, x)
    }
}

/// The quantized model's computation shared by samples running side by side: as [`Simulate`],
/// without gathering KV-cache ranges (which needs the one hook of its own).
impl LinearHook for &Simulate {
    fn kv_cache(&mut self, module: &str, k: &mut Array2<f32>, v: &mut Array2<f32>) {
        if let Some(q) = self.kv.get(module) {
            q.apply(k, v);
        }
    }

    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        match self.linears.get(name) {
            Some(s) => s.forward(device, x),
            None => layer.forward(device, x),
        }
    }
}

/// The weight the quantized kernel computes with, `(q − offset) · scale` per row and group (the
/// offset is zero for symmetric weights), as a float matrix.
pub fn dequantize_weight(w: &crate::quant::QuantizedWeight) -> Array2<f32> {
    Array2::from_shape_vec((w.rows, w.cols), w.dequantize()).expect("a quantized weight is rows × cols")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::quant::act_range;
    use ndarray::array;

    #[test]
    fn asymmetric_weights_are_simulated_with_their_zero_points() {
        // Every value of a row that is all positive sits far from zero: without the zero point the
        // simulated weight would be off by `offset · scale` (several steps).
        let rows = [[0.5f32, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2], [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]];
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let mut spec = crate::quant::QuantSpec::preset("w4a16").unwrap();
        spec.weight_symmetric = false;
        spec.group_size = Some(4);
        let qw = crate::quant::rtn::quantize(&flat, 2, 8, &spec);
        let offset = qw.offset.as_ref().expect("asymmetric weights carry zero points");
        assert!(offset.iter().any(|&z| z != 0.0));
        let d = dequantize_weight(&qw);
        for r in 0..2 {
            for c in 0..8 {
                let k = r * 2 + c / 4;
                assert_eq!(d[[r, c]], (qw.q[r * 8 + c] as f32 - offset[k]) * qw.scale[k]);
                // Round to nearest on a grid that covers the group: within half a step.
                assert!((d[[r, c]] - rows[r][c]).abs() <= qw.scale[k] / 2.0 + 1e-6, "({r}, {c})");
            }
        }
    }

    #[test]
    fn shared_inputs_are_observed_once_per_sequence() {
        let l = Linear { weight: array![[1.0f32, 0.0], [0.0, 1.0]], bias: None };
        let x = array![[1.0f32, -2.0], [3.0, 0.5]];
        let mut o = Observe::default();
        o.hessian_groups.insert("self_attn.q_proj".into());
        for name in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] {
            o.linear(&Cpu, name, &l, x.view());
        }
        o.next_sequence();
        o.linear(&Cpu, "self_attn.k_proj", &l, x.view());
        let s = &o.stats["self_attn.q_proj"];
        assert_eq!(s.tensor_range(), Some((-2.0, 3.0)));
        assert_eq!(o.hessians["self_attn.q_proj"].tokens(), 4);
        assert_eq!(o.stats.len(), 1);
    }

    /// Samples observed side by side, each by a fork merged back in sample order, give what one
    /// observer of all of them gives: the same ranges, histogram counts and order, and the Hessian
    /// of every token (its sums regrouped, so equal to rounding).
    #[test]
    fn forked_observers_merge_to_the_observer_of_every_sample() {
        let l = Linear { weight: array![[1.0f32, 0.5, -1.0], [0.25, 2.0, 1.0], [-0.5, 1.0, 0.0]], bias: None };
        let mut state = 5u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let samples: Vec<Array2<f32>> =
            (0..4).map(|k| Array2::from_shape_fn((7 + k, 3), |_| next() * (1.0 + k as f32))).collect();
        let setup = || {
            let mut o = Observe::new(InputGroups::default());
            o.hessian_groups.insert("a".into());
            o
        };
        let run = |o: &mut Observe, x: &Array2<f32>| {
            let y = o.linear(&Cpu, "a", &l, x.view());
            o.linear(&Cpu, "b", &l, y.view());
        };
        let mut one = setup();
        for x in &samples {
            one.next_sequence();
            run(&mut one, x);
        }
        let mut merged = setup();
        let template = merged.fork();
        for x in &samples {
            let mut f = template.fork();
            run(&mut f, x);
            merged.merge(f);
        }
        assert_eq!(merged.order, one.order);
        assert_eq!(merged.stats, one.stats);
        let (h1, h2) = (one.hessians["a"].matrix(), merged.hessians["a"].matrix());
        assert_eq!(merged.hessians["a"].tokens(), one.hessians["a"].tokens());
        for (a, b) in h1.iter().zip(&h2) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
        // Histograms on the grid the first pass fixed: counts add exactly.
        let (lo, hi) = one.stats["b"].tensor_range().unwrap();
        let hist = || BTreeMap::from([("b".to_string(), Histogram::with_range(lo, hi, 64))]);
        let (mut one, mut merged) = (setup(), setup());
        one.histograms = Some(hist());
        merged.histograms = Some(hist());
        let template = merged.fork();
        for x in &samples {
            one.next_sequence();
            run(&mut one, x);
            let mut f = template.fork();
            run(&mut f, x);
            merged.merge(f);
        }
        assert_eq!(merged.histograms, one.histograms);
        assert_eq!(one.histograms.unwrap()["b"].total(), samples.iter().map(|x| x.len() as u64).sum::<u64>());
    }

    #[test]
    fn a_pass_stops_computing_once_its_groups_are_observed() {
        let l = Linear { weight: array![[1.0f32, 2.0], [3.0, 4.0]], bias: None };
        let x = array![[1.0f32, -2.0], [3.0, 0.5]];
        let mut o = Observe::new(InputGroups::default());
        o.hessian_groups.insert("mlp.gate_proj".into());
        o.stop_after = Some(BTreeSet::from(["self_attn.o_proj".to_string(), "mlp.gate_proj".to_string()]));
        // Before every group is reached, linears compute; the one completing the set need not.
        assert_eq!(o.linear(&Cpu, "self_attn.o_proj", &l, x.view()), l.forward(&Cpu, x.view()));
        assert!(!o.finished());
        assert_eq!(o.linear(&Cpu, "mlp.gate_proj", &l, x.view()), Array2::<f32>::zeros((2, 2)));
        assert!(o.finished());
        assert_eq!(o.linear(&Cpu, "mlp.down_proj", &l, x.view()), Array2::<f32>::zeros((2, 2)));
        // What it gathers is still gathered; a new sequence starts over.
        assert_eq!(o.hessians["mlp.gate_proj"].tokens(), 2);
        assert!(!o.stats.contains_key("mlp.down_proj"));
        o.next_sequence();
        assert!(!o.finished());
        assert_eq!(o.linear(&Cpu, "self_attn.o_proj", &l, x.view()), l.forward(&Cpu, x.view()));
    }

    #[test]
    fn per_token_simulation_rounds_each_row_to_its_own_grid() {
        let x = array![[127.0f32, 1.4, -0.6], [0.0, 0.0, 0.0]];
        let y = ActSim::PerToken { bits: 8 }.apply(x.view());
        assert_eq!(y, array![[127.0, 1.0, -1.0], [0.0, 0.0, 0.0]]);
        // int4: the row's absmax 7 is 7 steps of 1.
        let y = ActSim::PerToken { bits: 4 }.apply(array![[7.0f32, 1.4, -0.6, 3.5]].view());
        assert_eq!(y, array![[7.0, 1.0, -1.0, 4.0]]);
        let r = act_range::minmax_range(-1.0, 1.0, false);
        let y = ActSim::Static(r).apply(array![[0.5f32, 7.0]].view());
        assert!((y[[0, 0]] - 0.5).abs() <= r.scale / 2.0 + 1e-6);
        assert!(y[[0, 1]] <= 1.0 + r.scale);
    }
}
