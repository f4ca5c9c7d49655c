//! Worker runtimes, one thread each, that serve the client listener's connections.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runtimes of one thread each, beside the caller's, for [`super::start_on`]: like nginx's worker
/// processes, each serves the connections it is given from start to end, with its own timers,
/// reactor and backend connections. Against one multi-threaded runtime this saves the work
/// stealing's bookkeeping and atomics and keeps a connection's work on one core
/// (bench/results/profile-2026-11-26.md).
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Something every runtime's thread does for itself at a steady pace, whatever it is serving:
/// `serve` gives back the memory its allocator keeps cached for the thread (see `main.rs`),
/// which only the thread itself can do.
#[derive(Clone)]
pub struct ThreadChore {
    pub every: Duration,
    pub run: Arc<dyn Fn() + Send + Sync>,
}

impl ThreadChore {
    /// Runs the chore on the polling thread every `every`, the first time one period from now;
    /// it never ends, so race it against what ends the thread's work.
    pub async fn repeat(self) -> std::convert::Infallible {
        let start = tokio::time::Instant::now() + self.every;
        let mut tick = tokio::time::interval_at(start, self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            (self.run)();
        }
    }
}

impl Workers {
    /// Starts `count` worker runtimes, numbered 1 to `count` (the caller's thread is 0), each
    /// thread doing `chore` besides.
    pub fn start(count: usize, chore: Option<ThreadChore>) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stop: stop.clone(),
            threads: Vec::with_capacity(count),
        };
        for index in 1..=count {
            let (tx, rx) = std::sync::mpsc::channel();
            let stop = stop.clone();
            let chore = chore.clone();
            let thread = std::thread::Builder::new()
                .name(format!("switchyard-worker-{index}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let rt = match rt {
                        Ok(rt) => {
                            let _ = tx.send(Ok(rt.handle().clone()));
                            rt
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    crate::http1::client::enter_worker(index);
                    rt.block_on(async move {
                        match chore {
                            Some(chore) => tokio::select! {
                                _ = stop.cancelled() => {}
                                never = chore.repeat() => match never {},
                            },
                            None => stop.cancelled().await,
                        }
                    });
                })?;
            workers.threads.push(thread);
            match rx.recv() {
                Ok(Ok(handle)) => workers.handles.push(handle),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(std::io::Error::other("a worker thread ended at start")),
            }
        }
        Ok(workers)
    }

    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }

    /// Stops the runtimes and waits for their threads; tasks still on them are dropped, so
    /// call it after [`super::Gateway::wait`].
    pub fn stop(self) {
        drop(self);
    }
}

/// Runs `f` on a single-threaded runtime on this thread, with `threads - 1` [`Workers`] beside
/// it whose handles `f` gets (for [`super::start_on`]), every thread doing `chore`; the workers stop
/// once `f` is done. How `serve` runs.
pub fn per_core<F, Fut>(
    threads: usize,
    chore: Option<ThreadChore>,
    f: F,
) -> std::io::Result<Fut::Output>
where
    F: FnOnce(Vec<tokio::runtime::Handle>) -> Fut,
    Fut: std::future::Future,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let workers = Workers::start(threads.saturating_sub(1), chore.clone())?;
    let work = f(workers.handles().to_vec());
    let out = runtime.block_on(async {
        match chore {
            Some(chore) => tokio::select! {
                out = work => out,
                never = chore.repeat() => match never {},
            },
            None => work.await,
        }
    });
    workers.stop();
    Ok(out)
}

/// Dropped, as when a start fails half-way, the workers stop too.
impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
