//! Statistics gathered at a linear layer's input over the calibration batches. Each observer is
//! updated with `x [tokens, in]` (any number of batches), is cheap compared with the linear's own
//! product, and merges with another observer of the same input (`a.merge(&b)` equals one pass over
//! both halves), so batches can be split across threads or resumed.
//!
//! - [`ChannelStats`]: per input channel min, max and mean magnitude; absmax, the shift
//!   `(max+min)/2` and the per-tensor range follow from them. Feeds smoothing, AWQ and min-max
//!   activation ranges.
//! - [`Histogram`]: 2048 bins of every value, for the L2-optimal activation clip.
//! - [`Hessian`]: `Σ xᵀx` over tokens, for GPTQ (`H = 2/n Σ xᵀx`).
//! - [`TokenSample`]: a uniform random sample of rows, for searches that score candidates on real
//!   activations (`smooth_search`).
//!
//! Histogram ranges, the two-pass scheme: a histogram should be created with the exact range of
//! the values it will see, [`Histogram::with_range`], taken from a [`ChannelStats`] of the same
//! input. In the calibration pipeline that range is free: the first pass gathers channel stats
//! for smoothing; smoothing maps each channel affinely, so [`ChannelStats::smoothed`] gives the
//! smoothed range exactly; the histogram is filled in the pass that runs on the smoothed layer.
//! Histograms with the same range merge exactly (counts add). Values outside the range (float
//! rounding, or a histogram started with [`Histogram::new`], whose range is the first batch's)
//! grow the range by whole old bins: every new bin is the union of `k` consecutive old bins, so
//! growth never moves mass to a wrong place, it only coarsens the bins.

use crate::device::Device;
use ndarray::{Array2, ArrayView2};

/// Per-channel minimum, maximum and magnitude sum of a linear's input.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelStats {
    /// `[in]`; `+inf` until a token is seen.
    pub min: Vec<f32>,
    /// `[in]`; `-inf` until a token is seen.
    pub max: Vec<f32>,
    /// `[in]`: `Σ |x_j|` over the finite values seen; empty once unknown (after a shift, see
    /// [`ChannelStats::smoothed`]).
    pub abs_sum: Vec<f64>,
    /// Rows seen.
    pub tokens: u64,
    /// NaN or infinite values seen (skipped). A healthy model has none; the pipeline should refuse
    /// to calibrate on them.
    pub nonfinite: u64,
}

impl ChannelStats {
    pub fn new(channels: usize) -> ChannelStats {
        ChannelStats {
            min: vec![f32::INFINITY; channels],
            max: vec![f32::NEG_INFINITY; channels],
            abs_sum: vec![0.0; channels],
            tokens: 0,
            nonfinite: 0,
        }
    }

    pub fn channels(&self) -> usize {
        self.min.len()
    }

    /// Folds in a batch `x [tokens, channels]`.
    pub fn update(&mut self, x: ArrayView2<f32>) {
        assert_eq!(x.ncols(), self.channels(), "ChannelStats::update: channel count differs");
        let known = !self.abs_sum.is_empty();
        for row in x.rows() {
            let mut bad = 0u64;
            for ((lo, hi), &v) in self.min.iter_mut().zip(self.max.iter_mut()).zip(row.iter()) {
                if v.is_finite() {
                    *lo = lo.min(v);
                    *hi = hi.max(v);
                } else {
                    bad += 1;
                }
            }
            if known {
                for (a, &v) in self.abs_sum.iter_mut().zip(row.iter()) {
                    if v.is_finite() {
                        *a += v.abs() as f64;
                    }
                }
            }
            self.nonfinite += bad;
        }
        self.tokens += x.nrows() as u64;
    }

    pub fn merge(&mut self, other: &ChannelStats) {
        assert_eq!(other.channels(), self.channels(), "ChannelStats::merge: channel count differs");
        for (a, b) in self.min.iter_mut().zip(&other.min) {
            *a = a.min(*b);
        }
        for (a, b) in self.max.iter_mut().zip(&other.max) {
            *a = a.max(*b);
        }
        if other.abs_sum.is_empty() {
            self.abs_sum.clear();
        }
        for (a, b) in self.abs_sum.iter_mut().zip(&other.abs_sum) {
            *a += b;
        }
        self.tokens += other.tokens;
        self.nonfinite += other.nonfinite;
    }

    /// `max |x_j|` per channel (0 for a channel never seen).
    pub fn absmax(&self) -> Vec<f32> {
        self.min.iter().zip(&self.max).map(|(&lo, &hi)| if lo > hi { 0.0 } else { lo.abs().max(hi.abs()) }).collect()
    }

    /// `mean |x_j|` per channel (AWQ's activation statistic), or `None` when unknown.
    pub fn abs_mean(&self) -> Option<Vec<f32>> {
        if self.abs_sum.is_empty() {
            return None;
        }
        let n = self.tokens.max(1) as f64;
        Some(self.abs_sum.iter().map(|&a| (a / n) as f32).collect())
    }

    /// The channel centres `(max + min) / 2`, the shift of m2 / Outlier Suppression+.
    pub fn shift(&self) -> Vec<f32> {
        self.min.iter().zip(&self.max).map(|(&lo, &hi)| if lo > hi { 0.0 } else { lo / 2.0 + hi / 2.0 }).collect()
    }

    /// `max |x_j - shift_j| = (max - min) / 2` per channel: the absmax after shifting.
    pub fn half_range(&self) -> Vec<f32> {
        self.min.iter().zip(&self.max).map(|(&lo, &hi)| if lo > hi { 0.0 } else { hi / 2.0 - lo / 2.0 }).collect()
    }

    /// The per-tensor `(min, max)`, or `None` before any token.
    pub fn tensor_range(&self) -> Option<(f32, f32)> {
        let lo = self.min.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = self.max.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (lo <= hi).then_some((lo, hi))
    }

    /// The statistics the same tokens would give after smoothing, `x'_j = (x_j - shift_j) / scale_j`
    /// (`scale_j > 0`): an increasing affine map per channel moves min and max exactly, and a
    /// scale divides the magnitudes; after a shift the magnitudes are unknown (emptied).
    pub fn smoothed(&self, shift: Option<&[f32]>, scale: &[f32]) -> ChannelStats {
        assert_eq!(scale.len(), self.channels(), "ChannelStats::smoothed: scale length differs");
        let z = |j: usize| shift.map_or(0.0, |s| s[j]);
        let map = |v: &[f32]| v.iter().enumerate().map(|(j, &x)| (x - z(j)) / scale[j]).collect::<Vec<f32>>();
        let abs_sum = match shift {
            None => self.abs_sum.iter().zip(scale).map(|(&a, &s)| a / s as f64).collect(),
            Some(_) => Vec::new(),
        };
        ChannelStats {
            min: map(&self.min),
            max: map(&self.max),
            abs_sum,
            tokens: self.tokens,
            nonfinite: self.nonfinite,
        }
    }
}

/// The default number of histogram bins (as TensorRT, torch and msModelSlim use).
pub const HISTOGRAM_BINS: usize = 2048;

/// A histogram of every value of a linear's input, on the grid `lo + i·width`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    lo: f64,
    width: f64,
    counts: Vec<u64>,
    /// False for a [`Histogram::new`] histogram until its first value.
    ranged: bool,
    pub nonfinite: u64,
}

impl Histogram {
    /// A histogram whose range comes from its first batch (and grows if needed).
    pub fn new(bins: usize) -> Histogram {
        assert!(bins > 0, "a histogram needs at least one bin");
        Histogram { lo: 0.0, width: 1.0, counts: vec![0; bins], ranged: false, nonfinite: 0 }
    }

    /// A histogram over `[lo, hi]` (the two-pass scheme: the range is known in advance).
    pub fn with_range(lo: f32, hi: f32, bins: usize) -> Histogram {
        let mut h = Histogram::new(bins);
        h.set_range(lo as f64, hi as f64);
        h
    }

    /// A histogram on this one's grid with nothing counted yet: a part of the same calibration
    /// data filled in another thread, which then [`Histogram::merge`]s exactly.
    pub fn emptied(&self) -> Histogram {
        Histogram { counts: vec![0; self.bins()], nonfinite: 0, ..*self }
    }

    fn set_range(&mut self, lo: f64, hi: f64) {
        let bins = self.counts.len() as f64;
        // A constant input still needs a positive width; any tiny one will do.
        let width = ((hi - lo) / bins).max(lo.abs().max(hi.abs()) * 1e-7 / bins).max(1e-30);
        self.lo = lo;
        self.width = width;
        self.ranged = true;
    }

    pub fn bins(&self) -> usize {
        self.counts.len()
    }
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    pub fn lo(&self) -> f64 {
        self.lo
    }
    pub fn width(&self) -> f64 {
        self.width
    }
    /// The right edge of the last bin.
    pub fn hi(&self) -> f64 {
        self.edge(self.bins())
    }
    /// The left edge of bin `i` (`edge(bins())` is the right end).
    pub fn edge(&self, i: usize) -> f64 {
        self.lo + i as f64 * self.width
    }

    /// Folds in a batch of values (any shape: rows of `x [tokens, in]`).
    pub fn update(&mut self, x: ArrayView2<f32>) {
        let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
        for &v in x.iter() {
            if v.is_finite() {
                lo = lo.min(v);
                hi = hi.max(v);
            } else {
                self.nonfinite += 1;
            }
        }
        if lo > hi {
            return;
        }
        if !self.ranged {
            self.set_range(lo as f64, hi as f64);
        } else if (lo as f64) < self.lo || (hi as f64) > self.hi() {
            self.grow_to(lo as f64, hi as f64);
        }
        let (origin, inv, last) = (self.lo, 1.0 / self.width, self.bins() - 1);
        for &v in x.iter() {
            if v.is_finite() {
                // Values on the right edge (or a rounding past it) belong to the last bin.
                let i = (((v as f64 - origin) * inv).floor().max(0.0) as usize).min(last);
                self.counts[i] += 1;
            }
        }
    }

    /// Widens the range to cover `[lo, hi]`, merging whole old bins (see the module docs).
    fn grow_to(&mut self, lo: f64, hi: f64) {
        let bins = self.bins() as f64;
        // Old bins to add on each side (a little more than needed, so the edges are strictly inside).
        let left = if lo < self.lo { ((self.lo - lo) / self.width).floor() + 1.0 } else { 0.0 };
        let right = if hi > self.hi() { ((hi - self.hi()) / self.width).floor() + 1.0 } else { 0.0 };
        let k = ((left + bins + right) / bins).ceil().max(1.0);
        let mut counts = vec![0u64; self.bins()];
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                let j = ((left + i as f64) / k).floor() as usize;
                counts[j.min(self.bins() - 1)] += c;
            }
        }
        self.lo -= left * self.width;
        self.width *= k;
        self.counts = counts;
    }

    /// Adds `other`'s counts. Exact when both share a grid (same range and bins, the two-pass
    /// case); otherwise `self` grows to cover `other` and each of `other`'s bins is spread over the
    /// bins it overlaps in proportion to the overlap (mass uniform within a bin).
    pub fn merge(&mut self, other: &Histogram) {
        self.nonfinite += other.nonfinite;
        if !other.ranged || other.total() == 0 {
            return;
        }
        if !self.ranged || self.total() == 0 {
            let nonfinite = self.nonfinite;
            *self = other.clone();
            self.nonfinite = nonfinite;
            return;
        }
        if self.lo == other.lo && self.width == other.width && self.bins() == other.bins() {
            for (a, b) in self.counts.iter_mut().zip(&other.counts) {
                *a += b;
            }
            return;
        }
        if other.lo < self.lo || other.hi() > self.hi() {
            self.grow_to(other.lo, other.hi());
        }
        let mut spread = vec![0f64; self.bins()];
        for (i, &c) in other.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let (a, b) = (other.edge(i), other.edge(i + 1));
            let first = (((a - self.lo) / self.width).floor().max(0.0) as usize).min(self.bins() - 1);
            let last = (((b - self.lo) / self.width).floor().max(0.0) as usize).min(self.bins() - 1);
            for (j, s) in spread.iter_mut().enumerate().take(last + 1).skip(first) {
                let overlap = b.min(self.edge(j + 1)) - a.max(self.edge(j));
                *s += c as f64 * overlap.max(0.0) / (b - a);
            }
        }
        // Round the spread mass to whole counts while keeping the total exact.
        let mut carry = 0f64;
        for (a, s) in self.counts.iter_mut().zip(spread) {
            let want = s + carry;
            let whole = want.round().max(0.0);
            carry = want - whole;
            *a += whole as u64;
        }
    }
}

/// The GPTQ statistics of a linear's input: `Σ xᵀx` (f32, `[in, in]`, lower triangle kept), the
/// column sums and the token count. [`Hessian::matrix`] gives `H = 2/n Σ xᵀx`, the matrix GPTQ uses; keeping the sum
/// rather than the running mean makes merging exact up to float addition.
#[derive(Debug, Clone, PartialEq)]
pub struct Hessian {
    /// Only the lower triangle (row ≥ column) is meaningful.
    sum: Array2<f32>,
    colsum: Vec<f64>,
    tokens: u64,
}

impl Hessian {
    pub fn new(channels: usize) -> Hessian {
        Hessian { sum: Array2::zeros((channels, channels)), colsum: vec![0.0; channels], tokens: 0 }
    }

    pub fn channels(&self) -> usize {
        self.colsum.len()
    }
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Folds in a batch `x [tokens, in]`; the product runs on `device`.
    pub fn update(&mut self, device: &dyn Device, x: ArrayView2<f32>) {
        assert_eq!(x.ncols(), self.channels(), "Hessian::update: channel count differs");
        if x.nrows() == 0 {
            return;
        }
        device.add_gram_lower(&mut self.sum, x);
        for row in x.rows() {
            for (c, &v) in self.colsum.iter_mut().zip(row.iter()) {
                *c += v as f64;
            }
        }
        self.tokens += x.nrows() as u64;
    }

    pub fn merge(&mut self, other: &Hessian) {
        assert_eq!(other.channels(), self.channels(), "Hessian::merge: channel count differs");
        self.sum += &other.sum;
        for (a, b) in self.colsum.iter_mut().zip(&other.colsum) {
            *a += b;
        }
        self.tokens += other.tokens;
    }

    /// `Σ xᵀx` at `(i, j)`, read from the lower triangle.
    fn sum_at(&self, i: usize, j: usize) -> f32 {
        self.sum[(i.max(j), i.min(j))]
    }

    /// `H = 2/n Σ xᵀx` (zeros before any token).
    pub fn matrix(&self) -> Array2<f32> {
        let k = if self.tokens > 0 { 2.0 / self.tokens as f64 } else { 0.0 };
        Array2::from_shape_fn(self.sum.dim(), |(i, j)| (self.sum_at(i, j) as f64 * k) as f32)
    }

    /// The statistics the same tokens would give after smoothing, `x' = (x - shift) / scale`:
    /// `Σ x'x'ᵀ = D⁻¹ (Σ xxᵀ - z cᵀ - c zᵀ + n z zᵀ) D⁻¹` with `c = Σ x`, `D = diag(scale)`.
    /// Saves a calibration pass; with a large shift the subtraction loses some f32 precision
    /// (relative error about 1e-7 · (mean/std)² per entry), harmless next to GPTQ's 1% damping.
    pub fn smoothed(&self, shift: Option<&[f32]>, scale: &[f32]) -> Hessian {
        let n = self.channels();
        assert_eq!(scale.len(), n, "Hessian::smoothed: scale length differs");
        let z: Vec<f64> = (0..n).map(|j| shift.map_or(0.0, |s| s[j] as f64)).collect();
        let t = self.tokens as f64;
        let c = &self.colsum;
        let sum = Array2::from_shape_fn((n, n), |(i, j)| {
            let centred = self.sum_at(i, j) as f64 - z[i] * c[j] - c[i] * z[j] + t * z[i] * z[j];
            (centred / (scale[i] as f64 * scale[j] as f64)) as f32
        });
        let colsum = (0..n).map(|j| (c[j] - t * z[j]) / scale[j] as f64).collect();
        Hessian { sum, colsum, tokens: self.tokens }
    }
}

/// A uniform sample of at most `capacity` rows of a linear's input over all batches (reservoir
/// sampling with a fixed seed, so runs are reproducible). Not mergeable: keep one per input.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSample {
    channels: usize,
    capacity: usize,
    rows: Vec<f32>,
    seen: u64,
    state: u64,
}

impl TokenSample {
    pub fn new(channels: usize, capacity: usize) -> TokenSample {
        TokenSample { channels, capacity, rows: Vec::new(), seen: 0, state: 0x853C_49E6_748F_EA9B }
    }

    fn next_random(&mut self) -> u64 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn update(&mut self, x: ArrayView2<f32>) {
        assert_eq!(x.ncols(), self.channels, "TokenSample::update: channel count differs");
        for row in x.rows() {
            self.seen += 1;
            let slot = if self.rows.len() < self.capacity * self.channels {
                self.rows.len() / self.channels
            } else {
                // Algorithm R: keep the new row with probability capacity / seen.
                let k = (self.next_random() % self.seen) as usize;
                if k >= self.capacity {
                    continue;
                }
                k
            };
            let at = slot * self.channels;
            if at == self.rows.len() {
                self.rows.extend(row.iter());
            } else {
                for (d, &v) in self.rows[at..at + self.channels].iter_mut().zip(row.iter()) {
                    *d = v;
                }
            }
        }
    }

    /// The sampled rows, `[min(capacity, seen), channels]`.
    pub fn rows(&self) -> ArrayView2<'_, f32> {
        ArrayView2::from_shape((self.rows.len() / self.channels.max(1), self.channels), &self.rows)
            .expect("rows are whole")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::quant::testutil::Rng;
    use ndarray::{s, Array2};

    fn batch(rng: &mut Rng, tokens: usize, channels: usize) -> Array2<f32> {
        // Channel 1 has a large offset, channel 2 an outlier scale.
        Array2::from_shape_fn((tokens, channels), |(_, j)| {
            let v = rng.laplace();
            match j {
                1 => v + 30.0,
                2 => v * 50.0,
                _ => v,
            }
        })
    }

    #[test]
    fn channel_stats_match_a_direct_scan_and_merge_exactly() {
        let mut rng = Rng::new(1);
        let x = batch(&mut rng, 300, 6);
        let mut one = ChannelStats::new(6);
        one.update(x.view());
        for j in 0..6 {
            let col = x.column(j);
            assert_eq!(one.min[j], col.iter().copied().fold(f32::INFINITY, f32::min));
            assert_eq!(one.max[j], col.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        }
        let (mut a, mut b) = (ChannelStats::new(6), ChannelStats::new(6));
        a.update(x.slice(s![..120, ..]));
        b.update(x.slice(s![120.., ..]));
        a.merge(&b);
        assert_eq!(a, one);
        let (lo, hi) = one.tensor_range().unwrap();
        assert_eq!(lo, x.iter().copied().fold(f32::INFINITY, f32::min));
        assert_eq!(hi, x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert!(one.shift()[1] > 25.0 && one.absmax()[2] > 100.0);
    }

    #[test]
    fn channel_stats_skip_and_count_nonfinite_values() {
        let mut s = ChannelStats::new(2);
        s.update(ndarray::array![[1.0f32, f32::NAN], [f32::INFINITY, -2.0]].view());
        assert_eq!((s.min.clone(), s.max.clone(), s.nonfinite), (vec![1.0, -2.0], vec![1.0, -2.0], 2));
        assert_eq!(ChannelStats::new(3).tensor_range(), None);
        assert_eq!(ChannelStats::new(1).absmax(), vec![0.0]);
    }

    #[test]
    fn smoothed_channel_stats_equal_stats_of_smoothed_tokens() {
        let mut rng = Rng::new(2);
        let x = batch(&mut rng, 200, 5);
        let shift = [0.5f32, 30.0, -1.0, 0.0, 2.0];
        let scale = [1.0f32, 0.5, 40.0, 3.0, 0.25];
        let xs = Array2::from_shape_fn(x.dim(), |(t, j)| (x[(t, j)] - shift[j]) / scale[j]);
        let (mut s, mut direct) = (ChannelStats::new(5), ChannelStats::new(5));
        s.update(x.view());
        direct.update(xs.view());
        let mapped = s.smoothed(Some(&shift), &scale);
        for j in 0..5 {
            assert!((mapped.min[j] - direct.min[j]).abs() <= 1e-5 * direct.min[j].abs().max(1.0));
            assert!((mapped.max[j] - direct.max[j]).abs() <= 1e-5 * direct.max[j].abs().max(1.0));
        }
    }

    #[test]
    fn histogram_counts_every_value_in_its_bin() {
        let x = ndarray::array![[0.0f32, 0.24, 0.25, 0.99], [1.0, 0.5, 0.75, 0.1]];
        let mut h = Histogram::with_range(0.0, 1.0, 4);
        h.update(x.view());
        // [0, .25): 0, .24, .1; [.25, .5): .25; [.5, .75): .5; [.75, 1]: .75, .99 and the right edge 1.0.
        assert_eq!(h.counts(), &[3, 1, 1, 3]);
        assert_eq!(h.total(), 8);
    }

    #[test]
    fn histogram_growth_merges_whole_bins() {
        let mut h = Histogram::with_range(0.0, 4.0, 4);
        h.update(ndarray::array![[0.5f32, 1.5, 2.5, 3.5, 3.6]].view());
        assert_eq!(h.counts(), &[1, 1, 1, 2]);
        // 9.0 is outside: the grid widens by whole old bins, so old counts stay in place.
        h.update(ndarray::array![[9.0f32]].view());
        assert!(h.lo() <= 0.0 && h.hi() > 9.0);
        for i in 0..4 {
            // Every old bin [i, i+1) lies inside exactly one new bin.
            let j = ((i as f64 + 0.5 - h.lo()) / h.width()).floor() as usize;
            let k = ((i as f64 + 0.01 - h.lo()) / h.width()).floor() as usize;
            assert_eq!(j, k);
        }
        assert_eq!(h.total(), 6);
        // And each value is in the bin containing it.
        let bin = |v: f64| ((v - h.lo()) / h.width()).floor() as usize;
        let mut want = [0u64; 4];
        for v in [0.5, 1.5, 2.5, 3.5, 3.6, 9.0] {
            want[bin(v)] += 1;
        }
        assert_eq!(h.counts(), &want[..]);
    }

    #[test]
    fn histograms_on_one_grid_merge_exactly() {
        let mut rng = Rng::new(3);
        let x = batch(&mut rng, 400, 8);
        let mut stats = ChannelStats::new(8);
        stats.update(x.view());
        let (lo, hi) = stats.tensor_range().unwrap();
        let mut one = Histogram::with_range(lo, hi, HISTOGRAM_BINS);
        one.update(x.view());
        let mut a = Histogram::with_range(lo, hi, HISTOGRAM_BINS);
        let mut b = a.clone();
        a.update(x.slice(s![..150, ..]));
        b.update(x.slice(s![150.., ..]));
        a.merge(&b);
        assert_eq!(a, one);
        assert_eq!(one.total(), 400 * 8);
    }

    #[test]
    fn histograms_on_different_grids_merge_without_losing_mass() {
        let mut rng = Rng::new(4);
        let x = batch(&mut rng, 300, 4);
        let (mut a, mut b) = (Histogram::new(64), Histogram::new(64));
        a.update(x.slice(s![..100, ..]));
        b.update(x.slice(s![100.., ..]).mapv(|v| v * 3.0).view());
        let (ta, tb) = (a.total(), b.total());
        a.merge(&b);
        assert_eq!(a.total(), ta + tb);
        assert!(a.lo() <= b.lo() && a.hi() >= b.hi());
    }

    #[test]
    fn hessian_is_twice_the_mean_outer_product_and_merges() {
        let mut rng = Rng::new(5);
        let x = batch(&mut rng, 90, 5);
        let mut one = Hessian::new(5);
        one.update(&Cpu, x.view());
        let h = one.matrix();
        for i in 0..5 {
            for j in 0..5 {
                let direct: f64 = (0..90).map(|t| x[(t, i)] as f64 * x[(t, j)] as f64).sum::<f64>() * 2.0 / 90.0;
                assert!((h[(i, j)] as f64 - direct).abs() <= 1e-5 * direct.abs().max(1.0), "{i},{j}");
            }
        }
        let (mut a, mut b) = (Hessian::new(5), Hessian::new(5));
        a.update(&Cpu, x.slice(s![..31, ..]));
        b.update(&Cpu, x.slice(s![31.., ..]));
        a.merge(&b);
        assert_eq!(a.tokens(), 90);
        let m = a.matrix();
        for (p, q) in m.iter().zip(h.iter()) {
            assert!((p - q).abs() <= 1e-5 * q.abs().max(1.0));
        }
    }

    #[test]
    fn token_sample_keeps_real_rows_spread_over_all_batches() {
        // Row t holds the value t in every channel, so each kept row says where it came from.
        let mut s = TokenSample::new(3, 50);
        for b in 0..20 {
            let x = Array2::from_shape_fn((100, 3), |(t, _)| (b * 100 + t) as f32);
            s.update(x.view());
        }
        let rows = s.rows();
        assert_eq!(rows.dim(), (50, 3));
        for r in rows.rows() {
            assert!(r.iter().all(|&v| v == r[0]), "a sampled row is a whole input row");
        }
        let late = rows.column(0).iter().filter(|&&v| v >= 1000.0).count();
        assert!((15..=35).contains(&late), "{late} of 50 from the second half");
        let mut small = TokenSample::new(2, 10);
        small.update(Array2::<f32>::ones((4, 2)).view());
        assert_eq!(small.rows().dim(), (4, 2));
    }

    #[test]
    fn smoothed_hessian_equals_hessian_of_smoothed_tokens() {
        let mut rng = Rng::new(6);
        let x = batch(&mut rng, 120, 4);
        let shift = [0.1f32, 30.0, 0.0, -0.5];
        let scale = [2.0f32, 0.7, 25.0, 1.0];
        let xs = Array2::from_shape_fn(x.dim(), |(t, j)| (x[(t, j)] - shift[j]) / scale[j]);
        let (mut h, mut direct) = (Hessian::new(4), Hessian::new(4));
        h.update(&Cpu, x.view());
        direct.update(&Cpu, xs.view());
        let (m, d) = (h.smoothed(Some(&shift), &scale).matrix(), direct.matrix());
        let norm = d.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (p, q) in m.iter().zip(d.iter()) {
            assert!((p - q).abs() <= 1e-4 * norm, "{p} vs {q}");
        }
    }
}
