//! Storage types and their conversion to and from `f32`.
//!
//! Every tensor is held in memory as `f32`; [`DType`] remembers how it was
//! stored so it can be written back the same way. Conversions follow IEEE-754
//! round-to-nearest-even (via the `half` crate for F16/BF16). Integer tensors
//! are read as data: a value that `f32` cannot hold exactly (|v| > 2²⁴ and not
//! representable) is an error rather than a silent rounding.

use std::fmt;

use half::{bf16, f16};

/// How a tensor is stored on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum DType {
    /// IEEE-754 binary64; rounded to nearest `f32` when read.
    F64,
    /// IEEE-754 binary32, the in-memory type.
    F32,
    /// IEEE-754 binary16 (half precision).
    F16,
    /// bfloat16: the top 16 bits of an `f32` (8 exponent, 7 mantissa bits).
    BF16,
    /// 8-bit float, 4 exponent bits, 3 mantissa bits, no infinities (OCP `E4M3FN`).
    F8_E4M3,
    /// 8-bit float, 5 exponent bits, 2 mantissa bits (the top byte of an F16).
    F8_E5M2,
    /// Signed 64-bit integer; must be exactly representable in `f32`.
    I64,
    /// Signed 32-bit integer; must be exactly representable in `f32`.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 64-bit integer; must be exactly representable in `f32`.
    U64,
    /// Unsigned 32-bit integer; must be exactly representable in `f32`.
    U32,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 8-bit integer.
    U8,
    /// One byte per value: nonzero reads as `1.0`; only `0.0` and `1.0` can be written.
    Bool,
    /// GGML block quantisation: 32 values share an f16 scale `d`; value = d·(q − 8), q ∈ [0, 15].
    Q4_0,
    /// GGML block quantisation: 32 values share an f16 scale `d` and minimum `m`; value = d·q + m.
    Q4_1,
    /// GGML block quantisation: 32 values share an f16 scale `d`; value = d·q, q ∈ [−128, 127].
    Q8_0,
}

impl DType {
    /// The name safetensors (and this crate's reports) use: `F32`, `BF16`, `Q4_1`, ...
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8_E4M3 => "F8_E4M3",
            DType::F8_E5M2 => "F8_E5M2",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U64 => "U64",
            DType::U32 => "U32",
            DType::U16 => "U16",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q8_0 => "Q8_0",
        }
    }

    /// Parses a safetensors dtype string (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    /// Quantised GGML types are not safetensors dtypes and are not accepted.
    pub fn from_safetensors(s: &str) -> Option<DType> {
        Some(match s {
            "F64" => DType::F64,
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8_E4M3,
            "F8_E5M2" => DType::F8_E5M2,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U64" => DType::U64,
            "U32" => DType::U32,
            "U16" => DType::U16,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// Parses a user-facing output dtype (`f32`, `f16`, `bf16`, `f64`), case-insensitively.
    pub fn parse_float(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "f64" | "float64" => Some(DType::F64),
            _ => None,
        }
    }

    /// Whether safetensors can store this type (all but the GGML block types).
    pub fn is_safetensors(self) -> bool {
        !matches!(self, DType::Q4_0 | DType::Q4_1 | DType::Q8_0)
    }

    /// Whether this is a floating-point type (including quantised ones).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F64
                | DType::F32
                | DType::F16
                | DType::BF16
                | DType::F8_E4M3
                | DType::F8_E5M2
                | DType::Q4_0
                | DType::Q4_1
                | DType::Q8_0
        )
    }

    /// `(elements per block, bytes per block)`; `(1, size)` for plain types.
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F64 | DType::I64 | DType::U64 => (1, 8),
            DType::F32 | DType::I32 | DType::U32 => (1, 4),
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => (1, 2),
            DType::F8_E4M3 | DType::F8_E5M2 | DType::I8 | DType::U8 | DType::Bool => (1, 1),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q8_0 => (32, 34),
        }
    }

    /// Bytes needed for `n` elements, or `None` if `n` is not a whole number
    /// of blocks or the count overflows.
    pub fn bytes_for(self, n: u128) -> Option<u128> {
        let (per, size) = self.block();
        let per = per as u128;
        if !n.is_multiple_of(per) {
            return None;
        }
        (n / per).checked_mul(size as u128)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes one OCP FP8 E4M3FN byte (bias 7, no infinities, `S.1111.111` is NaN).
pub fn f8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Decodes one FP8 E5M2 byte: the high byte of an IEEE half.
pub fn f8_e5m2_to_f32(b: u8) -> f32 {
    f16::from_bits((b as u16) << 8).to_f32()
}

/// Why a value could not be converted (the caller adds file and tensor).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ConvertError {
    /// The value cannot be represented exactly in the target type.
    Inexact(String),
    /// The dtype is not supported in this direction.
    Unsupported,
}

fn int_to_f32(v: i128) -> Result<f32, ConvertError> {
    let f = v as f32;
    if f as i128 == v {
        Ok(f)
    } else {
        Err(ConvertError::Inexact(v.to_string()))
    }
}

macro_rules! le_chunks {
    ($bytes:expr, $n:literal, $ty:ty) => {
        $bytes
            .chunks_exact($n)
            .map(|c| <$ty>::from_le_bytes(c.try_into().expect("chunk size")))
    };
}

/// Decodes little-endian `bytes` of `dtype` (block types included) into `out`.
/// `bytes.len()` must be a whole number of elements/blocks (checked by callers).
pub(crate) fn decode(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), ConvertError> {
    out.clear();
    let (per, size) = dtype.block();
    crate::mem::reserve_huge(out, bytes.len() / size * per);
    match dtype {
        DType::F32 => out.extend(le_chunks!(bytes, 4, f32)),
        DType::F64 => out.extend(le_chunks!(bytes, 8, f64).map(|v| v as f32)),
        DType::F16 => out.extend(le_chunks!(bytes, 2, u16).map(|b| f16::from_bits(b).to_f32())),
        DType::BF16 => {
            out.extend(le_chunks!(bytes, 2, u16).map(|b| f32::from_bits((b as u32) << 16)))
        }
        DType::F8_E4M3 => out.extend(bytes.iter().map(|&b| f8_e4m3_to_f32(b))),
        DType::F8_E5M2 => out.extend(bytes.iter().map(|&b| f8_e5m2_to_f32(b))),
        DType::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
        DType::I8 => out.extend(bytes.iter().map(|&b| b as i8 as f32)),
        DType::Bool => out.extend(bytes.iter().map(|&b| (b != 0) as u8 as f32)),
        DType::I16 => out.extend(le_chunks!(bytes, 2, i16).map(|v| v as f32)),
        DType::U16 => out.extend(le_chunks!(bytes, 2, u16).map(|v| v as f32)),
        DType::I32 => {
            for v in le_chunks!(bytes, 4, i32) {
                out.push(int_to_f32(v as i128)?);
            }
        }
        DType::U32 => {
            for v in le_chunks!(bytes, 4, u32) {
                out.push(int_to_f32(v as i128)?);
            }
        }
        DType::I64 => {
            for v in le_chunks!(bytes, 8, i64) {
                out.push(int_to_f32(v as i128)?);
            }
        }
        DType::U64 => {
            for v in le_chunks!(bytes, 8, u64) {
                out.push(int_to_f32(v as i128)?);
            }
        }
        DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => crate::quant::dequantize(dtype, bytes, out),
    }
    Ok(())
}

fn float_to_int(v: f32, min: f64, max: f64) -> Result<i128, ConvertError> {
    let d = v as f64;
    if d.fract() == 0.0 && d >= min && d <= max {
        Ok(d as i128)
    } else {
        Err(ConvertError::Inexact(v.to_string()))
    }
}

/// Encodes `values` as little-endian `dtype` bytes appended to `out`.
/// Floats round to nearest even; integers must be exact and in range.
pub(crate) fn encode_plain(
    dtype: DType,
    values: impl Iterator<Item = f32>,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    match dtype {
        DType::F32 => values.for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        DType::F64 => values.for_each(|v| out.extend_from_slice(&(v as f64).to_le_bytes())),
        DType::F16 => values.for_each(|v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        DType::BF16 => values.for_each(|v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        DType::Bool => {
            for v in values {
                match v {
                    0.0 => out.push(0),
                    1.0 => out.push(1),
                    _ => return Err(ConvertError::Inexact(v.to_string())),
                }
            }
        }
        DType::U8 => {
            for v in values {
                out.push(float_to_int(v, 0.0, u8::MAX as f64)? as u8);
            }
        }
        DType::I8 => {
            for v in values {
                out.push(float_to_int(v, i8::MIN as f64, i8::MAX as f64)? as i8 as u8);
            }
        }
        DType::I16 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, i16::MIN as f64, i16::MAX as f64)? as i16).to_le_bytes(),
                );
            }
        }
        DType::U16 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, 0.0, u16::MAX as f64)? as u16).to_le_bytes(),
                );
            }
        }
        DType::I32 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, i32::MIN as f64, i32::MAX as f64)? as i32).to_le_bytes(),
                );
            }
        }
        DType::U32 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, 0.0, u32::MAX as f64)? as u32).to_le_bytes(),
                );
            }
        }
        DType::I64 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, i64::MIN as f64, i64::MAX as f64)? as i64).to_le_bytes(),
                );
            }
        }
        DType::U64 => {
            for v in values {
                out.extend_from_slice(
                    &(float_to_int(v, 0.0, u64::MAX as f64)? as u64).to_le_bytes(),
                );
            }
        }
        DType::F8_E4M3 | DType::F8_E5M2 | DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => {
            return Err(ConvertError::Unsupported);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(dtype: DType, v: f32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_plain(dtype, std::iter::once(v), &mut out).unwrap();
        out
    }

    #[test]
    fn bf16_rounds_to_nearest_even_on_known_bit_patterns() {
        let bits = |v: f32| u16::from_le_bytes(enc(DType::BF16, v).try_into().unwrap());
        assert_eq!(bits(1.0), 0x3F80);
        assert_eq!(bits(-2.0), 0xC000);
        // Exactly half-way between 0x3F80 and 0x3F81: ties go to the even 0x3F80.
        assert_eq!(bits(f32::from_bits(0x3F80_8000)), 0x3F80);
        // Half-way between 0x3F81 and 0x3F82: ties go to the even 0x3F82.
        assert_eq!(bits(f32::from_bits(0x3F81_8000)), 0x3F82);
        // Just above half-way rounds up.
        assert_eq!(bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bits(f32::INFINITY), 0x7F80);
        assert!(bits(f32::NAN) & 0x7F80 == 0x7F80 && bits(f32::NAN) & 0x7F != 0);
    }

    #[test]
    fn f16_rounding_overflow_and_subnormals_on_known_bit_patterns() {
        let bits = |v: f32| u16::from_le_bytes(enc(DType::F16, v).try_into().unwrap());
        assert_eq!(bits(1.0), 0x3C00);
        assert_eq!(bits(-0.5), 0xB800);
        assert_eq!(bits(65504.0), 0x7BFF); // largest finite half
        assert_eq!(bits(65520.0), 0x7C00); // rounds to +inf
        assert_eq!(bits(2f32.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(bits(2f32.powi(-26)), 0x0000); // underflows to zero
        // 1 + 2^-11 is half-way between 1 and 1 + 2^-10: ties to even (1.0).
        assert_eq!(bits(1.0 + 2f32.powi(-11)), 0x3C00);
        assert_eq!(bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3C02);
    }

    #[test]
    fn decode_known_bit_patterns() {
        let mut out = Vec::new();
        decode(DType::F16, &[0x00, 0x3C, 0xFF, 0x7B, 0x01, 0x00], &mut out).unwrap();
        assert_eq!(out, vec![1.0, 65504.0, 2f32.powi(-24)]);
        decode(DType::BF16, &[0x80, 0x3F, 0x49, 0x40], &mut out).unwrap();
        assert_eq!(out, vec![1.0, f32::from_bits(0x4049_0000)]);
        decode(DType::I8, &[0xFF, 0x80, 0x7F], &mut out).unwrap();
        assert_eq!(out, vec![-1.0, -128.0, 127.0]);
        decode(DType::Bool, &[0, 1, 2], &mut out).unwrap();
        assert_eq!(out, vec![0.0, 1.0, 1.0]);
    }

    #[test]
    fn fp8_known_values() {
        assert_eq!(f8_e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8_e4m3_to_f32(0x7E), 448.0);
        assert_eq!(f8_e4m3_to_f32(0xB8), -1.0);
        assert_eq!(f8_e4m3_to_f32(0x01), 2f32.powi(-9));
        assert!(f8_e4m3_to_f32(0x7F).is_nan());
        assert_eq!(f8_e5m2_to_f32(0x3C), 1.0);
        assert_eq!(f8_e5m2_to_f32(0x7B), 57344.0);
        assert_eq!(f8_e5m2_to_f32(0x7C), f32::INFINITY);
    }

    #[test]
    fn integers_are_exact_or_refused() {
        let mut out = Vec::new();
        let big = (1i64 << 24) + 1;
        assert!(matches!(
            decode(DType::I64, &big.to_le_bytes(), &mut out),
            Err(ConvertError::Inexact(_))
        ));
        decode(DType::I64, &(-(1i64 << 40)).to_le_bytes(), &mut out).unwrap();
        assert_eq!(out, vec![-(2f32.powi(40))]);
        let mut bytes = Vec::new();
        assert!(encode_plain(DType::U8, [256.0].into_iter(), &mut bytes).is_err());
        assert!(encode_plain(DType::I32, [1.5].into_iter(), &mut bytes).is_err());
        bytes.clear();
        encode_plain(DType::I16, [-2.0, 300.0].into_iter(), &mut bytes).unwrap();
        assert_eq!(bytes, [0xFE, 0xFF, 0x2C, 0x01]);
    }
}
