//! Named f32 tensors and their safetensors encoding: little-endian F32 data,
//! shapes as the caller gives them, tensors sorted by name.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, View};

use crate::error::CheckpointError;

/// One tensor of a checkpoint file. `data` holds `shape.iter().product()`
/// elements in row-major order; an empty shape is a scalar.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl NamedTensor {
    pub fn new(name: impl Into<String>, shape: &[usize], data: Vec<f32>) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    /// A one-dimensional tensor holding `data`.
    pub fn vector(name: impl Into<String>, data: &[f32]) -> Self {
        Self {
            name: name.into(),
            shape: vec![data.len()],
            data: data.to_vec(),
        }
    }
}

/// Lends a [`NamedTensor`] to the safetensors serialiser, one tensor's bytes at a time.
struct F32View<'a>(&'a NamedTensor);

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// The bytes of `{group}.safetensors` holding `tensors`.
pub(crate) fn encode(group: &str, tensors: &[NamedTensor]) -> Result<Vec<u8>, CheckpointError> {
    let mut names = BTreeSet::new();
    for t in tensors {
        let invalid = |why: String| CheckpointError::InvalidTensor {
            group: group.into(),
            tensor: t.name.clone(),
            why,
        };
        if t.name.is_empty() {
            return Err(invalid("the name is empty".into()));
        }
        if !names.insert(t.name.as_str()) {
            return Err(invalid("the name appears twice".into()));
        }
        let elements = t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements != Some(t.data.len()) {
            return Err(invalid(format!(
                "shape {:?} does not hold {} elements",
                t.shape,
                t.data.len()
            )));
        }
    }
    safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), F32View(t))), None).map_err(|e| {
        CheckpointError::InvalidTensor {
            group: group.into(),
            tensor: String::new(),
            why: e.to_string(),
        }
    })
}

/// Parses a whole safetensors file; every tensor must be F32. With `values`
/// false only the header is checked and the tensors come back without data.
pub(crate) fn decode(path: &Path, bytes: &[u8], values: bool) -> Result<Vec<NamedTensor>, CheckpointError> {
    let st = SafeTensors::deserialize(bytes).map_err(|source| CheckpointError::Safetensors {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.iter() {
        let bad = |why: String| CheckpointError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            why,
        };
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("dtype {}; only F32 is supported", view.dtype())));
        }
        let raw = view.data();
        let elements = view.shape().iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if elements.and_then(|n| n.checked_mul(4)) != Some(raw.len()) {
            return Err(bad(format!(
                "shape {:?} does not match its {} data bytes",
                view.shape(),
                raw.len()
            )));
        }
        let data = if values {
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            Vec::new()
        };
        out.push(NamedTensor {
            name: name.to_string(),
            shape: view.shape().to_vec(),
            data,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_keeps_bits() {
        let tensors = vec![
            NamedTensor::new(
                "layers.0.weight",
                &[2, 3],
                vec![1.0, -2.5, 0.0, -0.0, f32::MAX, f32::MIN_POSITIVE],
            ),
            NamedTensor::new("scalar", &[], vec![f32::NAN]),
            NamedTensor::vector("empty", &[]),
        ];
        let bytes = encode("params", &tensors).expect("valid");
        let back = decode(Path::new("p"), &bytes, true).expect("valid");
        let mut want = tensors.clone();
        want.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back.len(), 3);
        for (a, b) in back.iter().zip(&want) {
            assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.data), bits(&b.data));
        }
    }

    #[test]
    fn encode_refuses_shape_mismatch_and_duplicates() {
        let e = encode("params", &[NamedTensor::new("w", &[2, 2], vec![0.0; 3])]).expect_err("3 != 4");
        assert!(e.to_string().contains("`params`, tensor `w`: shape [2, 2]"), "{e}");
        let t = NamedTensor::vector("w", &[1.0]);
        let e = encode("params", &[t.clone(), t]).expect_err("duplicate");
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn decode_refuses_other_dtypes() {
        let data = [0u8; 8];
        let view = safetensors::tensor::TensorView::new(Dtype::F64, vec![1], &data).expect("valid view");
        let bytes = safetensors::serialize([("w", view)], None).expect("serialises");
        let e = decode(Path::new("ck/params.safetensors"), &bytes, true).expect_err("f64");
        assert!(
            e.to_string().contains("ck/params.safetensors: tensor `w`: dtype F64"),
            "{e}"
        );
    }
}
