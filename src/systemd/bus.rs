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
    /// A job finished with a result other than `done`.
    #[error("{what}: the job ended with result {result:?}")]
    JobFailed {
        /// What was asked.
        what: String,
        /// systemd's job result (`failed`, `timeout`, `dependency`, ...).
        result: String,
    },
}

fn call(what: impl Into<String>) -> impl FnOnce(zbus::Error) -> BusError {
    let what = what.into();
    move |source| BusError::Call { what, source }
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

/// Runs a future on a single-threaded runtime: the CLI's operator
/// commands and the installer talk to D-Bus asynchronously.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

/// How long to wait for a start or stop job.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);

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

    /// Starts a unit and waits for the job's result.
    pub async fn start(&self, unit: &str) -> Result<(), BusError> {
        self.job(unit, "starting", |m, u| {
            Box::pin(m.start_unit(u, "replace".into()))
        })
        .await
    }

    /// Stops a unit and waits for the job's result.
    pub async fn stop(&self, unit: &str) -> Result<(), BusError> {
        self.job(unit, "stopping", |m, u| {
            Box::pin(m.stop_unit(u, "replace".into()))
        })
        .await
    }

    /// Restarts a unit and waits for the job's result.
    pub async fn restart(&self, unit: &str) -> Result<(), BusError> {
        self.job(unit, "restarting", |m, u| {
            Box::pin(m.restart_unit(u, "replace".into()))
        })
        .await
    }

    /// `ResetFailedUnit`: clears a failed state and the start-rate counter.
    pub async fn reset_failed(&self, unit: &str) -> Result<(), BusError> {
        self.manager
            .reset_failed_unit(unit.to_owned())
            .await
            .map_err(call(format!("resetting {unit}")))
    }

    async fn job<'a>(
        &'a self,
        unit: &str,
        verb: &str,
        request: impl FnOnce(
            &'a ManagerProxy<'static>,
            String,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = zbus::Result<zbus::OwnedObjectPath>> + Send + 'a>,
        >,
    ) -> Result<(), BusError> {
        let what = format!("{verb} {unit}");
        // Listen before asking, so the JobRemoved signal for our job cannot
        // slip past.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(call("listening for job results"))?;
        let job = request(&self.manager, unit.to_owned())
            .await
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
        match tokio::time::timeout(JOB_TIMEOUT, wait).await {
            Ok(Some(result)) if result == "done" => Ok(()),
            Ok(Some(result)) => Err(BusError::JobFailed { what, result }),
            Ok(None) => Err(BusError::Call {
                what,
                source: zbus::Error::Failure("the signal stream ended".into()),
            }),
            Err(_) => Err(BusError::Timeout {
                what,
                waited: JOB_TIMEOUT,
            }),
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
