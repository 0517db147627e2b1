//! The per-stream supervisor as a plain state machine: no I/O, no clock, no randomness of its
//! own. The runner feeds it events with the time they happened and a random number for the
//! jitter, and does what it answers.

use std::time::{Duration, Instant, SystemTime};

use super::status::{IngestError, LastError, StreamState, StreamStatus};
use crate::backoff::{Backoff, BackoffConfig};

/// What the runner must do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Tear the pipeline down and try again after this wait.
    RetryAfter(Duration),
    /// Tear the pipeline down and stop: the stream is offline, or failed by policy.
    GiveUp,
}

/// Timing the supervisor needs.
#[derive(Debug, Clone, Copy)]
pub struct SupervisorSettings {
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff: BackoffConfig,
    /// Live sources retry more errors than files (see [`IngestError::is_retryable`]).
    pub live: bool,
}

/// State machine of one stream.
#[derive(Debug, Clone)]
pub struct Supervisor {
    settings: SupervisorSettings,
    backoff: Backoff,
    status: StreamStatus,
    /// When the running attempt started (`None` while waiting to retry or stopped).
    attempt_started: Option<Instant>,
    last_frame: Option<Instant>,
    /// The stream was online at least once and then lost: the next frame is a reconnect.
    lost_after_online: bool,
}

impl Supervisor {
    pub fn new(settings: SupervisorSettings, wall: SystemTime) -> Self {
        Supervisor {
            settings,
            backoff: Backoff::new(settings.backoff),
            status: StreamStatus::new(StreamState::Starting, wall),
            attempt_started: None,
            last_frame: None,
            lost_after_online: false,
        }
    }

    pub fn status(&self) -> &StreamStatus {
        &self.status
    }

    pub fn state(&self) -> StreamState {
        self.status.state
    }

    fn enter(&mut self, state: StreamState, wall: SystemTime) {
        if self.status.state != state {
            self.status.state = state;
            self.status.since = wall;
        }
    }

    /// A disabled stream: nothing will run.
    pub fn disable(&mut self, wall: SystemTime) {
        self.attempt_started = None;
        self.enter(StreamState::Disabled, wall);
    }

    /// A connection attempt begins now.
    pub fn on_attempt(&mut self, now: Instant, wall: SystemTime) {
        self.status.attempts += 1;
        self.attempt_started = Some(now);
        self.last_frame = None;
        let state = if self.status.attempts == 1 {
            StreamState::Starting
        } else {
            StreamState::Reconnecting
        };
        self.enter(state, wall);
    }

    /// The decoder element is known.
    pub fn on_decoder(&mut self, name: &str) {
        self.status.decoder = Some(name.to_string());
    }

    /// A frame was delivered at `now`.
    pub fn on_frame(&mut self, now: Instant, wall: SystemTime) {
        self.last_frame = Some(now);
        if self.status.state != StreamState::Online {
            if self.lost_after_online {
                self.status.reconnects += 1;
                self.lost_after_online = false;
            }
            self.backoff.on_up(now);
            self.enter(StreamState::Online, wall);
        }
    }

    /// Checks the clocks; returns the failure to act on when a stall or connect timeout has
    /// passed (then call [`Supervisor::on_failure`] with it).
    pub fn poll(&mut self, now: Instant) -> Option<IngestError> {
        let started = self.attempt_started?;
        match self.status.state {
            StreamState::Online => {
                let last = self.last_frame.unwrap_or(started);
                (now.saturating_duration_since(last) >= self.settings.stall_timeout)
                    .then_some(IngestError::Stalled(self.settings.stall_timeout))
            }
            StreamState::Starting | StreamState::Reconnecting => {
                (now.saturating_duration_since(started) >= self.settings.connect_timeout)
                    .then_some(IngestError::ConnectTimeout(self.settings.connect_timeout))
            }
            _ => None,
        }
    }

    /// The running attempt failed with `err` at `now`; `unit` is a uniform random number in
    /// `[0, 1)` for the jitter.
    pub fn on_failure(
        &mut self,
        err: IngestError,
        now: Instant,
        wall: SystemTime,
        unit: f64,
    ) -> Next {
        let was_online = self.status.state == StreamState::Online;
        // Drawn now, so a stream that stayed online for `reset_after` starts again from base.
        let wait = self.backoff.on_failure(now, unit);
        if was_online {
            self.lost_after_online = true;
        }
        let retry = err.is_retryable(self.settings.live);
        self.status.last_error = Some(LastError {
            kind: err.kind(),
            message: err.to_string(),
            at: wall,
        });
        self.attempt_started = None;
        if !retry {
            let state = if err.is_policy() {
                StreamState::Failed
            } else {
                StreamState::Offline
            };
            self.enter(state, wall);
            return Next::GiveUp;
        }
        let state = if matches!(err, IngestError::Stalled(_)) {
            StreamState::Stalled
        } else {
            StreamState::Reconnecting
        };
        self.enter(state, wall);
        Next::RetryAfter(wait)
    }

    /// After a stall has been shown, the runner is about to wait and retry.
    pub fn on_retry_wait(&mut self, wall: SystemTime) {
        self.enter(StreamState::Reconnecting, wall);
    }

    /// A file reached its end and `on_eos = "stop"`.
    pub fn on_finished(&mut self, wall: SystemTime) {
        self.attempt_started = None;
        self.status.finished = true;
        self.enter(StreamState::Offline, wall);
    }

    /// The daemon is stopping this stream.
    pub fn on_stopped(&mut self, wall: SystemTime) {
        self.attempt_started = None;
        if !matches!(
            self.status.state,
            StreamState::Disabled | StreamState::Failed
        ) {
            self.enter(StreamState::Offline, wall);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(live: bool) -> SupervisorSettings {
        SupervisorSettings {
            stall_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
            backoff: BackoffConfig {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(1),
                reset_after: Duration::from_secs(10),
            },
            live,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn loss_stall_and_return_count_exactly_one_reconnect() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut s = Supervisor::new(settings(true), w);
        s.on_attempt(t0, w);
        assert_eq!(s.state(), StreamState::Starting);
        s.on_frame(t0 + ms(100), w);
        assert_eq!(s.state(), StreamState::Online);
        assert_eq!(s.poll(t0 + ms(2000)), None);
        let err = s.poll(t0 + ms(2100)).expect("stalled");
        assert_eq!(err.kind(), "stalled");
        let next = s.on_failure(err, t0 + ms(2100), w, 0.5);
        assert_eq!(next, Next::RetryAfter(ms(50)));
        assert_eq!(s.state(), StreamState::Stalled);
        s.on_retry_wait(w);
        assert_eq!(s.state(), StreamState::Reconnecting);
        // Failed attempts while the server is away do not count as reconnects.
        s.on_attempt(t0 + ms(2200), w);
        let next = s.on_failure(IngestError::Refused("x".into()), t0 + ms(2300), w, 0.5);
        assert_eq!(next, Next::RetryAfter(ms(100)));
        s.on_attempt(t0 + ms(2500), w);
        assert_eq!(s.state(), StreamState::Reconnecting);
        s.on_frame(t0 + ms(2600), w);
        s.on_frame(t0 + ms(2700), w);
        assert_eq!(s.state(), StreamState::Online);
        let st = s.status();
        assert_eq!((st.reconnects, st.attempts), (1, 3));
        assert_eq!(st.last_error.as_ref().unwrap().kind, "refused");
    }

    #[test]
    fn first_attempt_failing_is_not_a_reconnect() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut s = Supervisor::new(settings(true), w);
        s.on_attempt(t0, w);
        assert_eq!(s.poll(t0 + ms(4999)), None);
        let err = s.poll(t0 + ms(5000)).unwrap();
        assert_eq!(err, IngestError::ConnectTimeout(Duration::from_secs(5)));
        assert!(matches!(s.on_failure(err, t0, w, 0.1), Next::RetryAfter(_)));
        s.on_attempt(t0 + ms(5100), w);
        s.on_frame(t0 + ms(5200), w);
        assert_eq!(s.status().reconnects, 0);
    }

    #[test]
    fn bad_file_content_gives_up_but_live_sources_retry() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut file = Supervisor::new(settings(false), w);
        file.on_attempt(t0, w);
        let n = file.on_failure(IngestError::Decode("bad".into()), t0, w, 0.5);
        assert_eq!(n, Next::GiveUp);
        assert_eq!(file.state(), StreamState::Offline);
        let mut live = Supervisor::new(settings(true), w);
        live.on_attempt(t0, w);
        let n = live.on_failure(IngestError::Decode("bad".into()), t0, w, 0.5);
        assert!(matches!(n, Next::RetryAfter(_)));
    }

    #[test]
    fn a_refusal_by_policy_fails_the_stream_without_a_retry() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        for live in [true, false] {
            let mut s = Supervisor::new(settings(live), w);
            s.on_attempt(t0, w);
            let err = IngestError::SourceNotAllowed("file:// inside an HLS playlist".into());
            assert_eq!(s.on_failure(err, t0, w, 0.5), Next::GiveUp);
            assert_eq!(s.state(), StreamState::Failed);
            let last = s.status().last_error.clone().unwrap();
            assert_eq!(last.kind, "source_not_allowed");
            assert!(last.message.contains("HLS playlist"), "{}", last.message);
            // Nothing runs any more: no timeout fires, and a stop keeps the reason shown.
            assert_eq!(s.poll(t0 + Duration::from_secs(100)), None);
            s.on_stopped(w);
            assert_eq!(s.state(), StreamState::Failed);
        }
    }

    #[test]
    fn staying_online_resets_the_backoff() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut s = Supervisor::new(settings(true), w);
        let mut t = t0;
        // Fail repeatedly without ever coming online: the ceiling grows.
        for _ in 0..4 {
            s.on_attempt(t, w);
            s.on_failure(IngestError::Refused(String::new()), t, w, 0.999);
            t += ms(10);
        }
        s.on_attempt(t, w);
        s.on_frame(t, w);
        // Online for longer than reset_after, then lost: the wait is drawn from base again.
        let lost = t + Duration::from_secs(11);
        s.on_frame(lost - ms(1), w);
        let Next::RetryAfter(d) = s.on_failure(IngestError::EndOfStream, lost, w, 0.999) else {
            panic!()
        };
        assert!(d < ms(100), "{d:?}");
    }

    #[test]
    fn finished_files_and_stops_end_offline() {
        let t0 = Instant::now();
        let w = SystemTime::now();
        let mut s = Supervisor::new(settings(false), w);
        s.on_attempt(t0, w);
        s.on_frame(t0, w);
        s.on_finished(w);
        assert_eq!(s.state(), StreamState::Offline);
        assert!(s.status().finished);
        assert_eq!(s.poll(t0 + Duration::from_secs(100)), None);
        let mut d = Supervisor::new(settings(true), w);
        d.disable(w);
        d.on_stopped(w);
        assert_eq!(d.state(), StreamState::Disabled);
    }
}
