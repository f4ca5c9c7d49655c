//! A body that releases prepared chunks on a schedule, without a task per stream:
//! the first after `first_delay`, each next one `interval` later. It can be told to fail
//! after some chunks, as a backend whose connection drops mid-stream.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;

pub struct PacedBody {
    chunks: VecDeque<Bytes>,
    interval: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Fail with an error once this many chunks went out.
    fail_after: Option<usize>,
    sent: usize,
}

impl PacedBody {
    pub fn new(
        chunks: Vec<Bytes>,
        first_delay: Duration,
        interval: Duration,
        fail_after: Option<usize>,
    ) -> Self {
        let sleep = (!first_delay.is_zero())
            .then(|| Box::pin(tokio::time::sleep_until(Instant::now() + first_delay)));
        Self {
            chunks: chunks.into(),
            interval,
            sleep,
            fail_after,
            sent: 0,
        }
    }
}

impl Body for PacedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        if self.fail_after.is_some_and(|n| self.sent >= n) {
            self.fail_after = None;
            self.chunks.clear();
            return Poll::Ready(Some(Err("simulated connection drop".into())));
        }
        let Some(chunk) = self.chunks.pop_front() else {
            return Poll::Ready(None);
        };
        self.sent += 1;
        if !self.interval.is_zero() && !self.chunks.is_empty() {
            self.sleep = Some(Box::pin(tokio::time::sleep(self.interval)));
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.fail_after.is_none()
    }
}
