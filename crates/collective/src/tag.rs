//! The 64-bit tag every collective frame carries, so that a receiver detects a
//! frame from the wrong operation, phase, step or segment instead of adding it.
//!
//! Layout, most significant bit first:
//!
//! | bits   | width | field   | meaning                                               |
//! |--------|-------|---------|-------------------------------------------------------|
//! | 63..40 | 24    | op      | the caller's operation id, taken modulo 2^24          |
//! | 39..36 | 4     | phase   | [`Phase`]; 0 is never used, so a zero tag is invalid  |
//! | 35..20 | 16    | step    | ring step, doubling round or tree level               |
//! | 19..0  | 20    | segment | segment index inside the chunk or buffer being moved  |
//!
//! The phase names the algorithm as well as the half of it, so two ranks that
//! chose different algorithms for the same operation fail on the first frame.

use std::fmt;

/// Operation ids are taken modulo this; a runtime with fewer than 2^24
/// collectives in flight on one stream never confuses two of them.
pub const OP_ID_LIMIT: u32 = 1 << OP_BITS;
/// Steps per phase; bounds the world size of the ring (it has `world - 1` steps).
pub const STEP_LIMIT: u32 = 1 << STEP_BITS;
/// Segments per chunk (ring) or per buffer (the other algorithms).
pub const SEGMENT_LIMIT: u32 = 1 << SEGMENT_BITS;

const OP_BITS: u32 = 24;
const PHASE_BITS: u32 = 4;
const STEP_BITS: u32 = 16;
const SEGMENT_BITS: u32 = 20;
const SEGMENT_SHIFT: u32 = 0;
const STEP_SHIFT: u32 = SEGMENT_SHIFT + SEGMENT_BITS;
const PHASE_SHIFT: u32 = STEP_SHIFT + STEP_BITS;
const OP_SHIFT: u32 = PHASE_SHIFT + PHASE_BITS;
const _: () = assert!(OP_SHIFT + OP_BITS == 64);

/// Which part of which algorithm a frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Ring reduce-scatter (also the first half of the ring all-reduce).
    ReduceScatter = 1,
    /// Ring all-gather (also the second half of the ring all-reduce).
    AllGather = 2,
    /// Pipelined chain broadcast.
    BroadcastChain = 3,
    /// Binomial-tree broadcast.
    BroadcastTree = 4,
    /// Dissemination barrier.
    Barrier = 5,
    /// Recursive doubling: a surplus rank hands its data to its partner.
    FoldIn = 6,
    /// Recursive doubling: the pairwise exchange rounds.
    Exchange = 7,
    /// Recursive doubling: the partner hands the result back to the surplus rank.
    FoldOut = 8,
    /// Bruck all-gather: the dissemination rounds.
    Bruck = 9,
}

impl Phase {
    const ALL: [Phase; 9] = [
        Phase::ReduceScatter,
        Phase::AllGather,
        Phase::BroadcastChain,
        Phase::BroadcastTree,
        Phase::Barrier,
        Phase::FoldIn,
        Phase::Exchange,
        Phase::FoldOut,
        Phase::Bruck,
    ];

    fn from_bits(bits: u64) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| *p as u64 == bits)
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::ReduceScatter => "reduce-scatter",
            Phase::AllGather => "all-gather",
            Phase::BroadcastChain => "broadcast-chain",
            Phase::BroadcastTree => "broadcast-tree",
            Phase::Barrier => "barrier",
            Phase::FoldIn => "fold-in",
            Phase::Exchange => "exchange",
            Phase::FoldOut => "fold-out",
            Phase::Bruck => "bruck",
        }
    }
}

/// A frame tag; see the module docs for the bit layout.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(u64);

impl Tag {
    /// Packs the fields. `op` is reduced modulo [`OP_ID_LIMIT`]; `step` and
    /// `segment` must fit their fields (the engines check sizes up front, so
    /// an overflow here is a bug).
    pub fn new(op: u32, phase: Phase, step: u32, segment: u32) -> Tag {
        assert!(step < STEP_LIMIT, "tag step {step} does not fit {STEP_BITS} bits");
        assert!(
            segment < SEGMENT_LIMIT,
            "tag segment {segment} does not fit {SEGMENT_BITS} bits"
        );
        let op = u64::from(op % OP_ID_LIMIT);
        Tag(op << OP_SHIFT
            | (phase as u64) << PHASE_SHIFT
            | u64::from(step) << STEP_SHIFT
            | u64::from(segment) << SEGMENT_SHIFT)
    }

    /// The value to put on the wire.
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// A tag read from the wire; `None` if its phase field names no phase.
    pub fn from_u64(bits: u64) -> Option<Tag> {
        Phase::from_bits(field(bits, PHASE_SHIFT, PHASE_BITS)).map(|_| Tag(bits))
    }

    /// The operation id, modulo [`OP_ID_LIMIT`].
    pub fn op(self) -> u32 {
        field(self.0, OP_SHIFT, OP_BITS) as u32
    }

    pub fn phase(self) -> Phase {
        Phase::from_bits(field(self.0, PHASE_SHIFT, PHASE_BITS)).expect("a Tag always holds a valid phase")
    }

    pub fn step(self) -> u32 {
        field(self.0, STEP_SHIFT, STEP_BITS) as u32
    }

    pub fn segment(self) -> u32 {
        field(self.0, SEGMENT_SHIFT, SEGMENT_BITS) as u32
    }
}

fn field(bits: u64, shift: u32, width: u32) -> u64 {
    (bits >> shift) & ((1 << width) - 1)
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op {} {} step {} segment {}",
            self.op(),
            self.phase().name(),
            self.step(),
            self.segment()
        )
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    #[expect(clippy::unusual_byte_groupings, reason = "digits grouped by tag field")]
    fn layout_is_as_documented() {
        let tag = Tag::new(0xAB_CDEF, Phase::AllGather, 0x1234, 0x5_6789);
        assert_eq!(tag.to_u64(), 0xABCDEF_2_1234_56789);
        assert_eq!(tag.to_string(), "op 11259375 all-gather step 4660 segment 354185");
    }

    #[test]
    fn op_wraps_and_zero_phase_is_invalid() {
        assert_eq!(Tag::new(OP_ID_LIMIT + 5, Phase::Barrier, 0, 0).op(), 5);
        assert_eq!(Tag::from_u64(0), None);
        assert_eq!(Tag::from_u64(10 << PHASE_SHIFT), None);
    }

    proptest! {
        #[test]
        fn fields_round_trip(op in any::<u32>(), phase in 0..9usize, step in 0..STEP_LIMIT, segment in 0..SEGMENT_LIMIT) {
            let phase = Phase::ALL[phase];
            let tag = Tag::new(op, phase, step, segment);
            prop_assert_eq!(Tag::from_u64(tag.to_u64()), Some(tag));
            prop_assert_eq!((tag.op(), tag.phase(), tag.step(), tag.segment()), (op % OP_ID_LIMIT, phase, step, segment));
        }
    }
}
