//! systemd service notifications (`Type=notify`): `READY=1` once the store is open and the
//! listener bound, `STATUS=` lines, `WATCHDOG=1` keep-alives when the unit sets `WatchdogSec`,
//! and `STOPPING=1` at shutdown. The protocol is one datagram per message to the unix socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace); without that
//! variable every call does nothing, so the same binary runs under any supervisor.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    #[error("cannot send to NOTIFY_SOCKET {socket:?}: {source}")]
    Send {
        socket: String,
        source: std::io::Error,
    },
}

/// Where notifications go, as `NOTIFY_SOCKET` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Address {
    fn parse(value: &str) -> Result<Self, NotifyError> {
        if let Some(name) = value.strip_prefix('@') {
            if !name.is_empty() {
                return Ok(Self::Abstract(name.as_bytes().to_vec()));
            }
        } else if value.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(value)));
        }
        Err(NotifyError::BadAddress(value.to_string()))
    }
}

/// The service manager's notification socket, if transship runs under one.
#[derive(Debug, Clone)]
pub struct Notifier {
    address: Address,
    /// Kept for error messages.
    raw: String,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for; `Ok(None)` when it is unset or empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(raw) if !raw.is_empty() => Ok(Some(Self {
                address: Address::parse(&raw)?,
                raw,
            })),
            _ => Ok(None),
        }
    }

    /// Sends one message (newline-separated `KEY=VALUE` assignments).
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        let failed = |source| NotifyError::Send {
            socket: self.raw.clone(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(failed)?;
        match &self.address {
            Address::Path(path) => socket.send_to(message.as_bytes(), path),
            Address::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr =
                    std::os::unix::net::SocketAddr::from_abstract_name(name).map_err(failed)?;
                socket.send_to_addr(message.as_bytes(), &addr)
            }
        }
        .map(|_| ())
        .map_err(failed)
    }

    /// Sends a message, logging rather than failing: a lost notification must not take the
    /// registry down (systemd notices a missing READY or watchdog by itself).
    pub fn tell(&self, message: &str) {
        if let Err(e) = self.send(message) {
            tracing::warn!(error = %e, "systemd notification failed");
        }
    }
}

/// `STATUS=` text with line breaks removed (a newline would start a new assignment).
pub fn status(text: &str) -> String {
    format!("STATUS={}", text.replace(['\n', '\r'], " "))
}

/// How often to send `WATCHDOG=1`: half the interval systemd gives in `WATCHDOG_USEC`, if that
/// is meant for this process (`WATCHDOG_PID` unset or ours). `None`: no watchdog.
pub fn watchdog_period() -> Option<Duration> {
    watchdog_period_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_period_from(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// How often `STATUS=` is refreshed when no watchdog asks for more.
const STATUS_PERIOD: Duration = Duration::from_secs(30);

/// A running service's link to its manager: after `ready`, a task refreshes `STATUS=` (and
/// sends `WATCHDOG=1` if asked to) until `stopping`.
pub struct Service {
    notifier: Notifier,
    task: tokio::task::JoinHandle<()>,
}

impl Service {
    /// Sends `READY=1` with the first status line and starts the refresh task; `None` when no
    /// service manager listens. Call it on a tokio runtime once the listener is bound and the
    /// store is open.
    pub fn ready(status_text: impl Fn() -> String + Send + 'static) -> Option<Self> {
        let notifier = match Notifier::from_env() {
            Ok(n) => n?,
            Err(e) => {
                tracing::warn!(error = %e, "not notifying systemd");
                return None;
            }
        };
        notifier.tell(&format!("READY=1\n{}", status(&status_text())));
        let watchdog = watchdog_period();
        let tick = watchdog.map_or(STATUS_PERIOD, |w| w.min(STATUS_PERIOD));
        let n = notifier.clone();
        let task = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                interval.tick().await;
                let line = status(&status_text());
                match watchdog {
                    Some(_) => n.tell(&format!("WATCHDOG=1\n{line}")),
                    None => n.tell(&line),
                }
            }
        });
        Some(Self { notifier, task })
    }

    /// Sends `STOPPING=1`: shutdown has begun (in-flight requests are finishing). The
    /// watchdog is no longer fed; systemd bounds the stop with `TimeoutStopSec` instead.
    pub fn stopping(&self) {
        self.task.abort();
        self.notifier
            .tell("STOPPING=1\nSTATUS=stopping: finishing requests in flight");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_paths_or_abstract_names() {
        assert_eq!(
            Address::parse("/run/systemd/notify").unwrap(),
            Address::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            Address::parse("@sd-notify").unwrap(),
            Address::Abstract(b"sd-notify".to_vec())
        );
        for bad in ["", "@", "relative/path", "vsock:2:1234"] {
            assert!(Address::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watchdog_period_is_half_the_interval_for_this_process_only() {
        assert_eq!(
            watchdog_period_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_period_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_period_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_period_from(None, None, 7), None);
        assert_eq!(watchdog_period_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_period_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn a_message_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            address: Address::Path(path.clone()),
            raw: path.display().to_string(),
        };
        n.send("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("transship-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            address: Address::parse(&format!("@{name}")).unwrap(),
            raw: format!("@{name}"),
        };
        n.send("WATCHDOG=1").unwrap();
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn status_stays_one_assignment() {
        assert_eq!(status("a\nb\r"), "STATUS=a b ");
    }
}
