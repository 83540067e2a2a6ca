//! Log-probabilities of generated tokens, computed in the actor from the logits in its own memory, and
//! their frames for the host (the serving protocol's token frames: see `driftwood_abi::serve`).

use std::fmt::Write;

use driftwood_abi::serve::FRAME_LOGPROB;

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and its `top` most likely tokens. These are the model's
/// probabilities: pass the logits before any penalty or temperature touched them.
pub fn log_softmax_at(logits: &[f32], token: u32, top: u32) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    // Summed in f64: a vocabulary of 10^5 terms in f32 loses digits the host compares.
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top as usize + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top as usize && best.last().is_some_and(|&(_, b)| l <= b) {
                continue;
            }
            // Insert after every value at least as large: equal logits keep the lower id first.
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top as usize);
        }
    }
    TokenLogprob {
        token,
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(t, l)| (t, lp(l))).collect(),
    }
}

/// The token frame of `t`: `L{id} {bits:x} {n}` and ` {id} {bits:x}` per alternative.
pub fn frame(t: &TokenLogprob) -> String {
    let mut s = String::with_capacity(16 + 20 * t.top.len());
    s.push(FRAME_LOGPROB as char);
    let _ = write!(s, "{} {:x} {}", t.token, t.logprob.to_bits(), t.top.len());
    for &(id, lp) in &t.top {
        let _ = write!(s, " {id} {:x}", lp.to_bits());
    }
    s
}
