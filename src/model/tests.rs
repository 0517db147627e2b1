use super::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny/bundle");

fn copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(FIXTURE).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    dir
}

fn edit_manifest(dir: &Path, f: impl Fn(String) -> String) {
    let p = dir.join("manifest.toml");
    let t = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, f(t)).unwrap();
}

/// Rewrites `file` and updates its checksum in the manifest, so only the content is wrong.
fn replace_file(dir: &Path, file: &str, bytes: &[u8]) {
    let old = sha256_file(&dir.join(file)).unwrap();
    std::fs::write(dir.join(file), bytes).unwrap();
    let new = sha256_file(&dir.join(file)).unwrap();
    edit_manifest(dir, |t| t.replace(&old, &new));
}

fn safetensors_file(name: &str, shape: &[usize], values: &[f32]) -> Vec<u8> {
    let header = format!(
        r#"{{"{name}":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,{}]}}}}"#,
        values.len() * 4
    );
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(values.iter().flat_map(|f| f.to_le_bytes()));
    v
}

fn err(dir: &Path) -> String {
    ModelBundle::load(dir).unwrap_err().to_string()
}

#[test]
fn the_tiny_fixture_loads_with_its_graph_and_identity() {
    let b = ModelBundle::load(Path::new(FIXTURE)).unwrap();
    assert_eq!(b.graph.states().len(), 251);
    assert_eq!(b.text_embeddings.len(), 10 * 64);
    assert!(!b.trained());
    assert_eq!(b.manifest_sha256.len(), 64);
    assert_eq!(
        b.manifest_sha256,
        sha256_file(&Path::new(FIXTURE).join("manifest.toml")).unwrap()
    );
    assert_eq!(b.architecture().name, "tiny");
    assert!(matches!(
        b.manifest.model.source,
        ModelSource::Synth { seed: 11, .. }
    ));
}

#[test]
fn a_changed_file_fails_its_checksum() {
    let d = copy();
    let p = d.path().join("text_embeddings.safetensors");
    let mut bytes = std::fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&p, bytes).unwrap();
    let e = err(d.path());
    assert!(
        e.starts_with("text_embeddings.safetensors: checksum mismatch"),
        "{e}"
    );
}

#[test]
fn a_missing_file_or_manifest_is_named() {
    let d = copy();
    std::fs::remove_file(d.path().join("image_encoder.onnx")).unwrap();
    let e = err(d.path());
    assert!(e.starts_with("image_encoder.onnx: cannot read"), "{e}");
    assert!(e.contains("files.image_encoder_onnx"), "{e}");
    let empty = tempfile::tempdir().unwrap();
    assert!(err(empty.path()).contains("not a model bundle"));
}

#[test]
fn text_embeddings_of_the_wrong_shape_or_with_nan_are_refused() {
    let d = copy();
    replace_file(
        d.path(),
        "text_embeddings.safetensors",
        &safetensors_file("text_embeddings", &[9, 64], &[0.5; 9 * 64]),
    );
    let e = err(d.path());
    assert!(
        e.contains(
            "text_embeddings.safetensors: text_embeddings: shape [9, 64], expected [10, 64]"
        ),
        "{e}"
    );
    let mut v = vec![0.5f32; 10 * 64];
    v[3 * 64 + 5] = f32::NAN;
    replace_file(
        d.path(),
        "text_embeddings.safetensors",
        &safetensors_file("text_embeddings", &[10, 64], &v),
    );
    let e = err(d.path());
    assert!(e.contains("non-finite value at row 3, column 5"), "{e}");
    replace_file(
        d.path(),
        "text_embeddings.safetensors",
        &safetensors_file("other_name", &[10, 64], &[0.5; 640]),
    );
    assert!(err(d.path()).contains("no tensor named \"text_embeddings\""));
}

#[test]
fn manifest_mistakes_name_the_field() {
    let cases: [(&str, &str, &str); 6] = [
        (
            "schema_version = 1",
            "schema_version = 9",
            "manifest.toml: schema_version: 9 is not supported",
        ),
        (
            "level = \"local\"",
            "level = \"regional\"",
            "manifest.toml: line",
        ),
        (
            "[\"identity\", \"nose\"]",
            "[\"identity\", \"noze\"]",
            "graph.edges[9][1]: no label named \"noze\"",
        ),
        (
            "[\"fake\", \"identity\"]",
            "[\"eye\", \"identity\"]",
            "graph.edges[1]: ",
        ),
        (
            "patch_size = 32",
            "patch_size = 30",
            "architecture.patch_size: 30 does not divide image_size 224",
        ),
        ("name = \"mouth\"", "name = \"chin\"", "labels[7].prompt"),
    ];
    for (from, to, want) in cases {
        let d = copy();
        edit_manifest(d.path(), |t| {
            assert!(t.contains(from), "fixture lacks {from}");
            t.replacen(from, to, 1)
        });
        let e = err(d.path());
        assert!(e.contains(want), "{from} -> {to}: {e}");
    }
}

#[test]
fn paths_leaving_the_bundle_are_refused() {
    let d = copy();
    edit_manifest(d.path(), |t| {
        t.replace(
            "path = \"image_encoder.onnx\"",
            "path = \"../image_encoder.onnx\"",
        )
    });
    assert!(err(d.path()).contains("files.image_encoder_onnx.path"));
}

#[test]
fn files_in_sub_directories_are_refused() {
    let d = copy();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::copy(
        d.path().join("image_encoder.onnx"),
        d.path().join("sub/image_encoder.onnx"),
    )
    .unwrap();
    edit_manifest(d.path(), |t| {
        t.replace(
            "path = \"image_encoder.onnx\"",
            "path = \"sub/image_encoder.onnx\"",
        )
    });
    let e = err(d.path());
    assert!(
        e.contains("files.image_encoder_onnx.path") && e.contains("file name inside the bundle"),
        "{e}"
    );
}

#[test]
fn symbolic_links_are_never_followed_out_of_the_bundle() {
    // A file of the bundle swapped for a link to a file outside it, with the same content
    // (so its checksum would pass): refused without being read.
    let outside = tempfile::tempdir().unwrap();
    let d = copy();
    let target = outside.path().join("text.safetensors");
    std::fs::rename(d.path().join("text_embeddings.safetensors"), &target).unwrap();
    std::os::unix::fs::symlink(&target, d.path().join("text_embeddings.safetensors")).unwrap();
    let e = err(d.path());
    assert!(
        e.contains("text_embeddings.safetensors") && e.contains("symbolic link"),
        "{e}"
    );
    // The manifest itself as a link (to a secret file, say): refused too.
    let d = copy();
    std::fs::rename(
        d.path().join("manifest.toml"),
        outside.path().join("m.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("m.toml"),
        d.path().join("manifest.toml"),
    )
    .unwrap();
    assert!(err(d.path()).contains("symbolic link"));
}

#[test]
fn a_fifo_or_a_device_is_refused_without_blocking() {
    let d = copy();
    let fifo = d.path().join("image_encoder.onnx");
    std::fs::remove_file(&fifo).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // With no writer, a plain open would block forever: the loader must return at once.
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = d.path().to_path_buf();
    std::thread::spawn(move || tx.send(err(&dir)).unwrap());
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the loader returned instead of blocking on the FIFO");
    assert!(e.contains("not a regular file"), "{e}");
    let e = read_bundle_file(Path::new("/dev/zero"), 1 << 20).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn files_over_their_cap_are_refused_before_they_are_read() {
    let d = copy();
    let p = d.path().join("manifest.toml");
    let e = read_bundle_file(&p, 16).unwrap_err().to_string();
    assert!(e.contains("more than the 16 bytes allowed"), "{e}");
    // A sparse manifest past the 1 MiB cap: refused by its size, not read into memory.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(MAX_MANIFEST_BYTES + 1).unwrap();
    let e = err(d.path());
    assert!(e.contains("manifest.toml") && e.contains("allowed"), "{e}");
}

#[test]
fn a_crafted_safetensors_header_is_an_error_not_a_panic() {
    // data_offsets near usize::MAX used to wrap `base + b` and panic on the slice.
    let d = copy();
    let header = format!(
        r#"{{"text_embeddings":{{"dtype":"F32","shape":[10,64],"data_offsets":[{},{}]}}}}"#,
        usize::MAX - 7,
        usize::MAX
    );
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(&[0u8; 64]);
    replace_file(d.path(), "text_embeddings.safetensors", &v);
    let e = err(d.path());
    assert!(e.contains("outside the data"), "{e}");
}
