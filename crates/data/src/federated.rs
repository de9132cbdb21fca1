//! Splitting one data set among federated clients the way experiments on
//! non-IID data do: IID, label skew by a Dirichlet draw per class (Hsu et al.
//! 2019), pathological label skew by sorted shards (McMahan et al. 2017),
//! quantity skew by a Dirichlet draw of sizes; and the skew that results.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use tensor::Rng;

use crate::{DataError, Dataset};

/// How a data set is split among clients (`fl.partition`, `data partition --scheme`).
#[derive(Clone, Debug, PartialEq)]
pub enum ClientSplit {
    /// A seeded shuffle cut into near-equal parts.
    Iid,
    /// Per class, the class's rows are shared out in proportions drawn from
    /// Dir(α·1); smaller α, stronger label skew. Redrawn until every client
    /// holds at least [`CLIENT_ROWS_MIN`] rows.
    Dirichlet { alpha: f64 },
    /// Rows sorted by label, cut into `clients · k` shards, `k` random shards per client.
    Shards { k: usize },
    /// IID labels, sizes in proportions drawn from Dir(β·1).
    Quantity { beta: f64 },
    /// The client of every row, read from a file (one integer a line).
    Owners(Vec<usize>),
}

/// Every client gets at least this many rows from the Dirichlet schemes.
pub const CLIENT_ROWS_MIN: usize = 10;
/// Draws tried before a Dirichlet scheme gives up.
const DRAWS_MAX: usize = 1000;

impl FromStr for ClientSplit {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let bad = || {
            DataError::config(
                "partition scheme",
                format!("`{s}` (use iid, dirichlet:ALPHA, shards:K or quantity:BETA, with ALPHA, BETA > 0 and K ≥ 1)"),
            )
        };
        let (name, arg) = s.split_once(':').unwrap_or((s, ""));
        let positive = || {
            arg.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(bad)
        };
        match name {
            "iid" if arg.is_empty() => Ok(Self::Iid),
            "dirichlet" => Ok(Self::Dirichlet { alpha: positive()? }),
            "quantity" => Ok(Self::Quantity { beta: positive()? }),
            "shards" => match arg.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Self::Shards { k }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl ClientSplit {
    /// Reads a file of owners, one client index a line, for `rows` rows and `clients` clients.
    pub fn read_owners(path: &std::path::Path, rows: usize, clients: usize) -> Result<Self, DataError> {
        let text = std::fs::read_to_string(path).map_err(|err| DataError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let mut owners = Vec::with_capacity(rows);
        for (i, line) in text.lines().enumerate() {
            let c = line
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&c| c < clients)
                .ok_or_else(|| {
                    DataError::config(
                        "partition file",
                        format!(
                            "{}:{}: `{line}` is not a client index below {clients}",
                            path.display(),
                            i + 1
                        ),
                    )
                })?;
            owners.push(c);
        }
        if owners.len() != rows {
            return Err(DataError::config(
                "partition file",
                format!("{} names {} rows, the data has {rows}", path.display(), owners.len()),
            ));
        }
        Ok(Self::Owners(owners))
    }

    /// The rows of each of `clients` clients, ascending; every row is in exactly one.
    pub fn split(&self, ds: &Dataset, clients: usize, seed: u64) -> Result<Vec<Vec<usize>>, DataError> {
        let rows = ds.rows();
        if clients == 0 || clients > rows {
            return Err(DataError::config(
                "clients",
                format!("cannot split {rows} rows among {clients} clients"),
            ));
        }
        let mut rng = Rng::derive(seed, 0xFED);
        let mut parts = match self {
            Self::Iid => {
                let mut order: Vec<usize> = (0..rows).collect();
                rng.shuffle(&mut order);
                cut(&order, &equal_sizes(rows, clients))
            }
            Self::Quantity { beta } => {
                let mut order: Vec<usize> = (0..rows).collect();
                rng.shuffle(&mut order);
                let sizes = draw_until(CLIENT_ROWS_MIN.min(rows / clients), "quantity", || {
                    let p = dirichlet(&mut rng, *beta, clients);
                    Some(sizes_from(&p, rows))
                })?;
                cut(&order, &sizes)
            }
            Self::Dirichlet { alpha } => {
                let by_class = rows_by_class(ds);
                let min = CLIENT_ROWS_MIN.min(rows / clients);
                let mut result = None;
                for _ in 0..DRAWS_MAX {
                    let mut parts = vec![Vec::new(); clients];
                    for class_rows in &by_class {
                        let mut idx = class_rows.clone();
                        rng.shuffle(&mut idx);
                        let p = dirichlet(&mut rng, *alpha, clients);
                        for (c, part) in cut(&idx, &sizes_from(&p, idx.len())).into_iter().enumerate() {
                            parts[c].extend(part);
                        }
                    }
                    if parts.iter().all(|p| p.len() >= min) {
                        result = Some(parts);
                        break;
                    }
                }
                result.ok_or_else(|| too_few("dirichlet"))?
            }
            Self::Shards { k } => {
                let mut order: Vec<usize> = (0..rows).collect();
                order.sort_by_key(|&r| ds.labels[r]);
                let count = clients * k;
                if count > rows {
                    return Err(DataError::config(
                        "partition scheme",
                        format!("shards:{k} needs {count} shards of at least one row; the data has {rows} rows"),
                    ));
                }
                let shards = cut(&order, &equal_sizes(rows, count));
                let mut ids: Vec<usize> = (0..count).collect();
                rng.shuffle(&mut ids);
                ids.chunks(*k)
                    .map(|mine| mine.iter().flat_map(|&s| shards[s].iter().copied()).collect())
                    .collect()
            }
            Self::Owners(owners) => {
                if owners.len() != rows {
                    return Err(DataError::config(
                        "partition file",
                        format!("names {} rows, the data has {rows}", owners.len()),
                    ));
                }
                let mut parts = vec![Vec::new(); clients];
                for (r, &c) in owners.iter().enumerate() {
                    parts
                        .get_mut(c)
                        .ok_or_else(|| {
                            DataError::config("partition file", format!("row {r} names client {c} of {clients}"))
                        })?
                        .push(r);
                }
                parts
            }
        };
        for p in &mut parts {
            p.sort_unstable();
        }
        Ok(parts)
    }
}

impl fmt::Display for ClientSplit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Iid => f.write_str("iid"),
            Self::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Self::Shards { k } => write!(f, "shards:{k}"),
            Self::Quantity { beta } => write!(f, "quantity:{beta}"),
            Self::Owners(_) => f.write_str("file"),
        }
    }
}

fn too_few(scheme: &str) -> DataError {
    DataError::config(
        "partition scheme",
        format!(
            "{DRAWS_MAX} {scheme} draws left a client with fewer than {CLIENT_ROWS_MIN} rows; use fewer clients or a larger parameter"
        ),
    )
}

fn draw_until(min: usize, scheme: &str, mut draw: impl FnMut() -> Option<Vec<usize>>) -> Result<Vec<usize>, DataError> {
    for _ in 0..DRAWS_MAX {
        if let Some(sizes) = draw().filter(|s| s.iter().all(|&n| n >= min)) {
            return Ok(sizes);
        }
    }
    Err(too_few(scheme))
}

fn equal_sizes(rows: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|p| rows / parts + usize::from(p < rows % parts))
        .collect()
}

/// Sizes summing to `n` in proportions `p` (cut at the rounded-down cumulative sums).
fn sizes_from(p: &[f64], n: usize) -> Vec<usize> {
    let mut sizes = Vec::with_capacity(p.len());
    let (mut acc, mut prev) = (0.0, 0usize);
    for (i, &x) in p.iter().enumerate() {
        acc += x;
        let end = if i + 1 == p.len() {
            n
        } else {
            ((acc * n as f64) as usize).min(n)
        };
        let end = end.max(prev);
        sizes.push(end - prev);
        prev = end;
    }
    sizes
}

fn cut(order: &[usize], sizes: &[usize]) -> Vec<Vec<usize>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = order[at..at + n].to_vec();
            at += n;
            part
        })
        .collect()
}

fn rows_by_class(ds: &Dataset) -> Vec<Vec<usize>> {
    let mut by = vec![Vec::new(); ds.num_classes.max(1) as usize];
    for (r, &y) in ds.labels.iter().enumerate() {
        by[y as usize].push(r);
    }
    by
}

/// A draw from the symmetric Dirichlet distribution Dir(α·1ₙ).
fn dirichlet(rng: &mut Rng, alpha: f64, n: usize) -> Vec<f64> {
    let mut g: Vec<f64> = (0..n).map(|_| gamma(rng, alpha)).collect();
    let sum: f64 = g.iter().sum();
    if sum > 0.0 {
        g.iter_mut().for_each(|x| *x /= sum);
    } else {
        // Every draw underflowed (tiny α): all mass to one client, as the limit α → 0 does.
        g.iter_mut().for_each(|x| *x = 0.0);
        g[rng.below(n as u64) as usize] = 1.0;
    }
    g
}

/// A Gamma(shape, 1) draw: Marsaglia and Tsang (2000) for shape ≥ 1, and
/// Gamma(shape + 1)·U^(1/shape) below.
fn gamma(rng: &mut Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u = 1.0 - rng.next_f64();
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = rng.normal();
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = 1.0 - rng.next_f64();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// How skewed a split is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientSkew {
    /// Rows of each client.
    pub rows: Vec<usize>,
    /// The largest client's rows over the mean.
    pub rows_max_over_mean: f64,
    /// Mean over clients of the total-variation distance between the
    /// client's label distribution and the whole set's (0: IID, 1: disjoint).
    pub label_tv_mean: f64,
    /// Mean number of classes a client holds.
    pub classes_mean: f64,
    /// Per client, its count of each class.
    pub label_counts: Vec<Vec<usize>>,
}

impl ClientSkew {
    pub fn new(ds: &Dataset, parts: &[Vec<usize>]) -> Self {
        let classes = ds.num_classes.max(1) as usize;
        let mut global = vec![0usize; classes];
        ds.labels.iter().for_each(|&y| global[y as usize] += 1);
        let total = ds.rows().max(1) as f64;
        let label_counts: Vec<Vec<usize>> = parts
            .iter()
            .map(|p| {
                let mut c = vec![0usize; classes];
                p.iter().for_each(|&r| c[ds.labels[r] as usize] += 1);
                c
            })
            .collect();
        let tv = |c: &Vec<usize>, n: usize| {
            0.5 * c
                .iter()
                .zip(&global)
                .map(|(&a, &g)| (a as f64 / n.max(1) as f64 - g as f64 / total).abs())
                .sum::<f64>()
        };
        let rows: Vec<usize> = parts.iter().map(Vec::len).collect();
        let n = parts.len().max(1) as f64;
        let mean = rows.iter().sum::<usize>() as f64 / n;
        Self {
            rows_max_over_mean: rows.iter().copied().max().unwrap_or(0) as f64 / mean.max(1e-12),
            label_tv_mean: label_counts.iter().zip(&rows).map(|(c, &r)| tv(c, r)).sum::<f64>() / n,
            classes_mean: label_counts
                .iter()
                .map(|c| c.iter().filter(|&&x| x > 0).count())
                .sum::<usize>() as f64
                / n,
            rows,
            label_counts,
        }
    }
}

impl fmt::Display for ClientSkew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "client       rows  classes  labels")?;
        for (c, (rows, counts)) in self.rows.iter().zip(&self.label_counts).enumerate() {
            let held = counts.iter().filter(|&&x| x > 0).count();
            let counts: Vec<String> = counts.iter().map(usize::to_string).collect();
            writeln!(f, "{c:>6} {rows:>10} {held:>8}  {}", counts.join(" "))?;
        }
        write!(
            f,
            "size skew (max/mean rows) {:.3}; label skew (mean total variation from the whole set) {:.3}; classes per client {:.2}",
            self.rows_max_over_mean, self.label_tv_mean, self.classes_mean
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Features;

    fn labelled(rows: usize, classes: u32) -> Dataset {
        Dataset {
            features: Features::Dense {
                dim: 1,
                values: (0..rows).map(|r| r as f32).collect(),
            },
            labels: (0..rows).map(|r| (r % classes as usize) as u32).collect(),
            num_classes: classes,
        }
    }

    fn covers_every_row_once(parts: &[Vec<usize>], rows: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..rows).collect::<Vec<_>>());
    }

    #[test]
    fn every_scheme_gives_every_row_to_exactly_one_client() {
        let ds = labelled(5_000, 10);
        for scheme in ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2", "quantity:1"] {
            let split: ClientSplit = scheme.parse().unwrap();
            let parts = split.split(&ds, 20, 3).unwrap();
            assert_eq!(parts.len(), 20, "{scheme}");
            covers_every_row_once(&parts, 5_000);
            assert_eq!(parts, split.split(&ds, 20, 3).unwrap(), "{scheme} is not seeded");
        }
    }

    #[test]
    fn label_skew_grows_as_alpha_shrinks_and_shards_hold_few_classes() {
        let ds = labelled(10_000, 10);
        let skew = |s: &str| ClientSkew::new(&ds, &s.parse::<ClientSplit>().unwrap().split(&ds, 10, 1).unwrap());
        let (iid, a10, a05, a01) = (
            skew("iid"),
            skew("dirichlet:10"),
            skew("dirichlet:0.5"),
            skew("dirichlet:0.1"),
        );
        assert!(iid.label_tv_mean < 0.05, "{}", iid.label_tv_mean);
        assert!(iid.label_tv_mean < a10.label_tv_mean && a10.label_tv_mean < a05.label_tv_mean);
        assert!(a05.label_tv_mean < a01.label_tv_mean);
        assert!(skew("shards:2").classes_mean <= 4.0);
        assert!(iid.rows_max_over_mean < 1.001);
        assert!(skew("quantity:0.5").rows_max_over_mean > 1.3);
    }

    #[test]
    fn gamma_draws_have_the_right_mean() {
        let mut rng = Rng::new(9);
        for shape in [0.1, 0.5, 1.0, 3.0] {
            let n = 20_000;
            let mean = (0..n).map(|_| gamma(&mut rng, shape)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(0.5),
                "shape {shape}: mean {mean}"
            );
        }
    }

    #[test]
    fn bad_schemes_and_owner_files_are_refused_naming_why() {
        for bad in [
            "dirichlet",
            "dirichlet:0",
            "dirichlet:-1",
            "shards:0",
            "quantity:nan",
            "zipf:2",
            "iid:3",
        ] {
            let err = bad.parse::<ClientSplit>().unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        let ds = labelled(100, 2);
        assert!(ClientSplit::Iid.split(&ds, 101, 0).is_err());
        assert!("shards:60".parse::<ClientSplit>().unwrap().split(&ds, 2, 0).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owners.txt");
        std::fs::write(&path, "0\n1\n7\n").unwrap();
        let err = ClientSplit::read_owners(&path, 3, 2).unwrap_err().to_string();
        assert!(err.contains("owners.txt:3") && err.contains('7'), "{err}");
        std::fs::write(&path, "0\n1\n").unwrap();
        assert!(ClientSplit::read_owners(&path, 3, 2).is_err());
        std::fs::write(&path, "0\n1\n1\n").unwrap();
        let split = ClientSplit::read_owners(&path, 3, 2).unwrap();
        assert_eq!(split.split(&labelled(3, 2), 2, 0).unwrap(), vec![vec![0], vec![1, 2]]);
    }
}
