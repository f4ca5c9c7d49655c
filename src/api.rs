//! The client-facing routes: which paths are forwarded and how their path is rewritten.
//! Thin by design; the request handling lives in `pipeline`.

use std::borrow::Cow;

use crate::error::{ErrorKind, GatewayError};

/// A request the gateway will forward.
#[derive(Debug, PartialEq, Eq)]
pub struct Endpoint<'a> {
    /// Path and query the backend receives: the path in its canonical form (see [`canonical`]).
    pub path_and_query: Cow<'a, str>,
    /// Whether a WebSocket upgrade may be tunnelled on this path (the Realtime API).
    pub upgrade_allowed: bool,
    /// Where the deployment named in the path (or the Realtime query) sits in
    /// `path_and_query`, so it can be swapped per backend.
    pub deployment_span: Option<std::ops::Range<usize>>,
    /// The v1 API names the deployment in the JSON body's `model` instead.
    pub model_in_body: bool,
}

impl Endpoint<'_> {
    /// The deployment named in the path (or the Realtime query).
    pub fn deployment(&self) -> Option<&str> {
        self.path_and_query.get(self.deployment_span.clone()?)
    }
}

const DEPLOYMENTS_PREFIX: &str = "/openai/deployments/";

/// Classifies a request path, in its canonical form (see [`canonical`]), which is also what
/// the backend receives:
/// - `/openai/deployments/{deployment}/{operation...}`: Azure's classic surface;
/// - `/openai/realtime` (and `/openai/v1/realtime`): the Realtime API, WebSocket allowed;
/// - any other `/openai/...` (v1 API, files, batches, ...);
/// - `/v1/...` (OpenAI style): sent to the backend as `/openai/v1/...`.
pub fn classify<'a>(path: &'a str, path_and_query: &'a str) -> Result<Endpoint<'a>, GatewayError> {
    if let Cow::Owned(p) = canonical(path)? {
        // Routed again in its canonical form, which is its own (one call site below keeps
        // `classify_canonical` inlined on the usual way through).
        let query = path_and_query.get(path.len()..).unwrap_or("");
        let pq = format!("{p}{query}");
        let r = classify(&pq[..p.len()], &pq)?;
        return Ok(Endpoint {
            path_and_query: Cow::Owned(r.path_and_query.into_owned()),
            ..r
        });
    }
    classify_canonical(path, path_and_query)
}

fn classify_canonical<'a>(
    path: &str,
    path_and_query: &'a str,
) -> Result<Endpoint<'a>, GatewayError> {
    if let Some(rest) = path.strip_prefix(DEPLOYMENTS_PREFIX) {
        let (deployment, operation) = match memchr::memchr(b'/', rest.as_bytes()) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        if deployment.is_empty() || operation.is_empty() {
            return Err(not_found(
                path,
                "expected /openai/deployments/{deployment}/{operation}",
            ));
        }
        if !crate::config::valid_deployment_name(deployment) {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                "invalid deployment name: use 1 to 64 letters, digits, '-', '_' or '.'",
            ));
        }
        let start = DEPLOYMENTS_PREFIX.len();
        return Ok(Endpoint {
            path_and_query: Cow::Borrowed(path_and_query),
            upgrade_allowed: false,
            deployment_span: Some(start..start + deployment.len()),
            model_in_body: false,
        });
    }
    if path == "/openai" || path.starts_with("/openai/") {
        let upgrade_allowed = matches!(path, "/openai/realtime" | "/openai/v1/realtime");
        let deployment_span = if upgrade_allowed {
            realtime_deployment(path_and_query)?
        } else {
            None
        };
        return Ok(Endpoint {
            path_and_query: Cow::Borrowed(path_and_query),
            upgrade_allowed,
            deployment_span,
            model_in_body: path.starts_with("/openai/v1/") && !upgrade_allowed,
        });
    }
    if path == "/v1" || path.starts_with("/v1/") {
        let upgrade_allowed = path == "/v1/realtime";
        let deployment_span = if upgrade_allowed {
            realtime_deployment(path_and_query)?
        } else {
            None
        };
        // The span moves with the `/openai` put in front.
        let deployment_span = deployment_span.map(|r| r.start + 7..r.end + 7);
        return Ok(Endpoint {
            path_and_query: Cow::Owned(format!("/openai{path_and_query}")),
            upgrade_allowed,
            deployment_span,
            model_in_body: !upgrade_allowed,
        });
    }
    Err(not_found(
        path,
        "Switchyard serves the Azure OpenAI API under /openai/... and the OpenAI API under /v1/...",
    ))
}

/// The path segments the API itself defines, in their one spelling: a backend may take
/// `/openai/Deployments/x/Chat/Completions` for `/openai/deployments/x/chat/completions`, so
/// the gateway reads it as that too (to route, limit and count it).
const KNOWN_SEGMENTS: [&str; 38] = [
    "openai",
    "deployments",
    "v1",
    "chat",
    "completions",
    "embeddings",
    "responses",
    "input_items",
    "input_tokens",
    "conversations",
    "items",
    "files",
    "content",
    "uploads",
    "parts",
    "complete",
    "batches",
    "cancel",
    "fine_tuning",
    "jobs",
    "checkpoints",
    "events",
    "vector_stores",
    "file_batches",
    "assistants",
    "threads",
    "messages",
    "runs",
    "steps",
    "audio",
    "transcriptions",
    "translations",
    "speech",
    "images",
    "generations",
    "edits",
    "models",
    "realtime",
];

/// Bytes that may make a path other than canonical: `/` only when another follows it or it
/// ends the path.
static SUSPECT: [bool; 256] = {
    let mut t = [false; 256];
    t[b'%' as usize] = true;
    t[b'\\' as usize] = true;
    t[b'.' as usize] = true;
    t[b'/' as usize] = true;
    let mut c = b'A';
    while c <= b'Z' {
        t[c as usize] = true;
        c += 1;
    }
    t
};

/// The path as the gateway routes it and the backend receives it: no empty segments, the
/// API's own segments in their canonical case, percent-encoded unreserved characters
/// (letters, digits, `-`, `.`, `_`, `~`) decoded. A path whose meaning is not certain is a
/// 400: a raw `\`, an encoded `/`, `\` or control character, a `.` or `..` segment however
/// spelled. Borrowed when the path is canonical already, as an SDK's always is.
pub fn canonical(path: &str) -> Result<Cow<'_, str>, GatewayError> {
    // One pass over the bytes, a table read each: most paths hold nothing that could make
    // them other than canonical (a `%`, a `\`, an upper-case letter, a dot, two slashes in a
    // row, a trailing slash).
    let b = path.as_bytes();
    let plain = b.iter().enumerate().all(|(i, &c)| {
        !SUSPECT[usize::from(c)] || (c == b'/' && i + 1 < b.len() && b[i + 1] != b'/')
    });
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    if path.contains('\\') {
        return Err(GatewayError::new(
            ErrorKind::BadRequest,
            "the path may not contain '\\': servers differ on what it means",
        ));
    }
    let mut segments: Vec<Cow<'_, str>> = Vec::new();
    for raw in path.split('/').filter(|s| !s.is_empty()) {
        let seg = decode_unreserved(raw)?;
        if seg == "." || seg == ".." {
            return Err(GatewayError::new(
                ErrorKind::BadRequest,
                "path segments '.' and '..' are not allowed, however encoded",
            ));
        }
        segments.push(seg);
    }
    for i in 0..segments.len() {
        // A deployment's name (or a model's) is the user's own, case and all.
        let named = i > 0
            && (segments[i - 1] == "models"
                || (i == 2 && segments[0] == "openai" && segments[1] == "deployments"));
        if named {
            continue;
        }
        if let Some(known) = KNOWN_SEGMENTS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(&segments[i]))
        {
            segments[i] = Cow::Borrowed(known);
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// One segment with its percent-encoded unreserved characters decoded. An encoded `/`, `\` or
/// control character is refused: a backend, or a proxy in front of it, that decodes the path
/// would see other segments (or a cut line) than the gateway routed on. Other encodings stay
/// as they came.
fn decode_unreserved(seg: &str) -> Result<Cow<'_, str>, GatewayError> {
    if !seg.contains('%') {
        return Ok(Cow::Borrowed(seg));
    }
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        let decoded = match (b[i], b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h << 4) | l),
            _ => None,
        };
        if let Some(v) = decoded {
            if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                return Err(GatewayError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "the path may not contain {}: encoded separators and control characters are refused",
                        &seg[i..i + 3]
                    ),
                ));
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(v));
            } else {
                out.push_str(&seg[i..i + 3]);
            }
            i += 3;
            continue;
        }
        // Not an encoding: copied as it is, a whole character at a time.
        let len = seg[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&seg[i..i + len]);
        i += len;
    }
    Ok(Cow::Owned(out))
}

/// The Realtime API names its deployment in the query (`deployment=` on Azure's preview path,
/// `model=` on the v1 path): routed through `[[deployments]]` like any other, and renamed per
/// backend in place. Named twice, or differently by the two keys, it is a 400: the gateway
/// and the backend could each take another.
fn realtime_deployment(
    path_and_query: &str,
) -> Result<Option<std::ops::Range<usize>>, GatewayError> {
    let Some(q) = path_and_query.find('?') else {
        return Ok(None);
    };
    let ambiguous = || {
        GatewayError::new(
            ErrorKind::BadRequest,
            "the query names the deployment more than once: its meaning is not certain",
        )
    };
    let mut at = q + 1;
    let mut by_deployment: Option<(&str, std::ops::Range<usize>)> = None;
    let mut by_model: Option<(&str, std::ops::Range<usize>)> = None;
    for pair in path_and_query[q + 1..].split('&') {
        let slot = match pair.split_once('=') {
            Some(("deployment", v)) => Some((&mut by_deployment, v)),
            Some(("model", v)) => Some((&mut by_model, v)),
            _ => None,
        };
        if let Some((slot, value)) = slot {
            if slot.is_some() {
                return Err(ambiguous());
            }
            let start = at + (pair.len() - value.len());
            *slot = Some((value, start..start + value.len()));
        }
        at += pair.len() + 1;
    }
    if let (Some((d, _)), Some((m, _))) = (&by_deployment, &by_model)
        && d != m
    {
        return Err(ambiguous());
    }
    match by_deployment.or(by_model) {
        Some((name, _)) if !crate::config::valid_deployment_name(name) => Err(GatewayError::new(
            ErrorKind::BadRequest,
            "invalid deployment name: use 1 to 64 letters, digits, '-', '_' or '.'",
        )),
        Some((_, span)) => Ok(Some(span)),
        None => Ok(None),
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn not_found(path: &str, hint: &str) -> GatewayError {
    // The path is the client's own input; cap it so an error body stays small.
    let shown: String = path.chars().take(200).collect();
    GatewayError::new(ErrorKind::NotFound, format!("no route for {shown}: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> Endpoint<'_> {
        let path = p.split('?').next().unwrap();
        classify(path, p).unwrap()
    }

    #[test]
    fn classic_paths_forward_verbatim() {
        let r = ok("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21");
        assert_eq!(
            r.path_and_query,
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(r.deployment(), Some("gpt-4o"));
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-4o"
        );
        assert!(!r.upgrade_allowed);
        assert_eq!(
            ok("/openai/deployments/w/audio/transcriptions").deployment(),
            Some("w")
        );
    }

    #[test]
    fn v1_and_other_openai_paths() {
        assert_eq!(
            ok("/v1/chat/completions").path_and_query,
            "/openai/v1/chat/completions"
        );
        assert_eq!(
            ok("/openai/v1/embeddings").path_and_query,
            "/openai/v1/embeddings"
        );
        assert_eq!(
            ok("/openai/files?api-version=x").path_and_query,
            "/openai/files?api-version=x"
        );
        assert!(
            ok("/openai/realtime?api-version=2024-10-01-preview&deployment=rt").upgrade_allowed
        );
    }

    #[test]
    fn realtime_names_its_deployment_in_the_query() {
        let r = ok("/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-rt");
        assert_eq!(r.deployment(), Some("gpt-rt"));
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-rt"
        );
        assert!(!r.model_in_body);
        let r = ok("/v1/realtime?model=gpt-rt");
        assert_eq!(r.path_and_query, "/openai/v1/realtime?model=gpt-rt");
        assert_eq!(
            &r.path_and_query[r.deployment_span.clone().unwrap()],
            "gpt-rt"
        );
        assert_eq!(ok("/openai/realtime?api-version=x").deployment(), None);
        let bad = "/openai/realtime?deployment=a;b";
        assert_eq!(
            classify("/openai/realtime", bad).unwrap_err().kind,
            ErrorKind::BadRequest
        );
    }

    #[test]
    fn everything_else_is_404() {
        for p in [
            "/",
            "/admin",
            "/openai/deployments/x",
            "/openai/deployments//chat",
            "/v2/chat",
        ] {
            let e = classify(p, p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound, "{p}");
        }
    }

    #[test]
    fn paths_are_read_in_their_canonical_form_and_forwarded_so() {
        for (sent, canonical, deployment) in [
            (
                "/openai/Deployments/x/chat/completions",
                "/openai/deployments/x/chat/completions",
                Some("x"),
            ),
            (
                "/openai/%64eployments/x/chat/completions",
                "/openai/deployments/x/chat/completions",
                Some("x"),
            ),
            (
                "/openai//deployments/x/chat/completions",
                "/openai/deployments/x/chat/completions",
                Some("x"),
            ),
            (
                "//OpenAI/DEPLOYMENTS//My-GPT//Chat/Completions/",
                "/openai/deployments/My-GPT/chat/completions",
                Some("My-GPT"),
            ),
            (
                "/openai/deployments/gpt%2D4o/chat/completions",
                "/openai/deployments/gpt-4o/chat/completions",
                Some("gpt-4o"),
            ),
            ("/openai/V1/Files", "/openai/v1/files", None),
            ("/openai/files/", "/openai/files", None),
            // Azure's own list of deployments, whichever way it is written.
            ("/openai/deployments/", "/openai/deployments", None),
            ("/openai//v1/responses", "/openai/v1/responses", None),
            ("/V1/chat/completions", "/openai/v1/chat/completions", None),
            // A model's name keeps its case; an id is not an API word.
            ("/v1/Models/Chat", "/openai/v1/models/Chat", None),
            (
                "/openai/files/File-ABC/Content",
                "/openai/files/File-ABC/content",
                None,
            ),
            // Other encodings stay as they came.
            ("/openai/files/a%20b", "/openai/files/a%20b", None),
        ] {
            let r = classify(sent, sent).unwrap_or_else(|e| panic!("{sent}: {e}"));
            assert_eq!(r.path_and_query, canonical, "{sent}");
            assert_eq!(r.deployment(), deployment, "{sent}");
            // The canonical form is its own.
            assert!(
                matches!(canonical_path(canonical), Cow::Borrowed(_)),
                "{canonical}"
            );
        }
        // The query is kept as it came, after the canonical path.
        let r = classify(
            "/openai//Deployments/x/embeddings",
            "/openai//Deployments/x/embeddings?api-version=A%2F",
        )
        .unwrap();
        assert_eq!(
            r.path_and_query,
            "/openai/deployments/x/embeddings?api-version=A%2F"
        );
        assert_eq!(r.deployment(), Some("x"));
        // A path an SDK sends is borrowed, not copied.
        let sdk = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
        assert!(matches!(
            classify(sdk.split('?').next().unwrap(), sdk)
                .unwrap()
                .path_and_query,
            Cow::Borrowed(_)
        ));
    }

    fn canonical_path(p: &str) -> Cow<'_, str> {
        canonical(p).unwrap()
    }

    #[test]
    fn paths_whose_meaning_is_not_certain_are_400() {
        for p in [
            "/openai/deployments/allowed/chat\\..\\..\\secret\\chat\\completions",
            "/openai\\deployments/x/chat/completions",
            "/openai/deployments/../x/y",
            "/openai/%2e%2e/admin",
            "/openai/%2E./admin",
            "/openai/files/./x",
            "/openai/deployments/x/%2e/chat/completions",
            "/openai/files/x%5C..%5Cadmin",
            "/openai/files/x%2f..",
        ] {
            let e = classify(p, p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{p}");
        }
        // The Realtime query naming its deployment twice, or two ways differently.
        for q in [
            "/openai/realtime?deployment=a&deployment=b",
            "/openai/v1/realtime?model=a&model=a",
            "/openai/v1/realtime?model=a&deployment=b",
        ] {
            let path = q.split('?').next().unwrap();
            assert_eq!(
                classify(path, q).unwrap_err().kind,
                ErrorKind::BadRequest,
                "{q}"
            );
        }
        let same = "/openai/realtime?deployment=a&model=a";
        assert_eq!(
            classify("/openai/realtime", same).unwrap().deployment(),
            Some("a")
        );
    }

    #[test]
    fn encoded_separators_and_odd_deployment_names_are_400() {
        for p in [
            "/openai/deployments/a%2Fb/chat/completions",
            "/openai/deployments/a%2fb/chat/completions",
            "/openai/files/x%5C..%5Cadmin",
            "/openai/deployments/x%0d%0aHost:%20evil/chat/completions",
            "/v1/chat%00/completions",
            "/openai/deployments/gpt%204o/chat/completions",
            "/openai/deployments/gpt-4o;rm/chat/completions",
            "/openai/deployments/\u{e9}t\u{e9}/chat/completions",
        ] {
            let e = classify(p, p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::BadRequest, "{p}");
        }
        let long = format!("/openai/deployments/{}/chat/completions", "a".repeat(65));
        assert_eq!(
            classify(&long, &long).unwrap_err().kind,
            ErrorKind::BadRequest
        );
        let longest = format!("/openai/deployments/{}/chat/completions", "a".repeat(64));
        assert!(classify(&longest, &longest).is_ok());
        // Other encodings pass through untouched, as do names Azure allows.
        assert!(classify("/openai/files/a%20b", "/openai/files/a%20b").is_ok());
        assert_eq!(
            ok("/openai/deployments/My_gpt-4.1/embeddings").deployment(),
            Some("My_gpt-4.1")
        );
        // A trailing lone percent sign is not an encoding.
        assert!(classify("/openai/files/a%2", "/openai/files/a%2").is_ok());
    }
}
