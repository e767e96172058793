//! Client connections pinned to threads: each thread runs a single-threaded runtime, and a
//! connection lives on one of them from accept to close, with every task it spawns (the
//! upstream connections its calls open among them). A call then wakes no other thread on its
//! way through the gateway, where the shared work-stealing runtime hands its tasks between
//! workers (and wakes a sleeping worker to steal them) several times per call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;

/// Threads serving client connections; they end (and their connections with them) on
/// [`Serving::stop`], or when this is dropped.
pub struct Serving {
    threads: Vec<Thread>,
    stop: watch::Sender<()>,
    joins: Vec<std::thread::JoinHandle<()>>,
}

/// Where an HTTP/2 connection's streams run: on the shared runtime, so the calls a client (a
/// proxy, say) multiplexes on one connection spread over every worker, not its one thread.
#[derive(Clone)]
pub struct Streams(pub Handle);

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, stream: F) {
        self.0.spawn(stream);
    }
}

/// Blocking threads (name lookups, file reads) all serving threads may start together: what
/// one shared runtime allowed.
const BLOCKING_THREADS: usize = 512;

struct Thread {
    handle: Handle,
    /// Connections it serves now.
    connections: Arc<AtomicUsize>,
}

impl Serving {
    /// Starts `n` threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Serving> {
        let n = n.max(1);
        let (stop, stopped) = watch::channel(());
        let mut threads = Vec::with_capacity(n);
        let mut joins = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads((BLOCKING_THREADS / n).max(16))
                .build()?;
            let handle = runtime.handle().clone();
            let mut stopped = stopped.clone();
            joins.push(
                std::thread::Builder::new()
                    .name(format!("serving-{i}"))
                    .spawn(move || {
                        // Ends when the sender is dropped; the runtime's tasks are dropped with
                        // it, on this thread.
                        runtime.block_on(async move { while stopped.changed().await.is_ok() {} });
                    })?,
            );
            threads.push(Thread {
                handle,
                connections: Arc::new(AtomicUsize::new(0)),
            });
        }
        Ok(Serving {
            threads,
            stop,
            joins,
        })
    }

    /// Ends the threads and waits until they have: by then every task they ran (the
    /// connections, what those spawned) has been dropped, and whatever its drop records
    /// (an abandoned call's audit record, a process to reap) is done.
    pub async fn stop(self) {
        let Serving { stop, joins, .. } = self;
        drop(stop);
        let joined = tokio::task::spawn_blocking(move || {
            for thread in joins {
                let _ = thread.join();
            }
        });
        let _ = joined.await;
    }

    /// Threads serving.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Serves `stream` with `serve` on the thread serving the fewest connections, its socket
    /// moved to that thread's reactor.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.connections.load(Ordering::Relaxed))
            .expect("at least one thread");
        let socket = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return tracing::debug!("cannot move a connection to its thread: {e}"),
        };
        let count = Counted::new(thread.connections.clone());
        thread.handle.spawn(async move {
            let _count = count;
            match TcpStream::from_std(socket) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::debug!("cannot serve a connection on its thread: {e}"),
            }
        });
    }
}

/// One connection counted on its thread while it is served.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(count: Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connects to `listener` and answers the stream the server side accepted.
    async fn accepted(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn connections_go_to_the_least_busy_thread_and_are_served_there_until_they_end() {
        let serving = Serving::start(2).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (mut client, server) = accepted(&listener).await;
            // Echoes one byte and the name of the thread it runs on, then waits for the close.
            serving.spawn(server, |mut stream| async move {
                let mut byte = [0];
                if stream.read_exact(&mut byte).await.is_err() {
                    return;
                }
                let name = std::thread::current().name().unwrap_or("").to_owned();
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
                let _ = stream.read(&mut byte).await;
            });
            client.write_all(b"x").await.unwrap();
            let mut name = vec![0; 9];
            client.read_exact(&mut name).await.unwrap();
            clients.push((client, String::from_utf8(name).unwrap()));
        }
        let names: Vec<&str> = clients.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["serving-0", "serving-1", "serving-0", "serving-1"]);
        let counts = || -> Vec<usize> {
            serving
                .threads
                .iter()
                .map(|t| t.connections.load(Ordering::Relaxed))
                .collect()
        };
        assert_eq!(counts(), [2, 2]);
        // Closing a connection ends its task, and its thread counts one fewer.
        drop(clients.remove(0));
        for _ in 0..200 {
            if counts() == [1, 2] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(counts(), [1, 2]);
    }

    #[tokio::test]
    async fn stopping_the_threads_waits_until_what_they_served_is_dropped() {
        let serving = Serving::start(2).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dropped = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let (_client, server) = accepted(&listener).await;
            let guard = Dropped(dropped.clone());
            serving.spawn(server, move |stream| async move {
                let _held = (stream, guard);
                std::future::pending::<()>().await;
            });
        }
        serving.stop().await;
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            2,
            "both dropped before stop returned"
        );
    }

    /// Counts its drops.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn dropping_the_threads_ends_the_connections_they_serve() {
        let serving = Serving::start(1).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, server) = accepted(&listener).await;
        serving.spawn(server, |stream| async move {
            let _held = stream;
            std::future::pending::<()>().await;
        });
        drop(serving);
        // The served side closes: the client reads the end of the stream.
        let mut byte = [0];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut byte))
            .await
            .expect("closed, not left open");
        assert_eq!(read.unwrap(), 0);
    }
}
