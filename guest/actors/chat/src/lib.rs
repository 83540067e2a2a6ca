//! The default actor shipped with `driftwood`: plain generation and multi-turn chat.
//!
//! All state is in this actor's linear memory — the conversation, the session's KV cache and logits, the
//! sampler and its random stream — so a snapshot of the actor is a snapshot of the conversation.
//!
//! Host protocol: `init(max_seq)`, then optionally `set_sampling(...)` and `set_stops(ptr, len)`; text goes
//! in through `alloc(len)` + a host write, then `generate(ptr, len, max_tokens)` or `chat(ptr, len,
//! max_tokens)`. Generated text streams out through `driftwood.emit`. `stat(i)` reports the last call.
//!
//! A server speaking the chat-completions protocol uses `chat_messages(ptr, len, max_tokens)`: the whole
//! conversation as JSON each time. The actor remembers the text and tokens of the conversation it has seen,
//! so a request that extends it evaluates only the tokens of the new messages.
//!
//! Serving protocol 2 (`driftwood_abi::serve`): `serve_protocol()` returns 2, and `set_logprobs(top)` makes
//! the following calls emit frames, text and each generated token's log-probability (the log-softmax of
//! the model's logits, before penalties and temperature) with `top` alternatives.

use std::cell::RefCell;

use driftwood_guest::llm::{Model, Session};
use driftwood_guest::logprobs;
use driftwood_guest::sample::{self, Sampler, SamplerConfig};
use driftwood_guest::serve::{FRAME_TEXT, MAX_TOP_LOGPROBS, SERVE_PROTOCOL_VERSION};

struct Actor {
    model: Model,
    session: Session,
    sampler: Sampler,
    stops: Vec<String>,
    /// The conversation so far, as (role, content).
    messages: Vec<(String, String)>,
    /// [prompt tokens, tokens evaluated for the prompt, tokens generated, stop reason]
    stats: [u32; 4],
    /// The last generated token when generation stopped before evaluating it.
    pending: Option<u32>,
    /// The last call's reply: its text and tokens.
    reply: (String, Vec<u32>),
    /// For `chat_messages`: the conversation seen so far as rendered text and the tokens it was evaluated
    /// as (the prompt plus the generated reply), when the two are known to agree.
    known: Option<(String, Vec<u32>)>,
    /// Log-probabilities with this many alternatives per token, framed in what is emitted (serving protocol
    /// 2); `None`: plain text.
    top_logprobs: Option<u32>,
}

thread_local! {
    static ACTOR: RefCell<Option<Actor>> = const { RefCell::new(None) };
}

fn with_actor<R>(f: impl FnOnce(&mut Actor) -> R) -> Option<R> {
    ACTOR.with(|a| a.borrow_mut().as_mut().map(f))
}

/// Reserves `len` bytes for the host to write into; returns their offset.
#[unsafe(no_mangle)]
pub extern "C" fn alloc(len: u32) -> u32 {
    let buf = vec![0u8; len as usize].into_boxed_slice();
    Box::leak(buf).as_mut_ptr() as u32
}

/// Frees a buffer from [`alloc`].
///
/// # Safety
///
/// `ptr` and `len` must come from one earlier `alloc` call, freed once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dealloc(ptr: u32, len: u32) {
    // SAFETY: by the caller's contract this is the box `alloc` leaked.
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr as *mut u8, len as usize)) });
}

/// Reads the text the host wrote at `ptr` (invalid UTF-8 replaced).
fn input(ptr: u32, len: u32) -> String {
    // SAFETY: the host wrote `len` bytes at `ptr`, inside a buffer from `alloc`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) };
    String::from_utf8_lossy(bytes).into_owned()
}

/// Opens the host's `default` model and a session of `max_seq` tokens (0: the model's context length).
#[unsafe(no_mangle)]
pub extern "C" fn init(max_seq: u32) {
    let model = Model::open("default");
    let max_seq = if max_seq == 0 { model.info().max_position } else { max_seq };
    let session = Session::new(&model, max_seq);
    let actor = Actor {
        model,
        session,
        sampler: Sampler::new(SamplerConfig::default()),
        stops: Vec::new(),
        messages: Vec::new(),
        stats: [0; 4],
        pending: None,
        reply: (String::new(), Vec::new()),
        known: None,
        top_logprobs: None,
    };
    ACTOR.with(|a| *a.borrow_mut() = Some(actor));
}

/// Sets sampling for the following calls and reseeds the random stream.
#[unsafe(no_mangle)]
pub extern "C" fn set_sampling(temperature: f32, top_k: u32, top_p: f32, min_p: f32, repetition_penalty: f32, seed: u64) {
    let config = SamplerConfig { temperature, top_k, top_p, min_p, repetition_penalty, seed };
    with_actor(|a| a.sampler = Sampler::new(config));
}

/// The serving protocol this actor speaks (see `driftwood_abi::serve`).
#[unsafe(no_mangle)]
pub extern "C" fn serve_protocol() -> u32 {
    SERVE_PROTOCOL_VERSION
}

/// For the following calls: `-1` emits plain text; `0..=20` emits frames, text and each generated token's
/// log-probability with `top` alternatives (values past 20 are taken as 20).
#[unsafe(no_mangle)]
pub extern "C" fn set_logprobs(top: i32) {
    let top = u32::try_from(top).ok().map(|t| t.min(MAX_TOP_LOGPROBS));
    with_actor(|a| a.top_logprobs = top);
}

/// Emits a text frame.
fn emit_text_frame(text: &str) {
    let mut frame = String::with_capacity(text.len() + 1);
    frame.push(FRAME_TEXT as char);
    frame.push_str(text);
    driftwood_guest::emit(&frame);
}

/// Sets stop strings: the text at `ptr`, one per line.
#[unsafe(no_mangle)]
pub extern "C" fn set_stops(ptr: u32, len: u32) {
    let stops: Vec<String> = input(ptr, len).lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
    with_actor(|a| a.stops = stops);
}

/// Sets stop strings: the text at `ptr`, separated by NUL bytes (so a stop string may hold a line break).
#[unsafe(no_mangle)]
pub extern "C" fn set_stop_list(ptr: u32, len: u32) {
    let stops: Vec<String> = input(ptr, len).split('\0').filter(|s| !s.is_empty()).map(str::to_string).collect();
    with_actor(|a| a.stops = stops);
}

/// Evaluates `prompt` (reusing whatever prefix the cache already holds) and generates up to `max_tokens`.
fn run(a: &mut Actor, prompt: &[u32], max_tokens: u32) -> i32 {
    let reused = a.session.reuse_prefix(prompt);
    let Some(logits) = a.session.feed(&prompt[reused..]).map(|l| l.to_vec()) else {
        return -1; // the prompt does not fit in the session
    };
    let stops = a.stops.clone();
    let out = match a.top_logprobs {
        None => sample::generate(&mut a.session, &mut a.sampler, logits, max_tokens, &stops, driftwood_guest::emit),
        top => sample::generate_with_logprobs(
            &mut a.session,
            &mut a.sampler,
            logits,
            max_tokens,
            &stops,
            top,
            emit_text_frame,
            |t| driftwood_guest::emit(&logprobs::frame(t)),
        ),
    };
    a.stats = [prompt.len() as u32, (prompt.len() - reused) as u32, out.tokens.len() as u32, out.stop as u32];
    a.pending = (a.session.tokens().len() < prompt.len() + out.tokens.len()).then(|| out.tokens.last().copied()).flatten();
    if a.messages.last().is_some_and(|(role, _)| role == "user") {
        a.messages.push(("assistant".into(), out.text.clone()));
    }
    let generated = out.tokens.len() as i32;
    a.reply = (out.text, out.tokens);
    generated
}

/// Continues the text at `ptr` (with the model's BOS when its tokenizer asks for one). Returns the number of
/// tokens generated, or -1 if the prompt does not fit in the session, -2 before `init`.
#[unsafe(no_mangle)]
pub extern "C" fn generate(ptr: u32, len: u32, max_tokens: u32) -> i32 {
    let text = input(ptr, len);
    with_actor(|a| {
        a.messages.clear();
        let prompt = a.model.tokenize(&text, true);
        run(a, &prompt, max_tokens)
    })
    .unwrap_or(-2)
}

/// Adds the user message at `ptr` to the conversation and generates the assistant's reply (streamed).
/// Only tokens not already in the cache are evaluated. Returns as [`generate`].
#[unsafe(no_mangle)]
pub extern "C" fn chat(ptr: u32, len: u32, max_tokens: u32) -> i32 {
    let text = input(ptr, len);
    with_actor(|a| {
        a.messages.push(("user".into(), text));
        let rendered = a.model.chat_template(&a.messages, true);
        let prompt = a.model.tokenize(&rendered, false);
        let generated = run(a, &prompt, max_tokens);
        if generated < 0 {
            a.messages.pop();
        }
        generated
    })
    .unwrap_or(-2)
}

/// Generates the assistant's next reply to the conversation at `ptr`: JSON, a list of `{"role", "content"}`
/// objects, the whole conversation each time. When the conversation extends the one this actor last saw
/// (its text starts with that conversation and the reply generated for it), only the tokens after it are
/// evaluated; otherwise the longest common token prefix with the cache is kept. Returns as [`generate`].
#[unsafe(no_mangle)]
pub extern "C" fn chat_messages(ptr: u32, len: u32, max_tokens: u32) -> i32 {
    let json = input(ptr, len);
    with_actor(|a| {
        a.messages.clear();
        let rendered = a.model.chat_template_json(&json, true);
        let prompt = match a.known.take() {
            Some((text, mut tokens)) if rendered.len() > text.len() && rendered.starts_with(text.as_str()) => {
                tokens.extend(a.model.tokenize(&rendered[text.len()..], false));
                tokens
            }
            _ => a.model.tokenize(&rendered, false),
        };
        let generated = run(a, &prompt, max_tokens);
        // Remember the conversation only when the reply's tokens are exactly its text: a reply cut at a stop
        // string, or holding special tokens the text skips, is re-tokenized next time instead.
        let (text, tokens) = &a.reply;
        let exact = generated >= 0 && a.stats[3] != 1 && a.model.detokenize(tokens, false) == *text;
        if exact {
            let mut all = prompt;
            all.extend_from_slice(tokens);
            a.known = Some((rendered + text, all));
        }
        generated
    })
    .unwrap_or(-2)
}

/// The last call's numbers: 0 prompt tokens, 1 tokens evaluated for the prompt (the rest came from the
/// cache), 2 tokens generated, 3 stop reason (0 eos, 1 stop string, 2 max tokens, 3 context full).
#[unsafe(no_mangle)]
pub extern "C" fn stat(i: u32) -> u32 {
    with_actor(|a| a.stats.get(i as usize).copied().unwrap_or(0)).unwrap_or(0)
}

/// Messages in the conversation.
#[unsafe(no_mangle)]
pub extern "C" fn turns() -> u32 {
    with_actor(|a| a.messages.len() as u32).unwrap_or(0)
}

/// Decode benchmark: a fresh session with `context` tokens of context (token ids cycling through the
/// vocabulary), then `steps` greedy decode steps. Returns the number of steps run.
#[unsafe(no_mangle)]
pub extern "C" fn bench_decode(context: u32, steps: u32) -> i32 {
    let model = Model::open("default");
    let vocab = model.info().vocab_size;
    let mut session = Session::new(&model, context + steps + 1);
    let prompt: Vec<u32> = (0..context.max(1)).map(|i| (i * 7 + 3) % vocab).collect();
    let Some(logits) = session.feed(&prompt) else { return -1 };
    let mut next = sample::argmax(logits);
    for step in 0..steps {
        match session.feed(&[next]) {
            Some(l) => next = sample::argmax(l),
            None => return step as i32,
        }
    }
    steps as i32
}

/// Saves the session (KV cache, tokens, sampler state) to the snapshot file the host chose. Returns the number
/// of tokens saved, -1 if the host could not write it, -2 before `init`.
#[unsafe(no_mangle)]
pub extern "C" fn save_session() -> i32 {
    with_actor(|a| {
        // A token generated but not yet evaluated is evaluated now, so the saved cache holds every token.
        if let Some(tok) = a.pending.take() {
            a.session.feed(&[tok]);
        }
        if a.session.save(&a.sampler.state_bytes()) { a.session.tokens().len() as i32 } else { -1 }
    })
    .unwrap_or(-2)
}

/// Replaces the session with the snapshot file the host chose (and the sampler with the saved one). Returns
/// the number of tokens restored, -1 if the host refused the file, -2 before `init`.
#[unsafe(no_mangle)]
pub extern "C" fn load_session() -> i32 {
    with_actor(|a| match a.session.load() {
        Some(state) => {
            if let Some(sampler) = Sampler::from_state_bytes(&state) {
                a.sampler = sampler;
            }
            a.messages.clear();
            a.pending = None;
            a.session.tokens().len() as i32
        }
        None => -1,
    })
    .unwrap_or(-2)
}

/// Continues generating after the tokens the session holds (after `load_session`). Returns as [`generate`].
#[unsafe(no_mangle)]
pub extern "C" fn resume(max_tokens: u32) -> i32 {
    with_actor(|a| {
        let mut history = a.session.tokens().to_vec();
        history.extend(a.pending.take());
        if history.is_empty() {
            return -1;
        }
        run(a, &history, max_tokens)
    })
    .unwrap_or(-2)
}

/// Token `i` of the sequence so far (the session's tokens, then a generated token not yet evaluated), or
/// `u32::MAX` past the end. Lets the host compare runs token by token.
#[unsafe(no_mangle)]
pub extern "C" fn token_at(i: u32) -> u32 {
    with_actor(|a| {
        let tokens = a.session.tokens();
        match (i as usize).cmp(&tokens.len()) {
            std::cmp::Ordering::Less => tokens[i as usize],
            std::cmp::Ordering::Equal => a.pending.unwrap_or(u32::MAX),
            std::cmp::Ordering::Greater => u32::MAX,
        }
    })
    .unwrap_or(u32::MAX)
}

/// Replaces the session's contents with `n` tokens (ids cycling through the vocabulary), evaluated in one
/// prefill. For the snapshot benchmark. Returns `n`, or -1 if they do not fit.
#[unsafe(no_mangle)]
pub extern "C" fn fill(n: u32) -> i32 {
    with_actor(|a| {
        let vocab = a.model.info().vocab_size;
        let tokens: Vec<u32> = (0..n).map(|i| (i * 7 + 3) % vocab).collect();
        a.session.truncate(0);
        a.pending = None;
        if a.session.feed(&tokens).is_some() { n as i32 } else { -1 }
    })
    .unwrap_or(-2)
}

/// The session's KV cache in this actor's memory: 0 → its offset, 1 → its size in bytes.
#[unsafe(no_mangle)]
pub extern "C" fn kv_region(i: u32) -> u32 {
    with_actor(|a| {
        let (offset, bytes) = a.session.kv_region();
        if i == 0 { offset } else { bytes }
    })
    .unwrap_or(0)
}
