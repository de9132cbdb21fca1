//! The house rules as tests over the repository's Rust sources; see the crate
//! docs (`src/lib.rs`) for the list. Each failure names every offending file
//! and line.

use std::fs;
use std::path::{Path, PathBuf};

/// The crates that may use sockets, threads, processes and clocks: the runtime,
/// the crates that use it as a job does (`launch` starts and supervises
/// processes, `bench` times the runtime), the binary, and the file-format
/// crates that read and write their own files.
const IO_CRATES: &[&str] = &["node", "launch", "bench", "cli", "edge", "data", "checkpoint"];

/// What the crates outside `IO_CRATES` must not name in their non-test code.
const IO_TOKENS: &[&str] = &[
    "std::net",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "std::thread",
    "thread::spawn",
    "std::process",
    "Command::new",
    "Instant::now",
    "SystemTime",
    "std::time::Instant",
];

/// Files outside `IO_CRATES` that may name an `IO_TOKENS` token in non-test
/// code, as (path from the repository root, why). Empty: none does today.
const IO_ALLOWED: &[(&str, &str)] = &[];

/// Tokens that must appear nowhere. Spelled in two halves so that this file
/// does not contain them.
const DEBRIS_TOKENS: &[&str] = &[concat!("#[", "ignore"), concat!("dbg", "!(")];

/// The folders of each crate whose `.rs` files are checked.
const CRATE_DIRS: &[&str] = &["src", "tests", "examples", "benches"];

/// One checked file.
struct Source {
    /// From the repository root, with `/` separators, for messages.
    path: String,
    /// `Some(name)` for a file under `crates/<name>/`; `None` for a fuzz target.
    krate: Option<String>,
    /// `src`, `tests`, `examples`, `benches` or `fuzz_targets`.
    dir: &'static str,
    text: String,
}

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
}

fn rel(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.to_string_lossy().replace('\\', "/")
}

/// The entries of a folder, sorted so that messages are stable; none if it
/// does not exist.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(read) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = read
        .map(|entry| entry.unwrap_or_else(|e| panic!("{}: {e}", dir.display())).path())
        .collect();
    paths.sort();
    paths
}

fn walk_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for path in entries(dir) {
        if path.is_dir() {
            walk_rs(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

fn crate_dirs(root: &Path) -> Vec<PathBuf> {
    entries(&root.join("crates"))
        .into_iter()
        .filter(|path| path.join("Cargo.toml").is_file())
        .collect()
}

fn sources() -> Vec<Source> {
    let root = root();
    let mut places: Vec<(Option<String>, &'static str, PathBuf)> = Vec::new();
    for krate in crate_dirs(&root) {
        let name = krate.file_name().map(|name| name.to_string_lossy().into_owned());
        for &dir in CRATE_DIRS {
            places.push((name.clone(), dir, krate.join(dir)));
        }
    }
    places.push((None, "fuzz_targets", root.join("fuzz/fuzz_targets")));

    let mut sources = Vec::new();
    for (krate, dir, path) in places {
        let mut files = Vec::new();
        walk_rs(&path, &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            sources.push(Source {
                path: rel(&root, &file),
                krate: krate.clone(),
                dir,
                text,
            });
        }
    }
    // Guard against a walk that finds nothing and so passes every rule.
    assert!(
        sources.iter().any(|s| s.path == "crates/tidy/tests/tidy.rs"),
        "tidy did not find its own test file under {}",
        root.display()
    );
    sources
}

/// Fails with every finding, one per line, under a header saying the rule.
fn report(rule: &str, findings: &[String]) {
    assert!(
        findings.is_empty(),
        "{rule}\n{} finding(s):\n{}\n",
        findings.len(),
        findings.join("\n")
    );
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with("//")
}

/// `Some((name, inline))` if `line` declares a module: `mod name {` (inline)
/// or `mod name;`, with any visibility.
fn module_decl(line: &str) -> Option<(&str, bool)> {
    let mut rest = line.trim();
    if let Some(after) = rest.strip_prefix("pub") {
        rest = after.trim_start();
        if rest.starts_with('(') {
            rest = &rest[rest.find(')')? + 1..];
        }
        rest = rest.trim_start();
    }
    let rest = rest.strip_prefix("mod ")?.trim();
    if let Some(name) = rest.strip_suffix('{') {
        Some((name.trim(), true))
    } else {
        rest.strip_suffix(';').map(|name| (name.trim(), false))
    }
}

/// What a file's `#[cfg(test)]` attributes make test-only.
#[derive(Debug, Default, PartialEq)]
struct TestParts {
    /// 0-based line ranges (inclusive) of inline `#[cfg(test)] mod name { .. }`
    /// blocks, from the `#[cfg(test)]` to the closing brace.
    blocks: Vec<(usize, usize)>,
    /// Names of `#[cfg(test)] mod name;` declarations, whose files are test-only.
    files: Vec<String>,
}

/// Finds the test-only parts of a file. An inline module ends at the first
/// later line that is exactly its `mod` line's indentation followed by `}`,
/// which is where rustfmt puts it. A `#[cfg(test)]` on anything but a module
/// (a function, a statement) is not skipped, so such code is still checked.
fn test_parts(text: &str) -> TestParts {
    let lines: Vec<&str> = text.lines().collect();
    let mut parts = TestParts::default();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "#[cfg(test)]" {
            i += 1;
            continue;
        }
        // The item the attribute applies to, past further attributes.
        let mut j = i + 1;
        while j < lines.len()
            && (lines[j].trim().is_empty() || lines[j].trim_start().starts_with("#[") || is_comment(lines[j]))
        {
            j += 1;
        }
        match lines.get(j).and_then(|line| module_decl(line)) {
            Some((_, true)) => {
                let indent = &lines[j][..lines[j].len() - lines[j].trim_start().len()];
                let close = format!("{indent}}}");
                let end = (j + 1..lines.len())
                    .find(|&k| lines[k] == close)
                    .unwrap_or(lines.len() - 1);
                parts.blocks.push((i, end));
                i = end + 1;
            }
            Some((name, false)) => {
                parts.files.push(name.to_owned());
                i = j + 1;
            }
            None => i += 1,
        }
    }
    parts
}

/// The folder in which a file's child modules live: its own folder for
/// `lib.rs`, `main.rs` and `mod.rs`, else a folder named after it.
fn module_dir(path: &str) -> String {
    let (parent, file) = path.rsplit_once('/').unwrap_or(("", path));
    match file {
        "lib.rs" | "main.rs" | "mod.rs" => parent.to_owned(),
        _ => format!("{parent}/{}", file.trim_end_matches(".rs")),
    }
}

/// Rule: every file starts with a `//!` line that says what it owns.
#[test]
fn every_file_starts_with_a_module_doc() {
    let mut findings = Vec::new();
    for source in sources() {
        let first = source
            .text
            .lines()
            .enumerate()
            .find(|(_, line)| !line.trim().is_empty());
        match first {
            Some((_, line)) if line.starts_with("//!") => {}
            Some((i, line)) => findings.push(format!("{}:{}: {}", source.path, i + 1, line.trim())),
            None => findings.push(format!("{}:1: empty file", source.path)),
        }
    }
    report(
        "every .rs file must start with a `//!` line saying what it owns (only blank lines before it)",
        &findings,
    );
}

/// Rule: only the IO crates use sockets, threads, processes and clocks.
#[test]
fn only_io_crates_use_sockets_threads_processes_and_clocks() {
    let sources = sources();
    let checked = |source: &Source| {
        source.dir == "src" && source.krate.as_deref().is_some_and(|krate| !IO_CRATES.contains(&krate))
    };

    // Files declared with `#[cfg(test)] mod name;` are test-only as a whole.
    let mut test_files: Vec<String> = Vec::new();
    for source in sources.iter().filter(|s| checked(s)) {
        let dir = module_dir(&source.path);
        for name in test_parts(&source.text).files {
            test_files.push(format!("{dir}/{name}.rs"));
            test_files.push(format!("{dir}/{name}/"));
        }
    }
    let test_only = |path: &str| {
        test_files
            .iter()
            .any(|t| path == t || (t.ends_with('/') && path.starts_with(t.as_str())))
    };

    let mut findings = Vec::new();
    let mut allowed_used = vec![false; IO_ALLOWED.len()];
    for source in sources.iter().filter(|s| checked(s)) {
        if test_only(&source.path) {
            continue;
        }
        let allowed = IO_ALLOWED.iter().position(|(path, _)| *path == source.path);
        let blocks = test_parts(&source.text).blocks;
        for (i, line) in source.text.lines().enumerate() {
            if is_comment(line) || blocks.iter().any(|&(a, b)| (a..=b).contains(&i)) {
                continue;
            }
            let named: Vec<&str> = IO_TOKENS
                .iter()
                .copied()
                .filter(|token| contains_token(line, token))
                .collect();
            if named.is_empty() {
                continue;
            }
            match allowed {
                Some(k) => allowed_used[k] = true,
                None => findings.push(format!(
                    "{}:{}: `{}`: {}",
                    source.path,
                    i + 1,
                    named.join("`, `"),
                    line.trim()
                )),
            }
        }
    }
    for ((path, _), used) in IO_ALLOWED.iter().zip(allowed_used) {
        if !used {
            findings.push(format!(
                "{path}: on the allow-list but names no token (remove it from IO_ALLOWED)"
            ));
        }
    }
    report(
        &format!(
            "only {IO_CRATES:?} may use sockets, threads, processes or clocks; \
             other crates take a clock or a spawner from their caller, or put the \
             code in `node` (tests, benches and examples are exempt)"
        ),
        &findings,
    );
}

/// True if `token` occurs in `line` not preceded by an identifier character,
/// so `Instant::now` matches `std::time::Instant::now` but not `MyInstant::now`.
fn contains_token(line: &str, token: &str) -> bool {
    line.match_indices(token).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

/// Rule: no ignored test and no debug-print macro, in any file. Comment lines
/// are not code and are skipped.
#[test]
fn no_ignored_tests_or_debug_prints() {
    let mut findings = Vec::new();
    for source in sources() {
        for (i, line) in source.text.lines().enumerate() {
            if is_comment(line) {
                continue;
            }
            for token in DEBRIS_TOKENS {
                if line.contains(token) {
                    findings.push(format!("{}:{}: `{token}`: {}", source.path, i + 1, line.trim()));
                }
            }
        }
    }
    report(
        "no test is ignored (fix it or delete it) and no debug-print macro is committed",
        &findings,
    );
}

/// Rule: each crate has at most one integration-test binary, `tests/it/main.rs`
/// with the tests as its modules, so the crate is linked once, not once per file.
#[test]
fn one_integration_test_binary_per_crate() {
    let root = root();
    let crates = crate_dirs(&root);
    assert!(!crates.is_empty(), "no crates under {}", root.display());
    let mut findings = Vec::new();
    for krate in crates {
        // Cargo makes a test binary of each `tests/*.rs` and `tests/*/main.rs`.
        let binaries: Vec<String> = entries(&krate.join("tests"))
            .into_iter()
            .filter(|path| {
                if path.is_dir() {
                    path.join("main.rs").is_file()
                } else {
                    path.extension().is_some_and(|ext| ext == "rs")
                }
            })
            .map(|path| rel(&root, &path))
            .collect();
        if binaries.len() > 1 {
            findings.push(binaries.join(", "));
        }
    }
    report(
        "a crate has at most one integration-test binary: put the tests in modules of `tests/it/main.rs`",
        &findings,
    );
}

/// The scanner that rule (b) relies on skips exactly the test modules.
#[test]
fn test_parts_finds_inline_and_file_test_modules() {
    let text = "\
//! A file.
fn live() {}

#[cfg(test)]
mod testutil;

#[cfg(test)]
mod tests {
    fn inner() {
    }
}

fn after() {
    #[cfg(test)]
    let x = 1;
}

#[cfg(test)]
#[allow(dead_code)]
pub(crate) mod more {
}
";
    let parts = test_parts(text);
    assert_eq!(
        parts,
        TestParts {
            blocks: vec![(6, 10), (17, 20)],
            files: vec!["testutil".to_owned()],
        }
    );
    assert_eq!(module_dir("crates/model/src/lib.rs"), "crates/model/src");
    assert_eq!(module_dir("crates/ps/src/shard.rs"), "crates/ps/src/shard");
    assert!(contains_token("let t = std::time::Instant::now();", "Instant::now"));
    assert!(!contains_token("let t = MyInstant::now();", "Instant::now"));
}
