//! Stored objects and the backend that holds each. Responses, files, batches, threads and the
//! rest exist only on the Azure OpenAI instance that made them: the gateway learns each one's
//! owner from the answer that made it known, and sends every later request naming it there.
//! Owners are kept by object id, with the backend's name (so they survive reloads that keep the
//! backend) and, with `[[consumers]]`, the consumer whose request made it: in this replica's
//! memory, and with `limits.store = "redis"` in Redis too, so every replica knows what any
//! replica learned.

pub mod refs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::limits::Shared;
use crate::sync::lock;
use crate::telemetry::Metrics;

/// Who holds an object, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub backend: Arc<str>,
    /// The consumer whose request made (or first found) it; `None` without `[[consumers]]`.
    pub consumer: Option<Arc<str>>,
}

struct Entry {
    owner: Owner,
    expires: Instant,
}

/// The owners this replica knows: least recently used dropped first past `max_entries`.
pub struct Owners {
    entries: std::sync::Mutex<LruCache<Box<str>, Entry>>,
    ttl: Duration,
    max_entries: usize,
    metrics: Arc<Metrics>,
    /// Where other replicas read what this one learned, and the reverse.
    shared: Option<Arc<Shared>>,
    /// The key space in the shared store: `own` for objects, `session` for session keys.
    namespace: &'static str,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners")
            .field("ttl", &self.ttl)
            .field("max_entries", &self.max_entries)
            .finish_non_exhaustive()
    }
}

impl Owners {
    /// Owners of stored objects.
    pub fn new(
        ttl: Duration,
        max_entries: usize,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> Self {
        Self::in_namespace("own", ttl, max_entries, metrics, shared)
    }

    /// Backends of session keys (`routing.affinity_key`), kept apart from objects' owners.
    pub fn sessions(
        ttl: Duration,
        max_entries: usize,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> Self {
        Self::in_namespace("session", ttl, max_entries, metrics, shared)
    }

    fn in_namespace(
        namespace: &'static str,
        ttl: Duration,
        max_entries: usize,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> Self {
        Self {
            namespace,
            shared,
            // Unbounded here and trimmed by hand: a bounded cache allocates its whole table up
            // front, which an idle gateway would carry for nothing.
            entries: std::sync::Mutex::new(LruCache::unbounded()),
            ttl,
            max_entries: max_entries.max(1),
            metrics,
        }
    }

    /// The owner of `id`, if known and not expired: from memory, else (with Redis) from what
    /// any replica learned. An unreachable Redis is a miss (the owner is then searched for).
    pub async fn get(&self, id: &str) -> Option<Owner> {
        if let Some(o) = self.local(id) {
            return Some(o);
        }
        let shared = self.shared.as_ref()?;
        let record = shared.owner(self.namespace, id).await.ok()??;
        let (backend, consumer) = record.split_once('\n').unwrap_or((&record, ""));
        let owner = Owner {
            backend: Arc::from(backend),
            consumer: (!consumer.is_empty()).then(|| Arc::from(consumer)),
        };
        self.remember(std::slice::from_ref(&id.to_string()), &owner);
        Some(owner)
    }

    fn local(&self, id: &str) -> Option<Owner> {
        let mut entries = lock(&self.entries);
        let entry = entries.get(id)?;
        if entry.expires <= Instant::now() {
            entries.pop(id);
            self.count(entries.len(), 0);
            return None;
        }
        Some(entry.owner.clone())
    }

    /// Remembers `owner` for each of `ids`, here and (with Redis) for the other replicas.
    pub fn put(&self, ids: &[String], owner: &Owner) {
        if let Some(shared) = &self.shared {
            let record = format!(
                "{}\n{}",
                owner.backend,
                owner.consumer.as_deref().unwrap_or("")
            );
            for id in ids {
                // Known already, to the same owner: nothing new to tell the others.
                if self.local(id).as_ref() != Some(owner) {
                    shared.publish_owner(self.namespace, id, record.clone(), self.ttl);
                }
            }
        }
        self.remember(ids, owner);
    }

    /// Remembers `owner` for each of `ids` in this replica only.
    pub fn remember(&self, ids: &[String], owner: &Owner) {
        if ids.is_empty() {
            return;
        }
        let expires = Instant::now() + self.ttl;
        let mut entries = lock(&self.entries);
        for id in ids {
            entries.put(
                id.as_str().into(),
                Entry {
                    owner: owner.clone(),
                    expires,
                },
            );
        }
        let mut evicted = 0;
        while entries.len() > self.max_entries {
            entries.pop_lru();
            evicted += 1;
        }
        self.count(entries.len(), evicted);
    }

    /// Forgets `id` (it was deleted), here and for the other replicas.
    pub fn forget(&self, id: &str) {
        if let Some(shared) = &self.shared {
            shared.forget_owner(self.namespace, id);
        }
        let mut entries = lock(&self.entries);
        entries.pop(id);
        self.count(entries.len(), 0);
    }

    /// The owner metrics are about objects; session keys are not counted in them.
    fn count(&self, len: usize, evicted: u64) {
        if self.namespace == "own" {
            self.metrics.owners.set(len as i64);
            self.metrics.owner_evictions.inc_by(evicted);
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Longest JSON answer read for the objects it makes known (a response with encrypted
/// reasoning can run to a few hundred kilobytes); past it, the answer goes through unread.
const MAX_ANSWER: usize = 16 * 1024 * 1024;
/// Longest single event of a stream held while looking for its end.
const MAX_EVENT: usize = 4 * 1024 * 1024;

/// Reads an answer as it passes to the client and remembers the owner of every object it makes
/// known. A JSON answer's objects are remembered as its last byte passes, before the client
/// has it whole; a stream's as each event passes (a response's id from its first event).
pub struct Learner {
    owners: Arc<Owners>,
    owner: Owner,
    kind: Kind,
}

enum Kind {
    Json {
        buf: Vec<u8>,
        /// The body's length when the backend declared it: the end is known without waiting
        /// for the body to report it.
        expected: Option<u64>,
        done: bool,
    },
    Sse {
        pending: Vec<u8>,
        overflow: bool,
    },
}

impl Learner {
    /// A learner for an answer of this content type, if it is one objects are read from.
    pub fn new(
        owners: Arc<Owners>,
        owner: Owner,
        content_type: Option<&str>,
        expected: Option<u64>,
    ) -> Option<Self> {
        let ct = content_type.unwrap_or("");
        let kind = if ct.starts_with("application/json") {
            Kind::Json {
                buf: Vec::with_capacity(expected.unwrap_or(4096).min(1 << 20) as usize),
                expected,
                done: false,
            }
        } else if ct.starts_with("text/event-stream") {
            Kind::Sse {
                pending: Vec::new(),
                overflow: false,
            }
        } else {
            return None;
        };
        Some(Self {
            owners,
            owner,
            kind,
        })
    }

    /// Sees a chunk on its way to the client.
    pub fn feed(&mut self, chunk: &[u8]) {
        let mut ids = Vec::new();
        match &mut self.kind {
            Kind::Json {
                buf,
                expected,
                done,
            } => {
                if *done {
                    return;
                }
                if buf.len() + chunk.len() > MAX_ANSWER {
                    *done = true;
                    *buf = Vec::new();
                    return;
                }
                buf.extend_from_slice(chunk);
                if expected.is_some_and(|n| buf.len() as u64 >= n) {
                    *done = true;
                    json_ids(buf, &mut ids);
                }
            }
            Kind::Sse { pending, overflow } => {
                if *overflow {
                    return;
                }
                pending.extend_from_slice(chunk);
                let mut start = 0;
                while let Some(end) = event_end(&pending[start..]) {
                    refs::event_ids(&pending[start..start + end], &mut ids);
                    start += end;
                }
                pending.drain(..start);
                if pending.len() > MAX_EVENT {
                    *overflow = true;
                    *pending = Vec::new();
                }
            }
        }
        self.owners.put(&ids, &self.owner);
    }

    /// The body ended (or was dropped): what is still unread is read now.
    pub fn finish(&mut self) {
        let mut ids = Vec::new();
        if let Kind::Json { buf, done, .. } = &mut self.kind
            && !std::mem::replace(done, true)
        {
            json_ids(buf, &mut ids);
        }
        self.owners.put(&ids, &self.owner);
    }
}

fn json_ids(buf: &[u8], out: &mut Vec<String>) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(buf) {
        refs::answer_ids(&v, out);
    }
}

/// Length of the first whole event (through its blank line) in `buf`; `\r\n` line ends too.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let at = from + i;
        match buf.get(at + 1) {
            Some(b'\n') => return Some(at + 2),
            Some(b'\r') if buf.get(at + 2) == Some(&b'\n') => return Some(at + 3),
            _ => {}
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(b: &str) -> Owner {
        Owner {
            backend: Arc::from(b),
            consumer: None,
        }
    }

    #[test]
    fn remembers_forgets_and_drops_the_least_recently_used() {
        let metrics = Arc::new(Metrics::new());
        let o = Owners::new(Duration::from_secs(60), 2, metrics.clone(), None);
        o.put(&["a".into(), "b".into()], &owner("east"));
        assert_eq!(o.local("a"), Some(owner("east")));
        o.put(&["c".into()], &owner("west"));
        assert_eq!(o.local("b"), None, "b was least recently used");
        assert_eq!(o.local("a"), Some(owner("east")));
        assert_eq!(o.local("c"), Some(owner("west")));
        o.forget("c");
        assert_eq!(o.local("c"), None);
        assert_eq!(metrics.owner_evictions.get(), 1);
        assert_eq!(metrics.owners.get(), 1);
    }

    #[test]
    fn learners_remember_what_answers_make_known_as_they_pass() {
        let owners = Arc::new(Owners::new(
            Duration::from_secs(60),
            100,
            Arc::new(Metrics::new()),
            None,
        ));
        let body = br#"{"id":"file-1","object":"file"}"#;
        let mut l = Learner::new(
            owners.clone(),
            owner("east"),
            Some("application/json"),
            Some(body.len() as u64),
        )
        .unwrap();
        l.feed(&body[..10]);
        assert_eq!(owners.local("file-1"), None);
        l.feed(&body[10..]);
        assert_eq!(
            owners.local("file-1"),
            Some(owner("east")),
            "known at the last byte"
        );

        let mut l = Learner::new(
            owners.clone(),
            owner("west"),
            Some("text/event-stream"),
            None,
        )
        .unwrap();
        let created = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_9\"}}\n\n";
        l.feed(&created[..20]);
        assert_eq!(owners.local("resp_9"), None);
        l.feed(&created[20..]);
        assert_eq!(
            owners.local("resp_9"),
            Some(owner("west")),
            "known from the first event"
        );
        assert!(Learner::new(owners, owner("x"), Some("audio/mpeg"), None).is_none());
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let o = Owners::new(Duration::from_millis(1), 10, Arc::new(Metrics::new()), None);
        o.put(&["a".into()], &owner("east"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(o.local("a"), None);
        assert!(o.is_empty());
    }
}
