//! The channel an operator query travels on: the HTTP and socket handlers hold a
//! [`QueryClient`], send a [`Query`] and wait; the reconcile loop, which owns the
//! engine and the datapath, receives it between turns and answers
//! (`runtime::answers`), so an answer always describes one consistent state (what
//! is programmed now), never a half-applied one.
//!
//! Must not: compute an answer (the loop does) or know HTTP (the server does).
use tokio::sync::{mpsc, oneshot};

use super::explain::ExplainError;
use super::wire::{ExplainQuery, ExplainReport, StatusReport};

/// A question for the reconcile loop.
pub enum Query {
    Status(oneshot::Sender<StatusReport>),
    Explain(
        ExplainQuery,
        oneshot::Sender<Result<ExplainReport, ExplainError>>,
    ),
}

/// The handlers' end: asks the loop and waits.
#[derive(Clone)]
pub struct QueryClient {
    tx: mpsc::Sender<Query>,
}

/// The loop has stopped (the agent is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the agent's reconcile loop is not answering")]
pub struct LoopGone;

impl QueryClient {
    pub fn channel() -> (Self, mpsc::Receiver<Query>) {
        let (tx, rx) = mpsc::channel(64);
        (Self { tx }, rx)
    }

    pub async fn status(&self) -> Result<StatusReport, LoopGone> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Query::Status(reply))
            .await
            .map_err(|_| LoopGone)?;
        answer.await.map_err(|_| LoopGone)
    }

    pub async fn explain(
        &self,
        query: ExplainQuery,
    ) -> Result<Result<ExplainReport, ExplainError>, LoopGone> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Query::Explain(query, reply))
            .await
            .map_err(|_| LoopGone)?;
        answer.await.map_err(|_| LoopGone)
    }
}
