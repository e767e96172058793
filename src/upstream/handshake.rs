//! The MCP handshake on a fresh upstream connection.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::mcp::jsonrpc::Outcome;

use super::{CallOpts, Connection, UpstreamError};

/// Largest `initialize` (or `server/discover`) result accepted: each session keeps its
/// servers' results for its life, so their size is the server's to choose only up to this.
pub(crate) const MAX_INIT_RESULT: usize = 256 * 1024;

/// Refuses a handshake result larger than [`MAX_INIT_RESULT`].
pub(crate) fn kept_result(conn: &Connection, result: &[u8]) -> Result<(), UpstreamError> {
    if result.len() > MAX_INIT_RESULT {
        return Err(conn.server().unavailable(format!(
            "its initialize result is larger than {} KiB",
            MAX_INIT_RESULT / 1024
        )));
    }
    Ok(())
}

/// Performs the MCP handshake on a fresh connection; returns the server's `initialize` result.
pub(crate) async fn initialize(
    conn: &Arc<Connection>,
    init_params: &[u8],
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let outcome = conn
        .request(
            "initialize",
            Some(init_params),
            CallOpts::default(),
            timeout,
        )
        .await;
    let result = match outcome {
        Ok(Outcome::Result(r)) => r,
        Ok(Outcome::Error(e)) => {
            conn.shutdown().await;
            return Err(conn.server().unavailable_saying(
                format!(
                    "initialize failed with error {}",
                    crate::mcp::jsonrpc::error_code(&e).unwrap_or(0)
                ),
                &e,
            ));
        }
        Err(e) => {
            conn.shutdown().await;
            return Err(e);
        }
    };
    if let Err(e) = kept_result(conn, &result) {
        conn.shutdown().await;
        return Err(e);
    }
    if let Connection::Http(h) = &**conn {
        h.set_protocol_version(&result);
    }
    conn.notify("notifications/initialized", None).await?;
    Ok(result)
}
