//! Compressed data-parallel exchange (`[compress]` in the job file): each
//! worker compresses its weighted gradient tensor by tensor with the codec
//! its parameter group names (with error feedback where configured), and the
//! workers meet through collectives whose error does not grow with their number:
//!
//! - codecs that make messages (quantisers, sparsifiers): the messages are
//!   all-gathered (their byte lengths first, then the messages padded to the
//!   longest, carried as f32 words: an all-gather only copies bits) and every
//!   worker decodes all of them, in rank order, into the gradient. Each
//!   worker's message is quantised once, never re-quantised on a ring hop, so
//!   the error of the sum is the sum of the W messages' own errors; sparse
//!   messages with different indices on different workers add up exactly.
//! - `powersgd:R`: linear, so its factors are all-reduced in f32 (P, then
//!   after orthonormalising it, Q), warm-started from the previous step's Q.
//! - codec `none` (and PowerSGD's vectors): all-reduced in f32, as without compression.
//!
//! The result is the sum over workers of each one's compressed (weighted)
//! gradient, bitwise the same on every worker (same decodes in the same
//! order, and all-reduces whose results are identical on every rank).
//!
//! Local SGD (`cluster.sync = "local_sgd"`) averages parameters through the
//! same machinery, compressing the *model delta since the last average*, not
//! the parameters (Basu et al. 2019, "Qsparse-local-SGD"): every rank keeps
//! the last average `x̄` (the same everywhere); at an average rank r hands
//! `x_r − x̄` (plus its error-feedback residual) to the exchange above, which
//! sums every rank's compressed delta bitwise alike everywhere, and every
//! rank sets `x̄ ← x̄ + (1/W)·Σ_r Q(x_r − x̄)` and continues from `x̄`. A delta
//! is small beside the parameters, so a codec's relative error costs far less
//! on it than on the parameters themselves. The first average of a run (or
//! of an elastic generation), which has no `x̄` yet, is exact in f32.
//!
//! Error-feedback residuals are per worker and part of the training state:
//! a checkpoint holds every worker's as `rank{r}.{tensor}.ef_residual`,
//! the warm-start Q (the same everywhere) as `{tensor}.powersgd_q`, and local
//! SGD's last average (the same everywhere) as `{tensor}.local_sgd_average`,
//! in the `compress` file group.
//!
//! **Invariant:** every rank plans the same slots in the same order from the
//! same layout and config, so the collectives line up and the messages of
//! every rank are read alike.

use std::net::TcpStream;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use codec::{CodecSpec, ErrorFeedback, PowerSgd};
use collective::{Collective, CollectiveConfig, Command, Event, Kind};
use serde::{Deserialize, Serialize};
use tensor::{Layout, Rng};
use wire::msg::ToCoordinator;

use crate::comm::Comm;
use crate::error::JobError;
use crate::net;
use crate::report::Traffic;
use crate::train::Exchange;

/// Most `[[compress.groups]]` entries.
pub const GROUPS_MAX: usize = 256;
/// Most patterns in one group.
pub const PATTERNS_MAX: usize = 256;
/// Bytes a message may take per element of its tensor: no codec comes near
/// (a sparse codec keeping everything takes 9), so a peer announcing more is broken.
const MESSAGE_BYTES_PER_ELEM_MAX: usize = 12;
/// Bytes a message may take beyond that (header and parameters).
const MESSAGE_OVERHEAD_BYTES_MAX: usize = 64;
/// Stream label of the codecs' seeds (stochastic rounding, random-k).
const SEED_LABEL: u64 = 0xC0DE_C5EE_D000;
/// Stream label of the PowerSGD warm starts.
const POWERSGD_LABEL: u64 = 0x9057_6D00;
/// The checkpoint file group of the compression state.
pub const STATE_GROUP: &str = "compress";
/// Suffix of a worker's velocity in a checkpoint (`compress.momentum`).
const VELOCITY_SUFFIX: &str = "velocity";
/// Suffix of local SGD's last average in a checkpoint.
const AVERAGE_SUFFIX: &str = "local_sgd_average";

/// `[compress]`: the codec of every tensor, and groups that choose differently.
///
/// ```toml
/// [compress]
/// codec = "topk:0.01:f16"      # default "none": f32 all-reduce, as without this section
/// error_feedback = true        # default: the codec's own (on for the biased ones)
/// [[compress.groups]]
/// params = ["*.bias"]          # tensor names; `*` any run of characters, `?` one
/// codec = "none"
/// ```
///
/// A tensor takes the first group with a pattern matching its name, else
/// the section's own codec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressSection {
    pub codec: CodecSpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_feedback: Option<bool>,
    /// SGD momentum applied by each worker before compressing (momentum
    /// correction, Lin et al. 2018, "Deep Gradient Compression"): each worker
    /// keeps its own velocity `u = momentum·u + g` and compresses `u`; the
    /// optimizer then applies the sum with `optim.momentum = 0`. For sparse
    /// codecs the velocity of what was sent is cleared (momentum factor
    /// masking). 0 (the default): momentum stays in the optimizer, after the
    /// exchange.
    #[serde(skip_serializing_if = "is_zero")]
    pub momentum: f32,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<CompressGroup>,
}

/// One `[[compress.groups]]` entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressGroup {
    /// Tensor-name patterns (`layers.2.*`).
    pub params: Vec<String>,
    pub codec: CodecSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_feedback: Option<bool>,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

impl CompressSection {
    /// Whether any tensor is sent other than as f32.
    pub fn is_active(&self) -> bool {
        self.codec != CodecSpec::None || self.groups.iter().any(|g| g.codec != CodecSpec::None)
    }

    /// Checks what can be checked without the model.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(format!("compress.momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.groups.len() > GROUPS_MAX {
            return Err(format!(
                "compress.groups: {} groups, at most {GROUPS_MAX}",
                self.groups.len()
            ));
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.params.is_empty() {
                return Err(format!(
                    "compress.groups[{i}] names no tensors: give params = [\"pattern\", ...]"
                ));
            }
            if g.params.len() > PATTERNS_MAX {
                return Err(format!("compress.groups[{i}]: more than {PATTERNS_MAX} patterns"));
            }
            if let Some(p) = g.params.iter().find(|p| p.trim().is_empty()) {
                return Err(format!("compress.groups[{i}]: empty pattern {p:?}"));
            }
        }
        Ok(())
    }

    /// Each tensor's settings, in layout order. Every group must match some tensor.
    pub fn resolve(&self, layout: &Layout) -> Result<Vec<codec::CompressConfig>, String> {
        let mut used = vec![false; self.groups.len()];
        let plan = layout
            .tensors()
            .iter()
            .map(|t| {
                let group = self
                    .groups
                    .iter()
                    .position(|g| g.params.iter().any(|p| glob_match(p, &t.name)));
                match group {
                    Some(i) => {
                        used[i] = true;
                        codec::CompressConfig {
                            compress: self.groups[i].codec.clone(),
                            error_feedback: self.groups[i].error_feedback,
                        }
                    }
                    None => codec::CompressConfig {
                        compress: self.codec.clone(),
                        error_feedback: self.error_feedback,
                    },
                }
            })
            .collect();
        if let Some(i) = used.iter().position(|u| !u) {
            let names: Vec<&str> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
            return Err(format!(
                "compress.groups[{i}]: no tensor matches {:?}; the model's tensors are {names:?}",
                self.groups[i].params
            ));
        }
        Ok(plan)
    }
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters
/// (dots included) and `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was and how much of the name it has taken.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            // Let the last star take one more character and retry.
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// How one tensor crosses the wire.
enum How {
    /// Summed as f32 by the dense all-reduce.
    Dense,
    /// A codec message, all-gathered.
    Message { spec: CodecSpec, ef: Option<ErrorFeedback> },
    /// PowerSGD factors, all-reduced; `m` holds the corrected gradient between the rounds.
    PowerSgd {
        ps: PowerSgd,
        ef: Option<ErrorFeedback>,
        m: Vec<f32>,
        p_at: usize,
        q_at: usize,
    },
}

struct Slot {
    name: String,
    range: Range<usize>,
    shape: Vec<usize>,
    how: How,
}

/// The compressed exchange of one worker (see the module docs).
pub struct CompressExchange {
    comm: Comm,
    rank: u32,
    world: u32,
    coordinator: Arc<Mutex<TcpStream>>,
    seed: u64,
    slots: Vec<Slot>,
    /// This worker's messages, each behind its u32 length, in slot order.
    mine: Vec<u8>,
    /// One message, and one decoded tensor (scratch).
    msg: Vec<u8>,
    decoded: Vec<f32>,
    /// One rank's messages, unpacked from the all-gather (scratch).
    theirs: Vec<u8>,
    lens: Vec<f32>,
    words: Vec<f32>,
    /// The dense all-reduce: f32 tensors, then the PowerSGD P factors.
    dense: Vec<f32>,
    /// The PowerSGD Q factors.
    q: Vec<f32>,
    /// Most bytes a rank's messages may take.
    mine_bytes_max: usize,
    /// `compress.momentum` and this worker's velocity (empty when 0).
    momentum: f32,
    velocity: Vec<f32>,
    /// Local SGD: the parameters of the last average, the same on every rank
    /// (empty before the first one), and this rank's delta from it (scratch).
    average: Vec<f32>,
    delta: Vec<f32>,
    traffic: Traffic,
    /// Bytes an uncompressed all-reduce of the whole gradient sends (per peer, for the ratio).
    uncompressed: u64,
}

impl CompressExchange {
    /// Plans each tensor of `layout` as `section` says; `seed` is the job's
    /// seed; `restored` is the `compress` group of the checkpoint resumed from.
    pub fn new(
        comm: Comm,
        section: &CompressSection,
        layout: &Layout,
        seed: u64,
        coordinator: Arc<Mutex<TcpStream>>,
        restored: &[(String, Vec<f32>)],
    ) -> Result<Self, JobError> {
        let plan = section.resolve(layout).map_err(|why| JobError::Config {
            path: "<config>".into(),
            why,
        })?;
        let (rank, world) = (comm.rank(), comm.world());
        let mut slots = Vec::with_capacity(plan.len());
        let mut mine_bytes_max = 0;
        for (i, (t, cfg)) in layout.tensors().iter().zip(plan).enumerate() {
            let n = t.len();
            let ef = cfg.error_feedback().then(|| ErrorFeedback::new(n));
            let (rows, cols) = match t.shape.as_slice() {
                [rows, rest @ ..] if !rest.is_empty() => (*rows, rest.iter().product()),
                _ => (1, n),
            };
            let how = match cfg.compress {
                CodecSpec::None => How::Dense,
                CodecSpec::PowerSgd { rank: r } if PowerSgd::compresses(r as usize, rows, cols) => How::PowerSgd {
                    ps: PowerSgd::new(
                        r as usize,
                        rows,
                        cols,
                        Rng::derive(seed, POWERSGD_LABEL ^ i as u64).next_u64(),
                    ),
                    ef,
                    m: vec![0.0; n],
                    p_at: 0,
                    q_at: 0,
                },
                // PowerSGD sends vectors and tiny matrices as they are.
                CodecSpec::PowerSgd { .. } => How::Dense,
                spec => {
                    mine_bytes_max += 4 + MESSAGE_OVERHEAD_BYTES_MAX + MESSAGE_BYTES_PER_ELEM_MAX * n;
                    How::Message { spec, ef }
                }
            };
            slots.push(Slot {
                name: t.name.clone(),
                range: t.range(),
                shape: t.shape.clone(),
                how,
            });
        }
        let mut uncompressed = Traffic::new(world);
        plan_traffic(
            all_reduce_kind(layout.len(), world),
            rank,
            world,
            layout.len(),
            &mut uncompressed,
        );
        let mut ex = Self {
            comm,
            rank,
            world,
            coordinator,
            seed,
            slots,
            mine: Vec::new(),
            msg: Vec::new(),
            decoded: Vec::new(),
            theirs: Vec::new(),
            lens: Vec::new(),
            words: Vec::new(),
            dense: Vec::new(),
            q: Vec::new(),
            mine_bytes_max,
            momentum: section.momentum,
            velocity: if section.momentum > 0.0 {
                vec![0.0; layout.len()]
            } else {
                Vec::new()
            },
            average: Vec::new(),
            delta: Vec::new(),
            traffic: Traffic::new(world),
            uncompressed: uncompressed.sent_total(),
        };
        ex.load_state(restored)?;
        for s in &ex.slots {
            let how = match &s.how {
                How::Dense => "f32 all-reduce".to_string(),
                How::Message { spec, ef } => format!("{spec} all-gather, error feedback {}", ef.is_some()),
                How::PowerSgd { ps, ef, .. } => format!(
                    "powersgd rank {} factors all-reduced, error feedback {}",
                    ps.rank(),
                    ef.is_some()
                ),
            };
            tracing::info!(rank, tensor = %s.name, how, "compression");
        }
        Ok(ex)
    }

    /// Takes this rank's residuals and the warm starts from a checkpoint's
    /// `compress` group. Missing state (a checkpoint written without
    /// compression, or by fewer ranks) starts from zero, with a warning.
    fn load_state(&mut self, restored: &[(String, Vec<f32>)]) -> Result<(), JobError> {
        if restored.is_empty() {
            return Ok(());
        }
        let find = |name: &str| restored.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice());
        let bad = |name: &str, e: codec::CodecError| JobError::Resume {
            path: "<checkpoint>".into(),
            why: format!("{STATE_GROUP}/{name}: {e}"),
        };
        let saved_ranks = restored
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("rank")?.split_once('.')?.0.parse::<u32>().ok())
            .max()
            .map_or(0, |r| r + 1);
        if saved_ranks != 0 && saved_ranks != self.world {
            tracing::warn!(
                saved_ranks,
                world = self.world,
                "the checkpoint holds error-feedback residuals of a different number of workers; \
                 ranks without one start from zero"
            );
        }
        self.load_average(restored)?;
        let rank = self.rank;
        if !self.velocity.is_empty() {
            for s in &self.slots {
                let name = format!("rank{rank}.{}.{VELOCITY_SUFFIX}", s.name);
                match find(&name) {
                    Some(v) if v.len() == s.range.len() => self.velocity[s.range.clone()].copy_from_slice(v),
                    Some(v) => {
                        return Err(JobError::Resume {
                            path: "<checkpoint>".into(),
                            why: format!("{STATE_GROUP}/{name}: {} values, expected {}", v.len(), s.range.len()),
                        });
                    }
                    None => tracing::warn!(tensor = %name, "no velocity in the checkpoint; starting from zero"),
                }
            }
        }
        for s in &mut self.slots {
            let (ef, ps) = match &mut s.how {
                How::Dense => continue,
                How::Message { ef, .. } => (ef, None),
                How::PowerSgd { ef, ps, .. } => (ef, Some(ps)),
            };
            if let Some(ef) = ef {
                let name = format!("rank{rank}.{}.{}", s.name, ErrorFeedback::STATE_SUFFIX);
                match find(&name) {
                    Some(v) => ef.load_state(v).map_err(|e| bad(&name, e))?,
                    None => {
                        tracing::warn!(tensor = %name, "no error-feedback residual in the checkpoint; starting from zero")
                    }
                }
            }
            if let Some(ps) = ps {
                let name = format!("{}.{}", s.name, PowerSgd::STATE_SUFFIX);
                match find(&name) {
                    Some(v) => ps.load_state(v).map_err(|e| bad(&name, e))?,
                    None => tracing::warn!(tensor = %name, "no PowerSGD warm start in the checkpoint; starting afresh"),
                }
            }
        }
        Ok(())
    }

    /// Takes local SGD's last average from a checkpoint: all of it, or none (a
    /// checkpoint of a gradient all-reduce; the first average is then exact).
    fn load_average(&mut self, restored: &[(String, Vec<f32>)]) -> Result<(), JobError> {
        let bad = |why: String| JobError::Resume {
            path: "<checkpoint>".into(),
            why,
        };
        let len = self.slots.iter().map(|s| s.range.end).max().unwrap_or(0);
        let mut average = vec![0f32; len];
        let mut found = 0;
        for s in &self.slots {
            let name = format!("{}.{AVERAGE_SUFFIX}", s.name);
            let Some((_, v)) = restored.iter().find(|(n, _)| *n == name) else {
                continue;
            };
            if v.len() != s.range.len() {
                return Err(bad(format!(
                    "{STATE_GROUP}/{name}: {} values, expected {}",
                    v.len(),
                    s.range.len()
                )));
            }
            average[s.range.clone()].copy_from_slice(v);
            found += 1;
        }
        if found != 0 && found != self.slots.len() {
            return Err(bad(format!(
                "{STATE_GROUP} holds local SGD's last average of {found} of the model's {} tensors",
                self.slots.len()
            )));
        }
        if found != 0 {
            self.average = average;
        }
        Ok(())
    }

    /// The codec seed of tensor `slot` at `step` on this rank: independent
    /// across steps, ranks and tensors, as unbiased rounding needs.
    fn seed_for(seed: u64, step: u64, rank: u32, slot: usize) -> u64 {
        Rng::derive(seed ^ SEED_LABEL, (step << 24) ^ (u64::from(rank) << 12) ^ slot as u64).next_u64()
    }

    /// Runs one collective and counts what it moves.
    fn run(
        comm: &mut Comm,
        traffic: &mut Traffic,
        kind: Kind,
        buf: &mut [f32],
        step: u64,
        what: &str,
    ) -> Result<(), JobError> {
        comm.run(kind, buf, step, what)?;
        plan_traffic(kind, comm.rank(), comm.world(), buf.len(), traffic);
        Ok(())
    }

    /// Encodes every message tensor, all-gathers the messages and sums them into `grad`.
    fn exchange_messages(&mut self, step: u64, grad: &mut [f32], t: &mut Traffic) -> Result<(), JobError> {
        let (rank, world) = (self.rank, self.world as usize);
        self.mine.clear();
        let mut any = false;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let How::Message { spec, ef } = &mut s.how else {
                continue;
            };
            any = true;
            let g = &grad[s.range.clone()];
            let seed = Self::seed_for(self.seed, step, rank, i);
            let failed = |e: codec::CodecError| JobError::Peer {
                rank,
                why: format!("compressing `{}` with {spec}: {e}", s.name),
            };
            match ef {
                Some(ef) => {
                    t.norm2 += sum_sq(g, ef.state(), |a, r| a + r);
                    ef.compress_shaped(spec, g, &s.shape, seed, &mut self.msg)
                        .map_err(failed)?;
                    t.err2 += sum_sq(ef.state(), ef.state(), |r, _| r);
                }
                None => {
                    codec::encode_shaped(spec, g, &s.shape, seed, &mut self.msg).map_err(failed)?;
                    self.decoded.clear();
                    self.decoded.resize(g.len(), 0.0);
                    codec::decode(&self.msg, &mut self.decoded).map_err(failed)?;
                    t.norm2 += sum_sq(g, g, |a, _| a);
                    t.err2 += sum_sq(g, &self.decoded, |a, d| a - d);
                }
            }
            if !self.velocity.is_empty() && is_sparse(spec) {
                // Momentum factor masking: what was sent leaves the velocity too.
                self.decoded.clear();
                self.decoded.resize(g.len(), 0.0);
                codec::decode(&self.msg, &mut self.decoded).map_err(failed)?;
                for (u, d) in self.velocity[s.range.clone()].iter_mut().zip(&self.decoded) {
                    if *d != 0.0 {
                        *u = 0.0;
                    }
                }
            }
            self.mine.extend_from_slice(&(self.msg.len() as u32).to_le_bytes());
            self.mine.extend_from_slice(&self.msg);
        }
        if !any {
            return Ok(());
        }
        assert!(
            self.mine.len() <= self.mine_bytes_max,
            "a codec made a message beyond its bound"
        );
        // Lengths first: a rank's length travels as the bits of one f32.
        self.lens.clear();
        self.lens.resize(world, 0.0);
        self.lens[rank as usize] = f32::from_bits(self.mine.len() as u32);
        let mut lens = std::mem::take(&mut self.lens);
        Self::run(
            &mut self.comm,
            t,
            all_gather_kind(world, self.world),
            &mut lens,
            step,
            "compressed gradient lengths",
        )?;
        self.lens = lens;
        let lens: Vec<usize> = self.lens.iter().map(|v| v.to_bits() as usize).collect();
        if let Some(r) = (0..world).find(|&r| lens[r] > self.mine_bytes_max) {
            return Err(JobError::Peer {
                rank: r as u32,
                why: format!(
                    "announced {} bytes of compressed gradients at step {step}; at most {} fit this model",
                    lens[r], self.mine_bytes_max
                ),
            });
        }
        let words = lens.iter().max().copied().unwrap_or(0).div_ceil(4);
        self.words.clear();
        self.words.resize(world * words, 0.0);
        let own = &mut self.words[rank as usize * words..(rank as usize + 1) * words];
        for (w, b) in own.iter_mut().zip(self.mine.chunks(4)) {
            let mut word = [0u8; 4];
            word[..b.len()].copy_from_slice(b);
            *w = f32::from_le_bytes(word);
        }
        let mut buf = std::mem::take(&mut self.words);
        let r = Self::run(
            &mut self.comm,
            t,
            all_gather_kind(world * words, self.world),
            &mut buf,
            step,
            "compressed gradient all-gather",
        );
        self.words = buf;
        r?;
        for s in &self.slots {
            if matches!(s.how, How::Message { .. }) {
                grad[s.range.clone()].fill(0.0);
            }
        }
        // Every rank decodes every message in the same order, so the sums are bitwise equal everywhere.
        for (r, &len) in lens.iter().enumerate() {
            self.theirs.clear();
            for w in &self.words[r * words..(r + 1) * words] {
                self.theirs.extend_from_slice(&w.to_le_bytes());
            }
            self.theirs.truncate(len);
            let broken = |why: String| JobError::Peer {
                rank: r as u32,
                why: format!("compressed gradients of step {step}: {why}"),
            };
            let mut at = 0usize;
            for s in &self.slots {
                let How::Message { .. } = s.how else { continue };
                let Some(head) = self.theirs.get(at..at + 4) else {
                    return Err(broken(format!("cut off before `{}`", s.name)));
                };
                let n = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
                let Some(msg) = self.theirs.get(at + 4..at + 4 + n) else {
                    return Err(broken(format!("the message of `{}` is cut off", s.name)));
                };
                codec::decode_add(msg, &mut grad[s.range.clone()]).map_err(|e| broken(format!("`{}`: {e}", s.name)))?;
                at += 4 + n;
            }
            if at != self.theirs.len() {
                return Err(broken(format!(
                    "{} bytes after the last message",
                    self.theirs.len() - at
                )));
            }
        }
        Ok(())
    }

    /// The f32 tensors and PowerSGD's P in one all-reduce, then PowerSGD's Q in another.
    fn exchange_dense(&mut self, step: u64, grad: &mut [f32], t: &mut Traffic) -> Result<(), JobError> {
        // The f32 tensors first, in slot order (they are copied back in that order), then the P factors.
        self.dense.clear();
        for s in &self.slots {
            if let How::Dense = s.how {
                self.dense.extend_from_slice(&grad[s.range.clone()]);
            }
        }
        for s in &mut self.slots {
            if let How::PowerSgd { ps, ef, m, p_at, .. } = &mut s.how {
                m.copy_from_slice(&grad[s.range.clone()]);
                if let Some(ef) = ef {
                    ef.correct(m);
                }
                *p_at = self.dense.len();
                self.dense.resize(*p_at + ps.p_len(), 0.0);
                ps.compute_p(m, &mut self.dense[*p_at..]);
            }
        }
        if self.dense.is_empty() {
            return Ok(());
        }
        let mut dense = std::mem::take(&mut self.dense);
        let kind = all_reduce_kind(dense.len(), self.world);
        let r = Self::run(&mut self.comm, t, kind, &mut dense, step, "dense gradient all-reduce");
        self.dense = dense;
        r?;
        let mut at = 0;
        self.q.clear();
        for s in &mut self.slots {
            match &mut s.how {
                How::Dense => {
                    grad[s.range.clone()].copy_from_slice(&self.dense[at..at + s.range.len()]);
                    at += s.range.len();
                }
                How::PowerSgd { ps, ef, m, p_at, q_at } => {
                    let p = &mut self.dense[*p_at..*p_at + ps.p_len()];
                    *q_at = self.q.len();
                    self.q.resize(*q_at + ps.q_len(), 0.0);
                    let q = &mut self.q[*q_at..];
                    ps.compute_q(m, p, q);
                    // This worker's own share of the approximation, P̂ P̂ᵀ m: what its residual keeps the rest of.
                    self.decoded.clear();
                    self.decoded.resize(m.len(), 0.0);
                    ps.decompress(p, q, &mut self.decoded);
                    t.norm2 += sum_sq(m, m, |v, _| v);
                    t.err2 += sum_sq(m, &self.decoded, |a, d| a - d);
                    if let Some(ef) = ef {
                        ef.record(m, &self.decoded);
                    }
                }
                How::Message { .. } => {}
            }
        }
        if self.q.is_empty() {
            return Ok(());
        }
        let mut q = std::mem::take(&mut self.q);
        let kind = all_reduce_kind(q.len(), self.world);
        let r = Self::run(&mut self.comm, t, kind, &mut q, step, "PowerSGD Q all-reduce");
        self.q = q;
        r?;
        for s in &mut self.slots {
            if let How::PowerSgd { ps, p_at, q_at, .. } = &mut s.how {
                let p = &self.dense[*p_at..*p_at + ps.p_len()];
                let q = &self.q[*q_at..*q_at + ps.q_len()];
                // The gradients are weighted already: the summed Q gives the sum's approximation.
                ps.finish(p, q, &mut grad[s.range.clone()]);
            }
        }
        Ok(())
    }
}

impl Exchange for CompressExchange {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn world(&self) -> u32 {
        self.world
    }

    fn gradient_ready(&mut self, _: u64, _: Range<usize>, _: &[f32]) -> Result<(), JobError> {
        unreachable!("a compressed exchange does not overlap; the trainer asks `overlaps` first")
    }

    fn finish_gradients(&mut self, _: u64, _: &mut [f32]) -> Result<(), JobError> {
        unreachable!("a compressed exchange does not overlap; the trainer asks `overlaps` first")
    }

    fn overlaps(&self) -> bool {
        false
    }

    fn allreduce_gradient(&mut self, step: u64, grad: &mut [f32]) -> Result<(), JobError> {
        if !self.velocity.is_empty() {
            // Momentum correction: exchange this worker's velocity, not its gradient.
            for (u, g) in self.velocity.iter_mut().zip(grad.iter_mut()) {
                *u = self.momentum * *u + *g;
                *g = *u;
            }
        }
        let mut t = Traffic::new(self.world);
        t.uncompressed = self.uncompressed;
        self.exchange_messages(step, grad, &mut t)?;
        self.exchange_dense(step, grad, &mut t)?;
        self.traffic.add(&t);
        Ok(())
    }

    /// Local SGD: `x̄ ← x̄ + (1/W)·Σ_r Q(x_r − x̄)`, and `params ← x̄` (see the module docs).
    fn average_params(&mut self, step: u64, params: &mut [f32]) -> Result<(), JobError> {
        assert!(
            self.velocity.is_empty(),
            "compress.momentum corrects gradients; config validation refuses it with local SGD"
        );
        let inv = 1.0 / self.world as f32;
        let mut t = Traffic::new(self.world);
        // What a plain local-SGD average (an f32 all-reduce of the parameters) sends.
        t.uncompressed = self.uncompressed;
        if self.average.len() != params.len() {
            // No last average yet (a new run, or a new elastic generation): average exactly once.
            let kind = all_reduce_kind(params.len(), self.world);
            Self::run(&mut self.comm, &mut t, kind, params, step, "parameter average")?;
            self.traffic.add(&t);
            params.iter_mut().for_each(|p| *p *= inv);
            self.average.clear();
            self.average.extend_from_slice(params);
            return Ok(());
        }
        let mut delta = std::mem::take(&mut self.delta);
        delta.clear();
        delta.extend(params.iter().zip(&self.average).map(|(x, a)| x - a));
        let r = self
            .exchange_messages(step, &mut delta, &mut t)
            .and_then(|()| self.exchange_dense(step, &mut delta, &mut t));
        if r.is_ok() {
            // `delta` is now the sum of every rank's compressed delta, bitwise the same on every rank.
            for ((p, a), d) in params.iter_mut().zip(&mut self.average).zip(&delta) {
                *a += d * inv;
                *p = *a;
            }
            self.traffic.add(&t);
        }
        self.delta = delta;
        r
    }

    fn verify_identical(&mut self, epoch: u32, checksum: u64) -> Result<(), JobError> {
        let mut s = self.coordinator.lock().expect("coordinator stream lock");
        net::send_control(&mut s, self.rank, &ToCoordinator::EpochDone { epoch, checksum })
    }

    fn take_traffic(&mut self) -> Option<Traffic> {
        Some(std::mem::replace(&mut self.traffic, Traffic::new(self.world)))
    }

    /// Every rank's residuals (all-gathered: each rank calls this) and the warm starts.
    fn checkpoint_state(&mut self, step: u64) -> Result<Vec<(String, Vec<f32>)>, JobError> {
        let world = self.world as usize;
        let residuals: Vec<(&str, &[f32])> = self
            .slots
            .iter()
            .filter_map(|s| match &s.how {
                How::Message { ef: Some(ef), .. } | How::PowerSgd { ef: Some(ef), .. } => {
                    Some((s.name.as_str(), ef.state()))
                }
                _ => None,
            })
            .collect();
        let per_rank: usize = residuals.iter().map(|(_, r)| r.len()).sum();
        let mut out = Vec::new();
        if per_rank > 0 {
            let mut buf = vec![0f32; world * per_rank];
            let mut at = self.rank as usize * per_rank;
            for (_, r) in &residuals {
                buf[at..at + r.len()].copy_from_slice(r);
                at += r.len();
            }
            let names: Vec<(String, usize)> = residuals.iter().map(|(n, r)| (n.to_string(), r.len())).collect();
            Self::run(
                &mut self.comm,
                &mut self.traffic,
                all_gather_kind(buf.len(), world as u32),
                &mut buf,
                step,
                "error-feedback residuals for a checkpoint",
            )?;
            for r in 0..world {
                let mut at = r * per_rank;
                for (name, len) in &names {
                    out.push((
                        format!("rank{r}.{name}.{}", ErrorFeedback::STATE_SUFFIX),
                        buf[at..at + len].to_vec(),
                    ));
                    at += len;
                }
            }
        }
        for s in &self.slots {
            if let How::PowerSgd { ps, .. } = &s.how {
                out.push((format!("{}.{}", s.name, PowerSgd::STATE_SUFFIX), ps.state().to_vec()));
            }
            if !self.average.is_empty() {
                out.push((
                    format!("{}.{AVERAGE_SUFFIX}", s.name),
                    self.average[s.range.clone()].to_vec(),
                ));
            }
        }
        if !self.velocity.is_empty() {
            let mut buf = vec![0f32; world * self.velocity.len()];
            let n = self.velocity.len();
            buf[self.rank as usize * n..(self.rank as usize + 1) * n].copy_from_slice(&self.velocity);
            Self::run(
                &mut self.comm,
                &mut self.traffic,
                all_gather_kind(buf.len(), world as u32),
                &mut buf,
                step,
                "velocities for a checkpoint",
            )?;
            for r in 0..world {
                for s in &self.slots {
                    let at = r * n + s.range.start;
                    out.push((
                        format!("rank{r}.{}.{VELOCITY_SUFFIX}", s.name),
                        buf[at..at + s.range.len()].to_vec(),
                    ));
                }
            }
        }
        Ok(out)
    }
}

/// Whether a codec sends a subset of the elements (so momentum masking applies).
fn is_sparse(spec: &CodecSpec) -> bool {
    matches!(
        spec,
        CodecSpec::TopK { .. } | CodecSpec::RandK { .. } | CodecSpec::Threshold { .. }
    )
}

/// Σ f(a_i, b_i)², in f64, for the compression-error figures. Eight running
/// sums instead of one, so the adds do not wait on each other and the loop
/// vectorises; the order differs from a plain sum only in rounding.
fn sum_sq(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    assert_eq!(a.len(), b.len(), "sum_sq of slices of different lengths");
    let sq = |v: f32| f64::from(v) * f64::from(v);
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| sq(f(*x, *y)))
        .sum();
    let mut lanes = [0f64; 8];
    for (x, y) in ca.zip(cb) {
        for ((lane, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *lane += sq(f(*x, *y));
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The all-reduce `Comm::all_reduce` runs for `len` f32s (the worker's comm
/// uses the default collective config).
pub fn all_reduce_kind(len: usize, world: u32) -> Kind {
    Kind::AllReduce(CollectiveConfig::default().all_reduce_algorithm(len * 4, world))
}

/// The all-gather `CompressExchange` runs for `len` f32s (every rank's part
/// together): Bruck's for small buffers, the ring for large ones.
pub fn all_gather_kind(len: usize, world: u32) -> Kind {
    Kind::AllGather(CollectiveConfig::default().all_gather_algorithm(len * 4, world))
}

/// Adds to `t` the bytes rank `rank` sends to and receives from each peer in
/// collective `kind` over `len` f32s: the engine's own plan, run without IO
/// (each command completed at once), so the count is exact by construction.
/// Each frame counts its payload and its header.
pub fn plan_traffic(kind: Kind, rank: u32, world: u32, len: usize, t: &mut Traffic) {
    if t.sent.len() < world as usize {
        t.sent.resize(world as usize, 0);
        t.received.resize(world as usize, 0);
    }
    let Ok(mut engine) = Collective::new(kind, 0, rank, world, len, &CollectiveConfig::default()) else {
        return;
    };
    let frame = |range: &Range<usize>| (wire::HEADER_BYTES + 4 * range.len()) as u64;
    let mut todo = engine.start();
    while let Some(cmd) = todo.pop() {
        let event = match cmd {
            Command::Send { peer, tag, range } => {
                t.sent[peer as usize] += frame(&range);
                Event::Sent { peer, tag }
            }
            Command::Recv { peer, tag, range, .. } => {
                t.received[peer as usize] += frame(&range);
                Event::Received { peer, tag }
            }
            Command::Done => continue,
        };
        match engine.on_event(event) {
            Ok(more) => todo.extend(more),
            Err(e) => {
                tracing::warn!(error = %e, "counting a collective's traffic");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use collective::GatherAlgorithm;

    use super::*;

    #[test]
    fn globs_match_like_a_shell_without_path_rules() {
        for (p, n, want) in [
            ("layers.2.*", "layers.2.weight", true),
            ("layers.2.*", "layers.20.weight", false),
            ("*.bias", "layers.0.bias", true),
            ("*.bias", "layers.0.weight", false),
            ("*", "anything.at.all", true),
            ("layers.?.weight", "layers.1.weight", true),
            ("layers.?.weight", "layers.10.weight", false),
            ("*weight*", "layers.1.weight", true),
            ("a*b*c", "a.b.x.c", true),
            ("a*b*c", "a.c.b", false),
            ("weight", "weight", true),
            ("weight", "weights", false),
            ("", "", true),
            ("**", "", true),
        ] {
            assert_eq!(glob_match(p, n), want, "{p:?} vs {n:?}");
        }
    }

    fn mlp_layout() -> Layout {
        let mut l = Layout::new();
        for (i, (o, n)) in [(256, 784), (256, 256), (10, 256)].iter().enumerate() {
            l.push(format!("layers.{i}.weight"), &[*o, *n], tensor::ParamKind::Dense);
            l.push(format!("layers.{i}.bias"), &[*o], tensor::ParamKind::Dense);
        }
        l
    }

    fn section(toml_text: &str) -> CompressSection {
        toml::from_str(toml_text).expect("toml")
    }

    #[test]
    fn groups_choose_per_tensor_and_the_first_match_wins() {
        let s = section(
            r#"
            codec = "topk:0.01"
            [[groups]]
            params = ["*.bias"]
            codec = "none"
            [[groups]]
            params = ["layers.2.*", "layers.0.*"]
            codec = "int8"
            error_feedback = true
            "#,
        );
        s.validate().expect("valid");
        assert!(s.is_active());
        let plan = s.resolve(&mlp_layout()).expect("resolves");
        let shown: Vec<(String, bool)> = plan
            .iter()
            .map(|c| (c.compress.to_string(), c.error_feedback()))
            .collect();
        let want = [
            ("int8", true),      // layers.0.weight: the second group
            ("none", false),     // layers.0.bias: the first group, before the second
            ("topk:0.01", true), // layers.1.weight: the default, with the codec's error feedback
            ("none", false),
            ("int8", true),
            ("none", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(c, e)| (c.to_string(), *e)).collect();
        assert_eq!(shown, want);
    }

    #[test]
    fn bad_groups_are_refused_with_what_is_wrong() {
        let s = section("codec = \"int8\"\n[[groups]]\nparams = []\ncodec = \"none\"\n");
        assert!(
            s.validate()
                .expect_err("empty")
                .contains("compress.groups[0] names no tensors")
        );
        let s = section("[[groups]]\nparams = [\"layers.9.*\"]\ncodec = \"fp16\"\n");
        s.validate().expect("syntax is fine");
        let e = s.resolve(&mlp_layout()).expect_err("matches nothing");
        assert!(
            e.contains("compress.groups[0]: no tensor matches [\"layers.9.*\"]"),
            "{e}"
        );
        assert!(e.contains("layers.2.bias"), "{e}");
        let e = toml::from_str::<CompressSection>("codec = \"topk:2\"").expect_err("bad codec");
        assert!(e.to_string().contains("fraction must be in (0, 1]"), "{e}");
        let e = toml::from_str::<CompressSection>("[[groups]]\nparams = [\"*\"]\n").expect_err("no codec");
        assert!(e.to_string().contains("codec"), "{e}");
        assert!(!CompressSection::default().is_active());
    }

    /// `world` ranks over loopback TCP, each with its own coordinator stream (unused here).
    fn exchanges(world: usize, section: &CompressSection, layout: &Layout) -> Vec<CompressExchange> {
        exchanges_from(world, section, layout, &[])
    }

    /// [`exchanges`] resumed from a checkpoint's `compress` group.
    fn exchanges_from(
        world: usize,
        section: &CompressSection,
        layout: &Layout,
        restored: &[(String, Vec<f32>)],
    ) -> Vec<CompressExchange> {
        use std::net::{TcpListener, TcpStream};
        let pair = || {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
            let (b, _) = l.accept().expect("accept");
            (a, b)
        };
        let mut m: Vec<Vec<Option<TcpStream>>> = (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
        for (i, j) in (0..world).flat_map(|i| (i + 1..world).map(move |j| (i, j))) {
            let (a, b) = pair();
            m[i][j] = Some(a);
            m[j][i] = Some(b);
        }
        m.into_iter()
            .enumerate()
            .map(|(r, conns)| {
                let comm = Comm::new(r as u32, conns, CollectiveConfig::default(), 10_000, true).expect("comm");
                let coordinator = Arc::new(Mutex::new(pair().0));
                CompressExchange::new(comm, section, layout, 7, coordinator, restored).expect("exchange")
            })
            .collect()
    }

    /// Runs one step on every rank (threads) and returns each rank's result.
    fn step(exchanges: &mut [CompressExchange], grads: &[Vec<f32>], step: u64) -> Vec<Vec<f32>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = exchanges
                .iter_mut()
                .zip(grads)
                .map(|(ex, g)| {
                    s.spawn(move || {
                        let mut g = g.clone();
                        ex.allreduce_gradient(step, &mut g).expect("exchange");
                        g
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    fn small_layout() -> Layout {
        let mut l = Layout::new();
        l.push("w", &[20, 30], tensor::ParamKind::Dense);
        l.push("b", &[7], tensor::ParamKind::Dense);
        l
    }

    fn gradients(world: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        (0..world)
            .map(|_| (0..n).map(|_| rng.normal() as f32).collect())
            .collect()
    }

    #[test]
    fn every_rank_gets_the_same_sum_of_each_ranks_message() {
        let layout = small_layout();
        for codec in [
            "topk:0.1",
            "topk:0.05:f16",
            "int8:64",
            "qsgd:15",
            "sign:8",
            "threshold:1.5",
        ] {
            let section = section(&format!("codec = \"{codec}\"\nerror_feedback = false\n"));
            let world = 3;
            let mut ex = exchanges(world, &section, &layout);
            let grads = gradients(world, layout.len(), 11);
            let got = step(&mut ex, &grads, 5);
            for r in 1..world {
                assert!(
                    got[r].iter().zip(&got[0]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{codec}: rank {r} differs from rank 0"
                );
            }
            // The same messages decoded in rank order, by hand.
            let spec: CodecSpec = codec.parse().expect("codec");
            let mut want = vec![0f32; layout.len()];
            for (r, g) in grads.iter().enumerate() {
                for (i, t) in layout.tensors().iter().enumerate() {
                    let seed = CompressExchange::seed_for(7, 5, r as u32, i);
                    let mut msg = Vec::new();
                    codec::encode_shaped(&spec, &g[t.range()], &t.shape, seed, &mut msg).expect("encode");
                    codec::decode_add(&msg, &mut want[t.range()]).expect("decode");
                }
            }
            assert!(
                got[0].iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{codec}: not the rank-ordered sum of the messages"
            );
        }
    }

    #[test]
    fn quantisation_error_is_the_sum_of_each_ranks_own_bound() {
        // int8 rounds each rank's values once, to within its bucket's max/127: the sum is off
        // by at most the sum of those bounds, however many ranks there are.
        let mut l = Layout::new();
        l.push("v", &[4096], tensor::ParamKind::Dense);
        let section = section("codec = \"int8:4096\"\n");
        for world in [2, 4] {
            let mut ex = exchanges(world, &section, &l);
            let grads = gradients(world, l.len(), world as u64);
            let got = step(&mut ex, &grads, 0);
            let bound: f32 = grads
                .iter()
                .map(|g| g.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
                .sum();
            for (i, v) in got[0].iter().enumerate() {
                let exact: f32 = grads.iter().map(|g| g[i]).sum();
                assert!(
                    (v - exact).abs() <= bound * 1.0001,
                    "world {world}: {v} vs {exact}, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn powersgd_with_f32_biases_agrees_on_every_rank_and_counts_its_bytes() {
        let layout = small_layout();
        let section = section("codec = \"powersgd:2\"\n");
        let world = 2;
        let mut ex = exchanges(world, &section, &layout);
        let mut grads = gradients(world, layout.len(), 3);
        for s in 0..3 {
            let got = step(&mut ex, &grads, s);
            assert!(got[0].iter().zip(&got[1]).all(|(a, b)| a.to_bits() == b.to_bits()));
            assert!(got[0].iter().all(|v| v.is_finite()));
            // The bias is all-reduced exactly.
            let b = layout.get("b").expect("b").range();
            for i in b {
                assert_eq!(got[0][i], grads[0][i] + grads[1][i]);
            }
            grads = gradients(world, layout.len(), 4 + s);
        }
        let t = ex[0].take_traffic().expect("counted");
        // P (2·20) and the bias (7) in one all-reduce, Q (2·30) in another, 3 steps, one peer.
        let frames = 3 * 2 * 32;
        assert_eq!(t.sent_total(), 3 * 4 * (2 * 20 + 7 + 2 * 30) + frames);
        assert!(t.uncompressed > t.sent_total());
    }

    #[test]
    fn sum_sq_is_the_plain_sum_up_to_rounding() {
        let mut rng = Rng::new(7);
        for n in [0, 1, 7, 8, 9, 1001] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(x - y) * f64::from(x - y)).sum();
            let fast = sum_sq(&a, &b, |x, y| x - y);
            assert!(
                (fast - plain).abs() <= 1e-12 * plain.max(1.0),
                "n = {n}: {fast} vs {plain}"
            );
        }
    }

    #[test]
    fn traffic_follows_the_collective_plans() {
        // Ring all-reduce: 2(W−1)/W of the buffer out to the right neighbour, in from the left.
        let (world, len) = (4u32, 1 << 20);
        let mut t = Traffic::new(world);
        plan_traffic(all_reduce_kind(len, world), 1, world, len, &mut t);
        let payload = 2 * 3 * (len / 4) as u64 * 4;
        assert_eq!(t.sent[0] + t.sent[1] + t.sent[3], 0);
        assert!(t.sent[2] >= payload && t.sent[2] < payload + 64 * 32, "{:?}", t.sent);
        assert_eq!(t.received[0], t.sent[2]);
        // All-gather of W chunks of m: (W−1)·m each way.
        let mut t = Traffic::new(world);
        plan_traffic(Kind::AllGather(GatherAlgorithm::Ring), 3, world, 4 * 100, &mut t);
        assert_eq!(t.sent, vec![3 * (400 + 32), 0, 0, 0]);
        assert_eq!(t.received, vec![0, 0, 3 * (400 + 32), 0]);
        // Bruck's: a round to rank 3 − 2^k with the parts held so far, parts 3
        // then 0 in round 1, two frames as they wrap around the buffer's end.
        let mut t = Traffic::new(world);
        plan_traffic(Kind::AllGather(GatherAlgorithm::Bruck), 3, world, 4 * 100, &mut t);
        assert_eq!(t.sent, vec![0, 800 + 2 * 32, 400 + 32, 0]);
        assert_eq!(t.received, vec![400 + 32, 800 + 32, 0, 0]);
        // Recursive doubling with 4 ranks: the whole buffer to each of two partners.
        let mut t = Traffic::new(world);
        plan_traffic(all_reduce_kind(100, world), 0, world, 100, &mut t);
        assert_eq!(t.sent, vec![0, 432, 432, 0]);
        assert_eq!(t.received, t.sent);
    }

    /// Runs one local-SGD average on every rank (threads); `params` become each rank's result.
    fn average(exchanges: &mut [CompressExchange], params: &mut [Vec<f32>], step: u64) {
        std::thread::scope(|s| {
            let handles: Vec<_> = exchanges
                .iter_mut()
                .zip(params.iter_mut())
                .map(|(ex, p)| s.spawn(move || ex.average_params(step, p).expect("average")))
                .collect();
            handles.into_iter().for_each(|h| h.join().expect("rank thread"));
        });
    }

    /// Every rank's parameters: `base` plus its own noise of scale `scale`.
    fn drifted(base: &[f32], world: usize, scale: f32, seed: u64) -> Vec<Vec<f32>> {
        gradients(world, base.len(), seed)
            .into_iter()
            .map(|d| base.iter().zip(d).map(|(b, d)| b + scale * d).collect())
            .collect()
    }

    fn bitwise_equal(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn local_sgd_averages_fp16_deltas_within_the_codecs_bound_on_every_rank_alike() {
        let layout = small_layout();
        let world = 3;
        let mut ex = exchanges(world, &section("codec = \"fp16\"\nerror_feedback = false\n"), &layout);
        // Parameters of magnitude ~100 that drift by ~1e-3 between averages: fp16 of the
        // parameters would be off by ~0.05, fp16 of the deltas by ~1e-6.
        let base: Vec<f32> = gradients(1, layout.len(), 1)[0].iter().map(|v| 100.0 * v).collect();
        let mut params = drifted(&base, world, 1e-3, 2);
        let locals = params.clone();
        average(&mut ex, &mut params, 3);
        // The first average has no last average to take a delta from: it is exact (f32).
        for (i, v) in params[0].iter().enumerate() {
            let exact = locals.iter().map(|p| f64::from(p[i])).sum::<f64>() / world as f64;
            assert!((f64::from(*v) - exact).abs() <= 4.0 * exact.abs() * f64::from(f32::EPSILON));
        }
        let first = ex[0].take_traffic().expect("counted");
        assert_eq!(
            first.sent_total(),
            first.uncompressed,
            "the first average is a plain all-reduce"
        );
        for round in 0..3u64 {
            let last = params[0].clone();
            params = drifted(&last, world, 1e-3, 10 + round);
            let locals = params.clone();
            average(&mut ex, &mut params, 7 + 4 * round);
            for r in 1..world {
                assert!(bitwise_equal(&params[r], &params[0]), "round {round}: rank {r} differs");
            }
            let mut off_max = 0f64;
            for (i, v) in params[0].iter().enumerate() {
                let deltas: Vec<f64> = locals.iter().map(|p| f64::from(p[i]) - f64::from(last[i])).collect();
                let exact = f64::from(last[i]) + deltas.iter().sum::<f64>() / world as f64;
                // Each rank's delta rounded once to fp16 (relative 2^-11, or 2^-25 below its
                // normal range), plus the f32 roundings of the delta and of x̄ + mean.
                let bound = deltas
                    .iter()
                    .map(|d| d.abs() * 2f64.powi(-11) + 2f64.powi(-25))
                    .sum::<f64>()
                    / world as f64
                    + 3.0 * f64::from(last[i]).abs() * f64::from(f32::EPSILON);
                let off = (f64::from(*v) - exact).abs();
                assert!(
                    off <= bound,
                    "round {round}, element {i}: {v} vs {exact}, bound {bound}"
                );
                off_max = off_max.max(off);
            }
            assert!(off_max > 0.0, "fp16 rounded nothing: was the delta sent uncompressed?");
            let t = ex[0].take_traffic().expect("counted");
            // The all-gather passes each message on W − 1 times: 2 bytes per element, plus
            // the messages' headers, the lengths and the frames.
            let (n, hops) = (layout.len() as u64, world as u64 - 1);
            assert!((hops * 2 * n..=hops * (2 * n + 200)).contains(&t.sent_total()), "{t:?}");
        }
    }

    #[test]
    fn local_sgd_error_feedback_keeps_what_the_average_dropped() {
        // x̄ + (1/W)·Σ_r e_r is the exact mean of the local parameters: top-k drops
        // most of each delta, and the residuals hold it until a later average.
        let layout = small_layout();
        let world = 2;
        let mut ex = exchanges(
            world,
            &section("codec = \"topk:0.05\"\nerror_feedback = true\n"),
            &layout,
        );
        let mut params = drifted(&vec![0.5; layout.len()], world, 0.1, 3);
        average(&mut ex, &mut params, 3);
        let residual_mean = |ex: &[CompressExchange], i: usize| {
            ex.iter()
                .map(|e| {
                    let s = e.slots.iter().find(|s| s.range.contains(&i)).expect("slot");
                    let How::Message { ef: Some(ef), .. } = &s.how else {
                        panic!("top-k with error feedback")
                    };
                    f64::from(ef.state()[i - s.range.start])
                })
                .sum::<f64>()
                / world as f64
        };
        let mut exact: Vec<f64> = params[0].iter().map(|v| f64::from(*v)).collect();
        for round in 0..4u64 {
            let last = params[0].clone();
            params = drifted(&last, world, 0.1, 20 + round);
            for (i, e) in exact.iter_mut().enumerate() {
                *e += params.iter().map(|p| f64::from(p[i]) - f64::from(last[i])).sum::<f64>() / world as f64;
            }
            average(&mut ex, &mut params, 7 + 4 * round);
            assert!(bitwise_equal(&params[0], &params[1]), "round {round}");
            let mut dropped = 0f64;
            for (i, want) in exact.iter().enumerate() {
                let got = f64::from(params[0][i]) + residual_mean(&ex, i);
                assert!((got - want).abs() < 1e-5, "round {round}, element {i}: {got} vs {want}");
                dropped += residual_mean(&ex, i).abs();
            }
            assert!(dropped > 0.0, "top-5% kept everything");
        }
    }

    #[test]
    fn local_sgd_state_in_a_checkpoint_resumes_the_next_average_exactly() {
        let layout = small_layout();
        let world = 2;
        // Every kind of state: top-k residuals, PowerSGD's warm start and residual, the last average.
        let section = section(
            "codec = \"topk:0.05\"\nerror_feedback = true\n[[groups]]\nparams = [\"w\"]\ncodec = \"powersgd:2\"\n",
        );
        let mut ex = exchanges(world, &section, &layout);
        let mut params = drifted(&vec![0.0; layout.len()], world, 0.1, 4);
        average(&mut ex, &mut params, 3);
        params = drifted(&params[0], world, 0.1, 5);
        average(&mut ex, &mut params, 7);
        let saved: Vec<Vec<(String, Vec<f32>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = ex
                .iter_mut()
                .map(|e| s.spawn(move || e.checkpoint_state(8).expect("state")))
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        // Rank 0 writes the checkpoint; every rank's copy is the same.
        assert_eq!(saved[0], saved[1]);
        let names: Vec<&str> = saved[0].iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "rank0.b.ef_residual",
            "rank1.b.ef_residual",
            "rank1.w.ef_residual",
            "w.powersgd_q",
            "w.local_sgd_average",
            "b.local_sgd_average",
        ] {
            assert!(names.contains(&want), "no {want} in {names:?}");
        }
        let mut resumed = exchanges_from(world, &section, &layout, &saved[0]);
        let next = drifted(&params[0], world, 0.1, 6);
        let (mut a, mut b) = (next.clone(), next);
        average(&mut ex, &mut a, 11);
        average(&mut resumed, &mut b, 11);
        assert!(bitwise_equal(&a[0], &b[0]), "the resumed average differs");
        assert!(bitwise_equal(&a[1], &b[1]));
        // Without the last average a resumed run starts with an exact average instead.
        let without: Vec<(String, Vec<f32>)> = saved[0]
            .iter()
            .filter(|(n, _)| !n.ends_with(AVERAGE_SUFFIX))
            .cloned()
            .collect();
        let mut fresh = exchanges_from(world, &section, &layout, &without);
        let mut c = drifted(&params[0], world, 0.1, 6);
        average(&mut fresh, &mut c, 11);
        assert!(!bitwise_equal(&a[0], &c[0]));
        let t = fresh[0].take_traffic().expect("counted");
        assert_eq!(t.sent_total(), t.uncompressed);
        // Part of it is a broken checkpoint.
        let partial: Vec<(String, Vec<f32>)> = saved[0]
            .iter()
            .filter(|(n, _)| n != "b.local_sgd_average")
            .cloned()
            .collect();
        let comm_less = exchanges(1, &section, &layout).pop().expect("one rank");
        let mut probe = comm_less;
        let e = probe.load_state(&partial).expect_err("partial average");
        assert!(e.to_string().contains("1 of the model's 2 tensors"), "{e}");
    }
}
