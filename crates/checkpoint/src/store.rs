//! Checkpoint directories: atomic writes, verified reads, listing, falling
//! back past damaged checkpoints, and pruning.
//!
//! A checkpoint is `DIR/step-{step:012}/` holding `manifest.json` and one
//! `{group}.safetensors` per group. A write builds everything in
//! `DIR/.tmp-step-{step:012}-{pid}/`, fsyncs each file and the directory,
//! renames it into place and fsyncs `DIR`, so a crash leaves either the old
//! set of checkpoints or the old set plus the new, complete one. Names
//! starting with `.tmp-` are never read and are removed by the next write.
//!
//! **Invariant:** one process writes to a checkpoint directory at a time
//! (the next write removes every `.tmp-` entry, whoever left it).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::CheckpointError;
use crate::manifest::{FileEntry, MANIFEST_BYTES_MAX, MANIFEST_NAME, Manifest, TENSOR_FILE_EXT, check_group_name};
use crate::tensors::{NamedTensor, decode, encode};

/// Prefix of directories being written or removed.
const TEMP_PREFIX: &str = ".tmp-";
const DIR_PREFIX: &str = "step-";

/// A checkpoint in memory: its manifest and, per group (`params`, `optim`,
/// ...), the tensors of `{group}.safetensors`, sorted by name when read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub manifest: Manifest,
    pub files: BTreeMap<String, Vec<NamedTensor>>,
}

impl Snapshot {
    pub fn new(manifest: Manifest) -> Self {
        Self {
            manifest,
            files: BTreeMap::new(),
        }
    }

    pub fn group(&self, group: &str) -> Option<&[NamedTensor]> {
        self.files.get(group).map(Vec::as_slice)
    }

    pub fn tensor(&self, group: &str, name: &str) -> Option<&NamedTensor> {
        self.group(group)?.iter().find(|t| t.name == name)
    }
}

/// A checkpoint directory found by [`list`] (not yet verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub step: u64,
    pub path: PathBuf,
}

/// A checkpoint [`load_latest`] passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    pub path: PathBuf,
    pub error: CheckpointError,
}

/// The directory name of the checkpoint of `step`.
pub fn dir_name(step: u64) -> String {
    format!("{DIR_PREFIX}{step:012}")
}

fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(DIR_PREFIX)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let step = digits.parse().ok()?;
    (dir_name(step) == name).then_some(step)
}

/// The points at which a write can stop; tests stop there to play a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    TempCreated,
    FileWritten,
    ManifestWritten,
    TempSynced,
    OldMovedAside,
    Renamed,
}

/// Writes `snap` as `dir/step-{step:012}` and returns that path. `files` and
/// the group names decide the files; the manifest's `files` is filled in
/// here. An existing checkpoint of the same step is replaced (it is moved
/// aside first, so for a moment neither it nor the new one is in place: a
/// trainer writes the same step again only after resuming from an older
/// checkpoint because that one was unreadable).
pub fn write(dir: &Path, snap: &Snapshot) -> Result<PathBuf, CheckpointError> {
    write_with(dir, snap, &mut |_| Ok(()))
}

pub(crate) fn write_with(
    dir: &Path,
    snap: &Snapshot,
    hook: &mut dyn FnMut(Phase) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    for group in snap.files.keys() {
        check_group_name(group).map_err(|why| CheckpointError::InvalidGroup {
            group: group.clone(),
            why,
        })?;
    }
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(CheckpointError::io(dir, "creating the checkpoint directory"))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    remove_temps(dir)?;
    let step = snap.manifest.step;
    let tmp = dir.join(format!("{TEMP_PREFIX}{}-{}", dir_name(step), std::process::id()));
    fs::create_dir(&tmp).map_err(CheckpointError::io(&tmp, "creating"))?;
    hook(Phase::TempCreated)?;

    let mut manifest = snap.manifest.clone();
    manifest.files.clear();
    for (group, tensors) in &snap.files {
        let bytes = encode(group, tensors)?;
        let name = format!("{group}{TENSOR_FILE_EXT}");
        write_synced(&tmp.join(&name), &bytes)?;
        manifest.files.push(FileEntry {
            name,
            bytes: bytes.len() as u64,
            crc32c: crc32c::crc32c(&bytes),
        });
        hook(Phase::FileWritten)?;
    }
    let manifest_path = tmp.join(MANIFEST_NAME);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|source| CheckpointError::ManifestJson {
        path: manifest_path.clone(),
        source,
    })?;
    write_synced(&manifest_path, &json)?;
    hook(Phase::ManifestWritten)?;
    sync_dir(&tmp)?;
    hook(Phase::TempSynced)?;

    let target = dir.join(dir_name(step));
    let mut aside = None;
    if target.exists() {
        let old = dir.join(format!("{TEMP_PREFIX}old-{}-{}", dir_name(step), std::process::id()));
        fs::rename(&target, &old).map_err(CheckpointError::io(&target, "moving aside"))?;
        sync_dir(dir)?;
        aside = Some(old);
        hook(Phase::OldMovedAside)?;
    }
    fs::rename(&tmp, &target).map_err(CheckpointError::io(&tmp, "renaming into place"))?;
    sync_dir(dir)?;
    hook(Phase::Renamed)?;
    if let Some(old) = aside {
        fs::remove_dir_all(&old).map_err(CheckpointError::io(&old, "removing"))?;
    }
    Ok(target)
}

/// Reads a checkpoint directory, verifying every file's length and crc32c
/// before it is parsed.
pub fn read(path: &Path) -> Result<Snapshot, CheckpointError> {
    load(path, true)
}

/// Checks a checkpoint as [`read`] does (lengths, checksums, safetensors
/// headers, dtypes) without converting the tensors.
pub fn verify(path: &Path) -> Result<Manifest, CheckpointError> {
    Ok(load(path, false)?.manifest)
}

fn load(path: &Path, values: bool) -> Result<Snapshot, CheckpointError> {
    let manifest_path = path.join(MANIFEST_NAME);
    let bytes = read_file(&manifest_path, None)?;
    let manifest = Manifest::parse(&manifest_path, &bytes)?;
    if let Some(step) = path.file_name().and_then(|n| n.to_str()).and_then(parse_dir_name)
        && step != manifest.step
    {
        return Err(CheckpointError::ManifestInvalid {
            path: manifest_path,
            why: format!("step {} in a directory named for step {step}", manifest.step),
        });
    }
    let mut files = BTreeMap::new();
    for f in &manifest.files {
        let file = path.join(&f.name);
        let bytes = read_file(&file, Some(f.bytes))?;
        let crc = crc32c::crc32c(&bytes);
        if crc != f.crc32c {
            return Err(CheckpointError::Checksum {
                path: file,
                expected: f.crc32c,
                got: crc,
            });
        }
        let group = f.name.strip_suffix(TENSOR_FILE_EXT).unwrap_or(&f.name);
        files.insert(group.to_string(), decode(&file, &bytes, values)?);
    }
    Ok(Snapshot { manifest, files })
}

/// Reads a whole file whose length must be `expected` (or at most
/// [`MANIFEST_BYTES_MAX`] for the manifest), checking before reading.
fn read_file(path: &Path, expected: Option<u64>) -> Result<Vec<u8>, CheckpointError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => CheckpointError::MissingFile {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            op: "opening",
            source,
        },
    })?;
    let len = file
        .metadata()
        .map_err(CheckpointError::io(path, "reading the length of"))?
        .len();
    let limit = match expected {
        Some(expected) if len != expected => {
            return Err(CheckpointError::FileLength {
                path: path.to_path_buf(),
                expected,
                got: len,
            });
        }
        Some(expected) => expected,
        None if len > MANIFEST_BYTES_MAX => {
            return Err(CheckpointError::ManifestInvalid {
                path: path.to_path_buf(),
                why: format!("{len} bytes; at most {MANIFEST_BYTES_MAX}"),
            });
        }
        None => MANIFEST_BYTES_MAX,
    };
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    // One byte past the limit, to notice a file that grew since its length was taken.
    (&file)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(CheckpointError::io(path, "reading"))?;
    let got = bytes.len() as u64;
    if got != len {
        return Err(CheckpointError::FileLength {
            path: path.to_path_buf(),
            expected: len,
            got,
        });
    }
    Ok(bytes)
}

/// The checkpoints in `dir`, oldest first; none when `dir` does not exist.
pub fn list(dir: &Path) -> Result<Vec<Entry>, CheckpointError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => {
            return Err(CheckpointError::Io {
                path: dir.to_path_buf(),
                op: "listing",
                source: e,
            });
        }
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(CheckpointError::io(dir, "listing"))?;
        let path = e.path();
        if let Some(step) = e.file_name().to_str().and_then(parse_dir_name)
            && path.is_dir()
        {
            out.push(Entry { step, path });
        }
    }
    out.sort_by_key(|e| e.step);
    Ok(out)
}

/// Reads the newest checkpoint in `dir` that reads cleanly, and reports the
/// newer ones it had to skip.
pub fn load_latest(dir: &Path) -> Result<(Snapshot, Vec<Skipped>), CheckpointError> {
    let mut skipped = Vec::new();
    for e in list(dir)?.into_iter().rev() {
        match read(&e.path) {
            Ok(snap) => return Ok((snap, skipped)),
            Err(error) => skipped.push(Skipped { path: e.path, error }),
        }
    }
    Err(CheckpointError::NoCheckpoint {
        dir: dir.to_path_buf(),
        skipped,
    })
}

/// Removes all but the newest `keep_last` checkpoints, never removing the
/// newest one that verifies (so damaged newer ones cannot push the last good
/// one out). Returns the removed paths.
pub fn prune(dir: &Path, keep_last: usize) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut entries = list(dir)?;
    entries.reverse();
    let newest_good = entries.iter().position(|e| verify(&e.path).is_ok());
    let mut removed = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if i < keep_last || Some(i) == newest_good {
            continue;
        }
        // Renamed first, so that a crash half-way through the removal leaves a temp dir, not a damaged checkpoint.
        let doomed = dir.join(format!("{TEMP_PREFIX}del-{}-{}", dir_name(e.step), std::process::id()));
        fs::rename(&e.path, &doomed).map_err(CheckpointError::io(&e.path, "moving aside to remove"))?;
        sync_dir(dir)?;
        fs::remove_dir_all(&doomed).map_err(CheckpointError::io(&doomed, "removing"))?;
        removed.push(e.path.clone());
    }
    Ok(removed)
}

/// Removes what interrupted writes and removals left behind.
fn remove_temps(dir: &Path) -> Result<(), CheckpointError> {
    for e in fs::read_dir(dir).map_err(CheckpointError::io(dir, "listing"))? {
        let e = e.map_err(CheckpointError::io(dir, "listing"))?;
        if !e.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = e.path();
        let is_dir = e
            .file_type()
            .map_err(CheckpointError::io(&path, "inspecting"))?
            .is_dir();
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(CheckpointError::io(&path, "removing a stale temporary"))?;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(CheckpointError::io(path, "creating"))?;
    f.write_all(bytes).map_err(CheckpointError::io(path, "writing"))?;
    f.sync_all().map_err(CheckpointError::io(path, "syncing"))
}

fn sync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(CheckpointError::io(path, "syncing the directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(step: u64) -> Snapshot {
        let mut s = Snapshot::new(Manifest::new(step, 0, serde_json::Value::Null, serde_json::Value::Null));
        s.files
            .insert("params".into(), vec![NamedTensor::vector("w", &[step as f32, 1.0])]);
        s.files
            .insert("optim".into(), vec![NamedTensor::vector("w.momentum", &[0.5])]);
        s
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .expect("listable")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_crash_at_any_phase_leaves_the_old_set_or_the_new_checkpoint() {
        let phases = [
            (Phase::TempCreated, 0),
            (Phase::FileWritten, 0),
            (Phase::FileWritten, 1),
            (Phase::ManifestWritten, 0),
            (Phase::TempSynced, 0),
            (Phase::Renamed, 0),
        ];
        for (crash_at, skip) in phases {
            let tmp = tempfile::tempdir().expect("tempdir");
            let dir = tmp.path().join("ck");
            write(&dir, &snapshot(1)).expect("first write");
            let mut seen = 0;
            let result = write_with(&dir, &snapshot(2), &mut |p| {
                if p == crash_at {
                    seen += 1;
                    if seen > skip {
                        return Err(CheckpointError::InvalidGroup {
                            group: "crash".into(),
                            why: "simulated",
                        });
                    }
                }
                Ok(())
            });
            assert!(result.is_err(), "{crash_at:?}");
            let want = if crash_at == Phase::Renamed { 2 } else { 1 };
            let (snap, skipped) = load_latest(&dir).expect("a good checkpoint survives");
            assert_eq!((snap.manifest.step, skipped.len()), (want, 0), "{crash_at:?} #{skip}");
            assert_eq!(list(&dir).expect("lists").len(), want as usize, "{crash_at:?}");

            write(&dir, &snapshot(3)).expect("next write");
            assert!(
                names(&dir).iter().all(|n| !n.starts_with(TEMP_PREFIX)),
                "{:?}",
                names(&dir)
            );
            assert_eq!(load_latest(&dir).expect("readable").0.manifest.step, 3);
        }
    }

    #[test]
    fn rewriting_a_step_replaces_it_and_a_crash_in_between_keeps_older_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        write(dir, &snapshot(1)).expect("write");
        write(dir, &snapshot(2)).expect("write");
        let mut again = snapshot(2);
        again.files.insert("extra".into(), vec![]);
        let crash = write_with(dir, &again, &mut |p| {
            if p == Phase::OldMovedAside {
                return Err(CheckpointError::InvalidGroup {
                    group: "crash".into(),
                    why: "simulated",
                });
            }
            Ok(())
        });
        assert!(crash.is_err());
        assert_eq!(load_latest(dir).expect("step 1 survives").0.manifest.step, 1);
        let path = write(dir, &again).expect("rewrite");
        assert_eq!(path, dir.join("step-000000000002"));
        assert!(read(&path).expect("readable").group("extra").is_some());
        assert_eq!(names(dir), ["step-000000000001", "step-000000000002"]);
    }

    #[test]
    fn directory_names_are_canonical() {
        assert_eq!(dir_name(42), "step-000000000042");
        assert_eq!(parse_dir_name("step-000000000042"), Some(42));
        assert_eq!(parse_dir_name(&dir_name(u64::MAX)), Some(u64::MAX));
        for bad in [
            "step-42",
            "step-0000000000042",
            "step-00000000004x",
            "step-+00000000042",
            ".tmp-step-000000000042",
        ] {
            assert_eq!(parse_dir_name(bad), None, "{bad}");
        }
    }
}
