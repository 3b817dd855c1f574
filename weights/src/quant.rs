//! Dequantisation of GGML block formats (as in llama.cpp's `ggml-quants.c`).
//!
//! Each block holds 32 values. With `d`, `m` little-endian f16:
//! - `Q4_0` (18 bytes): `d`, then 16 bytes of nibbles; value `j` (< 16) is
//!   `d·((qs[j] & 0xF) − 8)` and value `j + 16` is `d·((qs[j] >> 4) − 8)`.
//! - `Q4_1` (20 bytes): `d`, `m`, 16 bytes of nibbles; value `j` is
//!   `d·(qs[j] & 0xF) + m`, value `j + 16` is `d·(qs[j] >> 4) + m`.
//! - `Q8_0` (34 bytes): `d`, then 32 signed bytes; value `j` is `d·qs[j]`.

use half::f16;

use crate::dtype::DType;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantises whole blocks of `dtype` from `bytes` into `out` (cleared first).
/// `bytes.len()` must be a multiple of the block size (checked by callers).
pub(crate) fn dequantize(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    let (per, size) = dtype.block();
    // `decode` has reserved the capacity (with the huge-page advice).
    out.clear();
    out.resize(bytes.len() / size * per, 0.0);
    let blocks = bytes.chunks_exact(size).zip(out.chunks_exact_mut(per));
    match dtype {
        DType::Q4_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    o[j] = d * ((qs[j] & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                for j in 0..16 {
                    o[j] = d * (qs[j] & 0x0f) as f32 + m;
                    o[j + 16] = d * (qs[j] >> 4) as f32 + m;
                }
            }
        }
        DType::Q8_0 => {
            for (b, o) in blocks {
                let d = f16_at(b, 0);
                for (x, &q) in o.iter_mut().zip(&b[2..34]) {
                    *x = d * (q as i8) as f32;
                }
            }
        }
        _ => unreachable!("dequantize called with non-block dtype {dtype}"),
    }
}
