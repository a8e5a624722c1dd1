//! A matrix read in place from a stored tensor's bytes: a plain row-major tensor, an expert's
//! linear inside a fused tensor (strided, possibly transposed), or an FP8 weight with its block
//! scales. Quantization widens it row by row (or column by column) without copying the tensor.

use super::fp8::BlockScale;
use crate::tensor::{decode_f32_into, DType};

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
    pub fn read_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let (es, cols) = (self.dtype.size(), self.cols);
        let at = |elem: usize| elem * es;
        if let (Some(scale), 1) = (&self.scale, self.col_stride) {
            // FP8 rows: each byte's value times its block's scale in one pass.
            for k in 0..n {
                let s = at(self.offset + (r0 + k) * self.row_stride);
                scale.decode_row(r0 + k, &self.bytes[s..s + at(cols)], &mut out[k * cols..(k + 1) * cols]);
            }
            return;
        }
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
    pub fn read_column(&self, c: usize, out: &mut [f32]) {
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
