//! The trace of a run: one text line per event, and an FNV-1a hash of every
//! byte, so two runs can be compared by hash (the fuzz mode keeps only the
//! hash; `sinter sim --trace FILE` keeps the text).

use std::fmt::Write as _;

use crate::queue::Nanos;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Most lines kept in memory; past that only the hash and the count grow.
pub const LINES_KEPT_MAX: usize = 2_000_000;

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trace {{ lines: {}, hash: {:016x} }}", self.lines, self.hash)
    }
}

pub struct Trace {
    hash: u64,
    lines: u64,
    keep: bool,
    text: String,
    line: String,
}

impl Trace {
    /// `keep`: also keep the text (up to [`LINES_KEPT_MAX`] lines).
    pub fn new(keep: bool) -> Self {
        Trace {
            hash: FNV_OFFSET,
            lines: 0,
            keep,
            text: String::new(),
            line: String::new(),
        }
    }

    /// Records one line at time `at`.
    pub fn record(&mut self, at: Nanos, what: std::fmt::Arguments<'_>) {
        self.line.clear();
        let _ = write!(self.line, "{at} ");
        let _ = self.line.write_fmt(what);
        self.line.push('\n');
        for b in self.line.bytes() {
            self.hash = (self.hash ^ b as u64).wrapping_mul(FNV_PRIME);
        }
        self.lines += 1;
        if self.keep && self.lines <= LINES_KEPT_MAX as u64 {
            self.text.push_str(&self.line);
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// The kept text (empty unless kept).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The last `n` kept lines: what led to a violation.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// FNV-1a of the bits of a parameter buffer: the checksum replicas compare.
pub fn checksum(values: &[f32]) -> u64 {
    let mut h = FNV_OFFSET;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
        }
    }
    h
}
