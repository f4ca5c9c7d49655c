//! Token usage read from responses as they stream past, without buffering what the client gets:
//! the `usage` object of a JSON answer (found in a bounded tail of the body) or of an event
//! stream's final usage chunk. When the gateway asked for that chunk on the client's behalf
//! (`stream_options.include_usage`), it is taken out again, with the `"usage":null` it makes
//! every other chunk carry, so the client sees exactly the stream it asked for.

pub mod ledger;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

/// What a response says it used. The Responses API's `input_tokens` and `output_tokens` are
/// read as prompt and completion tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Of the prompt tokens, those served from the backend's prompt cache.
    pub cached_tokens: u64,
    /// Of the completion tokens, those spent on reasoning.
    pub reasoning_tokens: u64,
    /// Audio tokens, prompt and completion together (`audio_tokens` in the `*_details`).
    pub audio_tokens: u64,
}

impl Usage {
    /// The counts of `crate::telemetry::TOKEN_KINDS`, in its order.
    pub fn by_kind(&self) -> [u64; 5] {
        [
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.audio_tokens,
        ]
    }
}

/// How much of a JSON body's end is kept to find `usage` in (it comes last in Azure's answers).
const JSON_TAIL: usize = 64 * 1024;
/// Longest single SSE event held while looking for its end.
const MAX_EVENT: usize = 1024 * 1024;

/// Watches one response body.
pub enum Tap {
    /// The body's last chunks, at least `JSON_TAIL` bytes of them when there are that many:
    /// shared with what goes to the client, not copied (most answers are one chunk).
    Json {
        chunks: Vec<Bytes>,
        len: usize,
    },
    Sse(SseTap),
}

impl Tap {
    /// A tap for a response of this content type; `strip` when the usage chunk was requested by
    /// the gateway, not the client.
    pub fn new(content_type: Option<&str>, strip: bool) -> Option<Tap> {
        let ct = content_type.unwrap_or("");
        if ct.starts_with("text/event-stream") {
            Some(Tap::Sse(SseTap {
                pending: BytesMut::new(),
                usage: None,
                strip,
                overflow: false,
            }))
        } else if ct.starts_with("application/json") {
            Some(Tap::Json {
                chunks: Vec::new(),
                len: 0,
            })
        } else {
            None
        }
    }

    /// Sees a chunk; returns what to send on to the client now.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        match self {
            Tap::Json { chunks, len } => {
                *len += chunk.len();
                chunks.push(chunk.clone());
                // Drop whole chunks from the front while the rest still covers the tail.
                let mut drop = 0;
                while drop + 1 < chunks.len() && *len - chunks[drop].len() >= JSON_TAIL {
                    *len -= chunks[drop].len();
                    drop += 1;
                }
                chunks.drain(..drop);
                chunk
            }
            Tap::Sse(s) => s.feed(chunk),
        }
    }

    /// The body ended: anything still held back, and the usage found.
    pub fn finish(&mut self) -> (Bytes, Option<Usage>) {
        match self {
            Tap::Json { .. } => (Bytes::new(), self.usage()),
            Tap::Sse(s) => (s.pending.split().freeze(), s.usage),
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        match self {
            Tap::Json { chunks, .. } => match chunks.as_slice() {
                [] => None,
                [one] => usage_in(one),
                many => usage_in(&many.concat()),
            },
            Tap::Sse(s) => s.usage,
        }
    }
}

pub struct SseTap {
    /// Bytes of an event not complete yet.
    pending: BytesMut,
    usage: Option<Usage>,
    strip: bool,
    /// An event grew past `MAX_EVENT`: stop interpreting, pass bytes through.
    overflow: bool,
}

/// What one event says about usage.
enum Seen {
    /// No usage, or none the gateway would remove.
    Nothing,
    /// `"usage":null` and its comma, at these bytes of the event: what asking for usage adds to
    /// every chunk.
    Null(std::ops::Range<usize>),
    /// Counts; `only` when the event carries nothing else (an empty `choices`).
    Counts { only: bool },
}

impl SseTap {
    fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.overflow {
            return chunk;
        }
        // Fast path: nothing held and the chunk is whole events (the usual case, one event per
        // chunk): no copy into `pending`.
        if self.pending.is_empty() && chunk.ends_with(b"\n\n") {
            return self.pass(chunk);
        }
        self.pending.extend_from_slice(&chunk);
        let Some(end) = last_event_end(&self.pending) else {
            if self.pending.len() > MAX_EVENT {
                self.overflow = true;
                return self.pending.split().freeze();
            }
            return Bytes::new();
        };
        let complete = self.pending.split_to(end).freeze();
        self.pass(complete)
    }

    /// Whole events: looked at, and passed on, without what the gateway asked for when
    /// `strip`.
    fn pass(&mut self, events: Bytes) -> Bytes {
        if !self.strip {
            for event in split_events(&events) {
                self.look(event);
            }
            return events;
        }
        let mut out = BytesMut::with_capacity(events.len());
        for event in split_events(&events) {
            match self.look(event) {
                Seen::Counts { only: true } => {} // the usage chunk the client did not ask for
                Seen::Null(r) => {
                    out.extend_from_slice(&event[..r.start]);
                    out.extend_from_slice(&event[r.end..]);
                }
                Seen::Nothing | Seen::Counts { only: false } => out.extend_from_slice(event),
            }
        }
        out.freeze()
    }

    /// Records usage from an event.
    fn look(&mut self, event: &[u8]) -> Seen {
        let Some((offset, data)) = event_data(event) else {
            return Seen::Nothing;
        };
        let Some((key, value)) = usage_value(data) else {
            return Seen::Nothing;
        };
        if value.starts_with(b"null") {
            let key = offset + key;
            let end = offset + (data.len() - value.len()) + b"null".len();
            return if event[..key].ends_with(b",") {
                Seen::Null(key - 1..end)
            } else if event[end..].starts_with(b",") {
                Seen::Null(key..end + 1)
            } else {
                Seen::Nothing
            };
        }
        let Some(found) = counts(value) else {
            return Seen::Nothing;
        };
        self.usage = Some(found);
        Seen::Counts {
            only: memfind(data, b"\"choices\":[]").is_some(),
        }
    }
}

/// Byte offset just past the last complete event (`\n\n`) in `buf`. Found through its
/// newlines: the JSON of an event has none, so this is one vector scan, where comparing
/// every pair of bytes was half of all the work a streamed answer cost the gateway.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut to = buf.len();
    while let Some(i) = memchr::memrchr(b'\n', &buf[..to]) {
        if i > 0 && buf[i - 1] == b'\n' {
            return Some(i + 1);
        }
        to = i;
    }
    None
}

/// Byte offset just past the first `\n\n` in `buf`.
fn first_event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let at = from + i;
        if buf.get(at + 1) == Some(&b'\n') {
            return Some(at + 2);
        }
        from = at + 1;
    }
    None
}

/// Whole events, each with its trailing blank line.
fn split_events(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = first_event_end(rest).unwrap_or(rest.len());
        let (event, tail) = rest.split_at(end);
        rest = tail;
        Some(event)
    })
}

/// The `data:` payload of a one-line event (the shape Azure and OpenAI send), and where in the
/// event it starts.
fn event_data(event: &[u8]) -> Option<(usize, &[u8])> {
    // The Responses API names each event in a line of its own before its data.
    let named = match event.strip_prefix(b"event:") {
        Some(_) => event.get(memchr::memchr(b'\n', event)? + 1..)?,
        None => event,
    };
    let line = named.strip_prefix(b"data:")?;
    let line = line.strip_prefix(b" ").unwrap_or(line);
    let offset = event.len() - line.len();
    Some((offset, line.strip_suffix(b"\n\n").unwrap_or(line)))
}

/// The `usage` object in a JSON text, if one is there and not null.
fn usage_in(json: &[u8]) -> Option<Usage> {
    counts(usage_value(json)?.1)
}

/// The last `"usage"` key in a JSON text: where it starts, and the text from its value on.
fn usage_value(json: &[u8]) -> Option<(usize, &[u8])> {
    let at = last_usage_key(json)?;
    let rest = &json[at + b"\"usage\"".len()..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = rest[colon..].strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    Some((at, &rest[start..]))
}

/// The counts of the usage object `value` starts with; `None` for any other value, or one
/// that counts nothing.
fn counts(value: &[u8]) -> Option<Usage> {
    if !value.starts_with(b"{") {
        return None;
    }
    let u = usage_object(value)?;
    (u.total_tokens > 0 || u.prompt_tokens > 0).then_some(Usage {
        total_tokens: u.total_tokens.max(u.prompt_tokens + u.completion_tokens),
        ..u
    })
}

/// The counts from the JSON object `obj` starts with: the totals at its top level, cached and
/// reasoning tokens from its `*_details` objects; `None` if the object is cut off. A scan
/// rather than a serde parse: this runs on every response, and the generic parse cost several
/// times more.
fn usage_object(obj: &[u8]) -> Option<Usage> {
    let mut u = Usage::default();
    // The audio tokens of the first two details objects that have them (prompt, completion).
    let mut audio = [0u64; 2];
    let mut audio_slots = 0;
    let mut depth = 0usize;
    // After `{` or `,`: the next string is a key.
    let mut key_next = false;
    // The last key at the top level: the details object being read, at depth 2.
    let mut parent: &[u8] = b"";
    let mut i = 0;
    while i < obj.len() {
        match obj[i] {
            b'"' => {
                let start = i + 1;
                let mut j = start;
                loop {
                    j += memchr::memchr2(b'"', b'\\', obj.get(j..)?)?;
                    if obj[j] == b'"' {
                        break;
                    }
                    j += 2; // an escaped character
                }
                i = j + 1;
                if key_next && (depth == 1 || depth == 2) {
                    key_next = false;
                    let key = &obj[start..j];
                    let slot = match (depth, key) {
                        (1, b"prompt_tokens" | b"input_tokens") => &mut u.prompt_tokens,
                        (1, b"completion_tokens" | b"output_tokens") => &mut u.completion_tokens,
                        (1, b"total_tokens") => &mut u.total_tokens,
                        (2, b"cached_tokens")
                            if matches!(
                                parent,
                                b"prompt_tokens_details"
                                    | b"input_tokens_details"
                                    | b"input_token_details"
                            ) =>
                        {
                            &mut u.cached_tokens
                        }
                        (2, b"reasoning_tokens")
                            if matches!(
                                parent,
                                b"completion_tokens_details" | b"output_tokens_details"
                            ) =>
                        {
                            &mut u.reasoning_tokens
                        }
                        // Prompt and completion audio add up: two slots would be one kind.
                        (2, b"audio_tokens") if is_details(parent) => {
                            audio_slots += 1;
                            if audio_slots == 1 {
                                &mut audio[0]
                            } else {
                                &mut audio[1]
                            }
                        }
                        (1, _) => {
                            parent = key;
                            continue;
                        }
                        _ => continue,
                    };
                    while i < obj.len() && (obj[i].is_ascii_whitespace() || obj[i] == b':') {
                        i += 1;
                    }
                    let mut n: u64 = 0;
                    while let Some(d) = obj.get(i).filter(|b| b.is_ascii_digit()) {
                        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                        i += 1;
                    }
                    *slot = n;
                }
                continue;
            }
            b'{' => {
                depth += 1;
                key_next = true;
            }
            b'[' => {
                depth += 1;
                key_next = false;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    u.audio_tokens = audio[0].saturating_add(audio[1]);
                    return Some(u);
                }
            }
            // Inside an array, commas separate values, not keys; a key only follows within an
            // object, which at depths 1 and 2 of a usage object is all there is.
            b',' => key_next = true,
            _ => {}
        }
        i += 1;
    }
    None
}

/// A usage object's `*_details` objects, where token kinds are broken down: chat's
/// `prompt_tokens_details` / `completion_tokens_details`, the Responses API's
/// `input_tokens_details` / `output_tokens_details`, audio transcription's and Realtime's
/// `input_token_details` / `output_token_details`.
fn is_details(key: &[u8]) -> bool {
    matches!(
        key,
        b"prompt_tokens_details"
            | b"completion_tokens_details"
            | b"input_tokens_details"
            | b"output_tokens_details"
            | b"input_token_details"
            | b"output_token_details"
    )
}

// memchr's searches: comparing a window at every position cost more than the rest of reading
// a response's usage.
fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Where the last `"usage"` is: found from the end through its `g`, the rarest of its letters
/// in these answers (the content filter's keys and values have none), with one vector scan per
/// `g`. `usage` closes an answer, so the search nearly always stops in its last few hundred
/// bytes. A substring searcher, forward or reverse, cost more than twice as much here: JSON is
/// full of the `"` it pairs with a letter as its prefilter. It still takes over after many `g`s
/// without the key, so a body of them costs one linear pass, not one scan per `g`.
fn last_usage_key(hay: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    const G: usize = 4;
    let mut end = hay.len();
    for _ in 0..64 {
        let g = memchr::memrchr(b'g', &hay[..end])?;
        if let Some(start) = g.checked_sub(G)
            && hay[start..].starts_with(KEY)
        {
            return Some(start);
        }
        end = g;
    }
    // A key whose `g` is before `end` ends by `end + 2`.
    memchr::memmem::rfind(&hay[..(end + KEY.len() - G - 1).min(hay.len())], KEY)
}

/// Asks for the final usage chunk on a streamed chat request that did not, so token limits can
/// be settled on real counts. Returns the rewritten body, or `None` when nothing needs to change
/// (not a stream, not JSON, or the client asked already).
pub fn request_usage_chunk(body: &[u8]) -> Option<Bytes> {
    /// The two fields that matter, the rest skipped unread: a fraction of a whole parse.
    #[derive(Deserialize)]
    struct Fields {
        stream: Option<bool>,
        #[serde(default, deserialize_with = "present")]
        stream_options: bool,
    }
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| true)
    }
    match serde_json::from_slice::<Fields>(body) {
        Ok(f) if f.stream != Some(true) => None,
        Ok(Fields {
            stream_options: false,
            ..
        }) => {
            // Added before the closing brace; the client's own bytes are passed on as sent.
            let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
            if body[close] != b'}' {
                return usage_chunk_by_value(body);
            }
            let mut out = Vec::with_capacity(body.len() + 40);
            out.extend_from_slice(&body[..close]);
            out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
            out.extend_from_slice(&body[close..]);
            Some(out.into())
        }
        // Options of its own, or what the typed read refuses (a repeated key, an array): the
        // whole parse decides.
        _ => usage_chunk_by_value(body),
    }
}

/// [`request_usage_chunk`] through a whole parse, for the bodies its typed read cannot settle
/// (`stream_options` of the client's own, repeated keys, anything but an object).
fn usage_chunk_by_value(body: &[u8]) -> Option<Bytes> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    if obj.get("stream").and_then(|s| s.as_bool()) != Some(true) {
        return None;
    }
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    let opts = opts.as_object_mut()?;
    if opts.get("include_usage").and_then(|s| s.as_bool()) == Some(true) {
        return None;
    }
    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

#[cfg(test)]
mod tests;
