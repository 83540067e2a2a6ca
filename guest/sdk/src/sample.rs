//! Sampling, done in the actor from the logits in its own memory: greedy, temperature, top-k, top-p, min-p,
//! repetition penalty, with a seeded generator whose state is part of the actor's memory (so a snapshot of
//! the actor resumes the exact same random stream).

/// Sampling settings. The defaults are greedy decoding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = none).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already-seen tokens by this (1 = off).
    pub repetition_penalty: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

/// SplitMix64: small, fast, and fully determined by its one word of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Picks next tokens from logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
}

/// Index of the largest value (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &x) in logits.iter().enumerate() {
        if x > best.1 {
            best = (i, x);
        }
    }
    best.0 as u32
}

impl Sampler {
    /// A sampler with `config`, its random stream seeded from `config.seed`.
    pub fn new(config: SamplerConfig) -> Sampler {
        Sampler { config, rng: Rng(config.seed), candidates: Vec::new() }
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// The sampler's settings and random-stream position as bytes (for a session snapshot).
    pub fn state_bytes(&self) -> Vec<u8> {
        let c = &self.config;
        let mut b = Vec::with_capacity(36);
        for w in [c.temperature.to_bits(), c.top_k, c.top_p.to_bits(), c.min_p.to_bits(), c.repetition_penalty.to_bits()] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&c.seed.to_le_bytes());
        b.extend_from_slice(&self.rng.0.to_le_bytes());
        b
    }

    /// A sampler exactly where [`state_bytes`](Self::state_bytes) left one; `None` if the bytes are not such
    /// a state.
    pub fn from_state_bytes(b: &[u8]) -> Option<Sampler> {
        if b.len() != 36 {
            return None;
        }
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let config = SamplerConfig {
            temperature: f32::from_bits(u32_at(0)),
            top_k: u32_at(4),
            top_p: f32::from_bits(u32_at(8)),
            min_p: f32::from_bits(u32_at(12)),
            repetition_penalty: f32::from_bits(u32_at(16)),
            seed: u64_at(20),
        };
        Some(Sampler { config, rng: Rng(u64_at(28)), candidates: Vec::new() })
    }

    /// Chooses the next token. `logits` is modified (penalties, temperature); `history` is the sequence so
    /// far, for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = self.config;
        if c.repetition_penalty != 1.0 && c.repetition_penalty > 0.0 {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / c.repetition_penalty } else { *l * c.repetition_penalty };
                }
            }
        }
        if !(c.temperature > 0.0) {
            return argmax(logits);
        }
        if c.top_k == 0 && c.top_p >= 1.0 && c.min_p <= 0.0 {
            // Every token stays a candidate: one pass in vocabulary order, no list and no sort of the
            // vocabulary (128k entries cost milliseconds a token). The distribution is the sorted walk's below;
            // the token one random draw lands on is not.
            let inv = 1.0 / c.temperature;
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l)) * inv;
            let mut sum = 0.0f32;
            for l in logits.iter_mut() {
                *l = (*l * inv - max).exp();
                sum += *l;
            }
            let mut r = self.rng.next_f32() * sum;
            let mut last = 0;
            for (i, &p) in logits.iter().enumerate() {
                if p > 0.0 {
                    last = i;
                }
                if r < p {
                    return i as u32;
                }
                r -= p;
            }
            return last as u32;
        }
        let cand = &mut self.candidates;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l / c.temperature)));
        if c.top_k > 0 && (c.top_k as usize) < cand.len() {
            let k = c.top_k as usize;
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        // Softmax over the survivors.
        let max = cand.first().map_or(0.0, |c| c.1);
        let mut sum = 0.0;
        for e in cand.iter_mut() {
            e.1 = (e.1 - max).exp();
            sum += e.1;
        }
        for e in cand.iter_mut() {
            e.1 /= sum;
        }
        if c.min_p > 0.0 {
            let floor = c.min_p * cand.first().map_or(0.0, |c| c.1);
            let keep = cand.iter().take_while(|e| e.1 >= floor).count().max(1);
            cand.truncate(keep);
        }
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cand.len();
            for (i, e) in cand.iter().enumerate() {
                acc += e.1;
                if acc >= c.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        let total: f32 = cand.iter().map(|e| e.1).sum();
        let mut r = self.rng.next_f32() * total;
        for e in cand.iter() {
            if r < e.1 {
                return e.0;
            }
            r -= e.1;
        }
        cand.last().map_or(0, |e| e.0)
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    Eos = 0,
    /// A stop string appeared.
    StopString = 1,
    /// `max_tokens` were generated.
    MaxTokens = 2,
    /// The KV cache is full.
    ContextFull = 3,
}

/// The outcome of [`generate`].
#[derive(Clone, Debug)]
pub struct Generated {
    /// Tokens generated (the EOS token, if any, excluded).
    pub tokens: Vec<u32>,
    /// Their text, cut before any stop string.
    pub text: String,
    /// Why it ended.
    pub stop: StopReason,
}

/// Samples up to `max_tokens` tokens after `logits` (the session's current next-token logits), feeding each
/// back into `session`, calling `on_text` with each new piece of text as soon as it is final (text that
/// could still turn into a stop string is held back).
pub fn generate(
    session: &mut crate::llm::Session,
    sampler: &mut Sampler,
    logits: Vec<f32>,
    max_tokens: u32,
    stops: &[String],
    on_text: impl FnMut(&str),
) -> Generated {
    generate_with_logprobs(session, sampler, logits, max_tokens, stops, None, on_text, |_| {})
}

/// [`generate`], also computing each generated token's log-probability when `top_logprobs` is given (with
/// that many alternatives) and passing it to `on_token` as soon as the token is chosen, before its text.
/// The log-probabilities are those of the model's logits, before penalties and temperature (see
/// [`log_softmax_at`](crate::logprobs::log_softmax_at)). An end-of-sequence token is not passed.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_logprobs(
    session: &mut crate::llm::Session,
    sampler: &mut Sampler,
    mut logits: Vec<f32>,
    max_tokens: u32,
    stops: &[String],
    top_logprobs: Option<u32>,
    mut on_text: impl FnMut(&str),
    mut on_token: impl FnMut(&crate::logprobs::TokenLogprob),
) -> Generated {
    // The sampler changes the logits it is given: the model's own are kept for the log-probabilities.
    let mut raw: Vec<f32> = Vec::new();
    let model = session.model().clone();
    let eos = model.info().eos.clone();
    let mut tokens = Vec::new();
    let mut shown = 0; // bytes of `text` already passed to on_text
    let mut text = String::new();
    let mut stop = StopReason::MaxTokens;
    while (tokens.len() as u32) < max_tokens {
        if top_logprobs.is_some() {
            raw.clear();
            raw.extend_from_slice(&logits);
        }
        let next = sampler.sample(&mut logits, session.tokens());
        if eos.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        if let Some(top) = top_logprobs {
            on_token(&crate::logprobs::log_softmax_at(&raw, next, top));
        }
        tokens.push(next);
        text = model.detokenize(&tokens, true);
        if let Some(at) = stops.iter().filter_map(|s| (!s.is_empty()).then(|| text.find(s.as_str())).flatten()).min() {
            text.truncate(at);
            stop = StopReason::StopString;
            break;
        }
        // Emit what is final: not a partial UTF-8 character, not a possible start of a stop string.
        let mut ready = text.len();
        if text.ends_with('\u{FFFD}') {
            ready = text.trim_end_matches('\u{FFFD}').len();
        }
        for s in stops {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && text[..ready].ends_with(&s[..k]) {
                    ready = ready.min(ready - k);
                    break;
                }
            }
        }
        if ready > shown && text.is_char_boundary(ready) && text.is_char_boundary(shown) {
            on_text(&text[shown..ready]);
            shown = ready;
        }
        if tokens.len() as u32 == max_tokens {
            break; // no need to evaluate a token nothing will follow
        }
        match session.feed(&[next]) {
            Some(l) => {
                logits.clear();
                logits.extend_from_slice(l);
            }
            None => {
                stop = StopReason::ContextFull;
                break;
            }
        }
    }
    if text.len() > shown && text.is_char_boundary(shown) {
        on_text(&text[shown..]);
    }
    Generated { tokens, text, stop }
}
