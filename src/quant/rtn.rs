//! Round-to-nearest weight quantization with symmetric min-max scales, per output channel or
//! per group of input channels.

use super::spec::QuantSpec;
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
    let absmax = values.iter().fold(0f32, |m, &x| m.max(x.abs()));
    if absmax > 0.0 {
        absmax / qmax as f32
    } else {
        1.0
    }
}

/// Rounds half to even, as torch.round does, and clamps to the integer range.
pub fn quantize_value(w: f32, scale: f32, qmax: i32) -> i8 {
    (w / scale).round_ties_even().clamp(-qmax as f32, qmax as f32) as i8
}

/// Quantizes a row-major `[rows, cols]` matrix. Rows are processed in parallel.
pub fn quantize(w: &[f32], rows: usize, cols: usize, spec: &QuantSpec) -> QuantizedWeight {
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let qmax = spec.qmax();
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0f32; rows * groups];
    q.par_chunks_mut(cols).zip(scale.par_chunks_mut(groups)).zip(w.par_chunks(cols)).for_each(
        |((qrow, srow), wrow)| {
            for (g, s) in srow.iter_mut().enumerate() {
                let range = g * group..((g + 1) * group).min(cols);
                *s = symmetric_scale(&wrow[range.clone()], qmax);
                for c in range {
                    qrow[c] = quantize_value(wrow[c], *s, qmax);
                }
            }
        },
    );
    QuantizedWeight { rows, cols, group, q, scale }
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
}
