//! Round-to-nearest weight quantization with symmetric min-max scales, per output channel or
//! per group of input channels.
//!
//! The rule, everywhere: a group's scale is `max|w| / qmax` (1 for an all-zero group), and
//! `q = clamp(round_half_even(w / scale), -qmax, qmax)`.
//!
//! The data-free path quantizes straight from the checkpoint's mapped bytes ([`MatrixView`]): each
//! block of rows is widened to f32 in a small per-thread buffer, its absmax found and its values
//! rounded while the buffer is hot in cache, blocks in parallel. No f32 copy of the whole matrix is
//! made. A fused expert stored transposed (its rows are stored columns) is read in stored order, column
//! by column, and only its integers are transposed.

use super::spec::QuantSpec;
use crate::model::fp8::BlockScale;
use crate::tensor::{decode_f32_into, DType};
use rayon::prelude::*;

/// Integer weights and their scales: `w ≈ q * scale[row, col / group]`.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    /// `[rows, cols]`, each in `[-qmax, qmax]`.
    pub q: Vec<i8>,
    /// `[rows, cols / group]`.
    pub scale: Vec<f32>,
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
                out[r * self.cols + c] = self.q[r * self.cols + c] as f32 * self.scale[r * g + c / self.group];
            }
        }
        out
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
    QuantizedWeight { rows, cols, group, q, scale }
}

/// A `[rows, cols]` matrix read in place from a float tensor's bytes: element `(r, c)` is element
/// `offset + r * row_stride + c * col_stride` of `bytes`. A plain row-major tensor has strides `(cols, 1)`;
/// a linear stored transposed inside a fused expert tensor has `(1, stored row length)`. An FP8 weight
/// carries its block scale, which multiplies each value as it is widened.
#[derive(Debug, Clone, Copy)]
pub struct MatrixView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub scale: Option<BlockScale<'a>>,
}

impl<'a> MatrixView<'a> {
    /// A row-major tensor.
    pub fn row_major(dtype: DType, bytes: &'a [u8], rows: usize, cols: usize) -> MatrixView<'a> {
        MatrixView { dtype, bytes, rows, cols, offset: 0, row_stride: cols, col_stride: 1, scale: None }
    }

    /// A row-major FP8 weight with its block scale.
    pub fn block_fp8(bytes: &'a [u8], rows: usize, cols: usize, scale: BlockScale<'a>) -> MatrixView<'a> {
        MatrixView { scale: Some(scale), ..MatrixView::row_major(DType::F8E4M3, bytes, rows, cols) }
    }

    /// Widens the rows from `r0` on that `out` holds (`out.len() / cols` of them, row-major), block
    /// scales applied.
    pub fn read_rows_into(&self, r0: usize, out: &mut [f32]) {
        let n = out.len() / self.cols.max(1);
        self.read_rows(r0, n, out);
    }

    /// Widens rows `r0..r0 + n` into `out` (`n × cols`, row-major).
    fn read_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let (es, cols) = (self.dtype.size(), self.cols);
        let at = |elem: usize| elem * es;
        if self.col_stride == 1 {
            let start = at(self.offset + r0 * self.row_stride);
            if self.row_stride == cols {
                decode(self.dtype, &self.bytes[start..start + at(n * cols)], out);
            } else {
                for k in 0..n {
                    let s = start + at(k * self.row_stride);
                    decode(self.dtype, &self.bytes[s..s + at(cols)], &mut out[k * cols..(k + 1) * cols]);
                }
            }
        } else {
            for k in 0..n {
                for c in 0..cols {
                    let s = at(self.offset + (r0 + k) * self.row_stride + c * self.col_stride);
                    decode(self.dtype, &self.bytes[s..s + es], &mut out[k * cols + c..k * cols + c + 1]);
                }
            }
        }
        if let Some(scale) = &self.scale {
            for (k, row) in out[..n * cols].chunks_mut(cols.max(1)).enumerate() {
                scale.apply_row(r0 + k, 0, row);
            }
        }
    }

    /// For a transposed view (`row_stride == 1`): widens column `c`, which is contiguous in the stored
    /// tensor, into `out` (`rows` values).
    fn read_column(&self, c: usize, out: &mut [f32]) {
        let es = self.dtype.size();
        let s = (self.offset + c * self.col_stride) * es;
        decode(self.dtype, &self.bytes[s..s + self.rows * es], out);
        if let Some(scale) = &self.scale {
            scale.apply_column(c, 0, &mut out[..self.rows]);
        }
    }
}

fn decode(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    decode_f32_into(dtype, bytes, out).expect("a MatrixView holds a float dtype");
}

/// A value that cannot be quantized, at `(row, col)` of the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NonFinite {
    pub row: usize,
    pub col: usize,
    pub value: f32,
}

/// Rows handled together.
const BLOCK_ROWS: usize = 32;

/// Quantizes a matrix read in place, blocks of rows in parallel, refusing NaN and infinities (which would
/// poison every scale). The result is identical to widening the matrix to f32 and calling [`quantize`].
pub fn quantize_view(m: &MatrixView, spec: &QuantSpec) -> Result<QuantizedWeight, NonFinite> {
    assert!(m.dtype.is_float() || m.scale.is_some(), "quantize_view needs a float tensor or an FP8 one with its scale");
    let (rows, cols) = (m.rows, m.cols);
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let qmax = spec.qmax();
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0f32; rows * groups];
    if rows == 0 || cols == 0 {
        return Ok(QuantizedWeight { rows, cols, group, q, scale });
    }
    if m.row_stride == 1 && m.col_stride != 1 {
        return quantize_transposed(m, group, qmax);
    }
    q.par_chunks_mut(BLOCK_ROWS * cols).zip(scale.par_chunks_mut(BLOCK_ROWS * groups)).enumerate().try_for_each_init(
        Vec::<f32>::new,
        |buf, (b, (qb, sb))| {
            let (r0, n) = (b * BLOCK_ROWS, qb.len() / cols);
            buf.resize(n * cols, 0.0);
            m.read_rows(r0, n, buf);
            for (k, ((w, q), s)) in buf.chunks(cols).zip(qb.chunks_mut(cols)).zip(sb.chunks_mut(groups)).enumerate() {
                if let Some(c) = quantize_row(w, q, s, group, qmax) {
                    return Err(NonFinite { row: r0 + k, col: c, value: w[c] });
                }
            }
            Ok(())
        },
    )?;
    Ok(QuantizedWeight { rows, cols, group, q, scale })
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
    Ok(QuantizedWeight { rows, cols, group, q, scale })
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
