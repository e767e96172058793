//! stdio servers on Kubernetes: the pods/attach subresource over a websocket.
//!
//! Each [`StdioConnector::open`] attaches anew to the server's ready pod (container
//! `server`, stdin and stdout, no tty). The container runs with `stdin: true` and
//! `stdinOnce: false`, so closing an attachment leaves the process and its stdin open.
//!
//! An attachment's stdout ends (EOF) when its websocket ends for any reason (kube-rs
//! leaves the reader pending forever when its message loop fails) and when its pod is no
//! longer one of the server's own pods (deleted or replaced behind our back, even if the
//! websocket to a lost node stays half-open), so the shared connection re-attaches.
//!
//! Only the replica that holds the lease attaches (the kubelet merges the stdin of every
//! attachment and copies stdout to each, so two replicas would read each other's answers):
//! `open` refuses on any other replica, and an attachment ends when its replica stops leading.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Either};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, AttachedProcess};
use tokio::io::{AsyncRead, ReadBuf};

use super::Inner;
use super::objects::CONTAINER;
use crate::orchestrator::{OrchestratorError, Result, Sharing, StdioConnector, StdioStream};

/// Attaches to the pod of one stdio server.
pub struct KubeAttach {
    inner: Arc<Inner>,
    server: String,
}

impl KubeAttach {
    pub(crate) fn new(inner: Arc<Inner>, server: String) -> Self {
        KubeAttach { inner, server }
    }
}

/// The attachment's stdout, keeping the websocket task alive while it is read.
struct Attached<R> {
    reader: R,
    /// Resolves when the attachment is over: the websocket ended or the pod is gone.
    over: BoxFuture<'static, ()>,
    /// `over` resolved (it must not be polled again).
    ended: bool,
    _process: AttachedProcess,
}

impl<R: AsyncRead + Unpin> AsyncRead for Attached<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.reader).poll_read(cx, buf) {
            // Once over, EOF on every later read (the reader may stay pending forever).
            Poll::Pending if self.ended => Poll::Ready(Ok(())),
            Poll::Pending => match self.over.poll_unpin(cx) {
                // Nothing buffered is lost: the reader had nothing left to give.
                Poll::Ready(()) => {
                    self.ended = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Pending => Poll::Pending,
            },
            ready => ready,
        }
    }
}

/// Resolves once this replica no longer leads.
async fn leadership_lost(inner: Arc<Inner>) {
    let mut leading = inner.leading.clone();
    if leading.wait_for(|l| !*l).await.is_err() && *leading.borrow() {
        // No election (a single replica leads for good), or the runtime is shutting down.
        std::future::pending::<()>().await;
    }
}

/// Resolves once `pod` (by uid) is no longer one of `server`'s own pods.
async fn pod_gone(inner: Arc<Inner>, server: String, uid: Option<String>) {
    let mut changed = inner.refreshed.subscribe();
    loop {
        changed.borrow_and_update();
        let present = uid.is_some()
            && inner
                .own_pods(&server)
                .iter()
                .any(|p| p.metadata.uid == uid);
        if !present || changed.changed().await.is_err() {
            return;
        }
    }
}

impl StdioConnector for KubeAttach {
    fn open(&self) -> BoxFuture<'_, Result<StdioStream>> {
        async move {
            if !self.inner.leading() {
                return Err(OrchestratorError::Attach {
                    server: self.server.clone(),
                    detail: "this replica does not lead: only the leader attaches".into(),
                });
            }
            let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
            let params = AttachParams::default()
                .container(CONTAINER)
                .stdin(true)
                .stdout(true)
                .stderr(false)
                .tty(false)
                .max_stdin_buf_size(self.inner.options.attach_buffer)
                .max_stdout_buf_size(self.inner.options.attach_buffer);
            let deadline = Instant::now() + self.inner.options.attach_timeout;
            let (pod, mut process) = loop {
                let mut refreshed = self.inner.refreshed.subscribe();
                let left = deadline.saturating_duration_since(Instant::now());
                let pod = self.inner.wait_ready(&self.server, left).await?;
                match api.attach(&pod, &params).await {
                    Ok(process) => break (pod, process),
                    // Deleted after the watch last saw it: wait for the watch to catch up
                    // (it then names the replacement), within the same deadline.
                    Err(kube::Error::Api(e)) if e.code == 404 && Instant::now() < deadline => {
                        let caught_up = async {
                            while self.inner.current_pod_name(&self.server).as_deref()
                                == Some(pod.as_str())
                            {
                                if refreshed.changed().await.is_err() {
                                    break;
                                }
                            }
                        };
                        let _ = tokio::time::timeout_at(deadline.into(), caught_up).await;
                    }
                    Err(e) => {
                        return Err(OrchestratorError::Attach {
                            server: self.server.clone(),
                            detail: format!("pod {pod}: {e}"),
                        });
                    }
                }
            };
            let missing = || OrchestratorError::Attach {
                server: self.server.clone(),
                detail: format!("pod {pod}: no stdin/stdout on the attachment"),
            };
            let writer = process.stdin().ok_or_else(missing)?;
            let reader = process.stdout().ok_or_else(missing)?;
            // The status channel resolves when the message loop ends, however it ends.
            let ended = process.take_status().ok_or_else(missing)?;
            let uid = self
                .inner
                .own_pods(&self.server)
                .into_iter()
                .find(|p| p.metadata.name.as_deref() == Some(pod.as_str()))
                .and_then(|p| p.metadata.uid.clone());
            let gone = pod_gone(self.inner.clone(), self.server.clone(), uid);
            let lost = leadership_lost(self.inner.clone());
            let over = futures_util::future::select(
                Box::pin(ended),
                futures_util::future::select(Box::pin(gone), Box::pin(lost)),
            )
            .map(|_: Either<_, _>| ())
            .boxed();
            Ok(StdioStream {
                reader: Box::pin(Attached {
                    reader,
                    over,
                    ended: false,
                    _process: process,
                }),
                writer: Box::pin(writer),
                process: None,
            })
        }
        .boxed()
    }

    fn open_private<'a>(
        &'a self,
        _principal: Option<&'a str>,
    ) -> BoxFuture<'a, Result<StdioStream>> {
        // The backend admits `sharing: shared` only (PodPolicy::admit): one pod per server.
        async move {
            Err(OrchestratorError::Unsupported {
                server: self.server.clone(),
                backend: "kubernetes",
                what: "sharing: shared (one pod per server)",
            })
        }
        .boxed()
    }

    fn sharing(&self) -> Sharing {
        Sharing::Shared
    }

    fn describe(&self) -> String {
        format!(
            "pod of {}/{} (attach)",
            self.inner.ns,
            crate::orchestrator::spec::object_name(&self.server)
        )
    }
}
