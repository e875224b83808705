//! Reading and writing NumPy `.npy` files (format versions 1 to 3, little-endian, C order)
//! for `f32`, `f16`, `i8`, `i32` and `i64` arrays.

use llm_ir::{
    dtype::DType,
    interp::{Data, Tensor},
};

use crate::weights::floats_le;

fn descr(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::BF16 => "<V2",
        DType::I8 => "|i1",
        DType::I32 => "<i4",
        DType::I64 => "<i8",
    }
}

/// Serializes a tensor as a version 1.0 `.npy` file (bf16 is written as f32).
pub fn write(t: &Tensor) -> Vec<u8> {
    let dtype = if t.dtype == DType::BF16 {
        DType::F32
    } else {
        t.dtype
    };
    let shape = match t.shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", t.shape[0]),
        _ => format!(
            "({})",
            t.shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        descr(dtype)
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match &t.data {
        Data::Float(v) => match dtype {
            DType::F16 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&half::f16::from_f32(*x).to_le_bytes())),
            _ => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        },
        Data::Int(v) => match dtype {
            DType::I8 => v.iter().for_each(|x| out.push(*x as i8 as u8)),
            DType::I32 => v
                .iter()
                .for_each(|x| out.extend_from_slice(&(*x as i32).to_le_bytes())),
            _ => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        },
    }
    out
}

/// Parses a `.npy` file.
pub fn read(bytes: &[u8]) -> Result<Tensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-UTF-8 .npy header")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or(format!("the .npy header has no '{key}'"))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    let descr_text = field("descr")?;
    let descr_value = descr_text
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("malformed .npy descr")?;
    let dtype = match descr_value {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "|i1" | "<i1" => DType::I8,
        "<i4" => DType::I32,
        "<i8" => DType::I64,
        other => {
            return Err(format!(
                "unsupported .npy dtype `{other}` (supported: <f4, <f2, |i1, <i4, <i8)"
            ));
        }
    };
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order .npy arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("malformed .npy shape")?;
    let shape: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("malformed .npy dim `{s}`"))
        })
        .collect::<Result<_, _>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or("the .npy shape overflows")?;
    let data = &bytes[start + header_len..];
    let need = n
        .checked_mul(dtype.size_bytes())
        .ok_or("the .npy shape overflows")?;
    if data.len() != need {
        return Err(format!(
            "the .npy data has {} bytes, but shape {shape:?} of {dtype} needs {need}",
            data.len()
        ));
    }
    Ok(match dtype {
        DType::F32 | DType::F16 => Tensor::from_f32(shape, dtype, floats_le(dtype, data)),
        DType::I8 => Tensor::from_i64(
            shape,
            dtype,
            data.iter().map(|&b| i64::from(b as i8)).collect(),
        ),
        DType::I32 => Tensor::from_i64(
            shape,
            dtype,
            data.chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        _ => Tensor::from_i64(
            shape,
            dtype,
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
    })
}
