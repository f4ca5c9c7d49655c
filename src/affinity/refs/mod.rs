//! Which stored objects a request names (in its path, its JSON body or its multipart form), and
//! which objects an answer made known. Pure functions of bytes; no I/O.

use std::borrow::Cow;
use std::sync::LazyLock;

use serde_json::Value;

/// Collections whose next path segment is an object's id, after `/openai/`, `/openai/v1/` or
/// `/openai/deployments/{name}/`, by their first letter (this runs for every request: most
/// paths are turned down on one byte). Two-segment collections are written with their slash.
fn collections(first: u8) -> &'static [&'static str] {
    match first {
        b'r' => &["responses"],
        b'c' => &["chat/completions", "conversations", "containers"],
        b'f' => &["files", "fine_tuning/jobs"],
        b'u' => &["uploads"],
        b'b' => &["batches"],
        b'v' => &["vector_stores"],
        b'a' => &["assistants"],
        b't' => &["threads"],
        b'e' => &["evals"],
        _ => &[],
    }
}

/// Body fields that hold one object's id.
const ONE: [&str; 9] = [
    "previous_response_id",
    "conversation",
    "input_file_id",
    "training_file",
    "validation_file",
    "file_id",
    "assistant_id",
    "thread_id",
    "container",
];
/// Body fields that hold a list of ids.
const MANY: [&str; 2] = ["file_ids", "vector_store_ids"];

/// How deep a body's JSON is searched; a client's documents are far shallower.
const MAX_DEPTH: usize = 32;

/// Where a path points, among the stateful families.
#[derive(Debug, PartialEq, Eq)]
pub struct PathObject<'a> {
    /// The collection (`files`, `fine_tuning/jobs`, ...).
    pub collection: &'static str,
    /// The id of the top-level object the path is about (a thread for
    /// `threads/{id}/runs/{run}`), if it names one; percent-encoding decoded, as the backend
    /// will read it.
    pub id: Option<Cow<'a, str>>,
    /// Whether the path is the object itself (`files/{id}`), not something under it.
    pub exact: bool,
}

/// The stateful family a (backend-bound) path belongs to, and the object it names. The query
/// string is ignored.
pub fn path_object(path: &str) -> Option<PathObject<'_>> {
    let path = &path[..memchr::memchr(b'?', path.as_bytes()).unwrap_or(path.len())];
    let rest = path.strip_prefix("/openai/")?;
    let rest = match rest.strip_prefix("deployments/") {
        Some(r) => &r[memchr::memchr(b'/', r.as_bytes())? + 1..],
        None => rest.strip_prefix("v1/").unwrap_or(rest),
    };
    let candidates = collections(*rest.as_bytes().first()?);
    let rest = rest.trim_end_matches('/');
    for &collection in candidates {
        let Some(after) = rest.strip_prefix(collection) else {
            continue;
        };
        if after.is_empty() {
            return Some(PathObject {
                collection,
                id: None,
                exact: false,
            });
        }
        let Some(after) = after.strip_prefix('/') else {
            continue;
        };
        let (id, tail) = after.split_once('/').unwrap_or((after, ""));
        return Some(PathObject {
            collection,
            id: (!id.is_empty()).then(|| percent_decoded(id)),
            exact: tail.is_empty(),
        });
    }
    None
}

/// `%XX` decoded, so `/files/%66ile-1` is known as `file-1`, the object the backend will look
/// up; left as it is when it does not decode to UTF-8.
fn percent_decoded(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_or(Cow::Borrowed(s), Cow::Owned)
}

/// The list endpoints answered with every backend's objects, merged.
const LISTED: [&str; 5] = [
    "files",
    "batches",
    "vector_stores",
    "assistants",
    "fine_tuning/jobs",
];

impl PathObject<'_> {
    /// A `GET` of this path lists the collection (`GET /openai/files`).
    pub fn is_list(&self) -> bool {
        self.id.is_none() && LISTED.contains(&self.collection)
    }
}

/// One page of a merged list, as the client asked for it in `query`: every backend's objects
/// in one order (newest first, or oldest with `order=asc`; by `created_at`, then id), the
/// ones after the `after` id, `limit` of them (default 20; files 10,000, as the API's own).
pub fn merge_page(collection: &str, query: &str, mut items: Vec<Value>) -> Value {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let default_limit = if collection == "files" { 10_000 } else { 20 };
    let limit = param("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(default_limit)
        .clamp(1, 10_000);
    let created = |v: &Value| v.get("created_at").and_then(Value::as_u64).unwrap_or(0);
    let id = |v: &Value| {
        v.get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    items.sort_by(|a, b| created(b).cmp(&created(a)).then_with(|| id(b).cmp(&id(a))));
    if param("order") == Some("asc") {
        items.reverse();
    }
    let start = match param("after") {
        Some(after) => items
            .iter()
            .position(|v| id(v) == after)
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let rest = items.len().saturating_sub(start);
    let data: Vec<Value> = items.into_iter().skip(start).take(limit).collect();
    serde_json::json!({
        "object": "list",
        "first_id": data.first().map(id),
        "last_id": data.last().map(id),
        "has_more": rest > data.len(),
        "data": data,
    })
}

/// Substring searchers, made once: making one costs more than searching a chat body with it.
static CONVERSATION: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"conversation\""));
static CONTAINER: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"container\""));
static STORE: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"store\""));

/// What a request's body names: the objects, and whether the backend is to keep the answer
/// (`"store": true`, how a chat completion becomes a stored object).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub ids: Vec<String>,
    pub stored: bool,
    /// A key some object of the body repeats: the body's meaning is not certain.
    pub repeated: Option<String>,
}

/// A cheap look before a body is parsed (this runs for every request with a body), in one pass
/// over the underscores and backslashes, the only bytes where a match can start: every field
/// read here has `_id"`, `_ids"`, `_file"` or `encrypted_content"` in its name, but for
/// `conversation` and `container`, which only Responses bodies carry (`responses`). Most chat
/// and embeddings bodies have a few underscores and none of these. A key spelled with escapes
/// (`"file\u005fid"`) would hide from the look, so a body escaping an ASCII letter, digit or
/// underscore, which no JSON encoder does of its own accord, is always parsed.
fn may_name_objects(body: &[u8], responses: bool) -> bool {
    for i in memchr::memchr2_iter(b'_', b'\\', body) {
        let after = &body[i..];
        let hit = if after[0] == b'_' {
            after.starts_with(b"_id\"")
                || after.starts_with(b"_ids\"")
                || after.starts_with(b"_file\"")
                || (after.starts_with(b"_content\"") && body[..i].ends_with(b"encrypted"))
        } else {
            escapes_a_name_char(after)
        };
        if hit {
            return true;
        }
    }
    responses && (CONVERSATION.find(body).is_some() || CONTAINER.find(body).is_some())
}

/// `\u00XX` for an ASCII letter, digit or underscore, at the start of `s`.
fn escapes_a_name_char(s: &[u8]) -> bool {
    let hex = |k: usize| s.get(k).and_then(|&c| (c as char).to_digit(16));
    match (s.get(1..4), hex(4), hex(5)) {
        (Some(b"u00"), Some(h), Some(l)) => {
            let c = (h * 16 + l) as u8;
            c.is_ascii_alphanumeric() || c == b'_'
        }
        _ => false,
    }
}

/// The object ids a JSON body names: the fields in [`ONE`] and [`MANY`] at any depth, and the
/// ids of reasoning items carrying `encrypted_content` (only their maker can read them); and,
/// when `chat` (a chat completion, which the backend keeps when asked), whether it asks the
/// backend to keep the answer. `responses`: the request is about Responses or conversations
/// (see [`may_name_objects`]).
pub fn body_refs(body: &[u8], responses: bool, chat: bool) -> Named {
    let names = may_name_objects(body, responses);
    let store = chat && STORE.find(body).is_some();
    if !(names || store) {
        return Named::default();
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Named::default();
    };
    let mut ids = Vec::new();
    if names {
        walk(&v, 0, &mut ids);
    }
    let stored = store && v.get("store").and_then(Value::as_bool) == Some(true);
    // A parsed document keeps the last of a repeated key; a backend may keep the first, and be
    // sent an object the owner check never saw.
    let repeated = repeated_key(body);
    Named {
        ids,
        stored,
        repeated,
    }
}

/// The first key an object of the document repeats, if any (escapes decoded, as a backend
/// decodes them).
fn repeated_key(body: &[u8]) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
    struct Walk(usize);
    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut keys: Vec<String> = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                if keys.contains(&key) {
                    return Err(A::Error::custom(key));
                }
                map.next_value_seed(Walk(self.0 + 1))?;
                keys.push(key);
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Walk(self.0 + 1))?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut d = serde_json::Deserializer::from_slice(body);
    match Walk(0).deserialize(&mut d) {
        // serde_json says where; the key is the message's first word.
        Err(e) if e.is_data() => e.to_string().split(' ').next().map(str::to_string),
        _ => None,
    }
}

/// The object ids a JSON body names (see [`body_refs`]).
pub fn body_ids(body: &[u8], responses: bool) -> Vec<String> {
    body_refs(body, responses, false).ids
}

fn push(out: &mut Vec<String>, id: &str) {
    if !id.is_empty() && id.len() <= 256 && !out.iter().any(|x| x == id) {
        out.push(id.to_string());
    }
}

fn walk(v: &Value, depth: usize, out: &mut Vec<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    match v {
        Value::Object(o) => {
            if o.get("type").and_then(Value::as_str) == Some("reasoning")
                && o.get("encrypted_content").is_some_and(|c| !c.is_null())
                && let Some(id) = o.get("id").and_then(Value::as_str)
            {
                push(out, id);
            }
            for (k, v) in o {
                if ONE.contains(&k.as_str()) {
                    match v {
                        Value::String(s) => push(out, s),
                        // `conversation: {"id": ...}`
                        Value::Object(c) => {
                            if let Some(id) = c.get("id").and_then(Value::as_str) {
                                push(out, id);
                            }
                        }
                        _ => {}
                    }
                } else if MANY.contains(&k.as_str()) {
                    for s in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
                        push(out, s);
                    }
                }
                if v.is_object() || v.is_array() {
                    walk(v, depth + 1, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| walk(i, depth + 1, out)),
        _ => {}
    }
}

/// The object ids a `multipart/form-data` body's text fields name (`file_id`, ...).
pub async fn form_ids(content_type: &str, body: bytes::Bytes) -> Vec<String> {
    let Ok(boundary) = multer::parse_boundary(content_type) else {
        return Vec::new();
    };
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut out = Vec::new();
    while let Ok(Some(field)) = form.next_field().await {
        // `file_ids[]` is how form encoders write a list.
        let name = field.name().unwrap_or("");
        let name = name.strip_suffix("[]").unwrap_or(name);
        if field.file_name().is_some() || !(ONE.contains(&name) || MANY.contains(&name)) {
            continue;
        }
        if let Ok(text) = field.text().await {
            push(&mut out, text.trim());
        }
    }
    out
}

/// The ids an answer's JSON makes known: the object's own `id` (or every listed one's), the
/// files a batch points at, a response's conversation and its reasoning items.
pub fn answer_ids(v: &Value, out: &mut Vec<String>) {
    let Some(o) = v.as_object() else { return };
    if o.get("object").and_then(Value::as_str) == Some("list") {
        for item in o
            .get("data")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            answer_ids(item, out);
        }
        return;
    }
    if let Some(id) = o.get("id").and_then(Value::as_str) {
        push(out, id);
    }
    for k in ["output_file_id", "error_file_id", "input_file_id"] {
        if let Some(id) = o.get(k).and_then(Value::as_str) {
            push(out, id);
        }
    }
    match o.get("conversation") {
        Some(Value::String(s)) => push(out, s),
        Some(Value::Object(c)) => {
            if let Some(id) = c.get("id").and_then(Value::as_str) {
                push(out, id);
            }
        }
        _ => {}
    }
    for item in o
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if item.get("type").and_then(Value::as_str) == Some("reasoning")
            && let Some(id) = item.get("id").and_then(Value::as_str)
        {
            push(out, id);
        }
    }
}

/// The ids one event of a streamed answer makes known: a streamed response's id from
/// `response.created` (so a retrieve or cancel during the stream finds it), reasoning items
/// as they are done, and the whole response at the end; a stored chat completion's id from its
/// first chunk (`out` still empty: the learner's list of what this event taught).
pub fn event_ids(event: &[u8], out: &mut Vec<String>) {
    let data = event
        .split(|b| *b == b'\n')
        .find_map(|line| line.strip_prefix(b"data:"))
        .map(|d| d.strip_prefix(b" ").unwrap_or(d));
    let Some(data) = data else { return };
    let kind_is = |k: &[u8]| memchr::memmem::find(&data[..data.len().min(96)], k).is_some();
    // A stored chat completion's chunks all carry its id: the first one says it.
    if out.is_empty() && memchr::memmem::find(data, b"\"chat.completion.chunk\"").is_some() {
        if let Ok(v) = serde_json::from_slice::<Value>(data)
            && let Some(id) = v.get("id").and_then(Value::as_str)
        {
            push(out, id);
        }
        return;
    }
    if !(kind_is(b"\"response.created\"")
        || kind_is(b"\"response.output_item.done\"")
        || kind_is(b"\"response.completed\""))
    {
        return;
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Some(r) = v.get("response") {
        answer_ids(r, out);
    }
    if let Some(item) = v.get("item")
        && item.get("type").and_then(Value::as_str) == Some("reasoning")
        && let Some(id) = item.get("id").and_then(Value::as_str)
    {
        push(out, id);
    }
}

#[cfg(test)]
mod tests;
