//! The CLI's way to a running gateway: one HTTP/1.1 request to its local API.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use std::path::Path;

use crate::config::Config;
use crate::state_dir::{AdminToken, admin_token_for};

/// A running gateway's API, with the admin token.
pub(crate) struct GatewayApi {
    addr: SocketAddr,
    token: AdminToken,
}

impl GatewayApi {
    /// The API of the gateway at `addr`, authenticated as the config says.
    pub(crate) fn new(config: &Config, addr: SocketAddr) -> anyhow::Result<Self> {
        let token = admin_token_for(config)?;
        // A gateway listening on every address is reached through loopback.
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(Self {
            addr: SocketAddr::new(ip, addr.port()),
            token,
        })
    }

    /// Sends one request with a handler package (or nothing) and returns the status and
    /// the JSON answer.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        self.request(method, path, "application/x-tar", &[], body)
            .await
    }

    /// Sends one request with the given content type and extra headers and returns the
    /// status and the JSON answer.
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, serde_json::Value)> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("cannot reach the running gateway at {}", self.addr))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.addr.to_string())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.reveal()),
            )
            .header(header::CONTENT_TYPE, content_type);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let json = serde_json::from_slice(&bytes).with_context(|| {
            format!("the gateway answered {status} with something that is not JSON")
        })?;
        Ok((status, json))
    }
}

/// The `message` of an API error answer.
pub(crate) fn error_message(json: &serde_json::Value) -> String {
    json["error"]["message"]
        .as_str()
        .unwrap_or("the gateway gave no reason")
        .to_owned()
}

/// One call to the running gateway's API with an optional JSON body; an error answer
/// becomes an error with the gateway's message.
pub(crate) async fn call(
    config_path: &Path,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let config = Config::load(config_path)?;
    let addr = crate::state_dir::running_gateway(&config.gateway.state_dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no gateway is running with the state directory {}; start it with `outpost run`",
            config.gateway.state_dir.display()
        )
    })?;
    let api = GatewayApi::new(&config, addr)?;
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let (status, answer) = api
        .request(method, path, "application/json", &[], bytes)
        .await?;
    if !status.is_success() {
        anyhow::bail!("{}", error_message(&answer));
    }
    Ok(answer)
}
