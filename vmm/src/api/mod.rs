//! The control API: a Unix stream socket (`--api-socket PATH`) that takes one JSON request per line and
//! answers each with one JSON reply line, in the spirit of cloud-hypervisor's API (`ch-remote`).
//!
//! # Protocol
//! A request is an object with a `command` and that command's fields:
//!
//! | command | fields | result |
//! |---|---|---|
//! | `add-device` | `path` (sysfs path of a host PCI device on vfio-pci), `id` (optional) | the device |
//! | `remove-device` | `id`, `timeout_secs` (optional, default 60, at most [`MAX_TIMEOUT_SECS`]) | the device, parked |
//! | `list-devices` | - | every passthrough device with its state (plugged, unplugging, parked) |
//! | `info` | - | VM and VMM counters: fds, RSS, VFIO map/unmap counters, containers, slots, GSIs |
//! | `dma-test` | `id`, `force` (optional) | what the NIC did when the VMM drove its TX ring (see [`crate::hotplug`]) |
//! | `ping` | - | `"pong"` |
//!
//! The reply is `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`. Every request gets a
//! reply: a line that is not UTF-8, not JSON, an unknown command, a missing or extra field, an unknown id,
//! or a request the VM cannot serve gets an error reply, is logged, and the VMM goes on. A line longer
//! than [`MAX_LINE`] gets an error reply and the connection is closed, and so does a connection on which
//! a whole line does not arrive within [`IDLE_TIMEOUT`].
//!
//! # Threading
//! The server runs on a thread of its own ([`ApiServer::start`]); requests are served one at a time, in
//! order, by a [`Backend`] that the thread owns (so the backend needs no locking of its own). The backend
//! may also name a file descriptor to watch ([`Backend::wake_fd`]); the thread calls
//! [`Backend::on_wake`] when it becomes readable (the hotplug controller's "the guest ejected a device").

pub mod client;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Longest request line accepted (bytes, without the newline).
pub const MAX_LINE: usize = 64 * 1024;
/// Longest `timeout_secs` a `remove-device` may ask for (a day).
pub const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;
/// How long the server waits for each whole request line (and for each reply to be taken) before it
/// closes the connection: one silent or trickling client cannot hold the API, which serves one
/// connection at a time, nor delay the VMM's exit by more than this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A request. See the module documentation for the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Plug a host PCI device (or a parked one again).
    AddDevice {
        /// `/sys/bus/pci/devices/<BDF>` (or the BDF).
        path: String,
        /// The id to give it (default: `vfio<N>`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Unplug a device: the guest is asked to eject it; it is then parked.
    RemoveDevice {
        /// Its id (or BDF).
        id: String,
        /// How long to wait for the guest's eject (seconds).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u64>,
    },
    /// Every passthrough device and its state.
    ListDevices,
    /// Counters of the VM and the VMM process.
    Info,
    /// Test command: the VMM drives the NIC's TX ring itself (see `hotplug`).
    DmaTest {
        /// Its id (or BDF).
        id: String,
        /// Run even though the guest has bus mastering on (its driver may be using the NIC).
        #[serde(default)]
        force: bool,
    },
    /// Liveness.
    Ping,
}

/// A reply. See the module documentation for the wire format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request was served.
    pub ok: bool,
    /// What it produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it was not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A success.
    pub fn ok(result: serde_json::Value) -> Self {
        Reply {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    /// A failure.
    pub fn err(error: impl Into<String>) -> Self {
        Reply {
            ok: false,
            result: None,
            error: Some(error.into()),
        }
    }
    /// The reply as one line of JSON (with the newline).
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|e| {
            format!("{{\"ok\":false,\"error\":\"cannot encode the reply: {e}\"}}")
        });
        s.push('\n');
        s
    }
}

/// Parses one request line. The error is the message of the error reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("the request is not UTF-8 ({e}); send one JSON object per line"))?;
    let text = text.trim();
    if text.is_empty() {
        return Err("empty request; send one JSON object per line".into());
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        format!("the request is not JSON ({e}); send e.g. {{\"command\":\"list-devices\"}}")
    })?;
    let Some(obj) = value.as_object() else {
        return Err("the request must be a JSON object with a \"command\"".into());
    };
    match obj.get("command") {
        None => return Err("the request has no \"command\"".into()),
        Some(c) if !c.is_string() => return Err("\"command\" must be a string".into()),
        _ => {}
    }
    let fields = obj.len();
    let req: Request = serde_json::from_value(value).map_err(|e| {
        format!("bad request: {e} (commands: add-device, remove-device, list-devices, info, dma-test, ping)")
    })?;
    // Serde does not check extra fields of the commands without fields: do it here.
    if matches!(req, Request::ListDevices | Request::Info | Request::Ping) && fields > 1 {
        return Err(format!(
            "bad request: unknown field in {}: this command takes no fields",
            String::from_utf8_lossy(line).trim()
        ));
    }
    if let Request::RemoveDevice {
        timeout_secs: Some(t),
        ..
    } = req
    {
        if t > MAX_TIMEOUT_SECS {
            return Err(format!(
                "bad request: timeout_secs {t} is more than {MAX_TIMEOUT_SECS} (a day)"
            ));
        }
    }
    Ok(req)
}

/// What serves the requests (owned by the server thread).
pub trait Backend: Send + 'static {
    /// Serves one request.
    fn handle(&mut self, req: Request) -> Reply;
    /// A file descriptor to watch besides the socket (e.g. "the guest ejected a device").
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// Called when [`wake_fd`](Self::wake_fd) is readable.
    fn on_wake(&mut self) {}
    /// Called once by the server thread before it serves: `fd` becomes readable when the server is asked to
    /// stop, so a request that waits (for the guest) can give up early.
    fn set_stop_fd(&mut self, fd: RawFd) {
        let _ = fd;
    }
}

/// Errors of starting the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket path is in use by a live server.
    #[error("--api-socket {0}: another process is listening there; pick another path or stop it")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error(
        "--api-socket {0}: the path exists and is not a socket; remove it or pick another path"
    )]
    NotASocket(PathBuf),
    /// bind/listen or another OS call failed.
    #[error("--api-socket {path}: {what}: {source}")]
    Os {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The running API server. [`ApiServer::shutdown`] stops it and hands the backend back.
pub struct ApiServer<B: Backend> {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<B>>,
}

fn bind(path: &Path) -> Result<UnixListener, Error> {
    let os = |what| {
        move |source| Error::Os {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Error::InUse(path.to_path_buf()));
        }
        // A stale socket of a VMM that is gone.
        std::fs::remove_file(path).map_err(os("removing a stale socket"))?;
    }
    let l = UnixListener::bind(path).map_err(os("bind"))?;
    l.set_nonblocking(true).map_err(os("set_nonblocking"))?;
    Ok(l)
}

impl<B: Backend> ApiServer<B> {
    /// Binds `path` (replacing a stale socket, refusing a live one) and serves `backend` on a thread.
    pub fn start(path: &Path, backend: B) -> Result<Self, Error> {
        let listener = bind(path)?;
        let os = |what| {
            move |source| Error::Os {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?;
        let stop2 = stop.try_clone().map_err(os("eventfd"))?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(listener, stop2, backend))
            .map_err(os("spawning the API thread"))?;
        log::info!("api: listening on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// Stops serving (after the request in progress), removes the socket and returns the backend
    /// (`None` if the server thread panicked).
    pub fn shutdown(mut self) -> Option<B> {
        let _ = self.stop.write(1);
        let b = self.thread.take().and_then(|t| t.join().ok());
        let _ = std::fs::remove_file(&self.path);
        b
    }
}

impl<B: Backend> Drop for ApiServer<B> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn poll_in(fds: &[RawFd], timeout_ms: i32) -> Vec<bool> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of pollfd for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    p.iter().map(|x| x.revents != 0).collect()
}

fn serve<B: Backend>(listener: UnixListener, stop: EventFd, mut backend: B) -> B {
    backend.set_stop_fd(stop.as_raw_fd());
    loop {
        let mut fds = vec![stop.as_raw_fd(), listener.as_raw_fd()];
        if let Some(w) = backend.wake_fd() {
            fds.push(w);
        }
        let ready = poll_in(&fds, 1000);
        if ready[0] {
            log::info!("api: stopping");
            return backend;
        }
        if ready.get(2).copied().unwrap_or(false) {
            backend.on_wake();
        }
        if ready[1] {
            match listener.accept() {
                Ok((stream, _)) => serve_connection(stream, &mut backend),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => log::warn!("api: accept failed: {e}"),
            }
        }
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes. `Ok(None)` at end of stream; `Err(true)` when the line
/// is too long (the connection must be closed), `Err(false)` on an I/O error or time-out.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<Option<()>, bool> {
    buf.clear();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', buf)
        .map_err(|_| false)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        return Err(true);
    }
    Ok(Some(()))
}

/// The connection's read side, with a deadline that the bytes of one request line share (a client that
/// sends a byte now and then still runs out of time).
struct UntilDeadline {
    stream: UnixStream,
    until: Instant,
}

impl Read for UntilDeadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// Serves one connection: a reply line for every request line, until the client closes it or a line
/// takes longer than [`IDLE_TIMEOUT`] to arrive.
pub fn serve_connection<B: Backend>(stream: UnixStream, backend: &mut B) {
    serve_connection_for(stream, backend, IDLE_TIMEOUT)
}

fn serve_connection_for<B: Backend>(stream: UnixStream, backend: &mut B, line_time: Duration) {
    if let Err(e) = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_write_timeout(Some(line_time)))
    {
        log::warn!("api: cannot set up a connection: {e}");
        return;
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log::warn!("api: cannot set up a connection: {e}");
            return;
        }
    };
    let mut reader = BufReader::new(UntilDeadline {
        stream,
        until: Instant::now(),
    });
    let mut buf = Vec::new();
    loop {
        reader.get_mut().until = Instant::now() + line_time;
        let reply = match read_line(&mut reader, &mut buf) {
            Ok(None) | Err(false) => return,
            Err(true) => {
                log::warn!("api: a request longer than {MAX_LINE} bytes: closing the connection");
                let r = Reply::err(format!(
                    "request longer than {MAX_LINE} bytes; connection closed"
                ));
                let _ = writer.write_all(r.to_line().as_bytes());
                return;
            }
            Ok(Some(())) if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(Some(())) => match parse_request(&buf) {
                Ok(req) => {
                    log::info!("api: request {req:?}");
                    let r = backend.handle(req);
                    if let Some(e) = &r.error {
                        log::warn!("api: request failed: {e}");
                    }
                    r
                }
                Err(e) => {
                    log::warn!("api: {e}");
                    Reply::err(e)
                }
            },
        };
        if writer.write_all(reply.to_line().as_bytes()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        served: usize,
    }

    impl Backend for Echo {
        fn handle(&mut self, req: Request) -> Reply {
            self.served += 1;
            match req {
                Request::Ping => Reply::ok(serde_json::json!("pong")),
                Request::RemoveDevice { id, .. } if id == "nope" => {
                    Reply::err("no device with id 'nope'")
                }
                other => Reply::ok(serde_json::to_value(other).unwrap_or_default()),
            }
        }
    }

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(br#"{"command":"ping"}"#), Ok(Request::Ping));
        assert_eq!(
            parse_request(
                br#" {"command":"add-device","path":"/sys/bus/pci/devices/0000:00:02.0"} "#
            ),
            Ok(Request::AddDevice {
                path: "/sys/bus/pci/devices/0000:00:02.0".into(),
                id: None
            })
        );
        assert_eq!(
            parse_request(br#"{"command":"remove-device","id":"nic0","timeout_secs":5}"#),
            Ok(Request::RemoveDevice {
                id: "nic0".into(),
                timeout_secs: Some(5)
            })
        );
        assert_eq!(
            parse_request(br#"{"command":"dma-test","id":"vfio0"}"#),
            Ok(Request::DmaTest {
                id: "vfio0".into(),
                force: false
            })
        );
    }

    #[test]
    fn malformed_requests_get_errors_that_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty request"),
            (b"   ", "empty request"),
            (b"\xff\xfe", "not UTF-8"),
            (b"{", "not JSON"),
            (b"list-devices", "not JSON"),
            (b"[1,2]", "must be a JSON object"),
            (b"42", "must be a JSON object"),
            (b"{}", "no \"command\""),
            (br#"{"command":7}"#, "must be a string"),
            (br#"{"command":"reboot"}"#, "unknown variant"),
            (br#"{"command":"add-device"}"#, "missing field `path`"),
            (br#"{"command":"add-device","path":3}"#, "invalid type"),
            (br#"{"command":"info","extra":1}"#, "unknown field"),
            (
                br#"{"command":"remove-device","id":"x","timeout_secs":-1}"#,
                "invalid value",
            ),
            (b"{\"command\":\"ping\"}{", "not JSON"),
            (
                br#"{"command":"remove-device","id":"x","timeout_secs":18446744073709551615}"#,
                "more than 86400",
            ),
            (
                br#"{"command":"remove-device","id":"x","timeout_secs":1e400}"#,
                "not JSON",
            ),
        ];
        for (input, want) in cases {
            let e = parse_request(input).unwrap_err();
            assert!(
                e.contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn replies_are_one_json_line() {
        let l = Reply::ok(serde_json::json!({"a": 1})).to_line();
        assert_eq!(l, "{\"ok\":true,\"result\":{\"a\":1}}\n");
        let l = Reply::err("bad \"thing\"\n").to_line();
        assert_eq!(l.matches('\n').count(), 1);
        let back: Reply = serde_json::from_str(l.trim()).unwrap();
        assert!(!back.ok);
        assert_eq!(back.error.as_deref(), Some("bad \"thing\"\n"));
    }

    fn roundtrip(path: &Path, lines: &[&[u8]]) -> Vec<Reply> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        for l in lines {
            s.write_all(l).unwrap();
            s.write_all(b"\n").unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        BufReader::new(s).read_to_string(&mut out).unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Sends a line longer than [`MAX_LINE`] and returns the replies read until the server closed the
    /// connection. The server stops reading after `MAX_LINE + 1` bytes, replies and closes: the rest of
    /// our write may then fail (EPIPE), and a read after the reply may fail (ECONNRESET, because bytes we
    /// sent were left unread). Neither is an error of the server; the reply is queued before either.
    fn send_overlong_line(path: &Path) -> Vec<Reply> {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let _ = s.write_all(&long);
        let mut r = BufReader::new(s);
        let mut replies = Vec::new();
        let mut line = String::new();
        while let Ok(n) = r.read_line(&mut line) {
            if n == 0 {
                break;
            }
            replies.push(serde_json::from_str(line.trim()).unwrap());
            line.clear();
        }
        replies
    }

    #[test]
    fn the_server_answers_every_request_and_survives_garbage() {
        let dir = std::env::temp_dir().join(format!("iovmm-api-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let server = ApiServer::start(&path, Echo { served: 0 }).unwrap();
        // A second server on the same live path is refused.
        assert!(matches!(
            ApiServer::start(&path, Echo { served: 0 }),
            Err(Error::InUse(_))
        ));
        let replies = roundtrip(
            &path,
            &[
                br#"{"command":"ping"}"#,
                b"garbage",
                b"\xff",
                br#"{"command":"remove-device","id":"nope"}"#,
                b"",
                br#"{"command":"list-devices"}"#,
            ],
        );
        assert_eq!(replies.len(), 5, "{replies:?}");
        assert!(replies[0].ok);
        assert_eq!(replies[0].result, Some(serde_json::json!("pong")));
        assert!(!replies[1].ok && !replies[2].ok);
        assert_eq!(
            replies[3].error.as_deref(),
            Some("no device with id 'nope'")
        );
        assert!(replies[4].ok);
        // A client that hangs up at once, and one that sends an over-long line.
        drop(UnixStream::connect(&path).unwrap());
        let r = send_overlong_line(&path);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].error.as_deref().unwrap_or("").contains("longer than"));
        // Still alive.
        let r = roundtrip(&path, &[br#"{"command":"ping"}"#]);
        assert!(r[0].ok);
        let backend = server.shutdown().unwrap();
        assert_eq!(backend.served, 4);
        assert!(!path.exists(), "the socket is removed");
        // A stale socket file is replaced; a non-socket file is refused.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        let s = ApiServer::start(&path, Echo { served: 0 }).unwrap();
        drop(s);
        std::fs::write(&path, "x").unwrap();
        assert!(matches!(
            ApiServer::start(&path, Echo { served: 0 }),
            Err(Error::NotASocket(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_trickles_a_request_is_cut_off_when_the_line_time_is_up() {
        let (server_end, mut client) = UnixStream::pair().unwrap();
        let line_time = Duration::from_millis(600);
        let trickle = std::thread::spawn(move || {
            // One byte every 100 ms: each read comes well within the line time, the line never does.
            let mut sent = 0;
            for b in br#"{"command":"ping"}"#.iter().cycle().take(40) {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        });
        let start = Instant::now();
        let mut echo = Echo { served: 0 };
        serve_connection_for(server_end, &mut echo, line_time);
        let took = start.elapsed();
        let sent = trickle.join().unwrap();
        assert_eq!(echo.served, 0);
        assert!(took >= line_time, "served for {took:?}");
        assert!(
            sent < 40,
            "the server closed the connection before the client was done ({sent} bytes)"
        );
    }

    #[test]
    fn requests_on_one_connection_each_get_the_full_line_time() {
        let (server_end, mut client) = UnixStream::pair().unwrap();
        let line_time = Duration::from_millis(400);
        let c = std::thread::spawn(move || {
            let mut replies = 0;
            let mut r = BufReader::new(client.try_clone().unwrap());
            for _ in 0..4 {
                // Longer in all than one line time, but each line comes in time.
                std::thread::sleep(Duration::from_millis(150));
                client.write_all(b"{\"command\":\"ping\"}\n").unwrap();
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) > 0 {
                    replies += 1;
                }
            }
            replies
        });
        let mut echo = Echo { served: 0 };
        serve_connection_for(server_end, &mut echo, line_time);
        assert_eq!(c.join().unwrap(), 4);
        assert_eq!(echo.served, 4);
    }
}
