//! `ErrorFeedback`: the residual of what a biased codec did not send, added
//! to the next gradient (Seide et al. 2014; Karimireddy et al. 2019), so that
//! nothing is lost, only delayed.

use crate::error::CodecError;
use crate::spec::CodecSpec;

/// The error-feedback residual of one tensor (or bucket), part of the
/// training state: checkpoint it as `{param}.ef_residual`
/// ([`ErrorFeedback::STATE_SUFFIX`]) through [`ErrorFeedback::state`] and
/// [`ErrorFeedback::load_state`].
///
/// **Invariant:** after any sequence of [`ErrorFeedback::compress`] calls,
/// Σ decoded messages + residual = Σ gradients (up to f32 rounding of the sums).
#[derive(Clone, Debug, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Suffix of the residual's name in a checkpoint: `{param}.ef_residual`.
    pub const STATE_SUFFIX: &'static str = "ef_residual";

    /// A zero residual for a gradient of `len` elements.
    pub fn new(len: usize) -> Self {
        Self {
            residual: vec![0.0; len],
        }
    }

    pub fn len(&self) -> usize {
        self.residual.len()
    }

    pub fn is_empty(&self) -> bool {
        self.residual.is_empty()
    }

    /// The residual, for a checkpoint.
    pub fn state(&self) -> &[f32] {
        &self.residual
    }

    /// Replaces the residual by one from a checkpoint; on error nothing changes.
    pub fn load_state(&mut self, residual: &[f32]) -> Result<(), CodecError> {
        if residual.len() != self.residual.len() {
            return Err(CodecError::StateLength {
                what: "error-feedback residual",
                expected: self.residual.len(),
                got: residual.len(),
            });
        }
        self.residual.copy_from_slice(residual);
        Ok(())
    }

    /// Forgets the residual (e.g. when the learning rate changes sharply).
    pub fn reset(&mut self) {
        self.residual.fill(0.0);
    }

    /// `g' = grad + residual`; encodes `g'` into `out` (see [`crate::encode`]);
    /// `residual = g' − decode(out)`.
    pub fn compress(&mut self, spec: &CodecSpec, grad: &[f32], seed: u64, out: &mut Vec<u8>) -> Result<(), CodecError> {
        self.compress_shaped(spec, grad, &[grad.len()], seed, out)
    }

    /// [`ErrorFeedback::compress`] for a tensor of `shape` (PowerSGD uses it).
    pub fn compress_shaped(
        &mut self,
        spec: &CodecSpec,
        grad: &[f32],
        shape: &[usize],
        seed: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        self.check_len(grad.len());
        // Everything that can fail is checked before the residual changes.
        crate::check_encode(spec, grad.len(), shape)?;
        self.accumulate(grad);
        crate::encode_shaped(spec, &self.residual, shape, seed, out)?;
        // The message was made from `self.residual` a moment ago: it decodes.
        crate::decode_sub(out, &mut self.residual).expect("a message this crate just encoded decodes");
        Ok(())
    }

    /// For codecs the caller drives itself (PowerSGD across workers): adds
    /// the residual into `grad`, which becomes the corrected gradient `g'`.
    pub fn correct(&self, grad: &mut [f32]) {
        self.check_len(grad.len());
        for (g, r) in grad.iter_mut().zip(&self.residual) {
            *g += r;
        }
    }

    /// For codecs the caller drives itself: `residual = corrected − approx`,
    /// where `corrected` is what [`ErrorFeedback::correct`] made and `approx`
    /// what the codec delivered for it.
    pub fn record(&mut self, corrected: &[f32], approx: &[f32]) {
        self.check_len(corrected.len());
        self.check_len(approx.len());
        for ((r, c), a) in self.residual.iter_mut().zip(corrected).zip(approx) {
            *r = c - a;
        }
    }

    /// `residual += grad`: the residual buffer becomes `g'`.
    fn accumulate(&mut self, grad: &[f32]) {
        for (r, g) in self.residual.iter_mut().zip(grad) {
            *r += g;
        }
    }

    fn check_len(&self, len: usize) {
        assert_eq!(
            len,
            self.residual.len(),
            "error feedback: the gradient's length differs from the residual's"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_state_refuses_the_wrong_length_and_changes_nothing() {
        let mut ef = ErrorFeedback::new(4);
        ef.compress(
            &CodecSpec::TopK {
                fraction: 0.25,
                values: crate::SparseValues::F32,
            },
            &[1.0, 2.0, 3.0, 4.0],
            0,
            &mut Vec::new(),
        )
        .expect("compress");
        assert_eq!(ef.state(), &[1.0, 2.0, 3.0, 0.0]);
        let err = ef.load_state(&[0.0; 3]).expect_err("wrong length").to_string();
        assert_eq!(err, "error-feedback residual: 3 values, expected 4");
        assert_eq!(ef.state(), &[1.0, 2.0, 3.0, 0.0]);
        ef.load_state(&[9.0; 4]).expect("right length");
        assert_eq!(ef.state(), &[9.0; 4]);
        ef.reset();
        assert_eq!(ef.state(), &[0.0; 4]);
    }

    #[test]
    fn correct_and_record_keep_what_was_not_delivered() {
        let mut ef = ErrorFeedback::new(3);
        let mut g = [1.0, 2.0, 3.0];
        ef.correct(&mut g);
        ef.record(&g, &[1.0, 0.0, 3.0]);
        assert_eq!(ef.state(), &[0.0, 2.0, 0.0]);
        let mut g = [1.0, 1.0, 1.0];
        ef.correct(&mut g);
        assert_eq!(g, [1.0, 3.0, 1.0]);
    }
}
