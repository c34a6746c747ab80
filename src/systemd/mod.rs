//! Talking to systemd: the notify protocol (readiness, status, watchdog)
//! and the unit files.

pub mod notify;
pub mod units;
