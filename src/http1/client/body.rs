//! A backend's response body, read straight from its connection as the client's side asks.

use super::*;

pub(super) enum State {
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
    UntilClose,
    Done,
}

/// A backend's response body, read from its connection as it is polled. Dropped before its
/// end, the connection closes (the rest of the body is never read).
pub struct H1Body {
    pub(super) conn: Option<Conn>,
    pub(super) state: State,
    pub(super) reusable: bool,
    pub(super) pool: Arc<HostPool>,
}

impl H1Body {
    /// The body ended: the connection goes back to the pool if it can carry another exchange.
    pub(super) fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.pool.checkin(conn);
        }
    }

    pub(super) fn fail(
        &mut self,
        msg: impl Into<String>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(msg.into().into())))
    }
}

/// The line at the front of `buf`, if a whole one is there: its length without the line end,
/// and with it. Measured in place rather than split off (a chunked body has two such lines
/// per chunk, and a split costs more than the rest of reading them).
pub(super) fn front_line(buf: &[u8]) -> Result<Option<(usize, usize)>, String> {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            let len = if i > 0 && buf[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            Ok(Some((len, i + 1)))
        }
        None if buf.len() > MAX_LINE => Err("chunk-size or trailer line too long".into()),
        None => Ok(None),
    }
}

pub(super) fn chunk_size(line: &[u8]) -> Result<u64, String> {
    // Extensions after `;` are ignored (RFC 9112 §7.1.1).
    let end = memchr::memchr(b';', line).unwrap_or(line.len());
    let digits = line[..end].trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err("invalid chunk size".into());
    }
    digits
        .iter()
        .try_fold(0u64, |n, b| {
            char::from(*b).to_digit(16).map(|d| n << 4 | u64::from(d))
        })
        .ok_or_else(|| "invalid chunk size".into())
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Use what is buffered first; read only when it cannot make progress.
            match this.state {
                State::Done => {
                    this.release();
                    return Poll::Ready(None);
                }
                State::Length(left) | State::ChunkData(left) if !conn.buf.is_empty() => {
                    let n = (conn.buf.len() as u64).min(left) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    this.state = match this.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    if matches!(this.state, State::Done) {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::ChunkSize => match front_line(&conn.buf) {
                    Ok(Some((len, used))) => {
                        let size = chunk_size(&conn.buf[..len]);
                        conn.buf.advance(used);
                        match size {
                            Ok(0) => this.state = State::Trailers,
                            Ok(n) => this.state = State::ChunkData(n),
                            Err(e) => return this.fail(e),
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return this.fail(e),
                },
                State::ChunkEnd if conn.buf.len() >= 2 || conn.buf.first() == Some(&b'\n') => {
                    match front_line(&conn.buf) {
                        Ok(Some((0, used))) => {
                            conn.buf.advance(used);
                            this.state = State::ChunkSize;
                            continue;
                        }
                        _ => return this.fail("chunk data not followed by CRLF"),
                    }
                }
                State::Trailers => match front_line(&conn.buf) {
                    Ok(Some((len, used))) => {
                        conn.buf.advance(used);
                        if len == 0 {
                            this.state = State::Done;
                        }
                        // Trailers are dropped: the client's response carries none.
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return this.fail(e),
                },
                _ => {}
            }
            match ready!(conn.poll_read_some(cx)) {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail("the backend closed the connection before the body ended");
                }
                Ok(_) => {}
                Err(e) => return this.fail(format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}
