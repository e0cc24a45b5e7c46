//! Forwarding a response stream to a client with the request's deadline enforced.

use crate::status::deadline_status;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The response-stream type of every streaming handler.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Messages buffered between the source and the client.
const BUFFER: usize = 64;

/// Spawns a task that moves `source` to the returned stream until the source ends, an error
/// passes, the client goes away (the source is dropped, which cancels the work upstream), the
/// `deadline` passes (DEADLINE_EXCEEDED) or `abort` fires (the status `on_abort` makes).
pub fn forward<T, S>(
    source: S,
    deadline: Option<Instant>,
    abort: Option<CancellationToken>,
    on_abort: fn() -> Status,
) -> BoxStream<T>
where
    T: Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(BUFFER);
    tokio::spawn(async move {
        let mut source = Box::pin(source);
        let abort = abort.unwrap_or_default();
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            tokio::select! {
                biased;
                _ = tx.closed() => break,
                _ = &mut expired => {
                    let _ = tx.send(Err(deadline_status("streaming the response"))).await;
                    break;
                }
                _ = abort.cancelled() => {
                    let _ = tx.send(Err(on_abort())).await;
                    break;
                }
                item = source.next() => match item {
                    Some(Ok(m)) => {
                        if tx.send(Ok(m)).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(s)) => {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                    None => break,
                },
            }
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn deadline_ends_stream() {
        let never = tokio_stream::pending::<Result<u32, Status>>();
        let deadline = Instant::now() + Duration::from_millis(20);
        let mut s = forward(never, Some(deadline), None, || Status::unavailable("x"));
        let item = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(item.unwrap_err().code(), tonic::Code::DeadlineExceeded);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn abort_and_passthrough() {
        let (tx, rx) = mpsc::channel::<Result<u32, Status>>(4);
        tx.send(Ok(7)).await.unwrap();
        let token = CancellationToken::new();
        let mut s = forward(ReceiverStream::new(rx), None, Some(token.clone()), || {
            Status::unavailable("shutting down")
        });
        assert_eq!(s.next().await.unwrap().unwrap(), 7);
        token.cancel();
        let end = tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .unwrap();
        assert_eq!(end.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn client_gone_drops_source() {
        let (tx, rx) = mpsc::channel::<Result<u32, Status>>(4);
        let s = forward(ReceiverStream::new(rx), None, None, || {
            Status::unavailable("x")
        });
        drop(s);
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .unwrap();
    }
}
