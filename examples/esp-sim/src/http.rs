//! A device's SoftAP HTTP server: `POST /<endpoint>`, session cookie, 1..=4096-byte
//! bodies; on any error the socket is closed without an answer, as esp_http_server does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outpost_protocomm::HTTP_MAX_BODY;
use tokio::net::TcpListener;

use crate::device::SimDevice;

#[derive(Default)]
struct Sessions {
    /// The current session id and the connection it was made on.
    current: Option<(u32, u64)>,
}

/// Serves `device` on `listener` until the process ends.
pub(crate) async fn serve(listener: TcpListener, device: Arc<SimDevice>) {
    let sessions = Arc::new(Mutex::new(Sessions::default()));
    let connections = AtomicU64::new(0);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = connections.fetch_add(1, Ordering::Relaxed);
        let device = device.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let device = device.clone();
                let sessions = sessions.clone();
                async move { handle(req, device, sessions, connection).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `Err` closes the connection without a response.
async fn handle(
    req: Request<Incoming>,
    device: Arc<SimDevice>,
    sessions: Arc<Mutex<Sessions>>,
    connection: u64,
) -> Result<Response<Full<Bytes>>, String> {
    if req.method() != Method::POST {
        return Ok(status(StatusCode::METHOD_NOT_ALLOWED));
    }
    let endpoint = req.uri().path().trim_start_matches('/').to_owned();
    let cookie = req
        .headers()
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(req.into_body(), HTTP_MAX_BODY)
        .collect()
        .await
        .map_err(|err| format!("body refused: {err}"))?
        .to_bytes();
    if body.is_empty() {
        return Err("empty body".into());
    }
    let new_cookie = {
        let mut sessions = sessions.lock().expect("sessions lock");
        let continues = match (sessions.current, cookie.as_deref()) {
            (Some((id, _)), Some(cookie)) => cookie == format!("session={id}"),
            (Some((_, conn)), None) => conn == connection,
            (None, _) => false,
        };
        if continues {
            None
        } else {
            let mut id = [0u8; 4];
            crate::device::getrandom_fill(&mut id).map_err(|e| e.to_string())?;
            let id = u32::from_le_bytes(id);
            sessions.current = Some((id, connection));
            device.new_session();
            Some(id)
        }
    };
    let answer =
        tokio::task::spawn_blocking(move || device.handle(&endpoint, &body, HTTP_MAX_BODY))
            .await
            .map_err(|e| e.to_string())??;
    let mut response = Response::new(Full::new(Bytes::from(answer)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html"),
    );
    if let Some(id) = new_cookie {
        response.headers_mut().insert(
            header::SET_COOKIE,
            header::HeaderValue::from_str(&format!("session={id}")).expect("ascii"),
        );
    }
    Ok(response)
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}

/// Binds a listener for one device.
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind(addr).await?)
}
