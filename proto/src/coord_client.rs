//! A coordinator client that finds the leader by itself.
//!
//! It tries the known coordinator addresses in turn; an UNAVAILABLE answer that names the leader
//! (the `cairn-leader` header) moves it straight there; an unreachable coordinator or an election
//! in progress makes it back off and try the next one, until a deadline. Callers never need to
//! know which coordinator leads. Other statuses are returned as they are.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::metadata::coordinator_client::CoordinatorClient;
use crate::LEADER_HEADER;

/// How long a call keeps looking for a leader before it gives up.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

pub use crate::transport::endpoint;

/// Redirect-following coordinator client (cheap to share behind an `Arc`).
pub struct CoordClient {
    addrs: Vec<String>,
    deadline: Duration,
    current: Mutex<(usize, Option<(String, Channel)>)>,
}

impl CoordClient {
    /// A client for the given coordinator addresses (at least one).
    pub fn new(addrs: Vec<String>) -> Result<Self, Status> {
        if addrs.is_empty() {
            return Err(Status::invalid_argument("no coordinator address given"));
        }
        Ok(Self {
            addrs,
            deadline: DEFAULT_DEADLINE,
            current: Mutex::new((0, None)),
        })
    }

    /// Changes how long one call may look for a leader.
    pub fn with_deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// The coordinator addresses this client knows.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    fn channel(&self) -> Result<(String, Channel), Status> {
        let mut cur = self.current.lock().expect("coordinator client lock");
        if let Some(c) = &cur.1 {
            return Ok(c.clone());
        }
        let addr = self.addrs[cur.0 % self.addrs.len()].clone();
        let ch = endpoint(&addr)?.connect_lazy();
        cur.1 = Some((addr.clone(), ch.clone()));
        Ok((addr, ch))
    }

    fn redirect(&self, failed: &str, leader: Option<String>) {
        let mut cur = self.current.lock().expect("coordinator client lock");
        if cur.1.as_ref().map(|c| c.0.as_str()) != Some(failed) {
            return; // someone else already moved on
        }
        match leader.and_then(|l| endpoint(&l).ok().map(|e| (l, e))) {
            Some((l, e)) if l != failed => cur.1 = Some((l, e.connect_lazy())),
            _ => {
                cur.0 += 1;
                cur.1 = None;
            }
        }
    }

    /// Runs `f` against the leader, following redirects and retrying while no leader answers.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut tries = 0usize;
        loop {
            let (addr, ch) = self.channel()?;
            let client = CoordinatorClient::new(ch)
                .max_decoding_message_size(crate::MAX_MESSAGE_SIZE)
                .max_encoding_message_size(crate::MAX_MESSAGE_SIZE);
            let status = match f(client).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            let retryable = matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            );
            if !retryable || start.elapsed() > self.deadline {
                return Err(status);
            }
            let leader = status
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let direct = leader.is_some();
            tracing::debug!(%addr, ?leader, code = ?status.code(), "coordinator redirect/retry");
            self.redirect(&addr, leader);
            tries += 1;
            // A named leader is tried at once; otherwise back off after a full round.
            if !direct || tries.is_multiple_of(self.addrs.len().max(1)) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}
