//! `.npy` files (NumPy's array format): read as `numpy.load` reads them, written in the format's
//! plainest form.
//!
//! Reading accepts every valid `.npy` file of a numeric type this crate can hold exactly:
//! - format versions 1.0, 2.0 (a 4-byte header length) and 3.0 (a UTF-8 header);
//! - the header as the Python dict literal NumPy writes, keys in any order, either quote style;
//! - C order and Fortran order (`fortran_order: True`, which NumPy writes for a transposed
//!   array): a Fortran-order array is transposed into C order, so the tensor is the same array;
//! - any rank, including 0-d (one element, shape `[]`) and 1-d arrays, and empty arrays;
//! - both byte orders (`<`, `>`, and `|` / `=` where they apply).
//!
//! Element types: [`read_f32`] takes `float32` (`<f4`, `>f4`), `float16` (widened, always exact)
//! and `float64` **only when every element is exactly a `float32`** (NaN and infinities
//! included): a `float64` array holding values `float32` cannot represent is an error naming the
//! first such element, never rounded silently. [`read_i64`] takes signed and unsigned integers
//! of 1, 2, 4 or 8 bytes in either byte order (`<i8`, `>i8`, `<i4`, …); a `uint64` element above
//! `i64::MAX` is an error. Anything else (structured or object arrays, complex numbers, strings,
//! trailing or missing data bytes, an unknown format version) is an [`Error::Npy`] saying what
//! was found.
//!
//! Writing produces version 1.0, little-endian, C order: `float32` tensors and `int64` arrays.

use crate::error::{Error, Result};
use crate::tensor::{Tensor, f32s_to_le_bytes};

/// What an element is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Float,
    Int,
    UInt,
}

/// An element type: kind, bytes and byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dtype {
    kind: Kind,
    size: usize,
    big_endian: bool,
}

impl Dtype {
    /// Parses a simple NumPy type string (`<f4`, `>i8`, `|u1`); `None` for anything else.
    fn parse(descr: &str) -> Option<Dtype> {
        let mut chars = descr.chars();
        let big_endian = match chars.next()? {
            '<' | '|' => false,
            '>' => true,
            '=' => cfg!(target_endian = "big"),
            _ => return None,
        };
        let kind = match chars.next()? {
            'f' => Kind::Float,
            'i' => Kind::Int,
            'u' => Kind::UInt,
            _ => return None,
        };
        let size: usize = chars.as_str().parse().ok()?;
        let ok = match kind {
            Kind::Float => matches!(size, 2 | 4 | 8),
            Kind::Int | Kind::UInt => matches!(size, 1 | 2 | 4 | 8),
        };
        ok.then_some(Dtype {
            kind,
            size,
            big_endian,
        })
    }

    /// The element at `bytes` (exactly `size` of them) widened to `f64` (floats) or `i128`
    /// (integers), both exact.
    fn float(self, b: &[u8]) -> f64 {
        let mut a = [0u8; 8];
        a[..self.size].copy_from_slice(b);
        if self.big_endian {
            a[..self.size].reverse();
        }
        match self.size {
            2 => f16_to_f64(u16::from_le_bytes([a[0], a[1]])),
            4 => f32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            _ => f64::from_le_bytes(a),
        }
    }

    fn int(self, b: &[u8]) -> i128 {
        let mut a = [0u8; 8];
        a[..self.size].copy_from_slice(b);
        if self.big_endian {
            a[..self.size].reverse();
        }
        let unsigned = u64::from_le_bytes(a);
        match self.kind {
            Kind::UInt => unsigned as i128,
            // Sign-extend from `size` bytes.
            _ => {
                let shift = 64 - 8 * self.size as u32;
                (((unsigned << shift) as i64) >> shift) as i128
            }
        }
    }
}

/// The value of an IEEE half-precision number (exact in `f64`).
fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((bits >> 10) & 0x1f) as i32;
    let fraction = (bits & 0x3ff) as f64;
    sign * match exponent {
        0 => fraction * 2f64.powi(-24),
        0x1f if fraction == 0.0 => f64::INFINITY,
        0x1f => f64::NAN,
        e => (1.0 + fraction / 1024.0) * 2f64.powi(e - 15),
    }
}

/// A parsed header.
struct Header {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
    data_start: usize,
}

impl Header {
    /// The number of elements, checked.
    fn count(&self) -> Result<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::Npy(format!(
                    "shape {} is too large to address",
                    dims(&self.shape)
                ))
            })
    }
}

fn dims(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// A value of the Python literal subset NumPy headers are written in.
enum Lit {
    Str(String),
    Bool(bool),
    Int(u128),
    /// `None`, a negative or fractional number: valid Python, never a valid size.
    Other,
    Seq(Vec<Lit>),
    Dict(Vec<(Lit, Lit)>),
}

/// A recursive-descent reader of a Python literal.
struct Literal<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    depth: usize,
}

impl Literal<'_> {
    fn skip_space(&mut self) {
        while self.chars.peek().is_some_and(|c| c.is_whitespace()) {
            self.chars.next();
        }
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_space();
        if self.chars.peek() == Some(&c) {
            self.chars.next();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Option<Lit> {
        self.skip_space();
        // Headers are a handful of levels deep; a deeper one is damaged (and must not overflow
        // the stack).
        if self.depth > 16 {
            return None;
        }
        let c = *self.chars.peek()?;
        match c {
            '\'' | '"' => {
                self.chars.next();
                let mut s = String::new();
                loop {
                    match self.chars.next()? {
                        '\\' => s.push(self.chars.next()?),
                        q if q == c => return Some(Lit::Str(s)),
                        ch => s.push(ch),
                    }
                }
            }
            '(' | '[' | '{' => {
                self.chars.next();
                self.depth += 1;
                let close = match c {
                    '(' => ')',
                    '[' => ']',
                    _ => '}',
                };
                let mut items = Vec::new();
                let mut pairs = Vec::new();
                loop {
                    if self.eat(close) {
                        break;
                    }
                    let item = self.value()?;
                    if c == '{' {
                        if !self.eat(':') {
                            return None;
                        }
                        pairs.push((item, self.value()?));
                    } else {
                        items.push(item);
                    }
                    if !self.eat(',') {
                        if self.eat(close) {
                            break;
                        }
                        return None;
                    }
                }
                self.depth -= 1;
                Some(if c == '{' {
                    Lit::Dict(pairs)
                } else {
                    Lit::Seq(items)
                })
            }
            _ => {
                let mut word = String::new();
                while let Some(&ch) = self.chars.peek() {
                    if !(ch.is_ascii_alphanumeric() || matches!(ch, '_' | '-' | '+' | '.')) {
                        break;
                    }
                    word.push(ch);
                    self.chars.next();
                }
                match word.as_str() {
                    "True" => Some(Lit::Bool(true)),
                    "False" => Some(Lit::Bool(false)),
                    "None" => Some(Lit::Other),
                    w => {
                        // Python 2 wrote long integers with an `L`.
                        let digits = w.trim_end_matches(['L', 'l']);
                        match digits.parse() {
                            Ok(n) => Some(Lit::Int(n)),
                            Err(_) => digits.parse::<f64>().ok().map(|_| Lit::Other),
                        }
                    }
                }
            }
        }
    }
}

fn malformed(what: &str) -> Error {
    Error::Npy(format!("malformed .npy header: {what}"))
}

fn header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 8 || &bytes[..6] != b"\x93NUMPY" {
        return Err(Error::Npy(
            "not an .npy file (the magic string `\\x93NUMPY` is missing)".into(),
        ));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (len, start): (usize, usize) = match (major, minor) {
        (1, 0) if bytes.len() >= 10 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        (2 | 3, 0) if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        (1..=3, 0) => return Err(Error::Npy("truncated .npy header".into())),
        _ => {
            return Err(Error::Npy(format!(
                "unsupported .npy format version {major}.{minor} (expected 1.0, 2.0 or 3.0)"
            )));
        }
    };
    let raw = start
        .checked_add(len)
        .and_then(|end| bytes.get(start..end))
        .ok_or_else(|| Error::Npy("truncated .npy header".into()))?;
    // Versions 1 and 2 write the header in Latin-1, version 3 in UTF-8.
    let text: String = if major == 3 {
        std::str::from_utf8(raw)
            .map_err(|_| malformed("a version 3.0 header must be UTF-8"))?
            .to_string()
    } else {
        raw.iter().map(|&b| b as char).collect()
    };
    let mut reader = Literal {
        chars: text.chars().peekable(),
        depth: 0,
    };
    let Some(Lit::Dict(pairs)) = reader.value() else {
        return Err(malformed(
            "expected a dict like `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}`",
        ));
    };
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    for (key, value) in pairs {
        match (key, value) {
            (Lit::Str(k), Lit::Str(d)) if k == "descr" => descr = Some(d),
            (Lit::Str(k), _) if k == "descr" => {
                return Err(Error::Npy(
                    "the array has a structured dtype; expected a plain numeric array".into(),
                ));
            }
            (Lit::Str(k), Lit::Bool(b)) if k == "fortran_order" => fortran = Some(b),
            (Lit::Str(k), Lit::Seq(items)) if k == "shape" => {
                let dims = items
                    .iter()
                    .map(|d| match d {
                        Lit::Int(n) => usize::try_from(*n).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| malformed("`shape` must be a tuple of sizes"))?;
                shape = Some(dims);
            }
            (Lit::Str(k), _) if k == "fortran_order" => {
                return Err(malformed("`fortran_order` must be True or False"));
            }
            (Lit::Str(k), _) if k == "shape" => {
                return Err(malformed("`shape` must be a tuple of sizes"));
            }
            (Lit::Str(k), _) => {
                return Err(malformed(&format!(
                    "unexpected key `{}` (expected `descr`, `fortran_order` and `shape`)",
                    short(&k)
                )));
            }
            _ => return Err(malformed("the keys must be strings")),
        }
    }
    let missing = |k: &str| malformed(&format!("no `{k}`"));
    Ok(Header {
        descr: descr.ok_or_else(|| missing("descr"))?,
        fortran: fortran.ok_or_else(|| missing("fortran_order"))?,
        shape: shape.ok_or_else(|| missing("shape"))?,
        data_start: start + len,
    })
}

/// At most 40 characters of `s`, for messages.
fn short(s: &str) -> String {
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s.to_string()
    }
}

/// The header, its element type (one of `accept`'s kinds, else an error naming `wanted`) and
/// the data bytes, checked against the shape.
fn open<'a>(bytes: &'a [u8], accept: &[Kind], wanted: &str) -> Result<(Header, Dtype, &'a [u8])> {
    let h = header(bytes)?;
    let dtype = Dtype::parse(&h.descr)
        .filter(|d| accept.contains(&d.kind))
        .ok_or_else(|| Error::Npy(format!("dtype is `{}`, expected {wanted}", short(&h.descr))))?;
    let count = h.count()?;
    let need = count
        .checked_mul(dtype.size)
        .ok_or_else(|| Error::Npy(format!("shape {} is too large to address", dims(&h.shape))))?;
    let data = &bytes[h.data_start.min(bytes.len())..];
    if data.len() != need {
        return Err(Error::Npy(format!(
            "holds {} bytes of data, but shape {} of `{}` needs {need}",
            data.len(),
            dims(&h.shape),
            h.descr
        )));
    }
    Ok((h, dtype, data))
}

/// `data` (the elements of an array of `shape` in Fortran order) in C order.
fn fortran_to_c<T: Copy>(data: Vec<T>, shape: &[usize]) -> Vec<T> {
    if shape.len() < 2 || data.is_empty() {
        return data;
    }
    // Fortran strides: the first index varies fastest.
    let mut strides = vec![1usize; shape.len()];
    for k in 1..shape.len() {
        strides[k] = strides[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; shape.len()];
    let mut offset = 0usize;
    for _ in 0..data.len() {
        out.push(data[offset]);
        // Advance the C-order index, last dimension fastest.
        for k in (0..shape.len()).rev() {
            index[k] += 1;
            offset += strides[k];
            if index[k] < shape[k] {
                break;
            }
            offset -= strides[k] * shape[k];
            index[k] = 0;
        }
    }
    out
}

/// Reads a floating-point array as `f32`: `float32` as is, `float16` widened, `float64` when
/// every element is exactly a `float32` (see the module doc).
pub fn read_f32(bytes: &[u8]) -> Result<Tensor> {
    let (h, dtype, data) = open(
        bytes,
        &[Kind::Float],
        "float32 (`<f4` or `>f4`; float16 and float64 holding float32 values are also read)",
    )?;
    let mut out = Vec::with_capacity(data.len() / dtype.size);
    for (i, b) in data.chunks_exact(dtype.size).enumerate() {
        let v = dtype.float(b);
        let single = v as f32;
        if single as f64 != v && !v.is_nan() {
            return Err(Error::Npy(format!(
                "dtype is `{}` and element {i} ({v:e}) is not exactly a float32: save the array as float32",
                h.descr
            )));
        }
        out.push(single);
    }
    let data = if h.fortran {
        fortran_to_c(out, &h.shape)
    } else {
        out
    };
    Ok(Tensor {
        shape: h.shape,
        data,
    })
}

/// Reads an integer array (signed or unsigned, 1 to 8 bytes, either byte order) as `i64`, with
/// its shape.
pub fn read_i64(bytes: &[u8]) -> Result<(Vec<usize>, Vec<i64>)> {
    let (h, dtype, data) = open(
        bytes,
        &[Kind::Int, Kind::UInt],
        "an integer type such as int64 (`<i8`) or int32 (`<i4`)",
    )?;
    let mut out = Vec::with_capacity(data.len() / dtype.size);
    for (i, b) in data.chunks_exact(dtype.size).enumerate() {
        let v = dtype.int(b);
        out.push(i64::try_from(v).map_err(|_| {
            Error::Npy(format!(
                "dtype is `{}` and element {i} ({v}) does not fit in int64",
                h.descr
            ))
        })?);
    }
    let data = if h.fortran {
        fortran_to_c(out, &h.shape)
    } else {
        out
    };
    Ok((h.shape, data))
}

fn write(descr: &str, shape: &[usize], data: Vec<u8>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    framed(1, &dict, &data)
}

/// The bytes of an `.npy` file of format `version` (1, 2 or 3) whose header is the Python dict
/// literal `dict` (`{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }`), padded with
/// spaces and a newline as numpy pads it so that the data starts on a 64-byte boundary, then
/// `data`: a file of any dtype, order or version numpy writes, byte for byte.
pub fn framed(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let mut text = dict.to_string();
    let prefix = if version == 1 { 10 } else { 12 };
    while !(prefix + text.len() + 1).is_multiple_of(64) {
        text.push(' ');
    }
    text.push('\n');
    let mut out = vec![0x93, b'N', b'U', b'M', b'P', b'Y', version, 0];
    if version == 1 {
        out.extend((text.len() as u16).to_le_bytes());
    } else {
        out.extend((text.len() as u32).to_le_bytes());
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    use super::framed as npy;

    fn le_f32(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn be_f32(xs: &[f32]) -> Vec<u8> {
        xs.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::Npy(m)) => m,
            other => panic!("expected an .npy error, got {other:?}"),
        }
    }

    #[test]
    fn c_order_little_endian_float32() {
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &le_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        );
        let t = read_f32(&b).unwrap();
        assert_eq!(t.shape, vec![2, 3]);
        assert_eq!(t.data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn written_files_read_back() {
        let t = Tensor::new(vec![2, 1, 2], vec![0.5, -1.0, 3.25, 7.0]).unwrap();
        assert_eq!(read_f32(&write_f32(&t)).unwrap(), t);
        assert_eq!(
            read_i64(&write_i64(&[3], &[1, -2, 3])).unwrap(),
            (vec![3], vec![1, -2, 3])
        );
        let scalar = Tensor::new(vec![], vec![2.5]).unwrap();
        assert_eq!(read_f32(&write_f32(&scalar)).unwrap(), scalar);
    }

    #[test]
    fn big_endian_float32() {
        let b = npy(
            1,
            "{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }",
            &be_f32(&[1.5, -2.0, 1e-3]),
        );
        assert_eq!(read_f32(&b).unwrap().data, vec![1.5, -2.0, 1e-3]);
    }

    /// `np.arange(6, dtype=np.float32).reshape(2, 3).T` saved: shape (3, 2), Fortran order,
    /// the bytes of the original C-order (2, 3) array.
    #[test]
    fn fortran_order_is_transposed_into_c_order() {
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }",
            &le_f32(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        );
        let t = read_f32(&b).unwrap();
        assert_eq!(t.shape, vec![3, 2]);
        // The transpose of [[0, 1, 2], [3, 4, 5]] in C order.
        assert_eq!(t.data, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn fortran_order_in_three_dimensions() {
        // Element (i, j, k) of a (2, 3, 4) array holds 100 i + 10 j + k; Fortran order stores it
        // at i + 2 j + 6 k.
        let shape = [2usize, 3, 4];
        let mut fortran = vec![0.0f32; 24];
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    fortran[i + 2 * j + 6 * k] = (100 * i + 10 * j + k) as f32;
                }
            }
        }
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3, 4), }",
            &le_f32(&fortran),
        );
        let t = read_f32(&b).unwrap();
        assert_eq!(t.shape, shape.to_vec());
        let mut n = 0;
        for i in 0..2 {
            for j in 0..3 {
                for k in 0..4 {
                    assert_eq!(t.data[n], (100 * i + 10 * j + k) as f32);
                    n += 1;
                }
            }
        }
    }

    #[test]
    fn fortran_order_integers() {
        let data: Vec<u8> = [1i64, 2, 3, 4]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b = npy(
            1,
            "{'descr': '<i8', 'fortran_order': True, 'shape': (2, 2), }",
            &data,
        );
        assert_eq!(read_i64(&b).unwrap(), (vec![2, 2], vec![1, 3, 2, 4]));
    }

    #[test]
    fn zero_and_one_dimensional_arrays() {
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
            &le_f32(&[4.0]),
        );
        let t = read_f32(&b).unwrap();
        assert_eq!((t.shape, t.data), (vec![], vec![4.0]));
        // NumPy marks every 0-d and 1-d array as both C and Fortran contiguous.
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
            &le_f32(&[4.0, 5.0]),
        );
        let t = read_f32(&b).unwrap();
        assert_eq!((t.shape, t.data), (vec![2], vec![4.0, 5.0]));
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }",
            &[],
        );
        assert_eq!(read_f32(&b).unwrap().shape, vec![0, 3]);
    }

    #[test]
    fn versions_two_and_three() {
        for version in [2, 3] {
            let b = npy(
                version,
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
                &le_f32(&[1.0, 2.0]),
            );
            assert_eq!(
                read_f32(&b).unwrap().data,
                vec![1.0, 2.0],
                "version {version}"
            );
        }
        let mut b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &le_f32(&[1.0]),
        );
        b[6] = 4;
        assert!(err(read_f32(&b)).contains("unsupported .npy format version 4.0"));
        b[6] = 1;
        b[7] = 1;
        assert!(err(read_f32(&b)).contains("unsupported .npy format version 1.1"));
    }

    #[test]
    fn header_keys_in_any_order_and_either_quote() {
        let b = npy(
            1,
            "{\"shape\": (2L,), \"fortran_order\": False, \"descr\": \"<f4\"}",
            &le_f32(&[1.0, 2.0]),
        );
        assert_eq!(read_f32(&b).unwrap().data, vec![1.0, 2.0]);
    }

    #[test]
    fn float64_and_float16_are_read_when_exact() {
        let data: Vec<u8> = [0.5f64, -3.0, f64::INFINITY]
            .iter()
            .flat_map(|x| x.to_be_bytes())
            .collect();
        let b = npy(
            1,
            "{'descr': '>f8', 'fortran_order': False, 'shape': (3,), }",
            &data,
        );
        assert_eq!(read_f32(&b).unwrap().data, vec![0.5, -3.0, f32::INFINITY]);
        let data: Vec<u8> = [1.0f64, 0.1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b = npy(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
            &data,
        );
        let m = err(read_f32(&b));
        assert!(
            m.contains("`<f8`") && m.contains("element 1") && m.contains("not exactly a float32"),
            "{m}"
        );
        // float16: 1.0 is 0x3c00, -2.0 is 0xc000, the smallest subnormal is 0x0001.
        let data: Vec<u8> = [0x3c00u16, 0xc000, 0x0001]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b = npy(
            1,
            "{'descr': '<f2', 'fortran_order': False, 'shape': (3,), }",
            &data,
        );
        assert_eq!(read_f32(&b).unwrap().data, vec![1.0, -2.0, 2f32.powi(-24)]);
    }

    #[test]
    fn integer_types_and_byte_orders() {
        let i8s: Vec<u8> = [5i64, -1].iter().flat_map(|x| x.to_be_bytes()).collect();
        let i4s: Vec<u8> = [5i32, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let u2s: Vec<u8> = [5u16, 65535].iter().flat_map(|x| x.to_be_bytes()).collect();
        for (descr, data, want) in [
            ("<i4", i4s, vec![5, -1]),
            (">i8", i8s, vec![5, -1]),
            (">u2", u2s, vec![5, 65535]),
            ("|i1", vec![5u8, 0xff], vec![5, -1]),
            ("|u1", vec![5u8, 0xff], vec![5, 255]),
        ] {
            let b = npy(
                1,
                &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2,), }}"),
                &data,
            );
            assert_eq!(read_i64(&b).unwrap(), (vec![2], want), "{descr}");
        }
        let b = npy(
            1,
            "{'descr': '<u8', 'fortran_order': False, 'shape': (1,), }",
            &u64::MAX.to_le_bytes(),
        );
        assert!(err(read_i64(&b)).contains("does not fit in int64"));
    }

    #[test]
    fn wrong_types_are_named() {
        let b = npy(
            1,
            "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        assert!(err(read_f32(&b)).contains("dtype is `<i8`, expected float32"));
        let b = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
            &[0; 4],
        );
        assert!(err(read_i64(&b)).contains("dtype is `<f4`, expected an integer type"));
        for descr in ["'|O'", "'<c8'", "'<U3'", "'<f3'", "'f4'"] {
            let b = npy(
                1,
                &format!("{{'descr': {descr}, 'fortran_order': False, 'shape': (1,), }}"),
                &[0; 4],
            );
            assert!(err(read_f32(&b)).contains("dtype is"), "{descr}");
        }
        let b = npy(
            1,
            "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        assert!(err(read_f32(&b)).contains("structured dtype"));
    }

    #[test]
    fn damaged_files_are_errors() {
        let good = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &le_f32(&[1.0, 2.0]),
        );
        assert!(err(read_f32(b"hello")).contains("not an .npy file"));
        assert!(err(read_f32(&good[..9])).contains("truncated .npy header"));
        assert!(err(read_f32(&good[..40])).contains("truncated .npy header"));
        let m = err(read_f32(&good[..good.len() - 1]));
        assert!(
            m.contains("holds 7 bytes of data, but shape [2] of `<f4` needs 8"),
            "{m}"
        );
        let mut long = good.clone();
        long.push(0);
        assert!(err(read_f32(&long)).contains("holds 9 bytes"));
        for (dict, want) in [
            ("{'descr': '<f4', 'shape': (2,), }", "no `fortran_order`"),
            (
                "{'descr': '<f4', 'fortran_order': 0, 'shape': (2,)}",
                "`fortran_order` must be",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2.5,)}",
                "`shape` must be",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}",
                "`shape` must be",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                "unexpected key `x`",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,)",
                "expected a dict",
            ),
            ("['descr', '<f4']", "expected a dict"),
            (
                &format!("{}{}", "(".repeat(200), ")".repeat(200)),
                "expected a dict",
            ),
        ] {
            let m = err(read_f32(&npy(1, dict, &le_f32(&[1.0, 2.0]))));
            assert!(m.contains(want), "{dict}: {m}");
        }
        let huge = npy(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }",
            &[],
        );
        assert!(err(read_f32(&huge)).contains("too large"));
        let mut latin = npy(
            3,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }",
            &le_f32(&[1.0, 2.0]),
        );
        latin[20] = 0xff;
        assert!(err(read_f32(&latin)).contains("UTF-8"));
    }
}
