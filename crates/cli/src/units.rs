//! The one reading of sizes, counts and rates on the command line, for every
//! flag that takes them (`--sizes`, `--size`, `--params`, `--burst`,
//! `--bandwidth`).
//!
//! SI prefixes are powers of 1000 (`K`, `k`, `KB`, `kB`, `M`, `MB`, `G`, `GB`),
//! IEC prefixes powers of 1024 (`Ki`, `KiB`, `Mi`, `MiB`, `Gi`, `GiB`), as
//! `numfmt` and the SI and IEC standards read them. `tc` reads `kb` as 1024
//! bytes and `kbit` as 1000 bits, so the lowercase byte units `kb`, `mb`, `gb`
//! are refused as ambiguous, with both readings in the message.

/// A prefix and its multiplier.
const PREFIXES: [(&str, f64); 7] = [
    ("", 1.0),
    ("K", 1e3),
    ("k", 1e3),
    ("M", 1e6),
    ("G", 1e9),
    ("Ki", 1024.0),
    ("Mi", 1024.0 * 1024.0),
];
const GIBI: (&str, f64) = ("Gi", 1024.0 * 1024.0 * 1024.0);

/// Splits `s` into its number and its suffix (everything from the first letter).
fn split(s: &str) -> (&str, &str) {
    let s = s.trim();
    let at = s
        .char_indices()
        .find(|&(i, c)| c.is_ascii_alphabetic() && !is_exponent(s, i))
        .map_or(s.len(), |(i, _)| i);
    (s[..at].trim(), s[at..].trim())
}

/// Whether the letter at `i` is the `e` of a number like `1e9`.
fn is_exponent(s: &str, i: usize) -> bool {
    let b = s.as_bytes();
    matches!(b[i], b'e' | b'E')
        && i > 0
        && b[i - 1].is_ascii_digit()
        && b.get(i + 1)
            .is_some_and(|c| c.is_ascii_digit() || *c == b'-' || *c == b'+')
}

fn multiplier(prefix: &str) -> Option<f64> {
    PREFIXES
        .iter()
        .chain([&GIBI])
        .find(|(p, _)| *p == prefix)
        .map(|&(_, m)| m)
}

fn number(num: &str, whole: &str, what: &str) -> Result<f64, String> {
    let v: f64 = num.parse().map_err(|_| format!("`{whole}` is not {what}"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("`{whole}` is not {what}"));
    }
    Ok(v)
}

/// `100M`, `4Ki`, `1.5G`, `269322`: a count.
pub fn count(s: &str) -> Result<u64, String> {
    let (num, suffix) = split(s);
    let mult = multiplier(suffix)
        .ok_or_else(|| format!("unknown suffix `{suffix}` in `{s}` (K, M, G for 1000s; Ki, Mi, Gi for 1024s)"))?;
    Ok((number(num, s, "a count")? * mult).round() as u64)
}

/// `4KiB`, `25MiB`, `32KB`, `70000`: bytes.
pub fn bytes(s: &str) -> Result<u64, String> {
    let (num, suffix) = split(s);
    if let Some(p) = ["kb", "mb", "gb"].iter().find(|u| **u == suffix) {
        let v = number(num, s, "a size")?;
        let (si, iec) = (p[..1].to_ascii_uppercase(), format!("{}i", p[..1].to_ascii_uppercase()));
        return Err(format!(
            "`{s}` is ambiguous: write {num}{iec}B ({} bytes, as tc reads {p}) or {num}{si}B ({} bytes)",
            (v * multiplier(&iec).unwrap_or(1.0)).round(),
            (v * multiplier(&si).unwrap_or(1.0)).round(),
        ));
    }
    let prefix = suffix.strip_suffix('B').unwrap_or(suffix);
    let mult = multiplier(prefix).ok_or_else(|| {
        format!("unknown unit `{suffix}` in `{s}` (B, KB, MB, GB for 1000s; KiB, MiB, GiB for 1024s)")
    })?;
    Ok((number(num, s, "a size")? * mult).round() as u64)
}

/// `25gbit`, `100mbit`, `1e9`: bits per second (`kbit`, `mbit`, `gbit` are
/// powers of 1000, as `tc` reads them).
pub fn rate(s: &str) -> Result<f64, String> {
    let (num, suffix) = split(s);
    let mult = match suffix.to_ascii_lowercase().as_str() {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        other => return Err(format!("unknown unit `{other}` in `{s}` (bit, kbit, mbit, gbit)")),
    };
    let v = number(num, s, "a rate (e.g. 25gbit, 100mbit)")?;
    if v == 0.0 {
        return Err(format!("`{s}` is not a positive rate"));
    }
    Ok(v * mult)
}

/// A comma-separated list of sizes in bytes, each a whole number of `f32` values.
pub fn f32_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|part| {
            let b = bytes(part)?;
            if !b.is_multiple_of(4) {
                return Err(format!("`{}` is not a whole number of f32 values", part.trim()));
            }
            usize::try_from(b).map_err(|_| format!("`{}` does not fit in memory", part.trim()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: the benchmark read `KB` as 1000 and the simulator `kb` as
    /// 1024; every flag now reads one table, and the ambiguous spelling is refused.
    #[test]
    fn si_is_1000_iec_is_1024_everywhere() {
        assert_eq!(bytes("4KiB"), Ok(4096));
        assert_eq!(bytes("4KB"), Ok(4000));
        assert_eq!(bytes("4kB"), Ok(4000));
        assert_eq!(bytes("25MiB"), Ok(25 << 20));
        assert_eq!(bytes("1GiB"), Ok(1 << 30));
        assert_eq!(bytes("70000"), Ok(70_000));
        assert_eq!(bytes("256Ki"), Ok(256 * 1024));
        assert_eq!(count("100M"), Ok(100_000_000));
        assert_eq!(count("4Ki"), Ok(4096));
        assert_eq!(count("269322"), Ok(269_322));
        assert_eq!(count("1.5G"), Ok(1_500_000_000));
        assert_eq!(rate("25gbit"), Ok(25e9));
        assert_eq!(rate("100mbit"), Ok(1e8));
        assert_eq!(rate("1e9"), Ok(1e9));
        assert_eq!(f32_sizes("4KiB, 1MiB"), Ok(vec![4096, 1 << 20]));
    }

    #[test]
    fn bad_and_ambiguous_units_say_why() {
        let e = bytes("32kb").unwrap_err();
        assert!(
            e.contains("32KiB (32768 bytes") && e.contains("32KB (32000 bytes)"),
            "{e}"
        );
        assert!(bytes("lots").unwrap_err().contains("`lots`"));
        assert!(bytes("-4KiB").is_err());
        assert!(count("12X").unwrap_err().contains("unknown suffix `X`"));
        assert!(rate("fast").is_err());
        assert!(rate("0gbit").unwrap_err().contains("positive"));
        assert!(f32_sizes("6B").unwrap_err().contains("f32"));
        assert!(bytes("NaN").is_err());
    }
}
