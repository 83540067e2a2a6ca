//! `Model::decode_batch` against the single-sequence `Model::forward`: several sequences with different
//! prompts, at different positions, in caches of different sizes, stepped together.

use std::path::Path;

use driftwood_backend::{Device, TensorMut};
use driftwood_engine::{BatchScratch, BatchSeq, EngineError, KvCache, Model, Scratch};

fn bundled() -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/driftwood-mini");
    Model::load(&dir, &mut |_| {}).expect("the bundled model loads")
}

/// max |a − b| / max |b|.
fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().chain(b).all(|x| x.is_finite()), "non-finite values");
    let scale = b.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let err = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
    err / scale.max(f64::MIN_POSITIVE)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0 as u32
}

/// One sequence, kept twice: stepped alone by `forward` and together with the others by `decode_batch`.
struct Seq {
    max_seq: usize,
    pos: usize,
    next: u32,
    kv_single: Vec<f32>,
    kv_batch: Vec<f32>,
    logits_single: Vec<f32>,
    logits_batch: Vec<f32>,
}

fn kv<'a>(model: &Model, mem: &'a mut [f32], max_seq: usize) -> KvCache<'a> {
    assert_eq!(mem.len(), model.kv_floats(max_seq));
    // SAFETY: `mem` holds kv_floats(max_seq) f32s and is exclusively borrowed for 'a.
    unsafe { KvCache::from_raw_parts(mem.as_mut_ptr(), model, max_seq) }
}

fn prefill(model: &Model, dev: &Device, prompt: &str, max_seq: usize) -> Seq {
    let tokens = model.tokenize(prompt, true).unwrap();
    let mut kv_single = vec![0f32; model.kv_floats(max_seq)];
    let mut logits = vec![0f32; model.config().vocab_size];
    let mut cache = kv(model, &mut kv_single, max_seq);
    model.forward(dev, &mut cache, 0, &tokens, TensorMut::from_f32(&mut logits), &mut Scratch::default()).unwrap();
    Seq {
        max_seq,
        pos: tokens.len(),
        next: argmax(&logits),
        kv_batch: kv_single.clone(),
        kv_single,
        logits_single: logits.clone(),
        logits_batch: logits,
    }
}

#[test]
fn decode_batch_matches_forward_for_each_sequence() {
    let model = bundled();
    let dev = Device::cpu();
    let prompts = [
        ("Once upon a time", 64),
        ("It is a truth universally acknowledged, that a single man in possession of a good fortune", 96),
        ("In the beginning God created the heaven and the earth. And the earth was without form", 48),
        ("Elizabeth", 64),
    ];
    let mut seqs: Vec<Seq> = prompts.iter().map(|&(p, max_seq)| prefill(&model, &dev, p, max_seq)).collect();
    let positions: Vec<usize> = seqs.iter().map(|s| s.pos).collect();
    assert!(positions.windows(2).any(|w| w[0] != w[1]), "the sequences should sit at different positions");
    let (mut scratch, mut batch_scratch) = (Scratch::default(), BatchScratch::default());
    for step in 0..4 {
        for s in &mut seqs {
            let mut cache = kv(&model, &mut s.kv_single, s.max_seq);
            let logits = TensorMut::from_f32(&mut s.logits_single);
            model.forward(&dev, &mut cache, s.pos, &[s.next], logits, &mut scratch).unwrap();
        }
        let mut batch: Vec<BatchSeq<'_>> = seqs
            .iter_mut()
            .map(|s| BatchSeq {
                kv: kv(&model, &mut s.kv_batch, s.max_seq),
                pos: s.pos,
                token: s.next,
                logits: TensorMut::from_f32(&mut s.logits_batch),
            })
            .collect();
        model.decode_batch(&dev, &mut batch, &mut batch_scratch).unwrap();
        drop(batch);
        for (i, s) in seqs.iter_mut().enumerate() {
            let logits_err = rel_error(&s.logits_batch, &s.logits_single);
            assert!(logits_err <= 1e-5, "step {step}, sequence {i}: logits differ by {logits_err:.2e} (relative)");
            let kv_err = rel_error(&s.kv_batch, &s.kv_single);
            assert!(kv_err <= 1e-5, "step {step}, sequence {i}: KV caches differ by {kv_err:.2e} (relative)");
            // Exactly the rows up to the new position were written, in both caches.
            let kv_dim = model.config().kv_dim();
            for block in s.kv_batch.chunks(s.max_seq * kv_dim).zip(s.kv_single.chunks(s.max_seq * kv_dim)) {
                let written = (s.pos + 1) * kv_dim;
                assert!(block.0[..written].iter().any(|&x| x != 0.0) && block.0[written..].iter().all(|&x| x == 0.0));
                assert!(block.1[written..].iter().all(|&x| x == 0.0));
            }
            assert_eq!(argmax(&s.logits_batch), argmax(&s.logits_single), "step {step}, sequence {i}: greedy token");
            s.next = argmax(&s.logits_single);
            s.pos += 1;
        }
    }
}

#[test]
fn a_batch_of_one_is_the_single_sequence_forward() {
    let model = bundled();
    let dev = Device::cpu();
    let mut s = prefill(&model, &dev, "The king said", 32);
    let mut cache = kv(&model, &mut s.kv_single, s.max_seq);
    let logits = TensorMut::from_f32(&mut s.logits_single);
    model.forward(&dev, &mut cache, s.pos, &[s.next], logits, &mut Scratch::default()).unwrap();
    let mut batch = [BatchSeq {
        kv: kv(&model, &mut s.kv_batch, s.max_seq),
        pos: s.pos,
        token: s.next,
        logits: TensorMut::from_f32(&mut s.logits_batch),
    }];
    model.decode_batch(&dev, &mut batch, &mut BatchScratch::default()).unwrap();
    assert_eq!(s.logits_batch, s.logits_single);
    assert_eq!(s.kv_batch, s.kv_single);
}

#[test]
fn invalid_sequences_are_refused_before_any_work() {
    let model = bundled();
    let dev = Device::cpu();
    let vocab = model.config().vocab_size;
    let mut scratch = BatchScratch::default();
    model.decode_batch(&dev, &mut [], &mut scratch).expect("an empty batch is a no-op");
    let (mut a, mut b) = (prefill(&model, &dev, "Once", 16), prefill(&model, &dev, "Twice", 16));
    let cases: [(u32, usize, &str); 3] = [
        (vocab as u32, b.pos, "sequence 1 of the batch: token 4096 is outside the 4096-token vocabulary"),
        (1, 16, "sequence 1 of the batch: sequence of 17 tokens exceeds the 16 the KV cache holds"),
        (1, usize::MAX, "exceeds the 16 the KV cache holds"),
    ];
    for (token, pos, message) in cases {
        let before = (a.kv_batch.clone(), a.logits_batch.clone());
        let mut batch = [
            BatchSeq {
                kv: kv(&model, &mut a.kv_batch, a.max_seq),
                pos: a.pos,
                token: a.next,
                logits: TensorMut::from_f32(&mut a.logits_batch),
            },
            BatchSeq {
                kv: kv(&model, &mut b.kv_batch, b.max_seq),
                pos,
                token,
                logits: TensorMut::from_f32(&mut b.logits_batch),
            },
        ];
        let err = model.decode_batch(&dev, &mut batch, &mut scratch).unwrap_err();
        assert!(matches!(err, EngineError::Request(_)), "{err:?}");
        assert!(err.to_string().contains(message), "{err}");
        assert!(before.0 == a.kv_batch && before.1 == a.logits_batch, "the valid sequence was left untouched");
    }
    let mut short = vec![0f32; vocab - 1];
    let mut batch = [BatchSeq {
        kv: kv(&model, &mut a.kv_batch, a.max_seq),
        pos: a.pos,
        token: a.next,
        logits: TensorMut::from_f32(&mut short),
    }];
    let err = model.decode_batch(&dev, &mut batch, &mut scratch).unwrap_err();
    assert!(err.to_string().contains("logits buffer holds 4095"), "{err}");
}
