//! Integration tests of the checkpoint crate's public API: round trips,
//! refusal of damaged checkpoints, fallback, pruning, crash leftovers, a
//! never-panics property over arbitrary bytes, and interop with Python's
//! `safetensors` package.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint::{CheckpointError, Manifest, NamedTensor, Snapshot};
use proptest::prelude::*;
use serde_json::json;

fn snapshot(step: u64) -> Snapshot {
    let manifest = Manifest::new(
        step,
        step / 10,
        json!({"epoch": step / 10, "batch": step % 10, "rng": [1u64, u64::MAX, 3, 4]}),
        json!({"optim": {"kind": "sgd", "lr": 0.1}}),
    );
    let mut s = Snapshot::new(manifest);
    s.files.insert(
        "params".into(),
        vec![
            NamedTensor::new("layers.0.weight", &[2, 3], vec![0.5, -1.0, 2.0, 0.0, -0.0, step as f32]),
            NamedTensor::new("layers.0.bias", &[3], vec![0.1, 0.2, 0.3]),
            NamedTensor::new("scale", &[], vec![1e-30]),
        ],
    );
    s.files.insert(
        "optim".into(),
        vec![
            NamedTensor::vector("layers.0.weight.momentum", &[1.0; 6]),
            NamedTensor::vector("optim.step", &[0.0, 7.0]),
        ],
    );
    s
}

fn sorted(mut s: Snapshot) -> Snapshot {
    for tensors in s.files.values_mut() {
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
    }
    s
}

fn edit_manifest(ck: &Path, edit: impl FnOnce(&mut Manifest)) {
    let path = ck.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&fs::read(&path).expect("manifest")).expect("valid manifest");
    edit(&mut m);
    fs::write(&path, serde_json::to_vec(&m).expect("serialises")).expect("writable");
}

fn assert_names(e: &CheckpointError, file: &str, what: &str) {
    let s = e.to_string();
    assert!(
        s.contains(file) && s.contains(what),
        "`{s}` should name {file} and say {what}"
    );
}

#[test]
fn errors_box_into_the_binarys_error_type() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = checkpoint::read(&tmp.path().join("step-000000000001")).expect_err("absent");
    let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(e);
    assert!(
        boxed.to_string().contains("step-000000000001/manifest.json: missing"),
        "{boxed}"
    );
}

#[test]
fn round_trip_keeps_everything() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let snap = snapshot(1234);
    let path = checkpoint::write(tmp.path(), &snap).expect("writes");
    assert_eq!(path, tmp.path().join("step-000000001234"));
    let mut names: Vec<String> = fs::read_dir(&path)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into())
        .collect();
    names.sort();
    assert_eq!(names, ["manifest.json", "optim.safetensors", "params.safetensors"]);

    let back = checkpoint::read(&path).expect("reads");
    assert_eq!(back.manifest.files.len(), 2);
    for f in &back.manifest.files {
        assert_eq!(fs::metadata(path.join(&f.name)).expect("file").len(), f.bytes);
    }
    let mut want = sorted(snap);
    want.manifest.files = back.manifest.files.clone();
    assert_eq!(back, want);
    assert_eq!(checkpoint::verify(&path).expect("verifies"), back.manifest);
    assert_eq!(back.tensor("params", "scale").map(|t| t.data[0]), Some(1e-30));
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    type Damage = fn(&Path);
    let cases: [(&str, Damage, &str, &str); 7] = [
        (
            "truncated",
            |ck| {
                let p = ck.join("params.safetensors");
                let b = fs::read(&p).expect("file");
                fs::write(&p, &b[..b.len() - 3]).expect("writable");
            },
            "params.safetensors",
            "bytes, but the manifest says",
        ),
        (
            "one flipped bit",
            |ck| {
                let p = ck.join("optim.safetensors");
                let mut b = fs::read(&p).expect("file");
                let last = b.len() - 1;
                b[last] ^= 0x10;
                fs::write(&p, &b).expect("writable");
            },
            "optim.safetensors",
            "crc32c",
        ),
        (
            "missing file",
            |ck| fs::remove_file(ck.join("params.safetensors")).expect("removable"),
            "params.safetensors",
            "missing",
        ),
        (
            "manifest not JSON",
            |ck| fs::write(ck.join("manifest.json"), b"{\"format_version\": 1,").expect("writable"),
            "manifest.json",
            "invalid manifest",
        ),
        (
            "manifest wrong type",
            |ck| {
                let p = ck.join("manifest.json");
                let s = fs::read_to_string(&p)
                    .expect("manifest")
                    .replacen("\"step\": 5", "\"step\": \"five\"", 1);
                fs::write(&p, s).expect("writable");
            },
            "manifest.json",
            "invalid type",
        ),
        (
            "manifest missing",
            |ck| fs::remove_file(ck.join("manifest.json")).expect("removable"),
            "manifest.json",
            "missing",
        ),
        (
            "step disagrees with the directory",
            |ck| edit_manifest(ck, |m| m.step = 6),
            "manifest.json",
            "step 6 in a directory named for step 5",
        ),
    ];
    for (what, damage, file, message) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ck = checkpoint::write(tmp.path(), &snapshot(5)).expect("writes");
        damage(&ck);
        let e = checkpoint::read(&ck).expect_err(what);
        assert_names(&e, file, message);
        let e = checkpoint::verify(&ck).expect_err(what);
        assert_names(&e, file, message);
    }
}

#[test]
fn well_formed_files_of_another_dtype_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let ck = checkpoint::write(tmp.path(), &snapshot(5)).expect("writes");
    let data = [0u8; 6];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3], &data).expect("view");
    let bytes = safetensors::serialize([("layers.0.bias", view)], None).expect("serialises");
    fs::write(ck.join("params.safetensors"), &bytes).expect("writable");
    edit_manifest(&ck, |m| {
        let f = m
            .files
            .iter_mut()
            .find(|f| f.name == "params.safetensors")
            .expect("listed");
        f.bytes = bytes.len() as u64;
        f.crc32c = crc32c::crc32c(&bytes);
    });
    let e = checkpoint::read(&ck).expect_err("f16");
    assert_names(&e, "params.safetensors", "`layers.0.bias`: dtype F16");
}

#[test]
fn invalid_snapshots_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = snapshot(1);
    s.files.insert("../escape".into(), vec![]);
    let e = checkpoint::write(tmp.path(), &s).expect_err("bad group");
    assert!(e.to_string().contains("../escape"), "{e}");
    let mut s = snapshot(1);
    s.files.get_mut("params").expect("group")[0].shape = vec![4, 4];
    let e = checkpoint::write(tmp.path(), &s).expect_err("bad shape");
    assert!(
        e.to_string()
            .contains("`params`, tensor `layers.0.weight`: shape [4, 4]"),
        "{e}"
    );
    assert!(checkpoint::list(tmp.path()).expect("lists").is_empty());
}

#[test]
fn load_latest_falls_back_past_damaged_checkpoints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for step in [10, 20, 30] {
        checkpoint::write(dir, &snapshot(step)).expect("writes");
    }
    let flip = |p: PathBuf| {
        let mut b = fs::read(&p).expect("file");
        let mid = b.len() / 2;
        b[mid] ^= 1;
        fs::write(&p, b).expect("writable");
    };
    flip(dir.join("step-000000000030/params.safetensors"));
    fs::write(dir.join("step-000000000020/manifest.json"), b"garbage").expect("writable");
    let (snap, skipped) = checkpoint::load_latest(dir).expect("step 10 is good");
    assert_eq!(snap.manifest.step, 10);
    let paths: Vec<&Path> = skipped.iter().map(|s| s.path.as_path()).collect();
    assert_eq!(paths, [dir.join("step-000000000030"), dir.join("step-000000000020")]);
    assert!(
        matches!(skipped[0].error, CheckpointError::Checksum { .. }),
        "{}",
        skipped[0].error
    );
    assert!(
        matches!(skipped[1].error, CheckpointError::ManifestJson { .. }),
        "{}",
        skipped[1].error
    );

    flip(dir.join("step-000000000010/optim.safetensors"));
    match checkpoint::load_latest(dir) {
        Err(CheckpointError::NoCheckpoint { skipped, .. }) => assert_eq!(skipped.len(), 3),
        other => panic!("expected NoCheckpoint, got {other:?}"),
    }
    match checkpoint::load_latest(&dir.join("absent")) {
        Err(CheckpointError::NoCheckpoint { skipped, .. }) => assert!(skipped.is_empty()),
        other => panic!("expected NoCheckpoint, got {other:?}"),
    }
}

#[test]
fn leftover_temp_dirs_are_ignored_by_load_and_removed_by_the_next_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    checkpoint::write(dir, &snapshot(1)).expect("writes");
    // What a crash half-way through writing step 2 leaves.
    let stale = dir.join(".tmp-step-000000000002-999999");
    fs::create_dir(&stale).expect("mkdir");
    fs::write(stale.join("params.safetensors"), b"half").expect("writable");
    fs::write(dir.join("notes.txt"), b"not a checkpoint").expect("writable");
    fs::create_dir(dir.join("step-2")).expect("mkdir");

    let listed: Vec<u64> = checkpoint::list(dir).expect("lists").iter().map(|e| e.step).collect();
    assert_eq!(listed, [1]);
    let (snap, skipped) = checkpoint::load_latest(dir).expect("loads");
    assert_eq!((snap.manifest.step, skipped.len()), (1, 0));

    checkpoint::write(dir, &snapshot(3)).expect("writes");
    assert!(!stale.exists());
    assert!(
        dir.join("notes.txt").exists() && dir.join("step-2").exists(),
        "foreign entries are left alone"
    );
    assert_eq!(checkpoint::load_latest(dir).expect("loads").0.manifest.step, 3);
}

#[test]
fn prune_keeps_the_newest_and_the_newest_good_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    for step in 1..=5 {
        checkpoint::write(dir, &snapshot(step)).expect("writes");
    }
    let removed = checkpoint::prune(dir, 3).expect("prunes");
    assert_eq!(removed, [dir.join("step-000000000002"), dir.join("step-000000000001")]);
    fs::remove_file(dir.join("step-000000000005/manifest.json")).expect("removable");
    fs::remove_file(dir.join("step-000000000004/params.safetensors")).expect("removable");
    let removed = checkpoint::prune(dir, 1).expect("prunes");
    assert_eq!(removed, [dir.join("step-000000000004")]);
    let steps: Vec<u64> = checkpoint::list(dir).expect("lists").iter().map(|e| e.step).collect();
    assert_eq!(steps, [3, 5]);
    assert_eq!(checkpoint::load_latest(dir).expect("step 3 kept").0.manifest.step, 3);
    let names: Vec<String> = fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-")), "{names:?}");
}

/// A checkpoint directory whose manifest lists `params.safetensors` with the
/// right length and checksum for `bytes`, so that the safetensors parser sees them.
fn dir_with_file(root: &Path, bytes: &[u8]) -> PathBuf {
    let ck = root.join("step-000000000001");
    fs::create_dir_all(&ck).expect("mkdir");
    fs::write(ck.join("params.safetensors"), bytes).expect("writable");
    let mut m = Manifest::new(1, 0, json!(null), json!(null));
    m.files.push(checkpoint::FileEntry {
        name: "params.safetensors".into(),
        bytes: bytes.len() as u64,
        crc32c: crc32c::crc32c(bytes),
    });
    fs::write(ck.join("manifest.json"), serde_json::to_vec(&m).expect("serialises")).expect("writable");
    ck
}

/// A safetensors file whose header is built from arbitrary fields.
fn fuzzed_safetensors() -> impl Strategy<Value = Vec<u8>> {
    let dtype = prop::sample::select(vec!["F32", "F64", "F16", "I8", "BOOL", "F4", "X"]);
    let shape = prop::collection::vec(prop_oneof![0usize..5, Just(usize::MAX / 2), Just(1usize << 62)], 0..4);
    let offsets = (0usize..64, 0usize..64);
    let tensor = ("[a-z.]{1,6}", dtype, shape, offsets);
    (
        prop::collection::vec(tensor, 0..4),
        prop::collection::vec(any::<u8>(), 0..64),
        0usize..8,
        any::<bool>(),
    )
        .prop_map(|(tensors, data, pad, lie)| {
            let mut header = serde_json::Map::new();
            for (name, dtype, shape, (a, b)) in tensors {
                header.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [a, b]}));
            }
            let mut h = serde_json::to_vec(&header).expect("serialises");
            h.extend(std::iter::repeat_n(b' ', pad));
            let n = if lie { h.len() as u64 + 3 } else { h.len() as u64 };
            let mut bytes = n.to_le_bytes().to_vec();
            bytes.extend(h);
            bytes.extend(data);
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn read_never_panics_on_an_arbitrary_manifest(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ck = tmp.path().join("step-000000000001");
        fs::create_dir(&ck).expect("mkdir");
        fs::write(ck.join("manifest.json"), &bytes).expect("writable");
        prop_assert!(checkpoint::read(&ck).is_err());
    }

    #[test]
    fn read_never_panics_on_arbitrary_tensor_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ck = dir_with_file(tmp.path(), &bytes);
        // Random bytes are essentially never a valid safetensors file; all that matters is no panic.
        let read = checkpoint::read(&ck);
        prop_assert_eq!(read.is_ok(), checkpoint::verify(&ck).is_ok());
    }

    #[test]
    fn read_never_panics_on_fuzzed_safetensors_headers(bytes in fuzzed_safetensors()) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ck = dir_with_file(tmp.path(), &bytes);
        if let Ok(snap) = checkpoint::read(&ck) {
            for t in snap.group("params").expect("group") {
                prop_assert_eq!(t.shape.iter().product::<usize>(), t.data.len());
            }
        }
    }
}

const PIP_HINT: &str = "run `pip install safetensors numpy` (the project's test command installs them)";

/// Runs tests/check_safetensors.py; fails, never skips, when Python or its packages are missing.
fn python(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_safetensors.py");
    let out = match Command::new("python3").arg(&script).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run python3 ({e}): install Python 3 and {PIP_HINT}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() != Some(3),
        "python3 lacks the safetensors or numpy package: {PIP_HINT}\n{stderr}"
    );
    assert!(
        out.status.success(),
        "check_safetensors.py {args:?} failed ({}):\n{stderr}",
        out.status
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn python_safetensors_reads_our_params() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut snap = snapshot(7);
    snap.files.get_mut("params").expect("group").push(NamedTensor::new(
        "embedding.weight",
        &[3, 2],
        vec![
            f32::NAN,
            f32::INFINITY,
            -0.0,
            f32::MIN_POSITIVE / 2.0,
            1.0 / 3.0,
            -65504.5,
        ],
    ));
    let ck = checkpoint::write(tmp.path(), &snap).expect("writes");
    let expected: BTreeMap<&str, serde_json::Value> = snap.files["params"]
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                json!({"shape": t.shape, "bits": t.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()}),
            )
        })
        .collect();
    let params = ck.join("params.safetensors");
    let out = python(&[
        "check",
        params.to_str().expect("utf-8 path"),
        &serde_json::to_string(&expected).expect("json"),
    ]);
    assert!(out.contains("ok 4 tensors"), "{out}");
}

#[test]
fn we_read_what_python_safetensors_writes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("from-python.safetensors");
    let out = python(&["write", file.to_str().expect("utf-8 path")]);
    assert!(out.contains("ok written"), "{out}");
    let ck = dir_with_file(tmp.path(), &fs::read(&file).expect("written"));
    let snap = checkpoint::read(&ck).expect("reads");
    let w = snap.tensor("params", "layers.0.weight").expect("weight");
    assert_eq!(
        (w.shape.as_slice(), w.data.as_slice()),
        (&[2, 3][..], &[0.0, 0.25, 0.5, 0.75, 1.0, 1.25][..])
    );
    let b = snap.tensor("params", "layers.0.bias").expect("bias");
    assert_eq!(b.data, [-1.5, 0.0, 2.25]);
}
