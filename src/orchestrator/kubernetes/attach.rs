//! stdio servers on Kubernetes: the pods/attach subresource over a websocket.
//!
//! Each [`StdioConnector::open`] attaches anew to the server's ready pod (container
//! `server`, stdin and stdout, no tty). The container runs with `stdin: true` and
//! `stdinOnce: false`, so closing an attachment leaves the process and its stdin open.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, AttachParams, AttachedProcess};
use tokio::io::{AsyncRead, ReadBuf};

use super::Inner;
use super::objects::CONTAINER;
use crate::orchestrator::{OrchestratorError, Result, StdioConnector, StdioStream};

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
    _process: AttachedProcess,
}

impl<R: AsyncRead + Unpin> AsyncRead for Attached<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.reader).poll_read(cx, buf)
    }
}

impl StdioConnector for KubeAttach {
    fn open(&self) -> BoxFuture<'_, Result<StdioStream>> {
        async move {
            let pod = self
                .inner
                .wait_ready(&self.server, self.inner.options.attach_timeout)
                .await?;
            let api: Api<Pod> = Api::namespaced(self.inner.client.clone(), &self.inner.ns);
            let params = AttachParams::default()
                .container(CONTAINER)
                .stdin(true)
                .stdout(true)
                .stderr(false)
                .tty(false)
                .max_stdin_buf_size(self.inner.options.attach_buffer)
                .max_stdout_buf_size(self.inner.options.attach_buffer);
            let mut process =
                api.attach(&pod, &params)
                    .await
                    .map_err(|e| OrchestratorError::Attach {
                        server: self.server.clone(),
                        detail: format!("pod {pod}: {e}"),
                    })?;
            let missing = || OrchestratorError::Attach {
                server: self.server.clone(),
                detail: format!("pod {pod}: no stdin/stdout on the attachment"),
            };
            let writer = process.stdin().ok_or_else(missing)?;
            let reader = process.stdout().ok_or_else(missing)?;
            Ok(StdioStream {
                reader: Box::pin(Attached {
                    reader,
                    _process: process,
                }),
                writer: Box::pin(writer),
            })
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!(
            "pod of {}/{} (attach)",
            self.inner.ns,
            crate::orchestrator::spec::object_name(&self.server)
        )
    }
}
