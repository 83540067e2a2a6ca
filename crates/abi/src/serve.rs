//! The serving protocol: the exports `driftwood serve` calls on a session's actor, beyond the host ABI.
//!
//! Version 1 is the chat actor's exports `init`, `set_sampling`, `set_stop_list`, `chat_messages`,
//! `generate`, `stat`, `alloc` and `dealloc`, with generated text streamed through `driftwood.emit`. A
//! module without a `serve_protocol` export speaks version 1.
//!
//! Version 2 adds:
//! - `serve_protocol() -> u32`, returning [`SERVE_PROTOCOL_VERSION`];
//! - `set_logprobs(top: i32)`: for the following calls, `-1` turns log probabilities off (the default),
//!   `0..=`[`MAX_TOP_LOGPROBS`] turns them on with that many alternatives per token.
//!
//! While log probabilities are on, every `emit` is a frame: its first byte says what follows.
//! - [`FRAME_TEXT`]: generated text, exactly what version 1 emits;
//! - [`FRAME_LOGPROB`]: one generated token, in ASCII: the token id, then the bits of its log-probability as
//!   an f32 in hexadecimal, then the number of alternatives, then each alternative's id and bits, all
//!   separated by single spaces (`L42 bf800000 1 42 bf800000`). The alternatives are the most likely tokens,
//!   most likely first.
//!
//! A token's frame comes before the text it adds, which may come later (text that could still become a
//! stop string, or a partial UTF-8 character, is held back), or never (text cut at a stop string). An
//! end-of-sequence token has no frame. The log-probabilities are the log-softmax of the model's logits for
//! the position, before any repetition penalty, temperature, top-k, top-p or min-p: the model's own
//! distribution, not the sampler's.

/// The serving protocol version of this crate; `driftwood serve` refuses a module reporting a later one.
pub const SERVE_PROTOCOL_VERSION: u32 = 2;

/// Most alternatives `set_logprobs` accepts.
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// First byte of an emitted text frame.
pub const FRAME_TEXT: u8 = b'T';

/// First byte of an emitted token frame.
pub const FRAME_LOGPROB: u8 = b'L';
