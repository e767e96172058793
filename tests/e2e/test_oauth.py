"""The gateway as an OAuth 2.1 resource server, with real peers on both sides.

The official Python SDK client's `OAuthClientProvider` learns everything from the gateway's
401: its challenge names the RFC 9728 metadata, which names a mock authorization server (in this
file), whose RFC 8414 metadata leads to dynamic registration, an authorization code with PKCE
S256, and an ES256 JWT for the gateway's resource URI (RFC 8707). With that token the client
lists and calls tools of the example server through the gateway, with a session and statelessly.
The mock server grants exactly the scopes asked, so the first token holds only `mcp:connect`:
the call meets 403 insufficient_scope, and the SDK steps up (a second authorization asking for
`mcp:tools` too) and repeats the call. Raw requests check the challenges themselves, and that a
token issued for another resource is refused with 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from e2e_support import EXAMPLE, Gateway, Tools, example_argv, free_port, start_gateway, text_of

pytestmark = pytest.mark.anyio

ECHO = "echo"  # one upstream: tool names are not prefixed
REDIRECT_URI = "http://127.0.0.1:1/callback"  # never contacted: the redirect handler takes the code


class MockAuthorizationServer(ThreadingHTTPServer):
    """RFC 8414 metadata, dynamic registration, an /authorize that approves at once, a /token that
    checks the code's client, redirect URI and PKCE S256 and signs an ES256 JWT for the `resource`
    asked, and the JWK set. Grants exactly the scopes asked; records every /authorize and /token."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.issuer = f"http://127.0.0.1:{self.server_address[1]}"
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.clients: dict[str, list[str]] = {}  # client_id -> redirect_uris
        self.codes: dict[str, dict[str, str]] = {}  # code -> its /authorize parameters
        self.authorizations: list[dict[str, str]] = []
        self.token_requests: list[dict[str, str]] = []

    def sign(self, aud: str, scope: str) -> str:
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "ada", "aud": aud, "iat": now, "exp": now + 300, "scope": scope}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k1"})

    def metadata(self) -> dict[str, Any]:
        i = self.issuer
        return {
            "issuer": i, "authorization_endpoint": f"{i}/authorize", "token_endpoint": f"{i}/token",
            "registration_endpoint": f"{i}/register", "jwks_uri": f"{i}/jwks", "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"], "token_endpoint_auth_methods_supported": ["none"],
        }

    def token(self, form: dict[str, str]) -> dict[str, Any] | None:
        asked = self.codes.pop(form.get("code", ""), None)
        digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
        if (
            asked is None
            or form.get("grant_type") != "authorization_code"
            or base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != asked["code_challenge"]
            or (form.get("client_id"), form.get("redirect_uri")) != (asked["client_id"], asked["redirect_uri"])
            or not form.get("resource")
        ):
            return None
        scope = asked.get("scope", "")
        return {"access_token": self.sign(form["resource"], scope), "token_type": "Bearer", "expires_in": 300, "scope": scope}


class _Handler(BaseHTTPRequestHandler):
    server: MockAuthorizationServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"content-type": "application/json", "content-length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        s, url = self.server, urlsplit(self.path)
        if url.path == "/.well-known/oauth-authorization-server":
            self._send(200, s.metadata())
        elif url.path == "/jwks":
            jwk = ECAlgorithm.to_jwk(s.key.public_key(), as_dict=True)
            self._send(200, {"keys": [{**jwk, "kid": "k1", "alg": "ES256", "use": "sig"}]})
        elif url.path == "/authorize":
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            s.authorizations.append(q)
            if q.get("redirect_uri") not in s.clients.get(q.get("client_id", ""), []) or q.get("code_challenge_method") != "S256":
                return self._send(400, {"error": "invalid_request"})
            code = secrets.token_urlsafe(16)
            s.codes[code] = q
            self._send(302, headers={"location": f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}"})
        else:
            self._send(404, {"error": "not_found"})

    def do_POST(self) -> None:
        s, body = self.server, self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/register":
            meta = json.loads(body)
            client_id = secrets.token_urlsafe(8)
            s.clients[client_id] = meta["redirect_uris"]
            self._send(201, {**meta, "client_id": client_id, "token_endpoint_auth_method": "none"})
        elif self.path == "/token":
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            s.token_requests.append(form)
            token = s.token(form)
            self._send(*((200, token) if token else (400, {"error": "invalid_grant"})))
        else:
            self._send(404, {"error": "not_found"})


@pytest.fixture(scope="module")
def auth_server() -> Iterator[MockAuthorizationServer]:
    server = MockAuthorizationServer()  # listening once constructed
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def oauth_gateway(tools: Tools, workdir: Path, auth_server: MockAuthorizationServer) -> Iterator[Gateway]:
    """A gateway in front of the example server that takes the mock server's tokens only (its
    port is chosen first: the resource URI, the tokens' audience, names it)."""
    port = free_port()
    example = example_argv(tools, "--test-tools")
    oauth = {
        "resource": f"http://127.0.0.1:{port}/mcp",
        "issuers": [{"issuer": auth_server.issuer, "jwks_uri": f"{auth_server.issuer}/jwks"}],
        "required_scopes": ["mcp:connect"],
        "scope_rules": [{"methods": ["tools/call"], "scopes": ["mcp:tools"]}],
        "key_refetch_interval": "300ms",
    }
    upstreams = [{"name": EXAMPLE, "stdio": {"command": example[0], "args": example[1:]}, "call_timeout": "30s"}]
    gateway = start_gateway(tools, workdir, "oauth", upstreams, extra={"auth": {"oauth": oauth}}, port=port)
    try:
        yield gateway
    finally:
        gateway.proc.stop()


class MemoryStorage:
    tokens: OAuthToken | None = None
    client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])  # with a session; stateless
async def test_the_sdk_discovers_authorizes_and_steps_up_through_the_gateway(
    oauth_gateway: Gateway, auth_server: MockAuthorizationServer, mode: str
) -> None:
    resource, issuer = oauth_gateway.url, auth_server.issuer
    auth_server.authorizations.clear()
    auth_server.token_requests.clear()
    codes: list[AuthorizationCodeResult] = []

    async def redirect_handler(url: str) -> None:
        # The user agent: the authorization server approves at once and redirects with the code.
        async with httpx.AsyncClient(follow_redirects=False) as browser:
            r = await browser.get(url)
        assert r.status_code == 302, r.text
        q = parse_qs(urlsplit(r.headers["location"]).query)
        codes.append(AuthorizationCodeResult(code=q["code"][0], state=q["state"][0]))

    async def callback_handler() -> AuthorizationCodeResult:
        return codes[-1]

    auth = OAuthClientProvider(
        server_url=resource,
        client_metadata=OAuthClientMetadata(client_name="e2e", redirect_uris=[REDIRECT_URI], grant_types=["authorization_code"]),
        storage=MemoryStorage(),
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )
    seen: list[tuple[str, str, int]] = []  # every request the SDK's HTTP client made, in order

    async def record(resp: httpx2.Response) -> None:
        seen.append((resp.request.method, str(resp.request.url), resp.status_code))

    http = create_mcp_http_client(auth=auth)
    http.event_hooks["response"].append(record)
    async with http, Client(streamable_http_client(resource, http_client=http), mode=mode, read_timeout_seconds=30) as c:
        assert ECHO in {t.name for t in (await c.list_tools()).tools}
        assert text_of(await c.call_tool(ECHO, {"text": "through oauth"})) == "through oauth"

    # Discovery started from the gateway's 401 and went where its metadata pointed.
    assert seen[:6] == [
        ("POST", resource, 401),
        ("GET", f"http://127.0.0.1:{oauth_gateway.port}/.well-known/oauth-protected-resource/mcp", 200),
        ("GET", f"{issuer}/.well-known/oauth-authorization-server", 200),
        ("POST", f"{issuer}/register", 201),
        ("POST", f"{issuer}/token", 200),
        ("POST", resource, 200),
    ], seen
    # Step-up: one 403 (the call), a new token, the call again; no other refusal.
    statuses = [status for _, _, status in seen]
    assert (statuses.count(401), statuses.count(403)) == (1, 1), seen
    step_up = statuses.index(403)
    assert seen[step_up + 1 : step_up + 3] == [("POST", f"{issuer}/token", 200), ("POST", resource, 200)], seen
    assert [a.get("scope", "").split() for a in auth_server.authorizations] == [["mcp:connect"], ["mcp:connect", "mcp:tools"]]
    # RFC 8707: both authorizations and both token requests named the gateway's resource URI.
    assert [a.get("resource") for a in auth_server.authorizations] == [resource, resource]
    assert [t.get("resource") for t in auth_server.token_requests] == [resource, resource]


async def test_challenges_and_a_token_for_another_resource(oauth_gateway: Gateway, auth_server: MockAuthorizationServer) -> None:
    url, origin = oauth_gateway.url, f"http://127.0.0.1:{oauth_gateway.port}"
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

    def bearer(token: str) -> dict[str, str]:
        return {**headers, "authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(url, json=init, headers=headers)
        assert r.status_code == 401
        challenge = r.headers["www-authenticate"]
        assert f'resource_metadata="{origin}/.well-known/oauth-protected-resource/mcp"' in challenge, challenge
        assert 'scope="mcp:connect"' in challenge, challenge
        prm = (await http.get(f"{origin}/.well-known/oauth-protected-resource/mcp")).json()
        assert prm["resource"] == url and prm["authorization_servers"] == [auth_server.issuer]

        # A token the same issuer signed for another resource: not an audience this gateway is.
        r = await http.post(url, json=init, headers=bearer(auth_server.sign("http://127.0.0.1:1/mcp", "mcp:connect mcp:tools")))
        assert r.status_code == 401
        assert 'error="invalid_token"' in r.headers["www-authenticate"], r.headers["www-authenticate"]
        # The same token for this resource passes: the refusal was the audience's.
        r = await http.post(url, json=init, headers=bearer(auth_server.sign(url, "mcp:connect mcp:tools")))
        assert r.status_code == 200, r.text

        # Without mcp:tools a call is refused with a challenge naming every scope it needs.
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": ECHO, "arguments": {"text": "x"}}}
        session = {"mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        r = await http.post(url, json=call, headers={**bearer(auth_server.sign(url, "mcp:connect")), **session})
        assert r.status_code == 403, r.text
        assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
        assert 'scope="mcp:connect mcp:tools"' in r.headers["www-authenticate"]
