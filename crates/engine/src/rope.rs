//! Rotary position embedding frequencies, including Llama 3.1-style scaling, and the per-call cos/sin
//! tables the backend applies.

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies `(head_dim / 2)` of a model's rotary embedding, as transformers computes them: in f32,
/// with scaling applied once at load.
pub(crate) fn inv_freq(config: &ModelConfig) -> Vec<f32> {
    let d = config.head_dim;
    (0..d / 2)
        .map(|j| {
            let base = 1.0 / config.rope_theta.powf((2 * j) as f64 / d as f64);
            let scaled = match config.rope_scaling {
                RopeScaling::None => base,
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                    let wavelen = 2.0 * std::f64::consts::PI / base;
                    let low_wavelen = original_max_position_embeddings / low_freq_factor;
                    let high_wavelen = original_max_position_embeddings / high_freq_factor;
                    if wavelen < high_wavelen {
                        base
                    } else if wavelen > low_wavelen {
                        base / factor
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * base / factor + smooth * base
                    }
                }
            };
            scaled as f32
        })
        .collect()
}

/// Fills `cos`/`sin` `(t, head_dim/2)` for positions `pos..pos + t`; angles are f32 products, as in
/// transformers.
pub(crate) fn tables(inv_freq: &[f32], pos: usize, t: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    cos.clear();
    sin.clear();
    for p in pos..pos + t {
        for &f in inv_freq {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
}
