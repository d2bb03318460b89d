//! taskexec patch: a handler learns that its client has gone.
//!
//! Upstream Rocket 0.5 runs each handler in a task of its own and never tells it when the
//! connection it answers has closed, so a long poll keeps its resources until its own deadline.
//! Hyper drops the response's channel when it sees the connection end; the server task watches
//! that channel while the handler runs and signals a `ClientGone` the handler may hold.

use std::future::pending;

use tokio::sync::watch;

use crate::request::{FromRequest, Outcome, Request};

/// Resolves [`ClientGone::departed`] once the connection of this request no longer waits for
/// its response. A request guard; never fails.
#[derive(Clone, Debug)]
pub struct ClientGone(Option<watch::Receiver<bool>>);

impl ClientGone {
    /// A signal and the sender that raises it.
    pub(crate) fn pair() -> (watch::Sender<bool>, ClientGone) {
        let (sender, receiver) = watch::channel(false);
        (sender, ClientGone(Some(receiver)))
    }

    /// Resolves once the client has gone; never for a request without a connection (a local
    /// client), nor after the server has finished with the request.
    pub async fn departed(&self) {
        if let Some(receiver) = &self.0 {
            let mut receiver = receiver.clone();
            if receiver.wait_for(|gone| *gone).await.is_ok() {
                return;
            }
        }
        pending().await
    }

    /// Whether the client has gone already.
    pub fn has_departed(&self) -> bool {
        self.0.as_ref().is_some_and(|receiver| *receiver.borrow())
    }
}

#[crate::async_trait]
impl<'r> FromRequest<'r> for ClientGone {
    type Error = std::convert::Infallible;

    async fn from_request(request: &'r Request<'_>) -> Outcome<Self, Self::Error> {
        Outcome::Success(request.local_cache(|| ClientGone(None)).clone())
    }
}
