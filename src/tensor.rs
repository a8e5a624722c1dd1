//! Element types and owned tensors: what flows from the quantizer to the writer.

use anyhow::{bail, Result};
use half::{bf16, f16};
use ndarray::{Array2, ArrayD, IxDyn};

/// The element types lamina reads and writes. `F8E4M3` is read only, as the weights of FP8
/// block-quantized checkpoints (DeepSeek-V3, the Qwen3 FP8 releases): it is not a float type on
/// its own ([`DType::is_float`] is false), because its values mean something only times their block
/// scale (see `crate::model::fp8`). Checkpoints with other dtypes (E5M2, FP4, complex) are refused
/// when they are opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum DType {
    BOOL,
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// `float8_e4m3fn`: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities.
    F8E4M3,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BOOL | DType::U8 | DType::I8 | DType::F8E4M3 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            DType::BOOL => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::I32 => "I32",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
        }
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<DType> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::BOOL,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::I16 => DType::I16,
            S::I32 => DType::I32,
            S::I64 => DType::I64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::F8_E4M3 => DType::F8E4M3,
            _ => return None,
        })
    }

    /// torch's spelling, as config.json's `torch_dtype` and `--serving_dtype` write it.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            other => other.name(),
        }
    }

    /// Reads torch's spelling of a float dtype (`bfloat16`, `float16`, `float32`, and short forms).
    pub fn from_torch_name(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "bfloat16" | "bf16" => Some(DType::BF16),
            "float16" | "fp16" | "f16" | "half" => Some(DType::F16),
            "float32" | "fp32" | "f32" | "float" => Some(DType::F32),
            _ => None,
        }
    }

    pub fn from_name(s: &str) -> Option<DType> {
        Some(match s {
            "BOOL" => DType::BOOL,
            "U8" => DType::U8,
            "I8" => DType::I8,
            "I16" => DType::I16,
            "I32" => DType::I32,
            "I64" => DType::I64,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            "F8_E4M3" => DType::F8E4M3,
            _ => return None,
        })
    }
}

/// The name, dtype and shape of a tensor: enough to plan where its bytes go.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorMeta {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorMeta {
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[usize]) -> Self {
        TensorMeta { name: name.into(), dtype, shape: shape.to_vec() }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
}

/// An owned tensor in its little-endian byte form, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Tensor {
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> Tensor {
        debug_assert_eq!(bytes.len(), shape.iter().product::<usize>() * dtype.size());
        Tensor { dtype, shape: shape.to_vec(), bytes }
    }
    pub fn from_f32(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_bytes(DType::F32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    pub fn from_i8(shape: &[usize], v: &[i8]) -> Tensor {
        Tensor::from_bytes(DType::I8, shape, v.iter().map(|&x| x as u8).collect())
    }
    pub fn from_i32(shape: &[usize], v: &[i32]) -> Tensor {
        Tensor::from_bytes(DType::I32, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    pub fn from_i64(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::from_bytes(DType::I64, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    /// Encodes f32 values in a float dtype (rounding to nearest even for bf16/f16).
    pub fn from_f32_as(dtype: DType, shape: &[usize], v: &[f32]) -> Result<Tensor> {
        let bytes = match dtype {
            DType::F32 => return Ok(Tensor::from_f32(shape, v)),
            DType::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            DType::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            DType::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
            other => bail!("cannot encode floats as {}", other.name()),
        };
        Ok(Tensor::from_bytes(dtype, shape, bytes))
    }
    pub fn meta(&self, name: &str) -> TensorMeta {
        TensorMeta::new(name, self.dtype, &self.shape)
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        decode_f32(self.dtype, &self.bytes)
    }
    pub fn to_i64(&self) -> Result<Vec<i64>> {
        decode_i64(self.dtype, &self.bytes)
    }
    pub fn to_array(&self) -> Result<ArrayD<f32>> {
        Ok(ArrayD::from_shape_vec(IxDyn(&self.shape), self.to_f32()?)?)
    }
}

/// Widens little-endian float bytes to f32.
pub fn decode_f32(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = vec![0f32; bytes.len() / dtype.size().max(1)];
    decode_f32_into(dtype, bytes, &mut out)?;
    Ok(out)
}

/// The value of every `float8_e4m3fn` byte (0x7F and 0xFF are NaN).
static F8E4M3_VALUES: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        *v = f8e4m3_value(b as u8);
    }
    t
});

/// The value of every `float8_e4m3fn` byte, indexed by the byte.
pub fn f8e4m3_table() -> &'static [f32; 256] {
    &F8E4M3_VALUES
}

/// Decodes one `float8_e4m3fn` byte: `(-1)^s · 2^(e-7) · (1 + m/8)`, subnormals `(-1)^s · 2^-6 · m/8`;
/// exponent and mantissa all ones is NaN (the format has no infinities, its largest value is 448).
pub fn f8e4m3_value(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 0x0F, b & 0x07);
    if e == 0x0F && m == 0x07 {
        return f32::NAN;
    }
    let magnitude =
        if e == 0 { m as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * magnitude
}

/// Widens little-endian float bytes into a caller's buffer (which must hold exactly the elements).
/// FP8 bytes give their raw values, without any block scale.
pub fn decode_f32_into(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    anyhow::ensure!(bytes.len() == n * dtype.size(), "byte length does not match the element count");
    match dtype {
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        }
        DType::F8E4M3 => {
            let table = &*F8E4M3_VALUES;
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = table[b as usize];
            }
        }
        other => bail!("dtype {} is not a float type", other.name()),
    }
    Ok(())
}

pub fn decode_i64(dtype: DType, bytes: &[u8]) -> Result<Vec<i64>> {
    Ok(match dtype {
        DType::I64 => bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
        DType::I32 => bytes.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
        DType::I16 => bytes.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
        DType::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
        DType::U8 | DType::BOOL => bytes.iter().map(|&b| b as i64).collect(),
        other => bail!("dtype {} is not an integer type", other.name()),
    })
}

/// Reshapes a flat f32 buffer as a matrix.
pub fn matrix(rows: usize, cols: usize, v: Vec<f32>) -> Array2<f32> {
    Array2::from_shape_vec((rows, cols), v).expect("matrix shape matches its data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_roundtrip_is_exact_on_the_grid() {
        let v = [1.0f32, -2.5, 0.0078125, 2f32.powi(100), -0.0];
        let t = Tensor::from_f32_as(DType::BF16, &[5], &v).unwrap();
        assert_eq!(t.to_f32().unwrap(), v);
    }

    #[test]
    fn f16_and_f64_widen() {
        let t = Tensor::from_f32_as(DType::F16, &[2], &[0.5, -1.25]).unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![0.5, -1.25]);
        let t = Tensor::from_f32_as(DType::F64, &[1], &[7.0]).unwrap();
        assert_eq!(t.to_f32().unwrap(), vec![7.0]);
    }

    /// Every E4M3FN byte against torch's `float8_e4m3fn` table at a few hand-checked points, and
    /// the format's defining values: 448 the largest, 2^-9 the smallest subnormal, NaN at 0x7F.
    #[test]
    fn fp8_e4m3fn_values() {
        let v = |b: u8| decode_f32(DType::F8E4M3, &[b]).unwrap()[0];
        assert_eq!(v(0x00), 0.0);
        assert_eq!(v(0x38), 1.0); // e = 7, m = 0
        assert_eq!(v(0x3C), 1.5);
        assert_eq!(v(0xC0), -2.0);
        assert_eq!(v(0x7E), 448.0);
        assert_eq!(v(0xFE), -448.0);
        assert_eq!(v(0x01), 2f32.powi(-9));
        assert_eq!(v(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(v(0x07), 7.0 / 8.0 * 2f32.powi(-6)); // largest subnormal
        assert!(v(0x7F).is_nan() && v(0xFF).is_nan());
        assert_eq!(v(0x80), -0.0);
        // Monotonic over the positive codes.
        let pos: Vec<f32> = (0u8..0x7F).map(v).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        assert!(!DType::F8E4M3.is_float());
        assert_eq!(DType::from_name("F8_E4M3"), Some(DType::F8E4M3));
    }

    #[test]
    fn ints_are_not_floats() {
        assert!(decode_f32(DType::I8, &[1, 2]).is_err());
        assert_eq!(decode_i64(DType::I32, &5i32.to_le_bytes()).unwrap(), vec![5]);
    }
}
