//! Reading the safetensors format: a little-endian u64 header length, a JSON header naming each
//! tensor's dtype, shape and byte range, then the raw data.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One tensor's entry in the header.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: [usize; 2],
}

/// A parsed safetensors file held in memory.
#[derive(Debug)]
pub struct SafeTensors {
    data: Vec<u8>,
    base: usize,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER: usize = 100 << 20;

impl SafeTensors {
    /// Parses `data`; errors say which part of the layout is wrong. Every offset and size
    /// from the file is checked with overflow-checked arithmetic before it is used.
    pub fn parse(data: Vec<u8>) -> Result<Self, String> {
        let len_bytes: [u8; 8] = data
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("file is shorter than the 8-byte header length")?;
        let n = u64::from_le_bytes(len_bytes);
        let base = usize::try_from(n)
            .ok()
            .filter(|n| *n <= MAX_HEADER)
            .and_then(|n| n.checked_add(8))
            .filter(|end| *end <= data.len())
            .ok_or_else(|| {
                format!(
                    "header length {n} does not fit the file of {} bytes",
                    data.len()
                )
            })?;
        let header: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&data[8..base]).map_err(|e| format!("header: {e}"))?;
        let room = data.len() - base;
        let mut tensors = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo =
                serde_json::from_value(v).map_err(|e| format!("tensor {name:?}: {e}"))?;
            let [a, b] = info.data_offsets;
            if a > b || b > room {
                return Err(format!(
                    "tensor {name:?}: bytes {a}..{b} lie outside the data ({room} bytes)"
                ));
            }
            let want = dtype_size(&info.dtype).map(|size| {
                info.shape
                    .iter()
                    .try_fold(size, |acc, d| acc.checked_mul(*d))
            });
            match want {
                // An unknown dtype is not size-checked here; readers refuse it by dtype.
                None => {}
                Some(Some(w)) if w == b - a => {}
                _ => {
                    return Err(format!(
                        "tensor {name:?}: shape {:?} of {} does not fill bytes {a}..{b}",
                        info.shape, info.dtype
                    ));
                }
            }
            tensors.insert(name, info);
        }
        Ok(SafeTensors {
            data,
            base,
            tensors,
        })
    }

    /// The f32 values of tensor `name` with its shape, checked for dtype and size.
    pub fn f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>), String> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| format!("no tensor named {name:?}"))?;
        if info.dtype != "F32" {
            return Err(format!("{name}: dtype {} (F32 expected)", info.dtype));
        }
        // Checked by `parse`: a <= b <= room, and the shape fills b - a exactly.
        let [a, b] = info.data_offsets;
        let bytes = &self.data[self.base + a..self.base + b];
        let values = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((info.shape.clone(), values))
    }
}

/// Bytes per element of the dtypes this reader knows (`None`: unknown, not size-checked).
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_f32_tensors_and_rejects_bad_layouts() {
        let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let ok = file(
            r#"{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"__metadata__":{"a":"b"}}"#,
            &data,
        );
        let st = SafeTensors::parse(ok).unwrap();
        assert_eq!(st.f32("t").unwrap(), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
        assert!(st.f32("u").unwrap_err().contains("no tensor named"));
        let short = file(
            r#"{"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,32]}}"#,
            &data,
        );
        assert!(SafeTensors::parse(short).unwrap_err().contains("outside"));
        let shape = file(
            r#"{"t":{"dtype":"F32","shape":[3,2],"data_offsets":[0,16]}}"#,
            &data,
        );
        assert!(
            SafeTensors::parse(shape)
                .unwrap_err()
                .contains("does not fill bytes 0..16")
        );
        let f16 = file(
            r#"{"t":{"dtype":"F16","shape":[8],"data_offsets":[0,16]}}"#,
            &data,
        );
        assert!(
            SafeTensors::parse(f16)
                .unwrap()
                .f32("t")
                .unwrap_err()
                .contains("F16")
        );
        assert!(SafeTensors::parse(vec![1, 2, 3]).is_err());
        // Crafted sizes that used to wrap or panic: a header length near 2^64, offsets near
        // usize::MAX, a shape whose product overflows.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(
            SafeTensors::parse(huge)
                .unwrap_err()
                .contains("does not fit")
        );
        let wrap = file(
            &format!(
                r#"{{"t":{{"dtype":"F32","shape":[4],"data_offsets":[0,{}]}}}}"#,
                usize::MAX
            ),
            &data,
        );
        assert!(SafeTensors::parse(wrap).unwrap_err().contains("outside"));
        let product = file(
            &format!(
                r#"{{"t":{{"dtype":"F32","shape":[{},{}],"data_offsets":[0,16]}}}}"#,
                usize::MAX / 2,
                8
            ),
            &data,
        );
        assert!(
            SafeTensors::parse(product)
                .unwrap_err()
                .contains("does not fill")
        );
        assert!(
            SafeTensors::parse(file("{nope", &[]))
                .unwrap_err()
                .contains("header")
        );
    }
}
