//! The session snapshot: round trips, interoperability with the safetensors crate, expectations, corruption.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;

use common::{FailAfter, MODEL_FP, SessionData, TOKENIZER_FP, dir_entries};
use driftwood_snapshot::session::{LAYOUT, MAX_FILE_BYTES};
use driftwood_snapshot::{
    KvDtype, SessionReader, SessionSnapshot, SnapshotError, parse_session, read_session, write_atomic, write_session,
    write_session_to,
};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

#[test]
fn round_trips() {
    let dir = tempfile::tempdir().unwrap();
    // (num_layers, kv_heads, head_dim, n_tokens, guest_state bytes)
    let shapes = [(1, 1, 1, 0, 0), (2, 2, 4, 1, 3), (3, 4, 8, 17, 101), (48, 2, 4, 5, 0), (4, 8, 64, 300, 4096)];
    for (seed, &(layers, heads, dim, tokens, guest)) in shapes.iter().enumerate() {
        let data = SessionData::random(seed as u64, layers, heads, dim, tokens, guest);
        let path = dir.path().join(format!("s{seed}.dws"));
        let written = write_session(&path, &data.snapshot()).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(written, bytes.len() as u64);
        assert_eq!(bytes, data.bytes(), "write_session_to writes the same bytes");

        let inspected = read_session(&path, None).unwrap();
        data.assert_matches(&inspected);
        assert_eq!(inspected.file_len(), written);
        let meta = inspected.meta();
        assert_eq!(meta["format"], "driftwood-session");
        assert_eq!(meta["version"], "3");
        assert_eq!(meta["dtype"], "f32");
        assert_eq!(meta["layout"], LAYOUT);
        assert_eq!(meta["n_tokens"], tokens.to_string());
        assert_eq!(meta["num_layers"], layers.to_string());

        let checked = read_session(&path, Some(&data.expect(tokens.max(1)))).unwrap();
        data.assert_matches(&checked);
    }
    assert_eq!(dir_entries(dir.path()).len(), shapes.len());
}

#[test]
fn writes_are_deterministic_and_aligned() {
    let data = SessionData::random(7, 3, 2, 4, 5, 3);
    let a = data.bytes();
    assert_eq!(a, data.bytes());
    let n = u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header padded to 8 bytes");
    assert!(a[8..8 + n].ends_with(b" ") || a[8 + n - 1] == b'}');
    let file = parse_session(a, None).unwrap();
    // Data served in place (no copy) since it is aligned.
    assert_eq!(file.k(0).as_ptr() as usize % 4, 0);
}

#[test]
fn an_owned_copy_writes_the_same_file() {
    let data = SessionData::random(11, 3, 2, 4, 6, 5);
    let borrowed = data.snapshot();
    let owned = borrowed.to_owned_snapshot();
    assert_eq!(owned.view().data_bytes(), borrowed.data_bytes());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    write_session_to(&mut a, &borrowed).unwrap();
    write_session_to(&mut b, &owned.view()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn the_safetensors_crate_reads_it() {
    let data = SessionData::random(3, 3, 2, 4, 6, 9);
    let bytes = data.bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        ["guest_state", "layers.0.k", "layers.0.v", "layers.1.k", "layers.1.v", "layers.2.k", "layers.2.v", "tokens"]
    );
    let k1 = st.tensor("layers.1.k").unwrap();
    assert_eq!(k1.dtype(), Dtype::F32);
    assert_eq!(k1.shape(), [6, 2, 4]);
    let values: Vec<u32> = k1.data().chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(values, common::bits(&data.layers[1].0));
    let tokens = st.tensor("tokens").unwrap();
    assert_eq!((tokens.dtype(), tokens.shape()), (Dtype::U32, &[6][..]));
    let guest = st.tensor("guest_state").unwrap();
    assert_eq!((guest.dtype(), guest.shape(), guest.data()), (Dtype::U8, &[9][..], &data.guest_state[..]));

    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["model_fingerprint"], MODEL_FP);
    assert_eq!(meta["tokenizer_fingerprint"], TOKENIZER_FP);
    assert_eq!(meta["kv_heads"], "2");
    assert_eq!(meta["head_dim"], "4");
    assert_eq!(meta["checksum"], spec_checksum(&parts(&bytes)));
}

#[test]
fn reads_a_file_written_by_the_safetensors_crate() {
    // safetensors' own writer orders tensors differently (by dtype, then name) and its metadata key order is
    // arbitrary: the reader relies on neither.
    let data = SessionData::random(11, 12, 2, 2, 3, 5);
    let p = parts(&data.bytes());
    let views: Vec<(String, TensorView<'_>)> = p
        .tensors
        .iter()
        .map(|(name, t)| (name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap()))
        .collect();
    let meta: HashMap<String, String> = p.meta.clone().into_iter().collect();
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    assert_ne!(bytes, data.bytes());
    data.assert_matches(&parse_session(bytes, Some(&data.expect(3))).unwrap());
}

#[test]
fn misaligned_data_is_copied_to_aligned_memory() {
    let data = SessionData::random(5, 2, 3, 5, 7, 2);
    let bytes = data.bytes();
    // One more space in the header shifts all data by one byte: valid safetensors, misaligned f32.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut shifted = Vec::new();
    shifted.extend_from_slice(&(n as u64 + 1).to_le_bytes());
    shifted.extend_from_slice(&bytes[8..8 + n]);
    shifted.push(b' ');
    shifted.extend_from_slice(&bytes[8 + n..]);
    let file = parse_session(shifted, None).unwrap();
    data.assert_matches(&file);
    assert_eq!(file.k(1).as_ptr() as usize % 4, 0);
    assert_eq!(file.tokens().as_ptr() as usize % 4, 0);
}

#[test]
fn expectations_name_what_differs_with_both_values() {
    let data = SessionData::random(2, 2, 2, 4, 3, 0);
    let bytes = data.bytes();
    let check = |tweak: &dyn Fn(&mut driftwood_snapshot::SessionExpect), needle: &str| {
        let mut expect = data.expect(3);
        tweak(&mut expect);
        let err = parse_session(bytes.clone(), Some(&expect)).unwrap_err();
        assert!(err.to_string().contains(needle), "{err} should contain {needle:?}");
        err
    };
    let other = "ffee".repeat(16);
    let err = check(&|e| e.model_fingerprint = other.clone(), "");
    assert_eq!(err.to_string(), format!("snapshot is for model {MODEL_FP} but the loaded model is {other}"));
    let err = check(&|e| e.tokenizer_fingerprint = "tok-b".into(), "");
    assert_eq!(err.to_string(), format!("snapshot is for tokenizer {TOKENIZER_FP} but the loaded tokenizer is tok-b"));
    let err = check(&|e| e.num_layers = 3, "");
    assert_eq!(err.to_string(), "snapshot has num_layers = 2 but the loaded model has num_layers = 3");
    check(&|e| e.kv_heads = 8, "kv_heads = 2 but the loaded model has kv_heads = 8");
    check(&|e| e.head_dim = 64, "head_dim = 4 but the loaded model has head_dim = 64");
    let err = check(&|e| e.max_tokens = 2, "");
    assert_eq!(err.to_string(), "snapshot holds 3 tokens but the session holds at most 2");
    assert!(matches!(err, SnapshotError::TooManyTokens { n_tokens: 3, max_tokens: 2 }));
    // Inspect-only reads do not care.
    parse_session(bytes, None).unwrap();
}

#[test]
fn truncated_at_every_offset_is_an_error() {
    let data = SessionData::random(9, 2, 1, 2, 2, 3);
    let bytes = data.bytes();
    for len in 0..bytes.len() {
        let err = parse_session(bytes[..len].to_vec(), None).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    // And one byte too many.
    let mut longer = bytes.clone();
    longer.push(0);
    parse_session(longer, None).unwrap_err();
}

#[test]
fn every_single_bit_flip_is_an_error() {
    let data = SessionData::random(10, 2, 1, 2, 2, 3);
    let bytes = data.bytes();
    let mut kinds = BTreeMap::<String, usize>::new();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            match parse_session(b, None) {
                Ok(_) => panic!("flipping bit {bit} of byte {i} ({:?}) went unnoticed", bytes[i] as char),
                Err(e) => *kinds.entry(variant(&e)).or_default() += 1,
            }
        }
    }
    assert!(kinds.contains_key("Checksum") && kinds.contains_key("Invalid"), "{kinds:?}");
}

#[test]
fn hostile_files_are_refused_with_a_clear_message() {
    let data = SessionData::random(4, 2, 2, 2, 2, 3);
    let valid = parts(&data.bytes());
    assert!(parse_session(valid.build(true), None).is_ok(), "the crafting helper round-trips");

    type Edit = Box<dyn Fn(&mut Parts)>;
    let meta = |key: &'static str, value: &'static str| -> Edit {
        Box::new(move |p: &mut Parts| {
            p.meta.insert(key.into(), value.into());
        })
    };
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("format", meta("format", "llama-kv"), "invalid session snapshot: format: is Some(\"llama-kv\")"),
        ("version", meta("version", "1"), "version: unsupported version \"1\""),
        ("dtype", meta("dtype", "f16"), "dtype: is \"f16\", expected \"f32\" or \"bf16\""),
        (
            "dtype vs tensors",
            meta("dtype", "bf16"),
            "tensor layers.0.k: is F32 [2, 2, 2], but the metadata requires BF16",
        ),
        ("layout", meta("layout", "whatever"), "layout: is \"whatever\""),
        ("unknown key", meta("comment", "hi"), "__metadata__: unknown key \"comment\""),
        (
            "missing key",
            Box::new(|p| {
                p.meta.remove("n_tokens");
            }),
            "n_tokens: missing from __metadata__",
        ),
        ("leading zero", meta("num_layers", "02"), "num_layers: \"02\" is not a decimal integer"),
        ("zero heads", meta("kv_heads", "0"), "kv_heads: \"0\" is not a decimal integer ≥ 1"),
        ("negative", meta("head_dim", "-2"), "head_dim"),
        ("huge layer count", meta("num_layers", "18446744073709551615"), "missing tensor \"layers.2.k\""),
        ("one layer short", meta("num_layers", "3"), "missing tensor \"layers.2.k\""),
        ("one layer too many", meta("num_layers", "1"), "unexpected tensor \"layers.1.k\""),
        ("n_tokens vs shapes", meta("n_tokens", "3"), "tensor tokens: is U32 [2], but the metadata requires U32 [3]"),
        ("extra tensor", Box::new(|p| p.push("extra", Dtype::U8, vec![1], vec![0])), "unexpected tensor \"extra\""),
        (
            "non-canonical layer",
            Box::new(|p| p.rename("layers.1.v", "layers.01.v")),
            "unexpected tensor \"layers.01.v\"",
        ),
        ("wrong kind", Box::new(|p| p.rename("layers.1.v", "layers.1.q")), "unexpected tensor \"layers.1.q\""),
        ("missing tensor", Box::new(|p| p.remove("tokens")), "missing tensor \"tokens\""),
        (
            "f16 keys",
            Box::new(|p| {
                let t = p.get("layers.0.k");
                t.dtype = Dtype::F16;
                t.shape = vec![2, 2, 4];
            }),
            "tensor layers.0.k: is F16 [2, 2, 4]",
        ),
        (
            "transposed values",
            Box::new(|p| p.get("layers.1.v").shape = vec![2, 4, 1]),
            "tensor layers.1.v: is F32 [2, 4, 1]",
        ),
        ("signed tokens", Box::new(|p| p.get("tokens").dtype = Dtype::I32), "tensor tokens: is I32 [2]"),
        (
            "2-D guest state",
            Box::new(|p| p.get("guest_state").shape = vec![3, 1]),
            "guest_state: is U8 [3, 1], but must be one-dimensional U8",
        ),
    ];
    for (what, edit, needle) in cases {
        let mut p = parts(&data.bytes());
        edit(&mut p);
        let err = parse_session(p.build(true), None).expect_err(what).to_string();
        assert!(err.contains(needle), "{what}: {err:?} should contain {needle:?}");
    }

    // A checksum spelled in uppercase, a changed checksum, or changed data under the old checksum.
    let mut p = parts(&data.bytes());
    let upper = p.meta["checksum"].to_uppercase();
    p.meta.insert("checksum".into(), upper.clone());
    let err = parse_session(p.build(false), None).unwrap_err().to_string();
    assert_eq!(err, format!("invalid session snapshot: checksum: {upper:?} is not 64 lowercase hex digits"));
    let mut p = parts(&data.bytes());
    p.meta.insert("checksum".into(), "0".repeat(64));
    let err = parse_session(p.build(false), None).unwrap_err();
    assert!(matches!(&err, SnapshotError::Checksum { stored, .. } if stored == &"0".repeat(64)), "{err:?}");
    let mut p = parts(&data.bytes());
    p.get("layers.1.k").data[0] ^= 0x80;
    let err = parse_session(p.build(false), None).unwrap_err();
    assert!(
        err.to_string().starts_with("session snapshot: tensor layers.1.k: checksum mismatch: the file records "),
        "{err}"
    );
    assert!(matches!(&err, SnapshotError::TensorChecksum { tensor, .. } if tensor == "layers.1.k"), "{err:?}");

    // Broken safetensors framing.
    let bytes = data.bytes();
    let framing = |mut b: Vec<u8>, edit: &dyn Fn(&mut Vec<u8>)| {
        edit(&mut b);
        parse_session(b, None).unwrap_err().to_string()
    };
    for (what, edit) in [
        ("empty", &(|b: &mut Vec<u8>| b.clear()) as &dyn Fn(&mut Vec<u8>)),
        ("length u64::MAX", &|b: &mut Vec<u8>| b[..8].copy_from_slice(&u64::MAX.to_le_bytes())),
        ("length past the end", &|b: &mut Vec<u8>| {
            let len = b.len() as u64;
            b[..8].copy_from_slice(&len.to_le_bytes())
        }),
        ("length 0", &|b: &mut Vec<u8>| b[..8].copy_from_slice(&0u64.to_le_bytes())),
        ("not JSON", &|b: &mut Vec<u8>| b[8] = b'['),
        ("not UTF-8", &|b: &mut Vec<u8>| b[9] = 0xff),
        ("data too short", &|b: &mut Vec<u8>| {
            b.pop();
        }),
    ] {
        let err = framing(bytes.clone(), edit);
        assert!(err.starts_with("invalid session snapshot: safetensors header: "), "{what}: {err}");
    }

    // A safetensors file that is not a session snapshot.
    let plain = safetensors::serialize([("w", TensorView::new(Dtype::U8, vec![2], &[1, 2]).unwrap())], None).unwrap();
    let err = parse_session(plain, None).unwrap_err().to_string();
    assert_eq!(err, "invalid session snapshot: __metadata__: missing (not a Driftwood session snapshot)");

    // Shapes whose sizes overflow.
    let mut p = parts(&data.bytes());
    p.get("guest_state").shape = vec![1 << 40, 1 << 40];
    let err = parse_session(p.build(true), None).unwrap_err().to_string();
    assert!(err.contains("safetensors header"), "{err}");
}

#[test]
fn oversized_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.dws");
    let f = fs::File::create(&path).unwrap();
    f.set_len(MAX_FILE_BYTES + 1).unwrap(); // sparse: nothing is stored
    let err = read_session(&path, None).unwrap_err();
    assert!(
        matches!(err, SnapshotError::TooLarge { what: "file", size, limit: MAX_FILE_BYTES, .. } if size == MAX_FILE_BYTES + 1),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "session snapshot: file is 68719476737 bytes, over the limit of 68719476736 bytes");
    let err = read_session(&dir.path().join("absent.dws"), None).unwrap_err();
    assert!(err.to_string().starts_with("opening "), "{err}");
}

#[test]
fn a_failed_overwrite_keeps_the_previous_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.dws");
    let old = SessionData::random(20, 3, 2, 4, 10, 4);
    write_session(&path, &old.snapshot()).unwrap();
    let old_bytes = fs::read(&path).unwrap();

    let new = SessionData::random(21, 3, 2, 4, 50, 4);
    let new_len = new.bytes().len();
    for fail_at in [0, 1, 8, 200, new_len / 2, new_len - 1] {
        let err = write_atomic(&path, |w| {
            let mut failing = FailAfter { inner: w, left: fail_at };
            write_session_to(&mut failing, &new.snapshot()).map(|_| ()).map_err(std::io::Error::other)
        })
        .unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), old_bytes, "failure after {fail_at} bytes");
        assert_eq!(dir_entries(dir.path()), ["chat.dws"]);
    }
    old.assert_matches(&read_session(&path, Some(&old.expect(10))).unwrap());

    // Invalid input is refused before anything is written.
    let mut bad = new.snapshot();
    bad.layers.pop();
    let err = write_session(&path, &bad).unwrap_err();
    assert_eq!(err.to_string(), "session snapshot: layers: 2 layers given but num_layers is 3");
    let mut bad = new.snapshot();
    bad.layers[1].1 = &bad.layers[1].1[1..];
    let err = write_session(&path, &bad).unwrap_err();
    assert!(err.to_string().contains("layer 1 v has 1599 bytes, expected 1600"), "{err}");
    let bad = SessionSnapshot { head_dim: 0, ..new.snapshot() };
    assert!(write_session(&path, &bad).unwrap_err().to_string().contains("head_dim: must be at least 1"));
    assert_eq!(fs::read(&path).unwrap(), old_bytes);

    // A writer that fails is reported as such by write_session_to.
    let mut sink = Vec::new();
    let err = write_session_to(&mut FailAfter { inner: &mut sink, left: 10 }, &new.snapshot()).unwrap_err();
    assert!(matches!(err, SnapshotError::Write { .. }), "{err:?}");
    sink.flush().unwrap();
}

fn variant(e: &SnapshotError) -> String {
    format!("{e:?}").split([' ', '{', '(']).next().unwrap_or_default().to_string()
}

/// A tensor taken apart.
#[derive(Debug, Clone)]
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// A session file taken apart, to be edited and rebuilt by an independent writer.
#[derive(Debug, Clone)]
struct Parts {
    meta: BTreeMap<String, String>,
    tensors: Vec<(String, Tensor)>,
}

fn parts(bytes: &[u8]) -> Parts {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let tensors = meta
        .offset_keys()
        .into_iter()
        .map(|name| {
            let t = st.tensor(&name).unwrap();
            (name, Tensor { dtype: t.dtype(), shape: t.shape().to_vec(), data: t.data().to_vec() })
        })
        .collect();
    Parts { meta: meta.metadata().clone().unwrap().into_iter().collect(), tensors }
}

impl Parts {
    fn get(&mut self, name: &str) -> &mut Tensor {
        &mut self.tensors.iter_mut().find(|(n, _)| n == name).unwrap().1
    }
    fn push(&mut self, name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) {
        self.tensors.push((name.into(), Tensor { dtype, shape, data }));
    }
    fn rename(&mut self, from: &str, to: &str) {
        self.tensors.iter_mut().find(|(n, _)| n == from).unwrap().0 = to.into();
    }
    fn remove(&mut self, name: &str) {
        self.tensors.retain(|(n, _)| n != name);
    }

    /// Rebuilds the file (optionally with the digests (version 3) and the checksum recomputed per the
    /// specification).
    fn build(&self, fix_checksum: bool) -> Vec<u8> {
        let mut fixed = self.clone();
        if fix_checksum {
            if fixed.meta.get("version").map(String::as_str) == Some("3") {
                let digests = spec_digests(&fixed);
                fixed.meta.insert("digests".into(), digests);
            }
            let sum = spec_checksum(&fixed);
            fixed.meta.insert("checksum".into(), sum);
        }
        let meta = fixed.meta.clone();
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(&meta).unwrap());
        let mut offset = 0;
        for (name, t) in &self.tensors {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
            );
            offset += t.data.len();
        }
        let mut json = serde_json::to_vec(&header).unwrap();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        for (_, t) in &self.tensors {
            out.extend_from_slice(&t.data);
        }
        out
    }
}

/// The tensors in digest (and version-2 checksum) order, as far as they are present.
fn spec_order(p: &Parts) -> Vec<&[u8]> {
    let find = |name: &str| p.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.data.as_slice());
    let mut order = vec!["tokens".to_string(), "guest_state".to_string()];
    let layers: usize = p.meta.get("num_layers").and_then(|n| n.parse().ok()).unwrap_or(0).min(1000);
    for i in 0..layers {
        order.push(format!("layers.{i}.k"));
        order.push(format!("layers.{i}.v"));
    }
    order.iter().filter_map(|name| find(name)).collect()
}

/// The version-3 `digests` value as the module documentation specifies it.
fn spec_digests(p: &Parts) -> String {
    spec_order(p).iter().map(|d| common::blake3_hex(d)).collect::<Vec<_>>().join(",")
}

/// The checksum as the module documentation specifies it (version 2 or 3), implemented independently of the
/// crate.
fn spec_checksum(p: &Parts) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for (k, v) in p.meta.iter().filter(|(k, _)| *k != "checksum") {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    if p.meta.get("version").map(String::as_str) == Some("3") {
        return h.finalize().as_bytes().iter().map(|b| format!("{b:02x}")).collect();
    }
    for d in spec_order(p) {
        field(d);
    }
    h.finalize().as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A version-2 file of `data` (f32), built by an independent writer per the version-2 specification.
fn v2_bytes(data: &SessionData) -> Vec<u8> {
    let mut p = parts(&data.bytes());
    p.meta.remove("digests");
    p.meta.insert("version".into(), "2".into());
    p.build(true)
}

/// f32 to bf16, to nearest with ties to even, computed independently (by comparing distances in f64).
fn reference_bf16(x: f32) -> u16 {
    let lo = x.to_bits() & 0xffff_0000;
    if x.is_nan() || x.is_infinite() || lo == x.to_bits() {
        return (x.to_bits() >> 16) as u16 | if x.is_nan() { 0x40 } else { 0 };
    }
    let hi = lo + 0x1_0000;
    let (dl, dh) =
        ((f64::from(f32::from_bits(lo)) - f64::from(x)).abs(), (f64::from(f32::from_bits(hi)) - f64::from(x)).abs());
    let pick = if dl < dh || (dl == dh && (lo >> 16) & 1 == 0) { lo } else { hi };
    (pick >> 16) as u16
}

/// Per layer, k and v bytes.
type Kv = Vec<(Vec<u8>, Vec<u8>)>;

fn read_kv(path: &std::path::Path, dtype: KvDtype, fill: u8) -> (Result<(), SnapshotError>, Kv) {
    let reader = SessionReader::open(path, None).unwrap();
    let n = reader.layer_bytes(dtype);
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = (0..reader.num_layers()).map(|_| (vec![fill; n], vec![fill; n])).collect();
    let dst = out.iter_mut().map(|(k, v)| (k.as_mut_slice(), v.as_mut_slice())).collect();
    let result = reader.read_kv_into(dtype, dst);
    (result, out)
}

#[test]
fn version_3_records_the_kv_dtype_and_per_tensor_digests() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let mut data = SessionData::random(31, 3, 2, 4, 9, 5);
        if dtype == KvDtype::Bf16 {
            data = data.bf16();
        }
        let bytes = data.bytes();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let want = if dtype == KvDtype::F32 { Dtype::F32 } else { Dtype::BF16 };
        assert_eq!(st.tensor("layers.2.v").unwrap().dtype(), want);
        assert_eq!(st.tensor("layers.2.v").unwrap().data(), data.raw[2].1.as_slice());
        let p = parts(&bytes);
        assert_eq!(p.meta["dtype"], dtype.name());
        assert_eq!(p.meta["digests"], spec_digests(&p));
        assert_eq!(p.meta["digests"].split(',').nth(7).unwrap(), common::blake3_hex(&data.raw[2].1));
        assert_eq!(p.meta["checksum"], spec_checksum(&p));
        data.assert_matches(&parse_session(bytes.clone(), Some(&data.expect(9))).unwrap());

        let path = dir.path().join(format!("{dtype}.dws"));
        write_session(&path, &data.snapshot()).unwrap();
        let reader = SessionReader::open(&path, Some(&data.expect(9))).unwrap();
        assert_eq!((reader.version(), reader.kv_dtype(), reader.n_tokens()), (3, dtype, 9));
        assert_eq!(reader.tokens(), data.tokens.as_slice());
        assert_eq!(reader.guest_state(), data.guest_state.as_slice());
        assert_eq!(reader.kv_bytes(), (3 * 2 * 9 * 2 * 4 * dtype.size()) as u64);
        let (result, out) = read_kv(&path, dtype, 0xaa);
        result.unwrap();
        assert_eq!(out, data.raw, "read in the file's own dtype: the bytes as written");
        SessionReader::open(&path, None).unwrap().verify().unwrap();
    }
}

#[test]
fn read_kv_into_converts_between_f32_and_bf16() {
    let dir = tempfile::tempdir().unwrap();
    // f32 file (random bit patterns: NaNs, infinities, subnormals) into a bf16 destination.
    let data = SessionData::random(32, 2, 2, 8, 33, 0);
    let path = dir.path().join("f32.dws");
    write_session(&path, &data.snapshot()).unwrap();
    let (result, out) = read_kv(&path, KvDtype::Bf16, 0xaa);
    result.unwrap();
    for (l, (k, v)) in data.layers.iter().enumerate() {
        for (which, values, got) in [("k", k, &out[l].0), ("v", v, &out[l].1)] {
            for (i, x) in values.iter().enumerate() {
                let g = u16::from_le_bytes([got[2 * i], got[2 * i + 1]]);
                if x.is_nan() {
                    assert!(g & 0x7f80 == 0x7f80 && g & 0x7f != 0, "layer {l} {which}[{i}]: NaN became {g:#x}");
                } else {
                    assert_eq!(g, reference_bf16(*x), "layer {l} {which}[{i}] = {x:e}");
                }
            }
        }
    }
    // bf16 file into an f32 destination: exact.
    let data = SessionData::random(33, 2, 2, 8, 33, 0).bf16();
    let path = dir.path().join("bf16.dws");
    write_session(&path, &data.snapshot()).unwrap();
    let (result, out) = read_kv(&path, KvDtype::F32, 0xaa);
    result.unwrap();
    let want: Vec<(Vec<u8>, Vec<u8>)> =
        data.layers.iter().map(|(k, v)| (common::raw_of(k, KvDtype::F32), common::raw_of(v, KvDtype::F32))).collect();
    assert_eq!(out, want);
}

#[test]
fn a_corrupted_tensor_leaves_no_bytes_in_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    for (version, dtype) in [(3, KvDtype::F32), (3, KvDtype::Bf16), (2, KvDtype::F32)] {
        let data = SessionData::random(34, 3, 2, 4, 40, 3);
        let data = if dtype == KvDtype::Bf16 { data.bf16() } else { data };
        let mut bytes = if version == 2 { v2_bytes(&data) } else { data.bytes() };
        // One bit of the last layer's values.
        let at = bytes.len() - 40 * 4 - 3 - 7;
        bytes[at] ^= 0x04;
        let path = dir.path().join(format!("bad{version}{dtype}.dws"));
        fs::write(&path, &bytes).unwrap();
        for dst in [KvDtype::F32, KvDtype::Bf16] {
            let (result, out) = read_kv(&path, dst, 0xaa);
            let err = result.unwrap_err();
            if version == 3 {
                assert!(
                    matches!(&err, SnapshotError::TensorChecksum { tensor, .. } if tensor == "layers.2.v"),
                    "{err:?}"
                );
            } else {
                assert!(matches!(err, SnapshotError::Checksum { .. }), "{err:?}");
            }
            assert!(out.iter().all(|(k, v)| k.iter().chain(v).all(|&b| b == 0)), "v{version} {dtype}→{dst}: all zero");
        }
        assert!(SessionReader::open(&path, None).unwrap().verify().is_err());
        assert!(read_session(&path, None).is_err());
    }
}

#[test]
fn read_kv_into_refuses_wrong_destinations_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let data = SessionData::random(35, 2, 1, 4, 3, 0);
    let path = dir.path().join("s.dws");
    write_session(&path, &data.snapshot()).unwrap();
    let reader = SessionReader::open(&path, None).unwrap();
    let n = reader.layer_bytes(KvDtype::F32);
    let (mut k, mut v, mut short) = (vec![7u8; n], vec![7u8; n], vec![7u8; n - 1]);
    let err = reader.read_kv_into(KvDtype::F32, vec![(&mut k, &mut v), (&mut short, &mut [][..])]).unwrap_err();
    assert!(matches!(err, SnapshotError::BadInput { .. }), "{err:?}");
    assert!(err.to_string().contains("layer 1 k is 47 bytes, expected 48"), "{err}");
    assert!(k.iter().chain(&v).chain(&short).all(|&b| b == 7), "nothing written");
    let reader = SessionReader::open(&path, None).unwrap();
    let err = reader.read_kv_into(KvDtype::F32, vec![(&mut k, &mut v)]).unwrap_err();
    assert!(err.to_string().contains("1 layers given but the snapshot has 2"), "{err}");
}

#[test]
fn version_2_files_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let data = SessionData::random(36, 3, 2, 4, 11, 6);
    let bytes = v2_bytes(&data);
    let file = parse_session(bytes.clone(), Some(&data.expect(11))).unwrap();
    assert_eq!((file.version(), file.kv_dtype()), (2, KvDtype::F32));
    data.assert_matches(&file);
    let path = dir.path().join("v2.dws");
    fs::write(&path, &bytes).unwrap();
    data.assert_matches(&read_session(&path, Some(&data.expect(11))).unwrap());
    let reader = SessionReader::open(&path, Some(&data.expect(11))).unwrap();
    assert_eq!((reader.version(), reader.tokens()), (2, data.tokens.as_slice()));
    let (result, out) = read_kv(&path, KvDtype::F32, 0xaa);
    result.unwrap();
    assert_eq!(out, data.raw);
    SessionReader::open(&path, None).unwrap().verify().unwrap();
    // Version 2 knows no bf16.
    let mut p = parts(&bytes);
    p.meta.insert("dtype".into(), "bf16".into());
    let err = parse_session(p.build(true), None).unwrap_err().to_string();
    assert!(err.contains("dtype: is \"bf16\", expected \"f32\""), "{err}");
}

#[test]
fn readers_look_at_size_and_header_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let sparse = |name: &str, len: u64, head: &[u8]| {
        let path = dir.path().join(name);
        let mut f = fs::File::create(&path).unwrap();
        f.write_all(head).unwrap();
        f.set_len(len).unwrap(); // sparse: nothing is stored
        path
    };
    // 40 GiB of zeros: header length 0.
    let path = sparse("zeros.safetensors", 40 << 30, &[]);
    for err in [SessionReader::open(&path, None).unwrap_err(), read_session(&path, None).unwrap_err()] {
        assert!(err.to_string().contains("safetensors header: header length 0"), "{err}");
    }
    // A plausible header length, but the header then does not describe the file's 4 GiB.
    let data = SessionData::random(37, 1, 1, 1, 1, 0);
    let bytes = data.bytes();
    let path = sparse("long.safetensors", 4 << 30, &bytes);
    let err = SessionReader::open(&path, None).unwrap_err().to_string();
    assert!(err.contains("trailing bytes"), "{err}");
    // An actor snapshot is recognised by its magic.
    let path = sparse("actor.safetensors", 5 << 30, &driftwood_snapshot::actor::MAGIC);
    let err = SessionReader::open(&path, None).unwrap_err().to_string();
    assert!(err.contains("this is an actor snapshot"), "{err}");
    // Expectations are checked before any data is read: a header claiming more tokens than fit is refused
    // even though the data it describes is there.
    let path = dir.path().join("ok.dws");
    fs::write(&path, &bytes).unwrap();
    let err = SessionReader::open(&path, Some(&data.expect(0))).unwrap_err();
    assert!(matches!(err, SnapshotError::TooManyTokens { n_tokens: 1, max_tokens: 0 }), "{err:?}");
}

#[test]
fn hostile_sizes_in_the_header_are_refused() {
    let data = SessionData::random(38, 1, 1, 2, 2, 1);
    let mut p = parts(&data.bytes());
    p.get("guest_state").shape = vec![(16 << 20) + 1];
    p.get("guest_state").data = vec![0; (16 << 20) + 1];
    let err = parse_session(p.build(true), None).unwrap_err();
    assert!(matches!(err, SnapshotError::TooLarge { what: "guest_state", .. }), "{err:?}");
    let mut p = parts(&data.bytes());
    p.meta.insert("n_tokens".into(), ((1u64 << 22) + 1).to_string());
    let err = parse_session(p.build(true), None).unwrap_err().to_string();
    assert!(err.contains("n_tokens: 4194305 tokens, over the limit of 4194304"), "{err}");
    let mut p = parts(&data.bytes());
    p.meta.insert("digests".into(), "ab".repeat(32));
    let err = parse_session(p.build(false), None).unwrap_err().to_string();
    assert!(err.contains("digests: must be 4 comma-separated digests"), "{err}");
}
