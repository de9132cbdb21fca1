//! The binary push/pull messages, carried as the payload of `wire` frames of
//! type `Ps`. Keys and values are raw little-endian; nothing goes through serde.
//!
//! | bytes   | field    | meaning                                             |
//! |---------|----------|-----------------------------------------------------|
//! | 0       | kind     | 1 pull, 2 push, 3 pulled (reply), 4 pushed (ack), 5 coded push, 6 worker state |
//! | 1       | flags    | bit 0: dense part wanted; bit 1: wait for all       |
//! | 2..4    | zero     |                                                     |
//! | 4..8    | n_keys   | u32                                                 |
//! | 8..16   | clock    | u64: the step the request belongs to                |
//! | 16..24  | req      | u64: the pull's id, echoed in its reply             |
//! | 24..28  | n_dense  | u32: dense f32 values after the keys                |
//! | 28..32  | n_values | u32: row f32 values after the dense ones            |
//! | 32..    | keys (u64 × n_keys), dense (f32 × n_dense), values (f32 × n_values) |
//!
//! A coded push (kind 5) is a push whose dense part is one compressed
//! message (`codec` crate) of `n_dense` bytes instead of `n_dense` f32s; the
//! server decodes it into the shard's dense gradient. This crate only carries
//! the bytes.
//!
//! A worker state (kind 6) is what a worker must get back to resume exactly
//! but the shard never applies: its error-feedback residual over the shard's
//! dense part, as of `clock` pushes, in `n_dense` f32s (none: it keeps
//! nothing). A worker sends it between its pushes of a checkpoint step, and
//! the worker writing the checkpoint reads every worker's back with snapshot
//! pulls whose offsets start at [`WORKER_STATE_OFFSET`] (see
//! `Shard::worker_state_image`): that address space is apart from the
//! shard's image, so the `Pull` layout stays as it is.
//!
//! **Invariant:** [`decode`] returns an error, never panics, on any bytes, and
//! with a layout it accepts only keys of existing table rows and pushes whose
//! value count matches their keys' row lengths.

use tensor::{Layout, ParamKind};

use crate::error::PsError;
use crate::placement::split_key;

/// Bytes before the keys.
pub const HEAD_BYTES: usize = 32;
/// Most keys in one message (a batch's distinct rows for one shard).
pub const KEYS_PER_MESSAGE_MAX: usize = 4 << 20;

const KIND_PULL: u8 = 1;
const KIND_PUSH: u8 = 2;
const KIND_PULLED: u8 = 3;
const KIND_PUSHED: u8 = 4;
const KIND_PUSH_CODED: u8 = 5;
const KIND_WORKER_STATE: u8 = 6;
const FLAG_DENSE: u8 = 1;
const FLAG_WAIT_ALL: u8 = 2;
const FLAG_SNAPSHOT: u8 = 4;
/// Snapshot offsets from here on address the workers' states, not the image
/// (an image is far shorter than 2^62 values). The last offset of all,
/// `shard::CUT_BARRIER`, is a checkpoint's cut barrier instead; the shard
/// tells it apart first.
pub const WORKER_STATE_OFFSET: u64 = 1 << 62;

/// A worker asks for parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pull {
    pub req: u64,
    /// The step whose batch needs these values (checked against the consistency bound).
    pub clock: u64,
    /// Wait until every worker has pushed `clock` steps, whatever the consistency
    /// mode (evaluation and the job's end).
    pub wait_all: bool,
    /// Whether the shard's dense part is wanted.
    pub dense: bool,
    pub keys: Vec<u64>,
    /// Instead of keys: elements `offset..offset + len` of the shard's image
    /// (values then optimizer state), for a checkpoint. Carried as the two keys.
    pub snapshot: Option<(u64, u64)>,
}

/// A worker's gradient for one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Push {
    pub clock: u64,
    /// The gradient of the shard's whole dense part, or empty.
    pub dense: Vec<f32>,
    pub keys: Vec<u64>,
    /// The rows of `keys`, back to back.
    pub values: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    Pull(Pull),
    Push(Push),
    Pulled {
        req: u64,
        clock: u64,
        dense: Vec<f32>,
        values: Vec<f32>,
    },
    Pushed {
        clock: u64,
    },
    /// A push whose dense gradient is the codec message `dense_coded`
    /// (`push.dense` is empty until the server decodes it).
    PushCoded {
        push: Push,
        dense_coded: Vec<u8>,
    },
    /// A worker's state for the next checkpoint, as of `clock` pushes
    /// (empty: it keeps none for this shard).
    WorkerState {
        clock: u64,
        state: Vec<f32>,
    },
}

#[allow(clippy::too_many_arguments)]
fn head(out: &mut Vec<u8>, kind: u8, flags: u8, n_keys: usize, clock: u64, req: u64, n_dense: usize, n_values: usize) {
    out.clear();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(n_keys as u32).to_le_bytes());
    out.extend_from_slice(&clock.to_le_bytes());
    out.extend_from_slice(&req.to_le_bytes());
    out.extend_from_slice(&(n_dense as u32).to_le_bytes());
    out.extend_from_slice(&(n_values as u32).to_le_bytes());
}

fn put_keys(out: &mut Vec<u8>, keys: &[u64]) {
    out.reserve(keys.len() * 8);
    for k in keys {
        out.extend_from_slice(&k.to_le_bytes());
    }
}

fn put_f32(out: &mut Vec<u8>, v: &[f32]) {
    out.reserve(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

/// Encodes a [`Pull`] whose keys are `keys` (the `keys` field of `p` is ignored).
pub fn encode_pull(p: &Pull, keys: &[u64], out: &mut Vec<u8>) {
    let mut flags = if p.dense { FLAG_DENSE } else { 0 } | if p.wait_all { FLAG_WAIT_ALL } else { 0 };
    let snap;
    let keys = match p.snapshot {
        Some((offset, len)) => {
            flags |= FLAG_SNAPSHOT;
            snap = [offset, len];
            &snap[..]
        }
        None => keys,
    };
    head(out, KIND_PULL, flags, keys.len(), p.clock, p.req, 0, 0);
    put_keys(out, keys);
}

pub fn encode_push(clock: u64, dense: &[f32], keys: &[u64], values: &[f32], out: &mut Vec<u8>) {
    head(out, KIND_PUSH, 0, keys.len(), clock, 0, dense.len(), values.len());
    put_keys(out, keys);
    put_f32(out, dense);
    put_f32(out, values);
}

/// Encodes a coded push: the dense part is the codec message `dense_coded`.
pub fn encode_push_coded(clock: u64, dense_coded: &[u8], keys: &[u64], values: &[f32], out: &mut Vec<u8>) {
    head(
        out,
        KIND_PUSH_CODED,
        0,
        keys.len(),
        clock,
        0,
        dense_coded.len(),
        values.len(),
    );
    put_keys(out, keys);
    out.extend_from_slice(dense_coded);
    put_f32(out, values);
}

/// Encodes a worker's state for a checkpoint, as of `clock` pushes (see the module docs).
pub fn encode_worker_state(clock: u64, state: &[f32], out: &mut Vec<u8>) {
    head(out, KIND_WORKER_STATE, 0, 0, clock, 0, state.len(), 0);
    put_f32(out, state);
}

pub fn encode_pulled(req: u64, clock: u64, dense: &[f32], values: &[f32], out: &mut Vec<u8>) {
    head(out, KIND_PULLED, 0, 0, clock, req, dense.len(), values.len());
    put_f32(out, dense);
    put_f32(out, values);
}

pub fn encode_pushed(clock: u64, out: &mut Vec<u8>) {
    head(out, KIND_PUSHED, 0, 0, clock, 0, 0, 0);
}

fn bad(why: impl Into<String>) -> PsError {
    PsError::Message(why.into())
}

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as usize
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// A message a worker sends a shard, decoded to what the shard engine takes.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Pull(Pull),
    Push(Push),
    /// A worker's state for the next checkpoint, as of `clock` pushes.
    WorkerState {
        clock: u64,
        state: Vec<f32>,
    },
}

impl Message {
    /// What a worker asks of a shard: a compressed push's dense part is
    /// decoded into `dense_len` values (see [`Message::into_push`]); a reply
    /// is refused. The runtime calls this before it takes the shard's lock.
    pub fn into_request(self, dense_len: usize) -> Result<Request, PsError> {
        match self {
            Message::Pull(p) => Ok(Request::Pull(p)),
            Message::WorkerState { clock, state } => Ok(Request::WorkerState { clock, state }),
            other => match other.into_push(dense_len)? {
                Some(p) => Ok(Request::Push(p)),
                None => Err(PsError::Message("a reply sent to a server".into())),
            },
        }
    }

    /// The push this message carries, as a shard applies it: a compressed
    /// dense part (`PushCoded`) is decoded into `dense_len` values. `None`
    /// for a message that is not a push. The runtime calls this before it
    /// takes the shard's lock, so decoding runs in parallel across workers.
    pub fn into_push(self, dense_len: usize) -> Result<Option<Push>, PsError> {
        match self {
            Message::Push(p) => Ok(Some(p)),
            Message::PushCoded { mut push, dense_coded } => {
                push.dense = vec![0.0; dense_len];
                codec::decode(&dense_coded, &mut push.dense)
                    .map_err(|e| PsError::Message(format!("a compressed push that does not decode: {e}")))?;
                Ok(Some(push))
            }
            _ => Ok(None),
        }
    }
}

/// Decodes one message. With `layout` (on a server), keys must name rows of
/// its `Table` tensors and a push's values must match the keys' row lengths.
pub fn decode(bytes: &[u8], layout: Option<&Layout>) -> Result<Message, PsError> {
    if bytes.len() < HEAD_BYTES {
        return Err(bad(format!(
            "{} bytes, shorter than the {HEAD_BYTES}-byte head",
            bytes.len()
        )));
    }
    let (kind, flags) = (bytes[0], bytes[1]);
    if bytes[2] != 0 || bytes[3] != 0 || flags & !(FLAG_DENSE | FLAG_WAIT_ALL | FLAG_SNAPSHOT) != 0 {
        return Err(bad(format!("unknown flags {flags:#x} or non-zero reserved bytes")));
    }
    let n_keys = u32_at(bytes, 4);
    let clock = u64_at(bytes, 8);
    let req = u64_at(bytes, 16);
    let n_dense = u32_at(bytes, 24);
    let n_values = u32_at(bytes, 28);
    if n_keys > KEYS_PER_MESSAGE_MAX {
        return Err(bad(format!("{n_keys} keys (at most {KEYS_PER_MESSAGE_MAX})")));
    }
    // A coded push carries its dense part as bytes.
    let dense_unit = if kind == KIND_PUSH_CODED { 1 } else { 4 };
    let need = HEAD_BYTES as u64 + 8 * n_keys as u64 + dense_unit * n_dense as u64 + 4 * n_values as u64;
    if need != bytes.len() as u64 {
        return Err(bad(format!(
            "{n_keys} keys, {n_dense} dense and {n_values} row values need {need} bytes; got {}",
            bytes.len()
        )));
    }
    let keys_end = HEAD_BYTES + 8 * n_keys;
    let dense_end = keys_end + dense_unit as usize * n_dense;
    let keys: Vec<u64> = bytes[HEAD_BYTES..keys_end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    let snapshot = flags & FLAG_SNAPSHOT != 0;
    if snapshot && (kind != KIND_PULL || n_keys != 2 || flags & FLAG_DENSE != 0) {
        return Err(bad(
            "a snapshot request is a pull of exactly two numbers (offset, length)",
        ));
    }
    let expected_values = match layout {
        Some(l) if !snapshot => Some(check_keys(&keys, l)?),
        _ => None,
    };
    match kind {
        KIND_PULL => {
            if n_dense != 0 || n_values != 0 {
                return Err(bad("a pull carries values"));
            }
            Ok(Message::Pull(Pull {
                req,
                clock,
                wait_all: flags & FLAG_WAIT_ALL != 0,
                dense: flags & FLAG_DENSE != 0,
                snapshot: snapshot.then(|| (keys[0], keys[1])),
                keys: if snapshot { Vec::new() } else { keys },
            }))
        }
        KIND_PUSH | KIND_PUSH_CODED => {
            if let Some(want) = expected_values
                && want != n_values
            {
                return Err(bad(format!(
                    "push of {n_keys} keys carries {n_values} values; the rows hold {want}"
                )));
            }
            if kind == KIND_PUSH_CODED {
                return Ok(Message::PushCoded {
                    push: Push {
                        clock,
                        dense: Vec::new(),
                        keys,
                        values: f32s(&bytes[dense_end..]),
                    },
                    dense_coded: bytes[keys_end..dense_end].to_vec(),
                });
            }
            Ok(Message::Push(Push {
                clock,
                dense: f32s(&bytes[keys_end..dense_end]),
                keys,
                values: f32s(&bytes[dense_end..]),
            }))
        }
        KIND_PULLED | KIND_PUSHED if n_keys != 0 => Err(bad("a reply carries keys")),
        KIND_WORKER_STATE if n_keys != 0 || n_values != 0 => Err(bad("a worker state carries keys or row values")),
        KIND_WORKER_STATE => Ok(Message::WorkerState {
            clock,
            state: f32s(&bytes[keys_end..dense_end]),
        }),
        KIND_PULLED => Ok(Message::Pulled {
            req,
            clock,
            dense: f32s(&bytes[keys_end..dense_end]),
            values: f32s(&bytes[dense_end..]),
        }),
        KIND_PUSHED => Ok(Message::Pushed { clock }),
        k => Err(bad(format!("unknown kind {k}"))),
    }
}

/// Checks that every key names a row of a table; returns the total row length.
fn check_keys(keys: &[u64], layout: &Layout) -> Result<usize, PsError> {
    let tensors = layout.tensors();
    let mut total = 0usize;
    for &k in keys {
        let (t, row) = split_key(k);
        let Some(p) = tensors.get(t).filter(|p| p.kind == ParamKind::Table) else {
            return Err(bad(format!("key {k:#x} names tensor {t}, which is not a table")));
        };
        if row as usize >= p.shape[0] {
            return Err(bad(format!(
                "key {k:#x}: row {row} outside table `{}` of {} rows",
                p.name, p.shape[0]
            )));
        }
        total += p.row_len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::key;
    use proptest::prelude::*;

    fn layout() -> Layout {
        let mut l = Layout::new();
        l.push("w", &[4, 2], ParamKind::Dense);
        l.push("emb", &[10, 3], ParamKind::Table);
        l
    }

    #[test]
    fn round_trips() {
        let l = layout();
        let mut b = Vec::new();
        let pull = Pull {
            req: 9,
            clock: 4,
            wait_all: true,
            dense: true,
            keys: vec![key(1, 0), key(1, 9)],
            snapshot: None,
        };
        encode_pull(&pull, &pull.keys, &mut b);
        assert_eq!(decode(&b, Some(&l)).unwrap(), Message::Pull(pull));
        let snap = Pull {
            req: 1,
            clock: 2,
            wait_all: true,
            dense: false,
            keys: vec![],
            snapshot: Some((u64::MAX, 7)),
        };
        encode_pull(&snap, &[], &mut b);
        assert_eq!(decode(&b, Some(&l)).unwrap(), Message::Pull(snap));
        encode_push(5, &[1.0, 2.0], &[key(1, 3)], &[0.5, 0.25, -1.0], &mut b);
        assert_eq!(
            decode(&b, Some(&l)).unwrap(),
            Message::Push(Push {
                clock: 5,
                dense: vec![1.0, 2.0],
                keys: vec![key(1, 3)],
                values: vec![0.5, 0.25, -1.0]
            })
        );
        encode_pulled(9, 4, &[3.0], &[1.0, 2.0], &mut b);
        assert_eq!(
            decode(&b, None).unwrap(),
            Message::Pulled {
                req: 9,
                clock: 4,
                dense: vec![3.0],
                values: vec![1.0, 2.0]
            }
        );
        encode_pushed(7, &mut b);
        assert_eq!(decode(&b, None).unwrap(), Message::Pushed { clock: 7 });
        encode_push_coded(6, &[9, 8, 7], &[key(1, 2)], &[1.0, 2.0, 3.0], &mut b);
        assert_eq!(b.len(), HEAD_BYTES + 8 + 3 + 12);
        assert_eq!(
            decode(&b, Some(&l)).unwrap(),
            Message::PushCoded {
                push: Push {
                    clock: 6,
                    dense: vec![],
                    keys: vec![key(1, 2)],
                    values: vec![1.0, 2.0, 3.0]
                },
                dense_coded: vec![9, 8, 7],
            }
        );
        b.pop();
        assert!(decode(&b, Some(&l)).unwrap_err().to_string().contains("need"));
        encode_worker_state(8, &[0.5, -1.0], &mut b);
        assert_eq!(b.len(), HEAD_BYTES + 8);
        assert_eq!(
            decode(&b, Some(&l)).unwrap(),
            Message::WorkerState {
                clock: 8,
                state: vec![0.5, -1.0]
            }
        );
        encode_worker_state(9, &[], &mut b);
        assert_eq!(
            decode(&b, None).unwrap(),
            Message::WorkerState {
                clock: 9,
                state: vec![]
            }
        );
        // Row values or keys have no place in a worker state.
        b[28] = 1;
        b.extend_from_slice(&[0; 4]);
        assert!(decode(&b, None).unwrap_err().to_string().contains("keys or row values"));
    }

    #[test]
    fn refuses_what_the_layout_does_not_have() {
        let l = layout();
        let mut b = Vec::new();
        encode_push(0, &[], &[key(1, 10)], &[0.0; 3], &mut b);
        assert!(
            decode(&b, Some(&l))
                .unwrap_err()
                .to_string()
                .contains("row 10 outside table `emb`")
        );
        encode_push(0, &[], &[key(0, 1)], &[0.0; 3], &mut b);
        assert!(decode(&b, Some(&l)).unwrap_err().to_string().contains("not a table"));
        encode_push(0, &[], &[key(1, 1)], &[0.0; 2], &mut b);
        assert!(
            decode(&b, Some(&l))
                .unwrap_err()
                .to_string()
                .contains("carries 2 values")
        );
        b.truncate(b.len() - 1);
        assert!(decode(&b, Some(&l)).unwrap_err().to_string().contains("need"));
    }

    proptest! {
        #[test]
        fn no_bytes_make_it_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, Some(&layout()));
            let _ = decode(&bytes, None);
        }

        #[test]
        fn corrupted_heads_are_errors_or_consistent(kind in 0u8..7, n in 0u32..5, at in 0usize..32, byte in any::<u8>()) {
            let mut b = Vec::new();
            encode_push(1, &[1.0], &(0..n).map(|r| key(1, r)).collect::<Vec<_>>(), &vec![0.0; 3 * n as usize], &mut b);
            b[0] = kind;
            b[at] = byte;
            if let Ok(Message::Push(p)) = decode(&b, Some(&layout())) {
                prop_assert_eq!(p.values.len(), 3 * p.keys.len());
            }
        }
    }
}
