//! Token usage read from responses as they stream past, without buffering what the client gets:
//! the `usage` object of a JSON answer (found in a bounded tail of the body) or of an event
//! stream's final usage chunk. When the gateway asked for that chunk on the client's behalf
//! (`stream_options.include_usage`), it is taken out again, with the `"usage":null` it makes
//! every other chunk carry, so the client sees exactly the stream it asked for.

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
                                b"prompt_tokens_details" | b"input_tokens_details"
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
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"\",\"choices\":[],\"prompt_filter_results\":[]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n"
    );

    fn run(tap: &mut Tap, chunks: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(c)));
        }
        let (rest, usage) = tap.finish();
        out.extend_from_slice(&rest);
        (out, usage)
    }

    fn want() -> Option<Usage> {
        Some(Usage {
            prompt_tokens: 9,
            completion_tokens: 2,
            total_tokens: 11,
            ..Usage::default()
        })
    }

    #[test]
    fn reads_usage_from_a_stream_and_passes_it_through_untouched() {
        let events: Vec<&[u8]> = split_events(STREAM.as_bytes()).collect();
        let mut tap = Tap::new(Some("text/event-stream; charset=utf-8"), false).unwrap();
        let (out, usage) = run(&mut tap, &events);
        assert_eq!(out, STREAM.as_bytes());
        assert_eq!(usage, want());
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let bytes = STREAM.as_bytes();
        for cut in [1, 7, 33, 100, bytes.len() - 3] {
            for strip in [false, true] {
                let mut tap = Tap::new(Some("text/event-stream"), strip).unwrap();
                let (out, usage) = run(&mut tap, &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(usage, want(), "cut at {cut}");
                if !strip {
                    assert_eq!(out, bytes);
                }
            }
        }
    }

    #[test]
    fn strips_the_usage_it_asked_for() {
        let mut tap = Tap::new(Some("text/event-stream"), true).unwrap();
        let (out, usage) = run(&mut tap, &[STREAM.as_bytes()]);
        assert_eq!(usage, want());
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("usage"), "{text}");
        assert!(text.contains("\"content\":\"hi\""));
        assert!(
            text.starts_with("data: {\"id\":\"\",\"choices\":[],\"prompt_filter_results\""),
            "Azure's filter event stays"
        );
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(text.matches("\n\n").count(), 4);
    }

    #[test]
    fn the_stripped_stream_is_the_same_however_it_is_cut() {
        let stream = concat!(
            "data: {\"usage\":null,\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            "data:{\"id\":\"b\",\"choices\":[{\"delta\":{\"content\":\"y\"}}],\"usage\": null}\n\n",
            "data: {\"id\":\"c\",\"usage\":null}\n\n",
            "data: {\"id\":\"d\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
            "data: [DONE]\n\n"
        );
        let stripped = concat!(
            "data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            "data:{\"id\":\"b\",\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\n",
            "data: {\"id\":\"c\"}\n\n",
            "data: [DONE]\n\n"
        );
        for step in [1, 2, 7, 64, stream.len()] {
            let pieces: Vec<&[u8]> = stream.as_bytes().chunks(step).collect();
            let mut tap = Tap::new(Some("text/event-stream"), true).unwrap();
            let (out, usage) = run(&mut tap, &pieces);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                stripped,
                "pieces of {step}"
            );
            assert_eq!(usage, want());
            // Not stripping, the same pieces pass on as they came.
            let mut tap = Tap::new(Some("text/event-stream"), false).unwrap();
            let (out, usage) = run(&mut tap, &pieces);
            assert_eq!(String::from_utf8(out).unwrap(), stream, "pieces of {step}");
            assert_eq!(usage, want());
        }
    }

    #[test]
    fn reads_usage_from_json_bodies_of_any_size() {
        let mut big = String::from("{\"object\":\"list\",\"data\":[");
        for i in 0..20_000 {
            big.push_str(&format!("{{\"embedding\":[0.1,0.2],\"index\":{i}}},"));
        }
        big.push_str("{}],\"usage\":{\"prompt_tokens\":9,\"total_tokens\":9}}");
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        let chunks: Vec<&[u8]> = big.as_bytes().chunks(1000).collect();
        let (out, usage) = run(&mut tap, &chunks);
        assert_eq!(out.len(), big.len());
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 0,
                total_tokens: 9,
                ..Usage::default()
            })
        );
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        assert_eq!(run(&mut tap, &[b"{\"error\":{}}"]).1, None);
        assert!(Tap::new(Some("audio/mpeg"), false).is_none());
    }

    #[test]
    fn asks_for_usage_only_on_streams_that_did_not() {
        let b = request_usage_chunk(br#"{"stream":true,"messages":[]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(
            request_usage_chunk(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        assert!(request_usage_chunk(br#"{"messages":[]}"#).is_none());
        assert!(request_usage_chunk(b"not json").is_none());
        // The client's bytes stay as sent, the option added before the closing brace.
        let b = request_usage_chunk(b"{\"stream\": true, \"n\": 1.50}\n").unwrap();
        assert_eq!(
            &b[..],
            b"{\"stream\": true, \"n\": 1.50,\"stream_options\":{\"include_usage\":true}}\n"
        );
        // Options of the client's own keep theirs.
        let b = request_usage_chunk(br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        for unchanged in [
            &br#"{"stream":true,"stream_options":null}"#[..],
            br#"{"stream":"true"}"#,
            br#"{"stream":false}"#,
            br#"[true]"#,
            br#"{"stream":true} {}"#,
            br#"{"stream":true"#,
        ] {
            assert!(
                request_usage_chunk(unchanged).is_none(),
                "{}",
                String::from_utf8_lossy(unchanged)
            );
        }
        // A repeated key: the last one counts, as in a whole parse.
        assert!(request_usage_chunk(br#"{"stream":false,"stream":true}"#).is_some());
        assert!(request_usage_chunk(br#"{"stream":true,"stream":false}"#).is_none());
    }

    #[test]
    fn reads_responses_usage_from_bodies_and_named_events() {
        let body = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":1200,
            "input_tokens_details":{"cached_tokens":1024},"output_tokens":20,
            "output_tokens_details":{"reasoning_tokens":4},"total_tokens":1220},"user":null,"metadata":{}}"#;
        let want = Some(Usage {
            prompt_tokens: 1200,
            completion_tokens: 20,
            total_tokens: 1220,
            cached_tokens: 1024,
            reasoning_tokens: 4,
        });
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        assert_eq!(run(&mut tap, &[body]).1, want);
        let body = std::str::from_utf8(body).unwrap().replace('\n', "");
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"usage\":null}}}}\n\n\
             event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{body}}}\n\n"
        );
        let mut tap = Tap::new(Some("text/event-stream"), false).unwrap();
        let (out, usage) = run(&mut tap, &[stream.as_bytes()]);
        assert_eq!(out, stream.as_bytes());
        assert_eq!(usage, want);
    }

    #[test]
    fn the_usage_scan_reads_top_level_counts_only() {
        let u = |s: &str| usage_in(s.as_bytes());
        let full = r#"{"x":"a \"usage\": {","usage" : {"completion_tokens":8,
            "completion_tokens_details":{"reasoning_tokens":3,"total_tokens":99},
            "prompt_tokens": 10 ,"note":"total_tokens\\","prompt_tokens_details":{"cached_tokens":0},
            "total_tokens":18}}"#;
        assert_eq!(
            u(full),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 8,
                total_tokens: 18,
                cached_tokens: 0,
                reasoning_tokens: 3,
            })
        );
        // Embeddings: no completion count; the total is made up when missing.
        assert_eq!(
            u(r#"{"usage":{"prompt_tokens":5}}"#),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 0,
                total_tokens: 5,
                ..Usage::default()
            })
        );
        assert_eq!(u(r#"{"usage":null}"#), None);
        assert_eq!(u(r#"{"usage":{"prompt_tokens":0,"total_tokens":0}}"#), None);
        assert_eq!(u(r#"{"usage":{"prompt_tokens":7,"total_"#), None, "cut off");
        assert_eq!(
            u(r#"{"usage":{"prompt_tokens":7,"x":"}"#),
            None,
            "cut in a string"
        );
    }
}

#[cfg(test)]
mod search_tests {
    use super::{first_event_end, last_event_end, last_usage_key, memfind};

    #[test]
    fn searches_agree_with_the_naive_ones() {
        let naive = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
        let naive_r = |h: &[u8], n: &[u8]| h.windows(n.len()).rposition(|w| w == n);
        let hays: [&[u8]; 7] = [
            b"",
            b"\"",
            b"\"usage\"",
            b"{\"usage\":1,\"usage\":2}",
            b"\"usag\"usage\"\"usage",
            b"xx\"usage\"",
            b"\"usage\"xx",
        ];
        for h in hays {
            for n in [&b"\"usage\""[..], b"\"", b"x", b"\"usage\":null,"] {
                assert_eq!(memfind(h, n), naive(h, n), "{h:?} {n:?}");
            }
            assert_eq!(last_usage_key(h), naive_r(h, b"\"usage\""), "{h:?}");
        }
    }

    #[test]
    fn event_ends_agree_with_the_pairwise_search() {
        let first = |h: &[u8]| h.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
        let last = |h: &[u8]| h.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
        // Every string of up to 10 bytes of `\n` and `x`: runs of newlines of every length,
        // at the start, the end and in between.
        for len in 0..=10 {
            for bits in 0u32..1 << len {
                let h: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'\n' } else { b'x' })
                    .collect();
                assert_eq!(first_event_end(&h), first(&h), "{h:?}");
                assert_eq!(last_event_end(&h), last(&h), "{h:?}");
            }
        }
    }

    #[test]
    fn the_last_key_is_found_among_many_gs() {
        let naive_r = |h: &[u8]| h.windows(7).rposition(|w| w == b"\"usage\"");
        for gs in [0, 1, 63, 64, 65, 200] {
            for at in [0, 1, gs / 2, gs].into_iter().filter(|a| *a <= gs) {
                let mut h = vec![b'g'; gs];
                h.splice(at..at, b"\"usage\"".iter().copied());
                assert_eq!(last_usage_key(&h), naive_r(&h), "{gs} g, key at {at}");
                h.extend_from_slice(b"\"usage");
                assert_eq!(
                    last_usage_key(&h),
                    naive_r(&h),
                    "{gs} g, key at {at}, cut one"
                );
            }
            assert_eq!(last_usage_key(&vec![b'g'; gs]), None);
        }
    }

    #[test]
    fn the_last_key_is_found_wherever_it_is_against_the_tail() {
        let naive_r = |h: &[u8]| h.windows(7).rposition(|w| w == b"\"usage\"");
        // The key before the tail, across its start, inside it, and twice, in bodies around
        // the tail's size.
        for len in [500, 511, 512, 513, 600, 2000] {
            for at in (0..len - 7).filter(|a| a % 97 == 0 || len - a < 530) {
                let mut h = vec![b'x'; len];
                h[at..at + 7].copy_from_slice(b"\"usage\"");
                assert_eq!(last_usage_key(&h), naive_r(&h), "len {len} at {at}");
                if at >= 20 {
                    h[3..10].copy_from_slice(b"\"usage\"");
                    assert_eq!(last_usage_key(&h), naive_r(&h), "len {len} at {at}, twice");
                }
            }
        }
    }
}

#[cfg(test)]
mod json_tail_tests {
    use super::*;

    #[test]
    fn usage_at_the_end_of_a_long_body_in_many_chunks_is_found() {
        let mut body = br#"{"data":["#.to_vec();
        body.extend(std::iter::repeat_n(b'7', 300 * 1024));
        body.extend_from_slice(br#"],"usage":{"prompt_tokens":12,"total_tokens":12}}"#);
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        let mut out = Vec::new();
        // Chunks of 1,000 bytes: the usage object is cut in two.
        for piece in body.chunks(1000) {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
        }
        assert_eq!(out, body, "the client gets the body unchanged");
        let Tap::Json { chunks, len } = &tap else {
            panic!("a JSON tap")
        };
        assert!(*len >= JSON_TAIL && *len < JSON_TAIL + 1000, "{len}");
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), *len);
        let (_, usage) = tap.finish();
        assert_eq!(usage.map(|u| u.prompt_tokens), Some(12));
    }
}
