//! Reading a request body with a size cap and a deadline.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;

/// The whole of a small request body must arrive within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// More than the limit was sent.
    #[error("the body may be at most {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The client did not finish sending in time.
    #[error("the body did not arrive within {} s", .after.as_secs())]
    TimedOut {
        /// The deadline that passed.
        after: Duration,
    },
    /// The connection failed or the client gave up part-way.
    #[error("the request body could not be read: {0}")]
    Incomplete(String),
}

/// Reads a whole body of at most `limit` bytes that must arrive within `deadline`.
pub async fn read_body<B>(body: B, limit: usize, deadline: Duration) -> Result<Bytes, BodyError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::TimedOut { after: deadline }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Ok(Err(error)) => Err(BodyError::Incomplete(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use hyper::body::Frame;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A client that sends one byte of its body and then nothing ever again.
    struct Trickle(bool);

    impl Body for Trickle {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"{")))))
            }
        }
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let body = Full::new(Bytes::from_static(b"{\"a\":1}"));
        let read = read_body(body, 7, BODY_TIMEOUT).await.unwrap();
        assert_eq!(&read[..], b"{\"a\":1}");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let body = Full::new(Bytes::from_static(b"12345678"));
        let err = read_body(body, 7, BODY_TIMEOUT).await.unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { limit: 7 }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_times_out() {
        let err = read_body(Trickle(false), 1024, BODY_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TimedOut { .. }), "{err}");
        assert_eq!(err.to_string(), "the body did not arrive within 30 s");
    }
}
