//! A test plugin that denies every request with the call context it was given, as JSON:
//! the tests check each field the gateway answers, call after call on one instance.
use gatehouse_plugin::{CallContext, Decision, Payload, Plugin, export_plugin};

pub struct EchoContext;

impl Plugin for EchoContext {
    fn init(_config: &str) -> Result<Self, String> {
        Ok(EchoContext)
    }
    fn on_request(&mut self, ctx: &CallContext, arguments: &Payload) -> Decision {
        let echo = serde_json::json!({
            "method": ctx.method(),
            "server": ctx.server(),
            "name": ctx.name(),
            "principal": ctx.principal(),
            "session_id": ctx.session_id(),
            "profile": ctx.profile(),
            "groups": ctx.groups(),
            "scopes": ctx.scopes(),
            // Read twice: the second read comes from the kit's cache, and must agree.
            "name_again": ctx.name(),
            "arguments": arguments.text(),
        });
        Decision::deny(echo.to_string())
    }
}

export_plugin!(EchoContext: on_request);
