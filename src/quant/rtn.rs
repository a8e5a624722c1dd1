//! Round-to-nearest weight quantization with min-max scales, per output channel or per group of
//! input channels.
//!
//! The symmetric rule, everywhere: a group's scale is `max|w| / qmax` (1 for an all-zero group),
//! and `q = clamp(round_half_even(w / scale), -qmax, qmax)`.
//!
//! Asymmetric groups ([`asymmetric_grid`]) span `[min(w, 0), max(w, 0)]` with the whole signed
//! range `qmin..=qmax` (`-8..=7` for int4): `scale = (hi − lo) / (qmax − qmin)`, an integer zero
//! point `z = clamp(round(qmin − lo / scale))`, `q = clamp(round(w / scale) + z)`, and
//! `w ≈ (q − z)·scale`. Including 0 in the range (as AutoGPTQ and llm-compressor do; AutoAWQ
//! does not) makes 0 exact, and the zero point always lies in the range.
//!
//! W8A8S rows ([`lowbit_scale`], msModelSlim's sparse "lowbit" quantization) take the symmetric
//! int4 scale of their inliers, `t / 7`, and keep int8 storage so that the outliers (the largest
//! `fraction` of the row, or those beyond `sigma_factor` standard deviations) land beyond ±7
//! instead of being clipped.
//!
//! The data-free path quantizes straight from the checkpoint's mapped bytes ([`MatrixView`]): each
//! block of rows is widened to f32 in a small per-thread buffer, its absmax found and its values
//! rounded while the buffer is hot in cache, blocks in parallel. No f32 copy of the whole matrix is
//! made. A fused expert stored transposed (its rows are stored columns) is read in stored order, column
//! by column, and only its integers are transposed.

use super::spec::{Outliers, QuantSpec};
pub use crate::model::matrix::{MatrixView, NonFinite};
use rayon::prelude::*;

/// Integer weights and their scales: `w ≈ (q − offset) · scale[row, col / group]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `[rows, cols]`, in the spec's [`QuantSpec::q_range`].
    pub q: Vec<i8>,
    /// `[rows, cols / group]`.
    pub scale: Vec<f32>,
    /// `[rows, cols / group]`: the integer zero points of asymmetric weights; `None` when
    /// symmetric.
    pub offset: Option<Vec<f32>>,
}

impl QuantizedWeight {
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.group)
    }
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.groups();
        let mut out = vec![0f32; self.rows * self.cols];
        for r in 0..self.rows {
            for c in 0..self.cols {
                let k = r * g + c / self.group;
                let z = self.offset.as_ref().map_or(0.0, |o| o[k]);
                out[r * self.cols + c] = (self.q[r * self.cols + c] as f32 - z) * self.scale[k];
            }
        }
        out
    }
}

/// The asymmetric scale and zero point of a group over `qmin..=qmax`: `(scale, z)` with
/// `w ≈ (q − z)·scale` (see the module docs). An all-zero group gets scale 1.
pub fn asymmetric_grid(values: &[f32], qmin: i32, qmax: i32) -> (f32, f32) {
    let lo = values.iter().fold(0f32, |m, &x| m.min(x));
    let hi = values.iter().fold(0f32, |m, &x| m.max(x));
    if hi <= lo {
        return (1.0, 0.0);
    }
    let s = (hi - lo) / (qmax - qmin) as f32;
    let z = round_half_even(qmin as f32 - lo / s).clamp(qmin as f32, qmax as f32);
    (s, z)
}

/// `clamp(round_half_even(w / scale) + z, qmin, qmax)`.
pub fn quantize_affine(w: f32, scale: f32, z: f32, qmin: i32, qmax: i32) -> i8 {
    (round_half_even(w / scale) + z).clamp(qmin as f32, qmax as f32) as i8
}

/// The per-row scale of W8A8S (msModelSlim's lowbit sparse quantization, reconstructed from its
/// documentation; its implementation is closed): `t / 7`, where `t` is the largest magnitude of
/// the row's inliers, raised where needed so that the largest outlier still fits int8
/// (`max|w| / 127`). Outliers are the `fraction` of the row with the largest magnitudes, or the
/// values farther than `sigma_factor` standard deviations from the row's mean.
pub fn lowbit_scale(row: &[f32], rule: Outliers) -> f32 {
    let absmax = absmax(row);
    if absmax == 0.0 {
        return 1.0;
    }
    let t = match rule {
        Outliers::Fraction { ppm } => {
            let k = ((row.len() as f64 * ppm as f64 / 1e6).floor() as usize).min(row.len() - 1);
            let mut mags: Vec<f32> = row.iter().map(|x| x.abs()).collect();
            // The (k+1)-th largest magnitude: the largest inlier.
            let i = row.len() - 1 - k;
            *mags.select_nth_unstable_by(i, |a, b| a.total_cmp(b)).1
        }
        Outliers::Sigma { milli } => {
            let n = row.len() as f64;
            let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
            let std = (row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
            let bound = milli as f64 / 1000.0 * std;
            row.iter().filter(|&&x| (x as f64 - mean).abs() <= bound).fold(0f32, |m, &x| m.max(x.abs()))
        }
    };
    let s = t / 7.0;
    if s > 0.0 {
        s.max(absmax / 127.0)
    } else {
        absmax / 127.0
    }
}

/// The symmetric scale of a group: `max|w| / qmax`, or 1 for an all-zero group (any scale
/// represents zeros exactly, and 1 keeps derived quantities such as `deq_scale` finite).
pub fn symmetric_scale(values: &[f32], qmax: i32) -> f32 {
    scale_of(absmax(values), qmax)
}

fn scale_of(absmax: f32, qmax: i32) -> f32 {
    if absmax > 0.0 {
        absmax / qmax as f32
    } else {
        1.0
    }
}

fn absmax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, &x| m.max(x.abs()))
}

/// Rounds half to even, as torch.round does, and clamps to the integer range.
pub fn quantize_value(w: f32, scale: f32, qmax: i32) -> i8 {
    round_half_even(w / scale).clamp(-qmax as f32, qmax as f32) as i8
}

const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
const MAGIC_BITS: i32 = 0x4B40_0000; // its bit pattern

/// `clamp(round_half_even(x), -lim, lim)` as an integer, branch-free so that loops of it vectorize. Clamping
/// first gives the same integers (the bounds are integers) and keeps `x` in the magic-number range of
/// [`round_half_even`]; the rounded integer is then read straight from the low bits of the sum.
#[inline(always)]
fn to_int(x: f32, lim: f32) -> i8 {
    let x = x.max(-lim).min(lim);
    ((x + MAGIC).to_bits() as i32 - MAGIC_BITS) as i8
}

/// `x.round_ties_even()`, without the libm call the baseline x86-64 target makes of it for every value:
/// for `|x| < 2^22`, adding 1.5·2^23 leaves no fraction bits, so the sum is rounded to an integer in the
/// current (nearest, ties-to-even) mode, and subtracting it back is exact.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x.round_ties_even()
    }
}

/// The largest `|x|` of finite values as its bit pattern: non-negative floats order as their bits do, so
/// this is an integer max (which vectorizes), and a result of `0x7F80_0000` or more means an Inf or NaN.
#[inline(always)]
fn absmax_bits(values: &[f32]) -> u32 {
    values.iter().fold(0u32, |m, &x| m.max(x.to_bits() & 0x7FFF_FFFF))
}

/// Quantizes one row: `q` and `scale` receive its groups. Returns the column of a NaN or Inf, if any (its
/// group is then quantized with the NaN-ignoring float absmax, as [`symmetric_scale`] does).
#[inline]
fn quantize_row(row: &[f32], q: &mut [i8], scale: &mut [f32], group: usize, qmax: i32) -> Option<usize> {
    let lim = qmax as f32;
    let mut bad = None;
    for (g, ((w, q), s)) in row.chunks(group).zip(q.chunks_mut(group)).zip(scale.iter_mut()).enumerate() {
        let bits = absmax_bits(w);
        let m = if bits < 0x7F80_0000 {
            f32::from_bits(bits)
        } else {
            bad = bad.or_else(|| w.iter().position(|x| !x.is_finite()).map(|i| g * group + i));
            absmax(w)
        };
        *s = scale_of(m, qmax);
        let s = *s;
        let n = w.len();
        let q = &mut q[..n];
        for i in 0..n {
            q[i] = to_int(w[i] / s, lim);
        }
    }
    bad
}

/// Quantizes a row-major `[rows, cols]` f32 matrix of finite values. Rows are processed in parallel.
pub fn quantize(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> QuantizedWeight {
    if !spec.weight_symmetric || spec.lowbit.is_some() {
        return quantize_general(w, rows, cols, spec);
    }
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let qmax = spec.qmax();
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0f32; rows * groups];
    q.par_chunks_mut(cols.max(1)).zip(scale.par_chunks_mut(groups.max(1))).zip(w.par_chunks(cols.max(1))).for_each(
        |((qrow, srow), wrow)| {
            quantize_row(wrow, qrow, srow, group, qmax);
        },
    );
    QuantizedWeight { rows, cols, group, q, scale, offset: None }
}

/// The grid (scale, zero point) of every `(row, group)` of `w` as `spec` rounds it by min-max:
/// `[rows, groups]` each; zero points are 0 for symmetric specs.
pub fn grids(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> (Vec<f32>, Vec<f32>) {
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let (qmin, qmax) = spec.q_range();
    let mut scale = Vec::with_capacity(rows * groups);
    let mut zero = Vec::with_capacity(rows * groups);
    for row in w.chunks(cols.max(1)).take(rows) {
        if let Some(rule) = spec.lowbit {
            scale.push(lowbit_scale(row, rule));
            zero.push(0.0);
            continue;
        }
        for g in row.chunks(group) {
            let (s, z) =
                if spec.weight_symmetric { (symmetric_scale(g, qmax), 0.0) } else { asymmetric_grid(g, qmin, qmax) };
            scale.push(s);
            zero.push(z);
        }
    }
    (scale, zero)
}

/// Rounds `w` on given grids (`[rows, groups]` scales and zero points, groups of `spec`'s
/// length): the last step of every rounding that is not GPTQ's.
pub fn quantize_on(
    w: &[f32],
    rows: usize,
    cols: usize,
    spec: &QuantSpec,
    scale: Vec<f32>,
    zero: Vec<f32>,
) -> QuantizedWeight {
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let (qmin, qmax) = spec.q_range();
    let mut q = vec![0i8; rows * cols];
    q.par_chunks_mut(cols.max(1)).zip(w.par_chunks(cols.max(1))).enumerate().for_each(|(r, (qrow, wrow))| {
        for (c, (qv, &x)) in qrow.iter_mut().zip(wrow).enumerate() {
            let k = r * groups + c / group;
            *qv = quantize_affine(x, scale[k], zero[k], qmin, qmax);
        }
    });
    let offset = (!spec.weight_symmetric).then_some(zero);
    QuantizedWeight { rows, cols, group, q, scale, offset }
}

/// Asymmetric and W8A8S rounding: the grids of [`grids`], then [`quantize_on`].
fn quantize_general(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> QuantizedWeight {
    let (scale, zero) = grids(w, rows, cols, spec);
    quantize_on(w, rows, cols, spec, scale, zero)
}

/// Rows handled together.
const BLOCK_ROWS: usize = 32;

/// Quantizes a matrix read in place, blocks of rows in parallel, refusing NaN and infinities (which would
/// poison every scale). The result is identical to widening the matrix to f32 and calling [`quantize`].
pub fn quantize_view(m: &MatrixView, spec: &QuantSpec) -> Result<QuantizedWeight, NonFinite> {
    assert!(m.dtype.is_float() || m.scale.is_some(), "quantize_view needs a float tensor or an FP8 one with its scale");
    let (rows, cols) = (m.rows, m.cols);
    if !spec.weight_symmetric || spec.lowbit.is_some() {
        // Rare in data-free runs: widen the matrix, then round as the calibrated path does.
        let mut w = vec![0f32; rows * cols];
        if m.row_stride == 1 && m.col_stride != 1 {
            let mut col = vec![0f32; rows];
            for c in 0..cols {
                m.read_column(c, &mut col);
                for (r, &v) in col.iter().enumerate() {
                    w[r * cols + c] = v;
                }
            }
        } else {
            m.read_rows(0, rows, &mut w);
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(NonFinite { row: i / cols, col: i % cols, value: w[i] });
        }
        return Ok(quantize(&w, rows, cols, spec));
    }
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let qmax = spec.qmax();
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0f32; rows * groups];
    if rows == 0 || cols == 0 {
        return Ok(QuantizedWeight { rows, cols, group, q, scale, offset: None });
    }
    if m.row_stride == 1 && m.col_stride != 1 {
        return quantize_transposed(m, group, qmax);
    }
    q.par_chunks_mut(BLOCK_ROWS * cols).zip(scale.par_chunks_mut(BLOCK_ROWS * groups)).enumerate().try_for_each_init(
        Vec::<f32>::new,
        |buf, (b, (qb, sb))| {
            // One row at a time: widened into a buffer that stays in L1, its absmax found, its values rounded.
            let r0 = b * BLOCK_ROWS;
            buf.resize(cols, 0.0);
            for (k, (q, s)) in qb.chunks_mut(cols).zip(sb.chunks_mut(groups)).enumerate() {
                m.read_rows(r0 + k, 1, buf);
                if let Some(c) = quantize_row(buf, q, s, group, qmax) {
                    return Err(NonFinite { row: r0 + k, col: c, value: buf[c] });
                }
            }
            Ok(())
        },
    )?;
    Ok(QuantizedWeight { rows, cols, group, q, scale, offset: None })
}

/// A view whose columns are contiguous in the stored tensor (an expert's linear inside a fused tensor
/// of the release layout), quantized without gathering its rows: the stored tensor is read in order,
/// once for the absmax of every (row, group) and once to round, into a transposed buffer of integers
/// that is then transposed tile by tile. Same result as the row-wise path.
fn quantize_transposed(m: &MatrixView, group: usize, qmax: i32) -> Result<QuantizedWeight, NonFinite> {
    let (rows, cols) = (m.rows, m.cols);
    let groups = cols.div_ceil(group);
    // Pieces of columns, each inside one group, processed in parallel.
    let piece = if groups == 1 { cols.div_ceil(16).max(1) } else { group };
    let pieces = cols.div_ceil(piece);
    let span = |k: usize| k * piece..((k + 1) * piece).min(cols);

    // 1. The absmax bits of every row over each piece: [pieces][rows].
    let mut partial = vec![0u32; pieces * rows];
    partial.par_chunks_mut(rows).enumerate().for_each_init(
        || vec![0f32; rows],
        |col, (k, acc)| {
            for c in span(k) {
                m.read_column(c, col);
                for (a, x) in acc.iter_mut().zip(col.iter()) {
                    *a = (*a).max(x.to_bits() & 0x7FFF_FFFF);
                }
            }
        },
    );
    if partial.iter().any(|&b| b >= 0x7F80_0000) {
        return Err(first_non_finite(m));
    }
    // 2. Scales, [rows][groups] as stored and [groups][rows] for the rounding pass.
    let mut by_group = vec![0u32; groups * rows];
    for (k, acc) in partial.chunks(rows).enumerate() {
        let g = k * piece / group;
        for (b, &a) in by_group[g * rows..(g + 1) * rows].iter_mut().zip(acc) {
            *b = (*b).max(a);
        }
    }
    let by_group: Vec<f32> = by_group.iter().map(|&b| scale_of(f32::from_bits(b), qmax)).collect();
    let mut scale = vec![0f32; rows * groups];
    for g in 0..groups {
        for r in 0..rows {
            scale[r * groups + g] = by_group[g * rows + r];
        }
    }
    // 3. Round column by column into qt [cols][rows].
    let mut qt = vec![0i8; cols * rows];
    qt.par_chunks_mut(piece * rows).enumerate().for_each_init(
        || vec![0f32; rows],
        |col, (k, qk)| {
            let s = &by_group[(k * piece / group) * rows..][..rows];
            for (c, qc) in span(k).zip(qk.chunks_mut(rows)) {
                m.read_column(c, col);
                round_all(col, s, qc, qmax);
            }
        },
    );
    // 4. Transpose to [rows][cols] through a 64 × 64 tile that stays in L1 (writing straight down a
    //    power-of-two row length would hit one cache set over and over).
    const T: usize = 64;
    let mut q = vec![0i8; rows * cols];
    q.par_chunks_mut(T * cols).enumerate().for_each(|(b, qb)| {
        let (r0, n) = (b * T, qb.len() / cols);
        let mut tile = [[0i8; T]; T];
        for c0 in (0..cols).step_by(T) {
            let w = T.min(cols - c0);
            for (j, t) in tile.iter_mut().enumerate().take(w) {
                t[..n].copy_from_slice(&qt[(c0 + j) * rows + r0..][..n]);
            }
            for k in 0..n {
                for (j, d) in qb[k * cols + c0..][..w].iter_mut().enumerate() {
                    *d = tile[j][k];
                }
            }
        }
    });
    Ok(QuantizedWeight { rows, cols, group, q, scale, offset: None })
}

/// `q[i] = clamp(round_half_even(w[i] / s[i]))`, element by element.
#[inline]
fn round_all(w: &[f32], s: &[f32], q: &mut [i8], qmax: i32) {
    let lim = qmax as f32;
    let n = w.len();
    let (s, q) = (&s[..n], &mut q[..n]);
    for i in 0..n {
        q[i] = to_int(w[i] / s[i], lim);
    }
}

/// The first NaN or Inf in row-major order (a slow scan, for the error message only).
fn first_non_finite(m: &MatrixView) -> NonFinite {
    let mut col = vec![0f32; m.rows];
    let mut best: Option<NonFinite> = None;
    for c in 0..m.cols {
        m.read_column(c, &mut col);
        if let Some(r) = col.iter().position(|x| !x.is_finite()) {
            if best.is_none_or(|b| r < b.row) {
                best = Some(NonFinite { row: r, col: c, value: col[r] });
            }
        }
    }
    best.expect("a non-finite value was seen")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn per_channel_error_is_within_half_a_step() {
        let spec = QuantSpec::preset("w8a16").unwrap();
        let w: Vec<f32> = (0..64 * 48).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i % 5) as f32).collect();
        let qw = quantize(&w, 64, 48, &spec);
        let d = qw.dequantize();
        for (i, (a, b)) in w.iter().zip(&d).enumerate() {
            assert!((a - b).abs() <= qw.scale[i / 48] / 2.0 + 1e-7, "{a} vs {b}");
        }
        assert!(qw.q.iter().any(|&x| x == 127 || x == -127));
    }

    #[test]
    fn groups_and_int4() {
        let spec = QuantSpec::preset("w4a16").unwrap();
        let w: Vec<f32> = (0..2 * 256).map(|i| if i < 128 { 0.01 * i as f32 } else { -(i as f32) }).collect();
        let qw = quantize(&w, 2, 256, &spec);
        assert_eq!(qw.scale.len(), 4);
        assert!(qw.q.iter().all(|&x| (-7..=7).contains(&x)));
        assert!((qw.scale[0] - 1.27 / 7.0).abs() < 1e-6);
    }

    #[test]
    fn zero_rows_get_unit_scale() {
        let qw = quantize(&[0.0; 8], 2, 4, &QuantSpec::preset("w8a16").unwrap());
        assert_eq!(qw.scale, vec![1.0, 1.0]);
        assert!(qw.q.iter().all(|&x| x == 0));
    }

    #[test]
    fn rounding_is_half_to_even_like_the_standard_library() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            for v in [x, x + 0.5, x - 0.5, x + 0.49999997, x + 0.50000006] {
                assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
            }
            x += 0.25;
        }
        for v in [1e7f32, -3e9, 4194303.5, -4194304.5, 6000000.5, -6000001.5, 0.0, -0.0, 1e-30] {
            assert_eq!(round_half_even(v), v.round_ties_even(), "{v}");
        }
    }

    /// The rule written out plainly: scale `max|w| / qmax` (1 if all zero), `q = clamp(round_half_even(w / s))`.
    fn textbook(w: &[f32], rows: usize, cols: usize, group: usize, qmax: i32) -> (Vec<i8>, Vec<f32>) {
        let (mut q, mut scales) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for g in (0..cols).step_by(group) {
                let vals = &w[r * cols + g..r * cols + (g + group).min(cols)];
                let m = vals.iter().map(|x| x.abs()).fold(0f32, f32::max);
                let s = if m > 0.0 { m / qmax as f32 } else { 1.0 };
                scales.push(s);
                q.extend(vals.iter().map(|&x| (x / s).round_ties_even().clamp(-qmax as f32, qmax as f32) as i8));
            }
        }
        (q, scales)
    }

    #[test]
    fn kernel_matches_the_textbook_rule_including_ties() {
        // Rows whose absmax is qmax have scale 1, so k + 0.5 values are exact ties.
        let mut w: Vec<f32> = (0..4 * 300).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) / 7.0).collect();
        for r in 0..2 {
            for c in 0..300 {
                w[r * 300 + c] = ((c % 254) as f32 - 127.0) + if c % 3 == 0 { 0.5 } else { 0.0 };
            }
            w[r * 300] = 127.0;
        }
        w[3 * 300 + 10..3 * 300 + 140].iter_mut().for_each(|x| *x = 0.0);
        for (spec, group) in [("w8a16", 300), ("w4a16", 128), ("w4a8_dynamic", 300)] {
            let spec = QuantSpec::preset(spec).unwrap();
            let qw = quantize(&w, 4, 300, &spec);
            let (q, s) = textbook(&w, 4, 300, group, spec.qmax());
            assert_eq!((qw.q, qw.scale), (q, s));
        }
    }

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()
    }
    fn widened(bytes: &[u8]) -> Vec<f32> {
        crate::tensor::decode_f32(DType::BF16, bytes).unwrap()
    }

    #[test]
    fn views_quantize_as_the_widened_matrix_does() {
        let (rows, cols) = (70, 200); // not multiples of the block or the group
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 300.0).collect();
        let bytes = bf16_bytes(&w);
        for spec in ["w8a16", "w4a16", "w4a8_dynamic"] {
            let spec = QuantSpec::preset(spec).unwrap();
            let want = quantize(&widened(&bytes), rows, cols, &spec);
            let got = quantize_view(&MatrixView::row_major(DType::BF16, &bytes, rows, cols), &spec).unwrap();
            assert_eq!(got, want);
        }
        // The same matrix stored transposed ([cols, rows + 5], the linear in columns 3..3 + rows).
        let stride = rows + 5;
        let mut t = vec![0f32; cols * stride];
        for r in 0..rows {
            for c in 0..cols {
                t[c * stride + 3 + r] = w[r * cols + c];
            }
        }
        let tb = bf16_bytes(&t);
        let view = MatrixView {
            dtype: DType::BF16,
            bytes: &tb,
            rows,
            cols,
            offset: 3,
            row_stride: 1,
            col_stride: stride,
            scale: None,
        };
        for spec in ["w8a8_dynamic", "w4a16", "w4a8_dynamic"] {
            let spec = QuantSpec::preset(spec).unwrap();
            assert_eq!(quantize_view(&view, &spec).unwrap(), quantize(&widened(&bytes), rows, cols, &spec));
        }
        // An all-zero column group keeps its unit scale through the transposed path too.
        let zeros = vec![0u8; tb.len()];
        let view = MatrixView { bytes: &zeros, ..view };
        let qw = quantize_view(&view, &QuantSpec::preset("w4a16").unwrap()).unwrap();
        assert!(qw.scale.iter().all(|&s| s == 1.0) && qw.q.iter().all(|&x| x == 0));
    }

    /// An FP8 weight with block scales quantizes as the matrix of its textbook values (E4M3 value times the
    /// block's scale) does, on a grid with partial blocks at both edges.
    #[test]
    fn fp8_views_quantize_as_their_dequantized_values_do() {
        use crate::model::fp8::BlockScale;
        let (rows, cols) = (70, 300);
        let scales: Vec<f32> = (0..3 * 3).map(|i| 1e-3 * (1 + i * 5 % 7) as f32).collect();
        let sb: Vec<u8> = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bs = BlockScale { dtype: DType::F32, bytes: &sb, block: [32, 128], grid_cols: 3 };
        // Every byte value but the two NaNs.
        let bytes: Vec<u8> =
            (0..rows * cols).map(|i| (i * 13 % 256) as u8).map(|b| if b & 0x7F == 0x7F { 0 } else { b }).collect();
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| crate::tensor::f8e4m3_value(bytes[i]) * scales[(i / cols / 32) * 3 + (i % cols) / 128])
            .collect();
        let view = MatrixView::block_fp8(&bytes, rows, cols, bs);
        for spec in ["w8a8_dynamic", "w8a16", "w4a16", "w4a8_dynamic"] {
            let spec = QuantSpec::preset(spec).unwrap();
            assert_eq!(quantize_view(&view, &spec).unwrap(), quantize(&w, rows, cols, &spec), "{spec:?}");
        }
        let mut nan = bytes.clone();
        nan[45 * cols + 299] = 0x7F;
        let e =
            quantize_view(&MatrixView::block_fp8(&nan, rows, cols, bs), &QuantSpec::preset("w8a8_dynamic").unwrap());
        assert_eq!(e.map_err(|e| (e.row, e.col)).unwrap_err(), (45, 299));
    }

    fn spec_of(y: &str) -> QuantSpec {
        QuantSpec::from_qconfig(&serde_yaml::from_str(y).unwrap()).unwrap()
    }

    #[test]
    fn asymmetric_groups_follow_the_min_max_rule() {
        let spec = spec_of("weight: {scope: per_group, dtype: int4, symmetric: false, ext: {group_size: 4}}");
        // One all-positive group, one mixed, one all-zero.
        let w = [0.5f32, 1.0, 2.0, 3.0, -1.5, 0.0, 0.25, 6.0, 0.0, 0.0, 0.0, 0.0];
        let qw = quantize(&w, 1, 12, &spec);
        let (s, z) = (qw.scale.clone(), qw.offset.clone().unwrap());
        // Group 0 spans [0, 3]: scale 3/15, zero at q = -8 (0 is exact).
        assert!((s[0] - 0.2).abs() < 1e-7 && z[0] == -8.0);
        // Group 1 spans [-1.5, 6]: scale 0.5, zero point round(-8 + 3) = -5.
        assert!((s[1] - 0.5).abs() < 1e-7 && z[1] == -5.0);
        assert_eq!((s[2], z[2]), (1.0, 0.0));
        assert!(qw.q.iter().all(|&x| (-8..=7).contains(&x)));
        assert!(qw.q[4] == -8 && qw.q[7] == 7, "the extremes take the ends of the range: {:?}", qw.q);
        let d = qw.dequantize();
        for (g, chunk) in w.chunks(4).enumerate() {
            for (i, &x) in chunk.iter().enumerate() {
                assert!((d[g * 4 + i] - x).abs() <= s[g] / 2.0 + 1e-6, "{x} vs {}", d[g * 4 + i]);
            }
        }
        // The data-free path gives the same.
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(quantize_view(&MatrixView::row_major(DType::F32, &bytes, 1, 12), &spec).unwrap(), qw);
    }

    #[test]
    fn lowbit_rows_put_inliers_on_the_int4_scale_and_keep_outliers() {
        let y = |ext: &str| {
            format!("act: {{scope: per_tensor, dtype: int8}}\nweight: {{scope: per_channel, dtype: int4, ext: {ext}}}")
        };
        let spec = spec_of(&y("{fraction: 0.01}"));
        // 200 values in [-1, 1] and two outliers: 1% of 200 = 2 outliers.
        let mut row: Vec<f32> = (0..200).map(|i| ((i * 37 % 201) as f32 - 100.0) / 100.0).collect();
        row[17] = 9.0;
        row[150] = -5.0;
        let qw = quantize(&row, 1, 200, &spec);
        let t =
            row.iter().enumerate().filter(|(i, _)| *i != 17 && *i != 150).map(|(_, x)| x.abs()).fold(0f32, f32::max);
        assert_eq!(qw.scale[0], t / 7.0);
        assert!(qw.q.iter().enumerate().all(|(i, &q)| i == 17 || i == 150 || (-7..=7).contains(&q)));
        assert_eq!((qw.q[17], qw.q[150]), (63, -35));
        assert!(qw.offset.is_none());
        // Sigma: mean 0, so outliers are beyond 3 standard deviations.
        let spec = spec_of(&y("{use_sigma: true, sigma_factor: 3.0}"));
        let qs = quantize(&row, 1, 200, &spec);
        let n = 200.0f64;
        let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let t = row.iter().filter(|&&x| (x as f64 - mean).abs() <= 3.0 * std).fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(qs.scale[0], t / 7.0);
        // An outlier too large for int8 on that scale raises the scale so it still fits.
        row[3] = 1000.0;
        let qw = quantize(&row, 1, 200, &spec_of(&y("{fraction: 0.01}")));
        assert_eq!((qw.scale[0], qw.q[3]), (1000.0 / 127.0, 127));
    }

    #[test]
    fn views_refuse_non_finite_values_with_their_place() {
        let mut w = vec![0.5f32; 40 * 8];
        w[37 * 8 + 5] = f32::NAN;
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        let err =
            quantize_view(&MatrixView::row_major(DType::F32, &bytes, 40, 8), &QuantSpec::preset("w8a16").unwrap());
        let e = err.unwrap_err();
        assert_eq!((e.row, e.col), (37, 5));
        assert!(e.value.is_nan());
        // Read transposed (row r is stored column r), the same matrix names the same place.
        let mut t = vec![0f32; 8 * 40];
        for r in 0..40 {
            for c in 0..8 {
                t[c * 40 + r] = w[r * 8 + c];
            }
        }
        t[6 * 40 + 39] = f32::INFINITY; // a later row: the first in row order is still (37, 5)
        let tb: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = MatrixView {
            dtype: DType::F32,
            bytes: &tb,
            rows: 40,
            cols: 8,
            offset: 0,
            row_stride: 1,
            col_stride: 40,
            scale: None,
        };
        let e = quantize_view(&view, &QuantSpec::preset("w8a16").unwrap()).unwrap_err();
        assert_eq!((e.row, e.col), (37, 5));
    }
}
