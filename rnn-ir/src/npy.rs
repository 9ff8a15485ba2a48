//! `.npy` files (NumPy's array format, versions 1–3): `float32` tensors and `int64` vectors in,
//! `float32` tensors out. Only little-endian C-order arrays are accepted; anything else is an
//! error saying what was found.

use crate::error::{Error, Result};
use crate::tensor::{Tensor, f32s_from_le_bytes, f32s_to_le_bytes};

/// The element type of an array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `<f4`
    F32,
    /// `<i8`
    I64,
}

struct Header {
    dtype: String,
    fortran: bool,
    shape: Vec<usize>,
    data_start: usize,
}

fn header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::Npy(
            "not an .npy file (the magic string `\\x93NUMPY` is missing)".into(),
        ));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(Error::Npy(format!("unsupported .npy format version {v}"))),
    };
    let text = bytes
        .get(start..start + len)
        .ok_or_else(|| Error::Npy("truncated .npy header".into()))?;
    let text =
        std::str::from_utf8(text).map_err(|_| Error::Npy("the .npy header is not text".into()))?;
    let field = |key: &str| -> Result<&str> {
        let at = text
            .find(&format!("'{key}'"))
            .ok_or_else(|| Error::Npy(format!("the .npy header has no `{key}`")))?;
        let rest = &text[at + key.len() + 2..];
        let colon = rest
            .find(':')
            .ok_or_else(|| Error::Npy(format!("malformed `{key}` in the .npy header")))?;
        Ok(rest[colon + 1..].trim_start())
    };
    let descr = field("descr")?;
    let dtype = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| Error::Npy("malformed `descr` in the .npy header".into()))?
        .to_string();
    let fortran = field("fortran_order")?.starts_with("True");
    let shape_text = field("shape")?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| Error::Npy("malformed `shape` in the .npy header".into()))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::Npy(format!("malformed `shape` ({inner}) in the .npy header")))?;
    Ok(Header {
        dtype,
        fortran,
        shape,
        data_start: start + len,
    })
}

fn payload<'a>(bytes: &'a [u8], h: &Header, expected: &str, size: usize) -> Result<&'a [u8]> {
    if h.dtype != expected {
        let name = match expected {
            "<f4" => "float32 (`<f4`)",
            _ => "int64 (`<i8`)",
        };
        return Err(Error::Npy(format!(
            "dtype is `{}`, expected {name}",
            h.dtype
        )));
    }
    if h.fortran {
        return Err(Error::Npy(
            "the array is in Fortran order; save it in C order".into(),
        ));
    }
    let count = h
        .shape
        .iter()
        .try_fold(size, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Npy(format!("shape {:?} is too large to address", h.shape)))?;
    let data = &bytes[h.data_start.min(bytes.len())..];
    if data.len() != count {
        return Err(Error::Npy(format!(
            "holds {} bytes of data, but shape {:?} needs {}",
            data.len(),
            h.shape,
            count
        )));
    }
    Ok(data)
}

/// Reads a `float32` array.
pub fn read_f32(bytes: &[u8]) -> Result<Tensor> {
    let h = header(bytes)?;
    let data = payload(bytes, &h, "<f4", 4)?;
    let data = f32s_from_le_bytes(data);
    Ok(Tensor {
        shape: h.shape,
        data,
    })
}

/// Reads an `int64` array with its shape.
pub fn read_i64(bytes: &[u8]) -> Result<(Vec<usize>, Vec<i64>)> {
    let h = header(bytes)?;
    let data = payload(bytes, &h, "<i8", 8)?;
    let data = data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    Ok((h.shape, data))
}

fn write(descr: &str, shape: &[usize], data: Vec<u8>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut text = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with a newline.
    while (10 + text.len() + 1) % 64 != 0 {
        text.push(' ');
    }
    text.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((text.len() as u16).to_le_bytes());
    out.extend(text.as_bytes());
    out.extend(data);
    out
}

/// The bytes of a `float32` `.npy` file holding `t`.
pub fn write_f32(t: &Tensor) -> Vec<u8> {
    write("<f4", &t.shape, f32s_to_le_bytes(&t.data))
}

/// The bytes of an `int64` `.npy` file holding `data` with `shape`.
pub fn write_i64(shape: &[usize], data: &[i64]) -> Vec<u8> {
    write(
        "<i8",
        shape,
        data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}
