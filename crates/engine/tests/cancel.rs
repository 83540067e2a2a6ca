//! A forward pass asks its [`Cancel`] hook after every layer of every chunk and stops at once when told to.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use driftwood_backend::{Device, TensorMut};
use driftwood_engine::{Cancel, EngineError, KvCache, Model, Scratch};

#[test]
fn the_hook_is_asked_after_every_layer_and_stops_the_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/llama2-f32");
    let model = Model::load(&dir, &mut |_| {}).unwrap();
    let layers = model.config().num_layers;
    let dev = Device::cpu();
    let mut kv_mem = vec![0f32; model.kv_floats(8)];
    let mut logits = vec![0f32; model.config().vocab_size];
    let tokens = [1u32, 2, 3, 4];

    // Never cancelled: asked once per layer, and the same logits as `forward`.
    let asked = AtomicUsize::new(0);
    let count = || {
        asked.fetch_add(1, Ordering::Relaxed);
        false
    };
    {
        // SAFETY: kv_mem holds kv_floats(8) floats and is used only through `kv`.
        let mut kv = unsafe { KvCache::from_raw_parts(kv_mem.as_mut_ptr(), &model, 8) };
        let out = TensorMut::from_f32(&mut logits);
        model
            .forward_cancellable(&dev, &mut kv, 0, &tokens, out, &mut Scratch::default(), Cancel::new(&count))
            .unwrap();
    }
    assert_eq!(asked.load(Ordering::Relaxed), layers);
    let expected = logits.clone();
    kv_mem.fill(0.0);
    {
        // SAFETY: as above.
        let mut kv = unsafe { KvCache::from_raw_parts(kv_mem.as_mut_ptr(), &model, 8) };
        model.forward(&dev, &mut kv, 0, &tokens, TensorMut::from_f32(&mut logits), &mut Scratch::default()).unwrap();
    }
    assert_eq!(logits, expected);

    // Cancelled after the first layer: the pass stops there.
    let asked = AtomicUsize::new(0);
    let stop = || asked.fetch_add(1, Ordering::Relaxed) == 0;
    logits.fill(7.0);
    // SAFETY: as above.
    let mut kv = unsafe { KvCache::from_raw_parts(kv_mem.as_mut_ptr(), &model, 8) };
    let out = TensorMut::from_f32(&mut logits);
    let result = model.forward_cancellable(&dev, &mut kv, 0, &tokens, out, &mut Scratch::default(), Cancel::new(&stop));
    assert!(matches!(result, Err(EngineError::Cancelled)), "{result:?}");
    assert_eq!(asked.load(Ordering::Relaxed), 1);
    assert!(logits.iter().all(|&v| v == 7.0), "no logits are written by a cancelled pass");
}
