//! The SoftAP/HTTP transport: `POST /<endpoint>`, raw body, `Cookie: session=<id>`.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{Error, Timeouts};

/// An HTTP session with one device (one keep-alive socket; reconnects keep the cookie).
pub struct HttpLink {
    addr: SocketAddr,
    cookie: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
    timeouts: Timeouts,
}

impl HttpLink {
    /// A link to the device at `addr` (192.168.4.1:80 on a real SoftAP).
    pub fn new(addr: SocketAddr, timeouts: Timeouts) -> Self {
        Self {
            addr,
            cookie: None,
            sender: None,
            timeouts,
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, Error> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let connect = async {
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            };
            let stream = tokio::time::timeout(self.timeouts.connect, connect)
                .await
                .map_err(|_| Error::Timeout {
                    during: format!("connect to {}", self.addr),
                    after: self.timeouts.connect,
                })?
                .map_err(|err| Error::Http(format!("cannot connect to {}: {err}", self.addr)))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|err| Error::Http(err.to_string()))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("set above"))
    }

    /// One request: the raw protocomm bytes as the body, the answer's body back.
    pub async fn exchange(&mut self, endpoint: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        let timeout = self.timeouts.request;
        let round = async {
            let mut request = Request::post(format!("/{endpoint}"))
                .header(header::HOST, self.addr.to_string())
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .header(header::ACCEPT, "text/plain");
            if let Some(cookie) = &self.cookie {
                request = request.header(header::COOKIE, cookie.as_str());
            }
            let request = request
                .body(Full::new(Bytes::copy_from_slice(body)))
                .map_err(|err| Error::Http(err.to_string()))?;
            let sender = self.sender().await?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|err| Error::Dropped {
                    during: endpoint.to_owned(),
                    detail: format!("connection closed without a response ({err})"),
                })?;
            let status = response.status();
            let set_cookie = response
                .headers()
                .get(header::SET_COOKIE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .map(str::to_owned);
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|err| Error::Dropped {
                    during: endpoint.to_owned(),
                    detail: err.to_string(),
                })?
                .to_bytes();
            Ok::<_, Error>((status, set_cookie, bytes))
        };
        let (status, set_cookie, bytes) =
            tokio::time::timeout(timeout, round)
                .await
                .map_err(|_| Error::Timeout {
                    during: endpoint.to_owned(),
                    after: timeout,
                })??;
        if let Some(cookie) = set_cookie {
            self.cookie = Some(cookie);
        }
        if status != StatusCode::OK {
            return Err(Error::Http(format!("POST /{endpoint} answered {status}")));
        }
        Ok(bytes.to_vec())
    }
}

impl std::fmt::Debug for HttpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The default SoftAP device address.
pub const SOFTAP_DEFAULT: &str = "192.168.4.1:80";
