//! Rotary position embeddings of the text decoders, as transformers computes them:
//!
//! - default RoPE (`rope_theta`, `head_dim`, `partial_rotary_factor`), with `rotate_half` (the
//!   first and second halves of the rotated dims form the pairs);
//! - Qwen2-VL / Qwen2.5-VL M-RoPE: each frequency takes its angle from the temporal, height or
//!   width position id, the frequencies split into consecutive `mrope_section` blocks (t, h, w);
//! - Qwen3-VL interleaved M-RoPE (`mrope_interleaved`): frequencies cycle t, h, w, t, h, w, ...
//!   while each axis has sections left, the rest use t;
//! - GLM-4's rotation of adjacent pairs (`x[2i]`, `x[2i+1]`; vLLM's `is_neox_style=False`), chosen
//!   by the architecture with [`Rope::with_adjacent_pairs`];
//! - YaRN (`rope_type: yarn`, DeepSeek-V2/V3 and long-context releases): each frequency blends its
//!   original value and the value `factor` times slower, by a linear ramp between the dims that turn
//!   `beta_fast` and `beta_slow` times over `original_max_position_embeddings` (transformers'
//!   `_compute_yarn_parameters`), and cos/sin are multiplied by the attention factor (DeepSeek's
//!   MLA turns adjacent pairs, as GLM-4 does; its softmax mscale is the attention's business);
//! - HunYuan's NTK-alpha base (`rope_scaling: {type: dynamic, alpha}`): the base becomes
//!   `theta · alpha^(d / (d − 2))` for every length up to `max_position_embeddings`.
//!
//! A [`Rope`] is built once from the config; [`Rope::angles`] turns a sequence's positions into the
//! cos/sin tables every layer of that sequence shares.

use super::config::{RopeConfig, RopeScaling, YarnConfig};
use anyhow::{bail, ensure, Context, Result};
use ndarray::Array2;

/// Position ids of one sequence: one row (text) or three rows (M-RoPE temporal, height, width).
#[derive(Debug, Clone, PartialEq)]
pub struct Positions {
    /// `[1, seq]` or `[3, seq]`.
    ids: Array2<i64>,
}

impl Positions {
    /// `0, 1, …, seq-1`: text-only input. For an M-RoPE model all three axes use these ids.
    pub fn sequential(seq: usize) -> Positions {
        Positions { ids: Array2::from_shape_fn((1, seq), |(_, t)| t as i64) }
    }

    /// Explicit ids, `[1, seq]` or `[3, seq]` (Qwen VL `get_rope_index`, the fixtures' `lm.position_ids`).
    pub fn from_ids(ids: Array2<i64>) -> Result<Positions> {
        ensure!(
            ids.nrows() == 1 || ids.nrows() == 3,
            "position ids have {} rows; expected 1 or 3 (M-RoPE)",
            ids.nrows()
        );
        Ok(Positions { ids })
    }

    pub fn len(&self) -> usize {
        self.ids.ncols()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ids(&self) -> &Array2<i64> {
        &self.ids
    }

    /// The id of token `t` on `axis`; a single row serves every axis.
    fn id(&self, axis: usize, t: usize) -> i64 {
        self.ids[[if self.ids.nrows() == 1 { 0 } else { axis }, t]]
    }
}

/// The rotary frequencies of a model and which position axis drives each of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    head_dim: usize,
    /// The rotated dims (`head_dim · partial_rotary_factor`) and the unscaled base.
    rotary_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// `rotary_dim / 2` inverse frequencies (`theta^(-2i/rotary_dim)`), rounded to f32 as transformers stores them.
    inv_freq: Vec<f32>,
    /// For each frequency: 0 (temporal / text), 1 (height) or 2 (width).
    axis: Vec<usize>,
    /// Whether the model reads three position axes.
    multimodal: bool,
    pairs: Pairs,
    /// YaRN's factor on cos and sin (1 otherwise).
    attention_factor: f32,
}

/// Which dims of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairs {
    /// `x[i]` with `x[i + rotary_dim/2]` (`rotate_half`; Llama, Qwen, most families).
    Halves,
    /// `x[2i]` with `x[2i + 1]` (GLM-4).
    Adjacent,
}

impl Rope {
    /// Refuses the rope types lamina does not implement (llama3, linear, dynamic with neither a
    /// factor nor an alpha, ...).
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Result<Rope> {
        let alpha = cfg.alpha.filter(|_| cfg.kind == "dynamic");
        let growing = matches!(cfg.scaling, RopeScaling::DynamicNtk { .. }) && cfg.kind == "dynamic";
        if !matches!(cfg.kind.as_str(), "default" | "mrope" | "yarn") && alpha.is_none() && !growing {
            bail!(
                "config.json asks for rope type {:?}, which lamina's forward does not implement \
                 (supported: default RoPE, YaRN, the Qwen VL M-RoPE, dynamic NTK with a factor and \
                 HunYuan's NTK-alpha); data-free quantization does not need it",
                cfg.kind
            );
        }
        if let RopeScaling::DynamicNtk { factor, max_positions } = cfg.scaling {
            ensure!(
                factor.is_finite() && factor >= 1.0 && max_positions > 0,
                "the dynamic rope scaling needs a factor >= 1 and max_position_embeddings > 0 (got {factor} and {max_positions})"
            );
        }
        let rotary_dim = (head_dim as f64 * cfg.partial_rotary_factor) as usize;
        ensure!(
            rotary_dim >= 2 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
            "partial_rotary_factor {} of head_dim {head_dim} gives {rotary_dim} rotated dims; expected an even number in 2..={head_dim}",
            cfg.partial_rotary_factor
        );
        ensure!(cfg.theta > 0.0 && cfg.theta.is_finite(), "rope_theta is {}, expected a positive number", cfg.theta);
        let half = rotary_dim / 2;
        let theta = match alpha {
            Some(a) => {
                ensure!(
                    a > 0.0 && a.is_finite() && head_dim > 2,
                    "rope_scaling alpha is {a}, expected a positive number"
                );
                cfg.theta * a.powf(head_dim as f64 / (head_dim - 2) as f64)
            }
            None => cfg.theta,
        };
        let mut inv_freq = inverse_frequencies(theta, rotary_dim);
        let mut attention_factor = 1.0;
        if cfg.kind == "yarn" {
            let y = cfg.yarn.as_ref().context("config.json: rope type yarn without its settings")?;
            ensure!(y.factor > 0.0 && y.factor.is_finite(), "yarn factor is {}, expected a positive number", y.factor);
            inv_freq = yarn_inv_freq(y, theta, rotary_dim);
            attention_factor = y.attention_factor() as f32;
        }
        let (axis, multimodal) = match &cfg.mrope_section {
            None => (vec![0; half], false),
            Some(sections) if cfg.mrope_interleaved => (interleaved_axes(sections, half)?, true),
            Some(sections) => (sectioned_axes(sections, half)?, true),
        };
        Ok(Rope {
            head_dim,
            rotary_dim,
            theta,
            scaling: cfg.scaling,
            inv_freq,
            axis,
            multimodal,
            pairs: Pairs::Halves,
            attention_factor,
        })
    }

    /// The same frequencies, rotating adjacent pairs (GLM-4, DeepSeek's MLA) instead of halves.
    pub fn with_adjacent_pairs(mut self) -> Rope {
        self.pairs = Pairs::Adjacent;
        self
    }

    /// The base of a sequence of `tokens` tokens whose largest position id is `max_position`:
    /// the configured one, or the dynamic NTK scalings' larger one beyond the trained length.
    fn base_for(&self, tokens: usize, max_position: i64) -> f64 {
        let dim = self.rotary_dim as f64;
        match self.scaling {
            RopeScaling::None => self.theta,
            RopeScaling::DynamicNtk { factor, max_positions } => {
                let len = (max_position + 1).max(0) as f64;
                if len > max_positions as f64 {
                    self.theta * (factor * len / max_positions as f64 - (factor - 1.0)).powf(dim / (dim - 2.0))
                } else {
                    self.theta
                }
            }
            RopeScaling::QwenNtk { seq_length } => {
                let context = (tokens as f64 / seq_length as f64).log2() + 1.0;
                let alpha = (2f64.powf(context.ceil()) - 1.0).max(1.0);
                self.theta * alpha.powf(dim / (dim - 2.0))
            }
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn is_multimodal(&self) -> bool {
        self.multimodal
    }

    /// The cos/sin tables of one sequence.
    pub fn angles(&self, pos: &Positions) -> Result<RopeAngles> {
        if pos.ids.nrows() == 3 && !self.multimodal {
            bail!("three rows of position ids (M-RoPE) were given to a model without mrope_section in its config");
        }
        let (seq, half) = (pos.len(), self.inv_freq.len());
        let base = self.base_for(seq, pos.ids.iter().copied().max().unwrap_or(0));
        let scaled;
        let inv_freq = if base == self.theta {
            &self.inv_freq
        } else {
            scaled = inverse_frequencies(base, self.rotary_dim);
            &scaled
        };
        let mut cos = Array2::zeros((seq, half));
        let mut sin = Array2::zeros((seq, half));
        for t in 0..seq {
            for j in 0..half {
                // transformers multiplies in f32 (`inv_freq @ position_ids`), then takes cos and sin.
                let angle = pos.id(self.axis[j], t) as f32 * inv_freq[j];
                cos[[t, j]] = (angle as f64).cos() as f32 * self.attention_factor;
                sin[[t, j]] = (angle as f64).sin() as f32 * self.attention_factor;
            }
        }
        Ok(RopeAngles { cos, sin, head_dim: self.head_dim, pairs: self.pairs })
    }
}

/// `base^(-2i / rotary_dim)` for `i < rotary_dim / 2`, rounded to f32 as transformers stores them.
fn inverse_frequencies(base: f64, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / rotary_dim as f64)) as f32).collect()
}

/// YaRN's inverse frequencies: `interpolated · ramp + original · (1 − ramp)`, where the original
/// frequency of dim pair `i` is `theta^(-2i/dim)`, the interpolated one that divided by `factor`,
/// and the ramp rises linearly from 0 to 1 between the correction dims of `beta_fast` and
/// `beta_slow` rotations (`dim · ln(L / (2π·β)) / (2 ln theta)` for the original context `L`,
/// rounded outward when `truncate`).
fn yarn_inv_freq(y: &YarnConfig, theta: f64, dim: usize) -> Vec<f32> {
    let d = dim as f64;
    let correction = |rot: f64| {
        d * (y.original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction(y.beta_fast), correction(y.beta_slow));
    if y.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    (0..dim / 2)
        .map(|i| {
            let original = 1.0 / theta.powf(2.0 * i as f64 / d);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            (original / y.factor * ramp + original * (1.0 - ramp)) as f32
        })
        .collect()
}

/// Qwen2-VL: `freq.split(mrope_section)`, block `i` takes axis `i % 3`.
fn sectioned_axes(sections: &[usize], half: usize) -> Result<Vec<usize>> {
    ensure!(
        sections.iter().sum::<usize>() == half,
        "mrope_section {sections:?} sums to {}, but the head has {half} rotary frequencies",
        sections.iter().sum::<usize>()
    );
    Ok(sections.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat_n(i % 3, n)).collect())
}

/// Qwen3-VL: frequency `j` takes height if `j % 3 == 1` and `j < 3·sections[1]`, width if
/// `j % 3 == 2` and `j < 3·sections[2]`, and the temporal axis otherwise.
fn interleaved_axes(sections: &[usize], half: usize) -> Result<Vec<usize>> {
    ensure!(sections.len() == 3, "interleaved mrope_section {sections:?} must have three entries (t, h, w)");
    ensure!(
        sections.iter().sum::<usize>() == half,
        "mrope_section {sections:?} sums to {}, but the head has {half} rotary frequencies",
        sections.iter().sum::<usize>()
    );
    Ok((0..half)
        .map(|j| match j % 3 {
            1 if j < 3 * sections[1] => 1,
            2 if j < 3 * sections[2] => 2,
            _ => 0,
        })
        .collect())
}

/// cos and sin of every token's angles: `[seq, rotary_dim / 2]`.
#[derive(Debug, Clone)]
pub struct RopeAngles {
    cos: Array2<f32>,
    sin: Array2<f32>,
    head_dim: usize,
    pairs: Pairs,
}

impl RopeAngles {
    pub fn len(&self) -> usize {
        self.cos.nrows()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Rotates one head's vector of token `t` in place: each pair `(a, b)` of rotated dims
    /// becomes `(a·cos − b·sin, b·cos + a·sin)` (`x·cos + rotate_half(x)·sin`); dims past the
    /// rotated ones (partial rotary) pass through.
    pub fn rotate(&self, t: usize, x: &mut [f32]) {
        let half = self.cos.ncols();
        let (cos, sin) = (self.cos.row(t), self.sin.row(t));
        let (stride, partner) = match self.pairs {
            Pairs::Halves => (1, half),
            Pairs::Adjacent => (2, 1),
        };
        for j in 0..half {
            let (i, k) = (j * stride, j * stride + partner);
            let (a, b) = (x[i], x[k]);
            x[i] = a * cos[j] - b * sin[j];
            x[k] = b * cos[j] + a * sin[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn cfg(theta: f64, kind: &str, section: Option<Vec<usize>>, interleaved: bool) -> RopeConfig {
        RopeConfig {
            theta,
            kind: kind.into(),
            yarn: None,
            mrope_section: section,
            mrope_interleaved: interleaved,
            partial_rotary_factor: 1.0,
            alpha: None,
            scaling: RopeScaling::None,
        }
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() <= 1e-6
    }

    /// DeepSeek-V3's YaRN (factor 40, β 32/1, original context 4096, rotary dim 64, theta 10000)
    /// against the formula worked by hand: the correction dims are
    /// `64·ln(4096/(2π·β))/(2·ln 10000)` = 10.47 for β = 32 and 22.51 for β = 1, rounded out to 10
    /// and 23, so pairs below 10 keep their frequency, pairs from 23 on are 40 times slower, and pair
    /// 16 is blended with ramp (16 − 10)/13.
    #[test]
    fn yarn_frequencies_and_attention_factor() {
        let y = YarnConfig {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: Some(1.0),
            mscale_all_dim: Some(0.707),
            attention_factor: None,
            truncate: true,
        };
        let mut c = cfg(10000.0, "yarn", None, false);
        c.yarn = Some(y.clone());
        let rope = Rope::new(&c, 64).unwrap();
        let orig = |i: usize| 10000f64.powf(-((2 * i) as f64) / 64.0);
        for i in [0, 5, 9] {
            assert!((rope.inv_freq[i] as f64 - orig(i)).abs() <= 1e-7 * orig(i), "pair {i}");
        }
        for i in [23, 31] {
            assert!((rope.inv_freq[i] as f64 - orig(i) / 40.0).abs() <= 1e-7 * orig(i), "pair {i}");
        }
        let r = 6.0 / 13.0;
        let want = orig(16) / 40.0 * r + orig(16) * (1.0 - r);
        assert!((rope.inv_freq[16] as f64 - want).abs() <= 1e-7 * want);
        // mscale 1 over mscale_all_dim 0.707: (0.1 ln 40 + 1) / (0.0707 ln 40 + 1).
        let m = |k: f64| 0.1 * k * 40f64.ln() + 1.0;
        assert!((y.attention_factor() - m(1.0) / m(0.707)).abs() < 1e-12);
        assert!((y.softmax_mscale() - m(0.707) * m(0.707)).abs() < 1e-12);
        let a = rope.angles(&Positions::sequential(2)).unwrap();
        assert!((a.cos[[0, 0]] as f64 - m(1.0) / m(0.707)).abs() < 1e-6, "cos and sin carry the factor");
    }

    #[test]
    fn default_rope_rotates_halves_by_hand_computed_angles() {
        // head_dim 4, theta 10000: inverse frequencies 1 and 10000^(-1/2) = 0.01.
        let rope = Rope::new(&cfg(10000.0, "default", None, false), 4).unwrap();
        let angles = rope.angles(&Positions::sequential(3)).unwrap();
        let mut x = [1.0f32, 2.0, 3.0, 4.0];
        angles.rotate(2, &mut x);
        // Position 2: angles 2 and 0.02. cos 2 = -0.4161468365, sin 2 = 0.9092974268,
        // cos 0.02 = 0.9998000067, sin 0.02 = 0.0199986667.
        let (c0, s0, c1, s1) = (-0.4161468365, 0.9092974268, 0.9998000067, 0.0199986667);
        let want = [1.0 * c0 - 3.0 * s0, 2.0 * c1 - 4.0 * s1, 3.0 * c0 + 1.0 * s0, 4.0 * c1 + 2.0 * s1];
        for (a, b) in x.iter().zip(want) {
            assert!(close(*a, b), "{x:?} vs {want:?}");
        }
        // Position 0 is the identity.
        let mut y = [1.0f32, 2.0, 3.0, 4.0];
        angles.rotate(0, &mut y);
        assert_eq!(y, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn partial_rotary_leaves_the_tail_alone() {
        let mut c = cfg(100.0, "default", None, false);
        c.partial_rotary_factor = 0.5;
        // head_dim 8, rotary_dim 4: inverse frequencies 1 and 100^(-1/2) = 0.1.
        let rope = Rope::new(&c, 8).unwrap();
        let angles = rope.angles(&Positions::sequential(2)).unwrap();
        let mut x = [1.0f32, 0.0, 0.0, 1.0, 5.0, 6.0, 7.0, 8.0];
        angles.rotate(1, &mut x);
        // angle 1 for pair (0, 2), angle 0.1 for pair (1, 3).
        let want = [0.5403023059, -0.0998334166, 0.8414709848, 0.9950041653, 5.0, 6.0, 7.0, 8.0];
        for (a, b) in x.iter().zip(want) {
            assert!(close(*a, b), "{x:?}");
        }
    }

    #[test]
    fn adjacent_pairs_rotate_neighbours() {
        // GLM-4: head_dim 8 with partial rotary 0.5 gives rotary_dim 4 and the frequencies 1 and
        // 100^(-1/2) = 0.1, on pairs (0, 1) and (2, 3).
        let mut c = cfg(100.0, "default", None, false);
        c.partial_rotary_factor = 0.5;
        let rope = Rope::new(&c, 8).unwrap().with_adjacent_pairs();
        let angles = rope.angles(&Positions::sequential(2)).unwrap();
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        angles.rotate(1, &mut x);
        let (c1, s1, c2, s2) = (1f64.cos(), 1f64.sin(), 0.1f64.cos(), 0.1f64.sin());
        let want = [c1 - 2.0 * s1, 2.0 * c1 + s1, 3.0 * c2 - 4.0 * s2, 4.0 * c2 + 3.0 * s2, 5.0, 6.0, 7.0, 8.0];
        for (a, b) in x.iter().zip(want) {
            assert!(close(*a, b), "{x:?} vs {want:?}");
        }
    }

    #[test]
    fn ntk_alpha_raises_the_base() {
        // HunYuan: base 10000 · 1000^(4/2) = 1e10 for head_dim 4, so the second frequency is 1e-5.
        let mut c = cfg(1e4, "dynamic", None, false);
        c.alpha = Some(1000.0);
        let rope = Rope::new(&c, 4).unwrap();
        assert_eq!(rope.inv_freq, vec![1.0, 1e-5]);
        c.alpha = None;
        assert!(Rope::new(&c, 4).unwrap_err().to_string().contains("dynamic"));
    }

    #[test]
    fn qwen2_vl_sections_are_consecutive_blocks() {
        assert_eq!(sectioned_axes(&[2, 3, 3], 8).unwrap(), [0, 0, 1, 1, 1, 2, 2, 2]);
        let real = sectioned_axes(&[16, 24, 24], 64).unwrap();
        assert_eq!(real.iter().filter(|&&a| a == 0).count(), 16);
        assert_eq!(real[15..17], [0, 1]);
        assert_eq!(real[39..41], [1, 2]);
        assert!(sectioned_axes(&[2, 3, 2], 8).is_err());
    }

    #[test]
    fn qwen3_vl_sections_interleave() {
        // transformers: H at slice(1, 9, 3) = 1, 4, 7; W at slice(2, 9, 3) = 2, 5 (8 is past the end).
        assert_eq!(interleaved_axes(&[2, 3, 3], 8).unwrap(), [0, 1, 2, 0, 1, 2, 0, 1]);
        // The released Qwen3-VL: [24, 20, 20] over 64 frequencies.
        let real = interleaved_axes(&[24, 20, 20], 64).unwrap();
        let count = |a| real.iter().filter(|&&x| x == a).count();
        assert_eq!((count(0), count(1), count(2)), (24, 20, 20));
        assert_eq!(real[57..64], [0, 1, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn mrope_angles_follow_their_axis() {
        // head_dim 6: three frequencies 1, 10^(-1/3), 10^(-2/3); sections [1, 1, 1] put t, h, w on them.
        let rope = Rope::new(&cfg(10.0, "mrope", Some(vec![1, 1, 1]), false), 6).unwrap();
        let pos = Positions::from_ids(array![[5], [7], [9]]).unwrap();
        let a = rope.angles(&pos).unwrap();
        let want = [5.0, 7.0 * 10f64.powf(-1.0 / 3.0), 9.0 * 10f64.powf(-2.0 / 3.0)];
        for (j, angle) in want.iter().enumerate() {
            assert!((a.cos[[0, j]] as f64 - angle.cos()).abs() < 1e-6);
            assert!((a.sin[[0, j]] as f64 - angle.sin()).abs() < 1e-6);
        }
    }

    #[test]
    fn text_only_mrope_equals_default_rope() {
        let plain = Rope::new(&cfg(5e6, "default", None, false), 16).unwrap();
        for interleaved in [false, true] {
            let m = Rope::new(&cfg(5e6, "default", Some(vec![2, 3, 3]), interleaved), 16).unwrap();
            let seq = Positions::sequential(7);
            let three = Positions::from_ids(Array2::from_shape_fn((3, 7), |(_, t)| t as i64)).unwrap();
            let (a, b, c) = (plain.angles(&seq).unwrap(), m.angles(&seq).unwrap(), m.angles(&three).unwrap());
            assert_eq!(a.cos, b.cos);
            assert_eq!(a.sin, c.sin);
        }
    }

    #[test]
    fn unsupported_rope_types_are_refused() {
        for kind in ["llama3", "linear", "dynamic"] {
            let e = Rope::new(&cfg(1e4, kind, None, false), 16).unwrap_err().to_string();
            assert!(e.contains(kind), "{e}");
        }
        let plain = Rope::new(&cfg(1e4, "default", None, false), 16).unwrap();
        let three = Positions::from_ids(Array2::zeros((3, 2))).unwrap();
        assert!(plain.angles(&three).is_err());
        assert!(Positions::from_ids(Array2::zeros((2, 2))).is_err());
    }
}
