//! The house rules that a reviewer would otherwise check by eye, as tests over
//! the repository's Rust sources (`tests/tidy.rs`, run by `cargo test -p tidy`).
//!
//! The sources are every `.rs` file under `crates/*/src`, `crates/*/tests`,
//! `crates/*/examples`, `crates/*/benches` and `fuzz/fuzz_targets`. The rules:
//!
//! - every file starts with a `//!` line that says what it owns (after nothing
//!   but blank lines);
//! - only `node`, the crates that use it as a job does (`launch`, `bench`),
//!   the binaries `cli` and `edge`, and the file-format crates `data` and `checkpoint` use sockets,
//!   threads, processes or clocks: the other crates' non-test code
//!   (outside `#[cfg(test)]` modules, `tests/`, `benches/` and `examples/`)
//!   names none of `std::net`, `TcpStream`, `std::thread`, `std::process`,
//!   `Instant::now`, `SystemTime` and their kin, unless an allow-list in the
//!   test names the file and why;
//! - no test is skipped with an ignore attribute and no debug-print macro is
//!   left behind, anywhere;
//! - each crate has at most one integration-test binary (`tests/it/main.rs`).
//!
//! Every failure names each offending file and line. The crate has no code and
//! no dependencies.
