//! Talking to systemd: the notify protocol (readiness, status, watchdog),
//! the unit files, and the manager over D-Bus.

pub mod bus;
pub mod notify;
pub mod units;

/// Whether systemd is the running init system (`/run/systemd/system`
/// exists), as `sd_booted(3)` decides.
pub fn booted() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}
