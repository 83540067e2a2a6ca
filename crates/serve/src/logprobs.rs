//! Log-probabilities of generated tokens: the token frames an actor emits (serving protocol 2, see
//! [`driftwood_abi::serve`]) read back, and their OpenAI response shapes.
//!
//! The values are the actor's: the log-softmax of the model's logits at each position, before penalties and
//! temperature, so they describe the model's distribution rather than the sampler's.

use driftwood_engine::Model;
use serde_json::{Map, Value, json};

/// One generated token's log-probability and the most likely alternatives at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token chosen.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Reads a token frame without its first byte: `{id} {bits} {n}` then `{id} {bits}` per alternative
/// (bits: an f32's, in hexadecimal).
///
/// # Errors
///
/// A message saying what is wrong, when the frame is not such a record.
pub fn parse_frame(frame: &str) -> Result<TokenLogprob, String> {
    let mut words = frame.split(' ');
    let mut id = |what: &str| -> Result<u32, String> {
        words.next().and_then(|w| w.parse().ok()).ok_or_else(|| format!("token frame {frame:?}: no {what}"))
    };
    let token = id("token id")?;
    let bits = id_hex(&mut words, frame)?;
    let n =
        words.next().and_then(|w| w.parse::<usize>().ok()).ok_or_else(|| format!("token frame {frame:?}: no count"))?;
    if n > driftwood_abi::serve::MAX_TOP_LOGPROBS as usize {
        return Err(format!(
            "token frame {frame:?}: {n} alternatives, at most {}",
            driftwood_abi::serve::MAX_TOP_LOGPROBS
        ));
    }
    let mut top = Vec::with_capacity(n);
    for _ in 0..n {
        let alt = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("token frame {frame:?}: alternatives cut short"))?;
        top.push((alt, id_hex(&mut words, frame)?));
    }
    if words.next().is_some() {
        return Err(format!("token frame {frame:?}: more than {n} alternatives"));
    }
    Ok(TokenLogprob { token, logprob: bits, top })
}

/// The next word as the hexadecimal bits of an f32.
fn id_hex<'a>(words: &mut impl Iterator<Item = &'a str>, frame: &str) -> Result<f32, String> {
    words
        .next()
        .and_then(|w| u32::from_str_radix(w, 16).ok())
        .map(f32::from_bits)
        .ok_or_else(|| format!("token frame {frame:?}: a log-probability is not hexadecimal bits"))
}

/// A token's text (invalid UTF-8 of a partial character replaced), special tokens included.
fn text(model: &Model, token: u32) -> String {
    model.detokenize(&[token], false).unwrap_or_default()
}

/// A log-probability as JSON: a number, or OpenAI's stand-in for a token the model gives no chance
/// (JSON has no infinities).
fn number(lp: f32) -> Value {
    if lp.is_finite() { json!(lp) } else { json!(-9999.0) }
}

/// The `{"token", "logprob", "bytes"}` of one token.
fn entry(model: &Model, token: u32, lp: f32) -> Map<String, Value> {
    let t = text(model, token);
    let mut m = Map::new();
    m.insert("bytes".into(), json!(t.as_bytes()));
    m.insert("token".into(), json!(t));
    m.insert("logprob".into(), number(lp));
    m
}

/// A chat choice's `logprobs`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}],
/// "refusal": null}`.
pub fn chat(model: &Model, tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(model, t.token, t.logprob);
            let top: Vec<Value> = t.top.iter().map(|&(id, lp)| Value::Object(entry(model, id, lp))).collect();
            e.insert("top_logprobs".into(), Value::Array(top));
            Value::Object(e)
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A completion choice's legacy `logprobs`: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
/// offsets in characters counted from `offset` (the length of the text before these tokens, prompt
/// included, as OpenAI counts them), which is advanced past these tokens for the next chunk of a stream.
pub fn completion(model: &Model, tokens: &[TokenLogprob], offset: &mut usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        let s = text(model, t.token);
        offsets.push(*offset);
        *offset += s.chars().count();
        texts.push(s);
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            // A map by token text, as the legacy format has it (two ids with one text keep the likelier).
            let mut m = Map::new();
            for &(id, lp) in &t.top {
                m.entry(text(model, id)).or_insert_with(|| number(lp));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": texts,
        "token_logprobs": tokens.iter().map(|t| number(t.logprob)).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_exactly_and_bad_ones_are_refused() {
        let lp = -0.125f32;
        let frame = format!("42 {:x} 2 42 {:x} 7 {:x}", lp.to_bits(), lp.to_bits(), (-3.5f32).to_bits());
        let t = parse_frame(&frame).expect("a frame");
        assert_eq!(t, TokenLogprob { token: 42, logprob: lp, top: vec![(42, lp), (7, -3.5)] });
        assert_eq!(parse_frame("5 bf800000 0").expect("no alternatives").top, vec![]);
        for bad in ["", "x", "5", "5 zz 0", "5 bf800000", "5 bf800000 1", "5 bf800000 1 3", "5 bf800000 0 9", "5 0 99"]
        {
            assert!(parse_frame(bad).is_err(), "{bad:?}");
        }
    }
}
