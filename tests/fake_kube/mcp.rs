//! A minimal MCP client over a stdio attachment, for the orchestrator tests.

#![allow(dead_code)]

use std::pin::Pin;
use std::time::Duration;

use gatehouse::orchestrator::StdioStream;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, Lines};

/// Sends JSON-RPC lines and reads answers, skipping notifications.
pub struct Mcp {
    pub lines: Lines<BufReader<Pin<Box<dyn AsyncRead + Send>>>>,
    pub writer: Pin<Box<dyn AsyncWrite + Send>>,
}

impl Mcp {
    /// Wraps an attachment.
    pub fn new(s: StdioStream) -> Self {
        Mcp {
            lines: BufReader::new(s.reader).lines(),
            writer: s.writer,
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: Value) {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await.unwrap();
        self.writer.flush().await.unwrap();
    }

    /// Sends a request and waits for its answer.
    pub async fn call(&mut self, id: u64, method: &str, params: Value) -> Value {
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await;
        loop {
            let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
                .await
                .expect("answer in time")
                .expect("read")
                .expect("stream open");
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["id"] == id {
                return v;
            }
        }
    }

    /// `initialize` + `notifications/initialized`; returns the initialize answer.
    pub async fn handshake(&mut self) -> Value {
        let init = self
            .call(
                1,
                "initialize",
                json!({"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "orchestrator-test", "version": "1"}}),
            )
            .await;
        self.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        init
    }

    /// Reads until the stream ends (the process exited or the attachment was replaced).
    pub async fn drain(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            while let Ok(Some(_)) = self.lines.next_line().await {}
        })
        .await
        .is_ok()
    }
}

/// Names of the tools in a `tools/list` answer.
pub fn tool_names(list: &Value) -> Vec<String> {
    list["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("not a tools/list answer: {list}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}
