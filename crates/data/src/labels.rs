//! Turning the labels found in a file into class ids: `{-1,+1}` and `{0,1}`
//! become binary classes 0/1, anything else must be a non-negative class id.

/// Largest number of classes a reader accepts, so that a stray label such as
/// `4000000000` cannot make a model allocate a softmax of that width.
pub const CLASSES_MAX: u32 = 1 << 16;

/// Parses a label token: an integer with optional sign, or a decimal number
/// with an integral value (`1.0`, `-1e0`). Returns the message on failure.
pub(crate) fn parse_label(tok: &[u8]) -> Result<i64, String> {
    if let Some(v) = parse_int(tok) {
        return Ok(v);
    }
    let bad = || format!("label `{}` is not an integer", crate::error::shown(tok));
    let s = std::str::from_utf8(tok).map_err(|_| bad())?;
    let f: f64 = s.parse().map_err(|_| bad())?;
    if f.fract() != 0.0 || !(-1.0..=f64::from(CLASSES_MAX)).contains(&f) {
        return Err(bad());
    }
    Ok(f as i64)
}

/// `[+-]?[0-9]+` with at most 18 digits; `None` for anything else.
fn parse_int(tok: &[u8]) -> Option<i64> {
    let (neg, digits) = match tok.first()? {
        b'-' => (true, &tok[1..]),
        b'+' => (false, &tok[1..]),
        _ => (false, tok),
    };
    if digits.is_empty() || digits.len() > 18 {
        return None;
    }
    let mut v: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + i64::from(b - b'0');
    }
    Some(if neg { -v } else { v })
}

/// Collects raw labels with where they were seen, and maps them once the whole
/// file has been read (the number of classes depends on the set of labels).
///
/// The mapping of one label does not depend on the others once the file is
/// valid (`-1` → 0, `+1` → 1, any other label is its own id, and `-1` never
/// meets a label other than `+1`), so a row range read with the whole file's
/// number of classes maps its labels as a whole read does.
#[derive(Debug, Default)]
pub(crate) struct Labels {
    raw: Vec<i32>,
    /// Whether `raw` is kept: off for a scan that only wants the number of classes.
    keep: bool,
    /// Line or row where `-1` was first seen.
    first_minus_one: Option<u64>,
    /// First label outside `{-1, +1}` and where it was seen.
    first_other: Option<(i32, u64)>,
    max: i32,
    classes_fixed: Option<u32>,
}

impl Labels {
    /// `classes_fixed`: the caller's number of classes, if known; labels must then be below it.
    pub(crate) fn new(classes_fixed: Option<u32>) -> Self {
        Self {
            classes_fixed,
            keep: true,
            ..Self::default()
        }
    }

    /// Checks labels and finds the number of classes without keeping the
    /// labels: memory does not grow with the file.
    pub(crate) fn counting(classes_fixed: Option<u32>) -> Self {
        Self {
            classes_fixed,
            keep: false,
            ..Self::default()
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.raw.len()
    }

    /// Records `label`, seen at line or row `at`. Returns the message if it can never be valid.
    pub(crate) fn push(&mut self, label: i64, at: u64) -> Result<(), String> {
        if label < -1 {
            return Err(format!(
                "label {label} is negative (allowed: -1/+1, 0/1 or class ids 0..)"
            ));
        }
        let limit = self.classes_fixed.unwrap_or(CLASSES_MAX);
        if label >= i64::from(limit) {
            let what = if self.classes_fixed.is_some() {
                "num_classes"
            } else {
                "CLASSES_MAX"
            };
            return Err(format!("label {label} is not below {what} ({limit})"));
        }
        let label = label as i32;
        if label == -1 {
            self.first_minus_one.get_or_insert(at);
        } else if label != 1 {
            self.first_other.get_or_insert((label, at));
        }
        self.max = self.max.max(label);
        if self.keep {
            self.raw.push(label);
        }
        Ok(())
    }

    /// The class ids and the number of classes, or the place (`unit` is "line"
    /// or "row") and message of the first label that contradicts the others.
    pub(crate) fn finish(self, unit: &str) -> Result<(Vec<u32>, u32), (u64, String)> {
        if let Some(minus_one_at) = self.first_minus_one {
            if let Some((other, at)) = self.first_other {
                return Err((
                    at,
                    format!(
                        "label {other} mixed with label -1 (first at {unit} {minus_one_at}); \
                         use -1/+1, 0/1 or class ids 0.."
                    ),
                ));
            }
            let ids = self.raw.iter().map(|&l| u32::from(l == 1)).collect();
            return Ok((ids, self.classes_fixed.unwrap_or(2)));
        }
        let inferred = (self.max as u32 + 1).max(2);
        let ids = self.raw.iter().map(|&l| l as u32).collect();
        Ok((ids, self.classes_fixed.unwrap_or(inferred)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(labels: &[i64]) -> Result<(Vec<u32>, u32), (u64, String)> {
        let mut l = Labels::new(None);
        for (i, &x) in labels.iter().enumerate() {
            l.push(x, i as u64 + 1).map_err(|m| (i as u64 + 1, m))?;
        }
        l.finish("line")
    }

    #[test]
    fn binary_and_multiclass_mappings() {
        assert_eq!(map(&[-1, 1, 1]), Ok((vec![0, 1, 1], 2)));
        assert_eq!(map(&[0, 1, 0]), Ok((vec![0, 1, 0], 2)));
        assert_eq!(map(&[3, 0, 9]), Ok((vec![3, 0, 9], 10)));
        assert_eq!(map(&[0]), Ok((vec![0], 2)));
    }

    #[test]
    fn contradictions_name_the_place() {
        let (at, msg) = map(&[1, -1, 1, 2]).expect_err("-1 with 2");
        assert_eq!(at, 4);
        assert!(msg.contains("first at line 2"), "{msg}");
        assert!(map(&[-2]).is_err());
        assert!(map(&[i64::from(CLASSES_MAX)]).is_err());
    }

    #[test]
    fn label_tokens() {
        assert_eq!(parse_label(b"+1"), Ok(1));
        assert_eq!(parse_label(b"-1"), Ok(-1));
        assert_eq!(parse_label(b"1.0"), Ok(1));
        assert_eq!(parse_label(b"7"), Ok(7));
        assert!(parse_label(b"0.5").is_err());
        assert!(parse_label(b"x").is_err());
        assert!(parse_label(b"nan").is_err());
        assert!(parse_label(b"").is_err());
    }
}
