//! `manifest.json`: what a checkpoint holds (step, epoch, the trainer's data
//! position, the run config) and, for each tensor file, its length and crc32c.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::CheckpointError;

/// The version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a checkpoint directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Extension of the tensor files: group `params` is `params.safetensors`.
pub const TENSOR_FILE_EXT: &str = ".safetensors";
/// A manifest larger than this is refused before it is read.
pub const MANIFEST_BYTES_MAX: u64 = 16 << 20;
/// Tensor files per checkpoint.
pub const FILES_MAX: usize = 1024;
/// Length of a group name.
const GROUP_NAME_BYTES_MAX: usize = 128;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    /// Optimizer steps taken when the checkpoint was made.
    pub step: u64,
    pub epoch: u64,
    /// Where the trainer stands in its data (epoch, batch index, RNG states);
    /// opaque to this crate.
    pub data_position: serde_json::Value,
    /// The run's effective config; opaque to this crate.
    pub run_config: serde_json::Value,
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Filled in by [`crate::write`]; what is given there is ignored.
    pub files: Vec<FileEntry>,
}

/// One tensor file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name inside the checkpoint directory, e.g. `params.safetensors`.
    pub name: String,
    pub bytes: u64,
    /// CRC-32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

impl Manifest {
    /// A manifest stamped with the current time and no files yet.
    pub fn new(step: u64, epoch: u64, data_position: serde_json::Value, run_config: serde_json::Value) -> Self {
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            format_version: FORMAT_VERSION,
            step,
            epoch,
            data_position,
            run_config,
            created_unix_ms,
            files: vec![],
        }
    }

    /// Parses and checks a manifest read from `path`: known version, at most
    /// [`FILES_MAX`] files, each a distinct `{group}.safetensors` name.
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|source| CheckpointError::ManifestJson {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |why: String| CheckpointError::ManifestInvalid {
            path: path.to_path_buf(),
            why,
        };
        if m.format_version == 0 || m.format_version > FORMAT_VERSION {
            return Err(invalid(format!(
                "format_version {} is not supported (this build reads 1..={FORMAT_VERSION})",
                m.format_version
            )));
        }
        if m.files.len() > FILES_MAX {
            return Err(invalid(format!("{} files listed; at most {FILES_MAX}", m.files.len())));
        }
        for (i, f) in m.files.iter().enumerate() {
            let Some(group) = f.name.strip_suffix(TENSOR_FILE_EXT) else {
                return Err(invalid(format!("file `{}` does not end in {TENSOR_FILE_EXT}", f.name)));
            };
            if let Err(why) = check_group_name(group) {
                return Err(invalid(format!("file `{}`: {why}", f.name)));
            }
            if m.files[..i].iter().any(|g| g.name == f.name) {
                return Err(invalid(format!("file `{}` is listed twice", f.name)));
            }
        }
        Ok(m)
    }
}

/// A group name becomes a file name, so it must be a plain, portable one:
/// ASCII letters, digits, `_`, `-` and `.`, not starting with `.`.
pub(crate) fn check_group_name(group: &str) -> Result<(), &'static str> {
    if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
        return Err("must be 1 to 128 bytes long");
    }
    if group.starts_with('.') {
        return Err("must not start with '.'");
    }
    if !group
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("may hold only ASCII letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(files: &str) -> String {
        format!(
            r#"{{"format_version": 1, "step": 3, "epoch": 1, "data_position": null, "run_config": {{}},
                "created_unix_ms": 0, "files": [{files}]}}"#
        )
    }

    #[test]
    fn parses_what_it_writes() {
        let mut m = Manifest::new(7, 2, serde_json::json!({"batch": 5}), serde_json::json!({"lr": 0.1}));
        m.files.push(FileEntry {
            name: "params.safetensors".into(),
            bytes: 10,
            crc32c: 0xdead_beef,
        });
        let bytes = serde_json::to_vec_pretty(&m).expect("serialises");
        assert_eq!(Manifest::parse(Path::new("m"), &bytes).expect("valid"), m);
        assert!(m.created_unix_ms > 1_600_000_000_000);
    }

    #[test]
    fn refuses_unsafe_or_duplicate_file_names_and_future_versions() {
        let cases = [
            (
                manifest_json(r#"{"name": "../x.safetensors", "bytes": 1, "crc32c": 0}"#),
                "../x.safetensors",
            ),
            (
                manifest_json(r#"{"name": "params.bin", "bytes": 1, "crc32c": 0}"#),
                "params.bin",
            ),
            (
                manifest_json(
                    r#"{"name": "a.safetensors", "bytes": 1, "crc32c": 0}, {"name": "a.safetensors", "bytes": 1, "crc32c": 0}"#,
                ),
                "listed twice",
            ),
            (
                manifest_json("").replace(r#""format_version": 1"#, r#""format_version": 2"#),
                "format_version 2",
            ),
            (
                manifest_json("").replace(r#""epoch": 1"#, r#""epoch": 1, "extra": 0"#),
                "unknown field `extra`",
            ),
        ];
        for (json, want) in cases {
            let e = Manifest::parse(Path::new("ck/manifest.json"), json.as_bytes()).expect_err(want);
            let s = e.to_string();
            assert!(s.contains(want) && s.contains("ck/manifest.json"), "{s} lacks {want}");
        }
    }

    #[test]
    fn group_names_are_plain_file_names() {
        for ok in ["params", "optim", "optim-shard-3", "ema.v2"] {
            assert_eq!(check_group_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "a\\b", "..", "ü", &"x".repeat(129)] {
            assert!(check_group_name(bad).is_err(), "{bad}");
        }
    }
}
