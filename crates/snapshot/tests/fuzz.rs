//! Property tests: both readers on arbitrary bytes and on mutations of valid files never panic, and never accept
//! a changed file as something it is not. Bounded to a few hundred cases each so that CI stays fast.

mod common;

use common::{SessionData, sample_image};
use driftwood_snapshot::actor::MAGIC;
use driftwood_snapshot::{
    ActorLimits, ActorReader, KvDtype, SessionReader, parse_actor, parse_session, write_actor_to,
};
use proptest::prelude::*;
use proptest::sample::Index;

const LIMITS: ActorLimits = ActorLimits { max_memory: 1 << 24 };

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Remove(Index, usize),
    /// Overwrite an 8-byte little-endian word with a hostile value (lengths, counts).
    Word(Index, u64),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let hostile = prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1 << 40),
        any::<u64>(),
        0u64..5000
    ];
    prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Mutation::Set(i, x)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
        1 => (any::<Index>(), hostile).prop_map(|(i, w)| Mutation::Word(i, w)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match m {
        Mutation::Flip(i, x) => bytes[i.index(len)] ^= x,
        Mutation::Set(i, x) => bytes[i.index(len)] = *x,
        Mutation::Truncate(i) => bytes.truncate(i.index(len)),
        Mutation::Insert(i, v) => {
            let at = i.index(len + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Mutation::Remove(i, n) => {
            let at = i.index(len);
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Word(i, w) => {
            if len >= 8 {
                let at = i.index(len - 7);
                bytes[at..at + 8].copy_from_slice(&w.to_le_bytes());
            }
        }
    }
}

fn session_data() -> impl Strategy<Value = SessionData> {
    (any::<u64>(), 1usize..5, 1usize..4, 1usize..5, 0usize..7, 0usize..9)
        .prop_map(|(seed, l, h, d, n, g)| SessionData::random(seed, l, h, d, n, g))
}

fn actor_memory() -> impl Strategy<Value = Vec<u8>> {
    (0usize..3, any::<u64>(), 1u32..6)
        .prop_map(|(wasm_pages, seed, one_in)| common::sparse_memory(seed, wasm_pages * 65536, one_in))
}

fn actor_bytes(memory: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_actor_to(&mut out, &sample_image(memory.len() as u64), memory).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn session_reader_refuses_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(parse_session(bytes, None).is_err());
    }

    #[test]
    fn session_reader_refuses_arbitrary_headers(
        header in prop::collection::vec(any::<u8>(), 0..512),
        data in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&data);
        prop_assert!(parse_session(bytes, None).is_err());
    }

    #[test]
    fn session_round_trips(data in session_data()) {
        let file = parse_session(data.bytes(), Some(&data.expect(data.tokens.len()))).unwrap();
        data.assert_matches(&file);
    }

    /// A mutated file is refused, unless the change only touched bytes with no meaning (JSON whitespace): then
    /// it reads back exactly as the original.
    #[test]
    fn session_reader_on_mutated_files(data in session_data(), mutations in prop::collection::vec(mutation(), 1..5)) {
        let original = data.bytes();
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let changed = bytes != original;
        match parse_session(bytes, None) {
            Ok(file) => data.assert_matches(&file),
            Err(e) => prop_assert!(changed, "the unchanged file was refused: {e}"),
        }
    }

    #[test]
    fn actor_reader_refuses_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(parse_actor(bytes, &LIMITS).is_err());
    }

    #[test]
    fn actor_reader_refuses_arbitrary_bodies(
        header_len in prop_oneof![0u64..600, any::<u64>()],
        body in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&header_len.to_le_bytes());
        bytes.extend_from_slice(&[0; 32]);
        bytes.extend_from_slice(&body);
        prop_assert!(parse_actor(bytes, &LIMITS).is_err());
    }

    #[test]
    fn actor_round_trips(memory in actor_memory()) {
        let file = parse_actor(actor_bytes(&memory), &LIMITS).unwrap();
        prop_assert_eq!(&file.image, &sample_image(memory.len() as u64));
        let mut restored = vec![0xee; memory.len()];
        file.restore_into(&mut restored).unwrap();
        prop_assert!(restored == memory);
    }

    /// Every byte of an actor file is covered by the checksum or checked: any change is refused.
    #[test]
    fn actor_reader_on_mutated_files(memory in actor_memory(), mutations in prop::collection::vec(mutation(), 1..5)) {
        let original = actor_bytes(&memory);
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let changed = bytes != original;
        prop_assert_eq!(parse_actor(bytes, &LIMITS).is_err(), changed);
    }

    /// The streaming reader on mutated version-3 files (f32 and bf16 caches, read into either dtype): never a
    /// panic; a file it accepts reads back as the original; a file it refuses while reading the KV cache leaves
    /// every destination byte zero.
    #[test]
    fn session_reader_streams_mutated_v3_files(
        data in session_data(),
        bf16 in any::<bool>(),
        into_bf16 in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        let data = if bf16 { data.bf16() } else { data };
        let original = data.bytes();
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.dws");
        std::fs::write(&path, &bytes).unwrap();
        let dst_dtype = if into_bf16 { KvDtype::Bf16 } else { KvDtype::F32 };
        let reader = match SessionReader::open(&path, None) {
            Ok(r) => r,
            Err(e) => {
                prop_assert!(bytes != original, "the unchanged file was refused: {e}");
                return Ok(());
            }
        };
        prop_assert_eq!(reader.tokens(), data.tokens.as_slice());
        prop_assert_eq!(reader.guest_state(), data.guest_state.as_slice());
        let n = reader.layer_bytes(dst_dtype);
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = (0..reader.num_layers()).map(|_| (vec![0xa5; n], vec![0xa5; n])).collect();
        let dst = out.iter_mut().map(|(k, v)| (k.as_mut_slice(), v.as_mut_slice())).collect();
        match reader.read_kv_into(dst_dtype, dst) {
            Ok(()) => {
                if dst_dtype == data.kv_dtype {
                    prop_assert!(out == data.raw, "accepted data differs from what was written");
                }
            }
            Err(_) => {
                prop_assert!(bytes != original);
                prop_assert!(out.iter().all(|(k, v)| k.iter().chain(v).all(|&b| b == 0)), "bytes left behind");
            }
        }
    }

    /// The streaming actor reader on mutated files: never a panic; a file it accepts restores the original
    /// memory into fresh (zero) memory; a refused restore leaves no stored byte behind.
    #[test]
    fn actor_reader_streams_mutated_files(memory in actor_memory(), mutations in prop::collection::vec(mutation(), 0..4)) {
        let original = actor_bytes(&memory);
        let mut bytes = original.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let changed = bytes != original;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.actor");
        std::fs::write(&path, &bytes).unwrap();
        let reader = match ActorReader::open(&path, &LIMITS) {
            Ok(r) => r,
            Err(e) => {
                prop_assert!(changed, "the unchanged file was refused: {e}");
                return Ok(());
            }
        };
        let mut restored = vec![0u8; reader.image().memory_size as usize];
        match reader.restore_into(&mut restored, 0) {
            Ok(()) => {
                prop_assert!(!changed, "a changed file was accepted");
                prop_assert!(restored == memory);
            }
            Err(_) => {
                prop_assert!(changed);
                prop_assert!(restored.iter().all(|&b| b == 0), "bytes left behind");
            }
        }
    }
}
