//! systemd's manager over D-Bus (`org.freedesktop.systemd1`), through the
//! generated proxies of `zbus_systemd`: reload, enable, start and stop units
//! and wait for their jobs, read unit state. Never `systemctl` output.

use std::time::Duration;

use futures_util::StreamExt;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, TimerProxy, UnitProxy};
use zbus_systemd::zbus;

/// Errors talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The system bus could not be reached.
    #[error("connecting to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    /// A call failed.
    #[error("{what}: {source}")]
    Call {
        /// What was asked.
        what: String,
        /// The D-Bus error.
        #[source]
        source: zbus::Error,
    },
    /// A job did not finish in time.
    #[error("{what}: no result after {waited:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long we waited.
        waited: Duration,
    },
    /// systemd (or polkit) refused: the caller may not do this.
    #[error("{what} needs root (or a polkit rule that allows it): {source}")]
    Denied {
        /// What was asked.
        what: String,
        /// The D-Bus error.
        #[source]
        source: zbus::Error,
    },
    /// A job finished with a result other than `done`.
    #[error("{what}: the job ended with result {result:?}; {unit} is {state}")]
    JobFailed {
        /// What was asked.
        what: String,
        /// systemd's job result (`failed`, `timeout`, `canceled`,
        /// `dependency`, ...).
        result: String,
        /// The unit.
        unit: String,
        /// The unit's state once the job was gone, for people:
        /// `failed/failed (result exit-code)`.
        state: String,
    },
}

/// Whether a D-Bus error says the caller is not allowed (by the bus
/// policy, systemd, or polkit without an agent to ask).
fn is_denied(e: &zbus::Error) -> bool {
    use zbus::fdo::Error as Fdo;
    match e {
        zbus::Error::FDO(f) => matches!(
            **f,
            Fdo::AccessDenied(_) | Fdo::AuthFailed(_) | Fdo::InteractiveAuthorizationRequired(_)
        ),
        zbus::Error::MethodError(name, _, _) => name.as_str().ends_with(".AccessDenied"),
        _ => false,
    }
}

fn call(what: impl Into<String>) -> impl FnOnce(zbus::Error) -> BusError {
    let what = what.into();
    move |source| {
        if is_denied(&source) {
            BusError::Denied { what, source }
        } else {
            BusError::Call { what, source }
        }
    }
}

/// What systemd says about a unit.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct UnitState {
    /// `loaded`, `not-found`, `masked`, ...
    pub load_state: String,
    /// `active`, `inactive`, `failed`, `activating`, ...
    pub active_state: String,
    /// `running`, `dead`, `exited`, ...
    pub sub_state: String,
    /// `enabled`, `disabled`, `static`, `masked`, or empty.
    pub unit_file_state: String,
}

/// What systemd says about a service, for diagnosis.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ServiceInfo {
    /// Unit state.
    pub unit: UnitState,
    /// The unit file systemd loaded.
    pub fragment_path: String,
    /// Whether the file on disk changed since it was loaded.
    pub need_daemon_reload: bool,
    /// `success`, `start-limit-hit`, `watchdog`, `exit-code`, ...
    pub result: String,
    /// Automatic restarts so far.
    pub n_restarts: u32,
    /// `StartLimitBurst=`.
    pub start_limit_burst: u32,
    /// The main process (0 when none).
    pub main_pid: u32,
    /// `WatchdogSec=` in microseconds (0: off).
    pub watchdog_usec: u64,
    /// CLOCK_MONOTONIC time of the last watchdog ping (0: none yet).
    pub watchdog_timestamp_monotonic: u64,
    /// CLOCK_MONOTONIC time it last became active (0: never).
    pub active_enter_timestamp_monotonic: u64,
    /// Wall-clock time it last became active, microseconds since the
    /// epoch (0: not since boot).
    pub active_enter_timestamp: u64,
    /// Wall-clock time it last became inactive (or failed), microseconds
    /// since the epoch (0: not since boot).
    pub inactive_enter_timestamp: u64,
    /// Wall-clock time it last left the inactive (or failed) state, i.e.
    /// was last started, microseconds since the epoch (0: not since boot).
    /// Automatic restarts do not leave it: this is the start of a run of
    /// them.
    pub inactive_exit_timestamp: u64,
    /// `User=`.
    pub user: String,
}

/// What systemd says about a timer.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct TimerInfo {
    /// Unit state.
    pub unit: UnitState,
    /// Next elapse, wall clock, microseconds since the epoch (0: none).
    pub next_elapse_realtime: u64,
    /// Next elapse, CLOCK_MONOTONIC microseconds (0: none).
    pub next_elapse_monotonic: u64,
}

/// A connection to systemd's manager.
pub struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

/// Runs a future on the process's one single-threaded runtime: the CLI's
/// operator commands and the installer talk to D-Bus asynchronously.
///
/// A [`Systemd`] connection belongs to the runtime it was made on (its
/// reader task and socket live there), so the runtime is built once and
/// kept for the life of the process: a connection made in one call stays
/// usable in the next. Still, a command should do all of its bus work in
/// one call. Must not be called from inside a runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    use anyhow::Context as _;
    static RUNTIME: std::sync::OnceLock<std::io::Result<tokio::runtime::Runtime>> =
        std::sync::OnceLock::new();
    let rt = RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .as_ref()
        .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
        .context("starting the async runtime")?;
    rt.block_on(f)
}

/// How long to wait for a start or stop job at least; longer when the
/// unit's own start and stop timeouts add up to more.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// How long to wait for a job at most, whatever the unit's timeouts say
/// (they may be `infinity`).
const JOB_TIMEOUT_MAX: Duration = Duration::from_secs(30 * 60);

/// A change of a unit's state, queued as a systemd job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitAction {
    /// `StartUnit`.
    Start,
    /// `StopUnit`.
    Stop,
    /// `RestartUnit`.
    Restart,
    /// `ReloadUnit`.
    Reload,
}

impl UnitAction {
    /// The verb, for messages: `starting`, `stopping`, `restarting`.
    pub fn verb(self) -> &'static str {
        match self {
            UnitAction::Start => "starting",
            UnitAction::Stop => "stopping",
            UnitAction::Restart => "restarting",
            UnitAction::Reload => "reloading",
        }
    }
}

/// How a unit job ended, and the unit after it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobOutcome {
    /// systemd's job result from `JobRemoved`: `done`, `canceled`,
    /// `timeout`, `failed`, `dependency`, `skipped`, ...
    pub result: String,
    /// What systemd says about the unit once the job was gone (the
    /// service fields are zero for other kinds of unit).
    pub state: ServiceInfo,
}

impl JobOutcome {
    /// Whether the job did what was asked.
    pub fn done(&self) -> bool {
        self.result == "done"
    }
}

impl ServiceInfo {
    /// Whether systemd gave up on it: it failed after its start-rate limit
    /// (`StartLimitBurst=`) was reached. systemd 252 leaves `Result` at the
    /// last exit's cause when the limit stops automatic restarts; the
    /// restart count tells.
    pub fn hit_start_limit(&self) -> bool {
        self.result == "start-limit-hit"
            || (self.unit.active_state == "failed"
                && self.start_limit_burst > 0
                && self.n_restarts >= self.start_limit_burst)
    }

    /// The state for people: `active/running`, then the service's result
    /// when it is not `success`: `failed/failed (result exit-code)`.
    pub fn describe(&self) -> String {
        let mut s = format!("{}/{}", self.unit.active_state, self.unit.sub_state);
        if !self.result.is_empty() && self.result != "success" {
            s.push_str(&format!(" (result {})", self.result));
        }
        s
    }
}

/// A systemd time span in microseconds; `None` for `infinity`.
fn usec(v: u64) -> Option<Duration> {
    (v != u64::MAX).then(|| Duration::from_micros(v))
}

/// How long a job on a service may take, from its `TimeoutStartUSec` and
/// `TimeoutStopUSec`: each phase of the job (a stop may take two, the TERM
/// phase then the KILL phase) and a margin; at least [`JOB_TIMEOUT`], at
/// most [`JOB_TIMEOUT_MAX`] (also when a timeout is `infinity`).
fn job_deadline(action: UnitAction, start_usec: u64, stop_usec: u64) -> Duration {
    let (start, stop) = (usec(start_usec), usec(stop_usec));
    let phases = match action {
        UnitAction::Start | UnitAction::Reload => vec![start],
        UnitAction::Stop => vec![stop, stop],
        UnitAction::Restart => vec![stop, stop, start],
    };
    phases
        .into_iter()
        .try_fold(Duration::from_secs(30), |sum, p| Some(sum + p?))
        .unwrap_or(JOB_TIMEOUT_MAX)
        .clamp(JOB_TIMEOUT, JOB_TIMEOUT_MAX)
}

impl Systemd {
    /// Connects to the system bus.
    pub async fn connect() -> Result<Self, BusError> {
        let conn = zbus::Connection::system()
            .await
            .map_err(BusError::Connect)?;
        let manager = ManagerProxy::new(&conn)
            .await
            .map_err(call("creating the manager proxy"))?;
        // Job results (JobRemoved) are only signalled to subscribers.
        manager
            .subscribe()
            .await
            .map_err(call("subscribing to systemd signals"))?;
        Ok(Systemd { conn, manager })
    }

    /// When the service manager started (this boot, for systemd as PID 1;
    /// also inside a container), wall clock, microseconds since the epoch.
    pub async fn booted_at(&self) -> Result<u64, BusError> {
        self.manager
            .userspace_timestamp()
            .await
            .map_err(call("reading when systemd started"))
    }

    /// `Reload`: re-read unit files.
    pub async fn reload(&self) -> Result<(), BusError> {
        self.manager
            .reload()
            .await
            .map_err(call("reloading systemd"))
    }

    /// `EnableUnitFiles`; returns the symlinks made, as `(type, from, to)`.
    pub async fn enable(&self, units: &[&str]) -> Result<Vec<(String, String, String)>, BusError> {
        let names = units.iter().map(|u| (*u).to_owned()).collect();
        let (_, changes) = self
            .manager
            .enable_unit_files(names, false, true)
            .await
            .map_err(call(format!("enabling {}", units.join(" "))))?;
        Ok(changes)
    }

    /// `DisableUnitFiles`; returns the symlinks removed.
    pub async fn disable(&self, units: &[&str]) -> Result<Vec<(String, String, String)>, BusError> {
        let names = units.iter().map(|u| (*u).to_owned()).collect();
        self.manager
            .disable_unit_files(names, false)
            .await
            .map_err(call(format!("disabling {}", units.join(" "))))
    }

    /// Starts a unit and waits for the job's result: `done` or
    /// [`BusError::JobFailed`].
    pub async fn start(&self, unit: &str) -> Result<JobOutcome, BusError> {
        self.change_done(unit, UnitAction::Start).await
    }

    /// Stops a unit and waits for the job's result: `done` or
    /// [`BusError::JobFailed`].
    pub async fn stop(&self, unit: &str) -> Result<JobOutcome, BusError> {
        self.change_done(unit, UnitAction::Stop).await
    }

    /// Restarts a unit and waits for the job's result: `done` or
    /// [`BusError::JobFailed`].
    pub async fn restart(&self, unit: &str) -> Result<JobOutcome, BusError> {
        self.change_done(unit, UnitAction::Restart).await
    }

    /// `ResetFailedUnit`: clears a failed state and the start-rate counter.
    pub async fn reset_failed(&self, unit: &str) -> Result<(), BusError> {
        self.manager
            .reset_failed_unit(unit.to_owned())
            .await
            .map_err(call(format!("resetting {unit}")))
    }

    async fn change_done(&self, unit: &str, action: UnitAction) -> Result<JobOutcome, BusError> {
        let outcome = self.change(unit, action).await?;
        if outcome.done() {
            return Ok(outcome);
        }
        Err(BusError::JobFailed {
            what: format!("{} {unit}", action.verb()),
            result: outcome.result,
            unit: unit.to_owned(),
            state: outcome.state.describe(),
        })
    }

    /// Queues a start, stop or restart job (mode `replace`, as `systemctl`
    /// does) and waits for systemd to remove it (`JobRemoved`): returns the
    /// job's result, whatever it is, and the unit's state after it. Errors
    /// are for a refused request ([`BusError::Denied`]), a bus failure, or
    /// no result in time.
    pub async fn change(&self, unit: &str, action: UnitAction) -> Result<JobOutcome, BusError> {
        let what = format!("{} {unit}", action.verb());
        let waited = self.job_deadline(unit, action).await;
        // Listen before asking, so the JobRemoved signal for our job cannot
        // slip past.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(call("listening for job results"))?;
        let (name, mode) = (unit.to_owned(), "replace".to_owned());
        let job = match action {
            UnitAction::Start => self.manager.start_unit(name, mode).await,
            UnitAction::Stop => self.manager.stop_unit(name, mode).await,
            UnitAction::Restart => self.manager.restart_unit(name, mode).await,
            UnitAction::Reload => self.manager.reload_unit(name, mode).await,
        }
        .map_err(call(what.clone()))?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(args.result.clone());
                }
            }
            None
        };
        let result = match tokio::time::timeout(waited, wait).await {
            Ok(Some(result)) => result,
            Ok(None) => {
                return Err(BusError::Call {
                    what,
                    source: zbus::Error::Failure("the signal stream ended".into()),
                });
            }
            Err(_) => return Err(BusError::Timeout { what, waited }),
        };
        Ok(JobOutcome {
            result,
            state: self.service_info(unit).await?,
        })
    }

    /// How long a job on `unit` may take (see [`job_deadline`]).
    async fn job_deadline(&self, unit: &str, action: UnitAction) -> Duration {
        let Ok(path) = self.unit_path(unit).await else {
            return JOB_TIMEOUT;
        };
        let Ok(s) = ServiceProxy::builder(&self.conn).path(path).build().await else {
            return JOB_TIMEOUT;
        };
        match (s.timeout_start_u_sec().await, s.timeout_stop_u_sec().await) {
            (Ok(start), Ok(stop)) => job_deadline(action, start, stop),
            // Not a service (a timer, a target): its jobs are quick.
            _ => JOB_TIMEOUT,
        }
    }

    /// The state of a unit (loading it if needed, so an unknown unit reads
    /// as `not-found` rather than an error).
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState, BusError> {
        let path = self.unit_path(unit).await?;
        self.state_at(unit, path).await
    }

    async fn state_at(
        &self,
        unit: &str,
        path: zbus::OwnedObjectPath,
    ) -> Result<UnitState, BusError> {
        let u = UnitProxy::builder(&self.conn)
            .path(path)
            .build()
            .await
            .map_err(call(format!("reading {unit}")))?;
        let what = || format!("reading the state of {unit}");
        Ok(UnitState {
            load_state: u.load_state().await.map_err(call(what()))?,
            active_state: u.active_state().await.map_err(call(what()))?,
            sub_state: u.sub_state().await.map_err(call(what()))?,
            unit_file_state: u.unit_file_state().await.map_err(call(what()))?,
        })
    }

    async fn unit_path(&self, unit: &str) -> Result<zbus::OwnedObjectPath, BusError> {
        self.manager
            .load_unit(unit.to_owned())
            .await
            .map_err(call(format!("loading {unit}")))
    }

    /// Everything diagnosis wants to know about a service.
    pub async fn service_info(&self, unit: &str) -> Result<ServiceInfo, BusError> {
        let path = self.unit_path(unit).await?;
        let state = self.state_at(unit, path.clone()).await?;
        let what = || format!("reading {unit}");
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .build()
            .await
            .map_err(call(what()))?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .build()
            .await
            .map_err(call(what()))?;
        Ok(ServiceInfo {
            unit: state,
            fragment_path: u.fragment_path().await.map_err(call(what()))?,
            need_daemon_reload: u.need_daemon_reload().await.map_err(call(what()))?,
            result: s.result().await.unwrap_or_default(),
            n_restarts: s.n_restarts().await.unwrap_or_default(),
            start_limit_burst: u.start_limit_burst().await.unwrap_or_default(),
            main_pid: s.main_pid().await.unwrap_or_default(),
            watchdog_usec: s.watchdog_u_sec().await.unwrap_or_default(),
            watchdog_timestamp_monotonic: s
                .watchdog_timestamp_monotonic()
                .await
                .unwrap_or_default(),
            active_enter_timestamp_monotonic: u
                .active_enter_timestamp_monotonic()
                .await
                .unwrap_or_default(),
            active_enter_timestamp: u.active_enter_timestamp().await.unwrap_or_default(),
            inactive_enter_timestamp: u.inactive_enter_timestamp().await.unwrap_or_default(),
            inactive_exit_timestamp: u.inactive_exit_timestamp().await.unwrap_or_default(),
            user: s.user().await.unwrap_or_default(),
        })
    }

    /// A timer's state and next elapse.
    pub async fn timer_info(&self, unit: &str) -> Result<TimerInfo, BusError> {
        let path = self.unit_path(unit).await?;
        let state = self.state_at(unit, path.clone()).await?;
        let t = TimerProxy::builder(&self.conn)
            .path(path)
            .build()
            .await
            .map_err(call(format!("reading {unit}")))?;
        Ok(TimerInfo {
            unit: state,
            next_elapse_realtime: t.next_elapse_u_sec_realtime().await.unwrap_or_default(),
            next_elapse_monotonic: t.next_elapse_u_sec_monotonic().await.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What issue 17 hit: a bus connection made in one call, used in the
    /// next, failed with "a Tokio 1.x context was found, but it is being
    /// shutdown". Sockets stand in for the connection here.
    #[test]
    fn what_one_call_makes_still_works_in_the_next() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, mut b) = block_on(async { Ok(tokio::net::UnixStream::pair()?) }).unwrap();
        let got = block_on(async {
            a.write_all(b"ping").await?;
            let mut buf = [0; 4];
            b.read_exact(&mut buf).await?;
            Ok(buf)
        })
        .unwrap();
        assert_eq!(&got, b"ping");
    }

    #[test]
    fn a_job_may_take_what_the_units_timeouts_allow() {
        let s = |n: u64| n * 1_000_000;
        // The shipped unit: TimeoutStartSec=90s, TimeoutStopSec=40s.
        assert_eq!(
            job_deadline(UnitAction::Start, s(90), s(40)),
            Duration::from_secs(120)
        );
        assert_eq!(
            job_deadline(UnitAction::Stop, s(90), s(40)),
            Duration::from_secs(120),
            "never less than JOB_TIMEOUT"
        );
        assert_eq!(
            job_deadline(UnitAction::Restart, s(90), s(40)),
            Duration::from_secs(40 + 40 + 90 + 30)
        );
        assert_eq!(
            job_deadline(UnitAction::Stop, s(90), u64::MAX),
            JOB_TIMEOUT_MAX,
            "infinity is bounded"
        );
        assert_eq!(
            job_deadline(UnitAction::Start, s(10 * 3600), s(1)),
            JOB_TIMEOUT_MAX
        );
    }

    #[test]
    fn refusals_are_told_apart_from_other_failures() {
        let denied = zbus::Error::FDO(Box::new(
            zbus::fdo::Error::InteractiveAuthorizationRequired("ask".into()),
        ));
        let e = call("stopping x.service")(denied);
        assert!(matches!(e, BusError::Denied { .. }), "{e:?}");
        let text = crate::error::chain(&e);
        assert!(text.starts_with("stopping x.service needs root"), "{text}");
        let denied = zbus::Error::FDO(Box::new(zbus::fdo::Error::AccessDenied("no".into())));
        assert!(matches!(call("x")(denied), BusError::Denied { .. }));
        let other = zbus::Error::FDO(Box::new(zbus::fdo::Error::Failed("boom".into())));
        assert!(matches!(call("x")(other), BusError::Call { .. }));
    }

    #[test]
    fn a_state_for_people_names_a_result_other_than_success() {
        let mut info = ServiceInfo::default();
        info.unit.active_state = "active".into();
        info.unit.sub_state = "running".into();
        info.result = "success".into();
        assert_eq!(info.describe(), "active/running");
        info.unit.active_state = "failed".into();
        info.unit.sub_state = "failed".into();
        info.result = "exit-code".into();
        assert_eq!(info.describe(), "failed/failed (result exit-code)");
    }
}
