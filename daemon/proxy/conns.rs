//! Connections: how many the proxy keeps, whose they are, and how long one may sit doing nothing.
//!
//! Invariants:
//! - A connection with no request in flight is idle, and an idle connection holds its place only
//!   for `--idle-timeout`; once it has started sending a request head it has `--header-timeout`
//!   to finish it (slowloris). So only connections doing work outlive the timeouts.
//! - At `--max-connections`, and when accepting fails for want of file descriptors, the
//!   connection idle the longest is closed to make room: idle connections cannot lock out a
//!   client with work to do.
//! - The connections of one user (the uid owning the peer socket, see `peer`) are at most
//!   `--max-connections-per-user`; a user at the share first loses its own idle connections,
//!   and past that its new connections are answered 503.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// The limits, each a `capitd` flag.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// From a request head's first byte to its end (and from a connection's opening to its first
    /// request's end): slowloris gets no longer.
    pub header_timeout: Duration,
    /// How long a connection with no request in flight stays open.
    pub idle_timeout: Duration,
    /// How long a request body may take to arrive in full.
    pub body_timeout: Duration,
    /// Open connections at most; `None` sizes it from the file descriptor limit at start.
    pub max_connections: Option<usize>,
    /// Open connections of one user at most; `None` is half of the total.
    pub max_per_user: Option<usize>,
}

const NEVER: u64 = u64::MAX;

/// One connection as the registry and its watchdog see it.
pub struct Activity {
    opened: Instant,
    /// The uid that owns the peer's socket, when the kernel says.
    pub user: Option<u32>,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the connection last became idle.
    idle_since_ms: AtomicU64,
    /// Milliseconds after `opened` of the first byte read while idle (a request head begun).
    head_started_ms: AtomicU64,
    /// The client spoke HTTP/2, whose idle connections carry pings: only the idle timeout counts.
    http2: AtomicBool,
    /// Bytes have arrived (the first read tells HTTP/2 by its preface).
    spoke: AtomicBool,
    /// Asked to close (evicted to make room).
    evicted: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new(user: Option<u32>) -> Activity {
        Activity {
            opened: Instant::now(),
            user,
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NEVER),
            http2: AtomicBool::new(false),
            spoke: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When the connection must close, as things stand; `None` while a request is in flight.
    pub fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.evicted.load(Ordering::Acquire) {
            return Some(Instant::now());
        }
        if !self.is_idle() {
            return None;
        }
        let idle_end = self.idle_since_ms.load(Ordering::Acquire) + limits.idle_timeout.as_millis() as u64;
        let head = self.head_started_ms.load(Ordering::Acquire);
        let end = if head != NEVER && !self.http2.load(Ordering::Acquire) {
            idle_end.min(head + limits.header_timeout.as_millis() as u64)
        } else {
            idle_end
        };
        Some(self.opened + Duration::from_millis(end))
    }

    /// Resolves when something that moves the deadline happens.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Marks a request as begun; the returned guard marks it done when dropped (with its
    /// response body, after the last byte).
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(NEVER, Ordering::Release);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    fn saw_bytes(&self, bytes: &[u8]) {
        if !self.spoke.swap(true, Ordering::AcqRel) && bytes.starts_with(b"PRI * HTTP/2.0") {
            self.http2.store(true, Ordering::Release);
        }
        if self.is_idle() && self.head_started_ms.load(Ordering::Acquire) == NEVER {
            self.head_started_ms.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        }
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.idle_since_ms.store(activity.now_ms(), Ordering::Release);
            activity.changed.notify_one();
        }
    }
}

/// A response body that keeps its request counted as in flight until the body is done.
pub struct Guarded<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Guarded<B> {
    pub fn new(body: B, in_flight: InFlight) -> Guarded<B> {
        Guarded { body, _in_flight: in_flight }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A socket that tells its connection's [`Activity`] when bytes arrive.
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Watched<T> {
        Watched { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.saw_bytes(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Every open connection, by id, and how many each user has.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    all: HashMap<u64, Arc<Activity>>,
    per_user: HashMap<u32, usize>,
}

/// A connection's place in the registry; dropping it gives the place back.
pub struct Place {
    registry: Arc<Registry>,
    id: u64,
    pub activity: Arc<Activity>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.registry.lock();
        open.all.remove(&self.id);
        if let Some(user) = self.activity.user
            && let Some(count) = open.per_user.get_mut(&user)
        {
            *count -= 1;
            if *count == 0 {
                open.per_user.remove(&user);
            }
        }
    }
}

/// Whether a new connection is within its user's share.
pub enum Admission {
    Within(Place),
    /// Over the share with nothing idle to give up: answer it 503 and close it.
    OverShare(Place, usize),
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new connection from `user`, making room within its share by closing its
    /// longest-idle connection when it has one.
    pub fn admit(self: &Arc<Self>, user: Option<u32>, share: usize) -> Admission {
        let activity = Arc::new(Activity::new(user));
        let mut open = self.lock();
        let id = open.next_id;
        open.next_id += 1;
        open.all.insert(id, activity.clone());
        let place = Place { registry: self.clone(), id, activity };
        let Some(user) = user else {
            return Admission::Within(place);
        };
        let count = open.per_user.entry(user).or_default();
        *count += 1;
        let count = *count;
        if count <= share {
            return Admission::Within(place);
        }
        if evict_longest_idle(&open, |a| a.user == Some(user) && !std::ptr::eq(a, &*place.activity)) {
            Admission::Within(place)
        } else {
            Admission::OverShare(place, count - 1)
        }
    }

    /// Closes the connection idle the longest, if any is idle; true when one was.
    pub fn evict_one(&self) -> bool {
        evict_longest_idle(&self.lock(), |_| true)
    }
}

fn evict_longest_idle(open: &Open, eligible: impl Fn(&Activity) -> bool) -> bool {
    let victim = open
        .all
        .values()
        .filter(|a| a.is_idle() && !a.evicted.load(Ordering::Acquire) && eligible(a))
        .min_by_key(|a| a.opened + Duration::from_millis(a.idle_since_ms.load(Ordering::Acquire)));
    match victim {
        Some(activity) => {
            activity.evicted.store(true, Ordering::Release);
            activity.changed.notify_one();
            true
        }
        None => false,
    }
}

/// Raises the soft limit on open files to the hard limit (the inherited soft limit is often
/// 1,024, which a few hundred connections and their upstreams exhaust) and returns the limit
/// now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    // macOS refuses an unlimited soft limit for files; OPEN_MAX is what it allows.
    let target = if cfg!(target_os = "macos") { limit.rlim_max.min(10_240) } else { limit.rlim_max };
    if target > limit.rlim_cur {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct passed; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return target;
        }
    }
    limit.rlim_cur
}

/// File descriptors kept back from connections: the database, the control socket and its
/// clients, logs, the runtime's own.
const FD_RESERVE: u64 = 128;
/// The default connection limit when descriptors are plentiful: far more than any set of local
/// agents opens, and small enough that its buffers stay modest.
const DEFAULT_MAX_CONNECTIONS: u64 = 8_192;

/// The connection limit for `fd_limit` open files: each client connection may hold one upstream
/// connection too, so two descriptors each. A limit asked for beyond that is lowered to it.
pub fn connection_budget(fd_limit: u64, asked: Option<usize>) -> (usize, Option<usize>) {
    let fits = (fd_limit.saturating_sub(FD_RESERVE) / 2).max(16) as usize;
    match asked {
        Some(n) if n > fits => (fits, Some(n)),
        Some(n) => (n, None),
        None => (fits.min(DEFAULT_MAX_CONNECTIONS as usize), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: None,
            max_per_user: None,
        }
    }

    fn secs_after(activity: &Activity, deadline: Option<Instant>) -> Option<u64> {
        deadline.map(|d| d.duration_since(activity.opened).as_secs())
    }

    #[test]
    fn idle_connections_close_at_the_idle_timeout_and_slow_heads_at_the_header_timeout() {
        let activity = Arc::new(Activity::new(None));
        assert_eq!(secs_after(&activity, activity.deadline(&limits())), Some(60), "a fresh connection sending nothing");
        activity.saw_bytes(b"GET /");
        assert_eq!(secs_after(&activity, activity.deadline(&limits())), Some(10), "a head begun must end in time");
        let request = activity.begin_request();
        assert_eq!(activity.deadline(&limits()), None, "no timeout while a request is in flight");
        drop(request);
        let deadline = activity.deadline(&limits()).unwrap();
        assert!(deadline > Instant::now() + Duration::from_secs(59), "idle again: the idle timeout restarts");
    }

    #[test]
    fn http2_pings_do_not_count_as_a_slow_head() {
        let activity = Arc::new(Activity::new(None));
        activity.saw_bytes(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(secs_after(&activity, activity.deadline(&limits())), Some(60));
    }

    #[test]
    fn a_user_over_its_share_gives_up_its_own_idle_connection_first() {
        let registry = Arc::new(Registry::default());
        let Admission::Within(first) = registry.admit(Some(1000), 2) else { panic!("within the share") };
        let Admission::Within(second) = registry.admit(Some(1000), 2) else { panic!("within the share") };
        let _busy = second.activity.begin_request();
        let Admission::Within(other_user) = registry.admit(Some(1001), 2) else { panic!("another user has its own share") };
        let Admission::Within(third) = registry.admit(Some(1000), 2) else { panic!("room made by closing an idle one") };
        assert!(first.activity.evicted.load(Ordering::Acquire), "the user's own idle connection goes");
        assert!(!other_user.activity.evicted.load(Ordering::Acquire), "not another user's");
        let _busy_too = third.activity.begin_request();
        drop(first);
        // Both remaining connections of the user are busy: the next one is over its share.
        assert!(matches!(registry.admit(Some(1000), 2), Admission::OverShare(_, 2)));
        assert!(matches!(registry.admit(None, 2), Admission::Within(_)), "an unknown peer has no share to pass");
    }

    #[test]
    fn at_the_limit_the_longest_idle_connection_goes() {
        let registry = Arc::new(Registry::default());
        let places: Vec<Place> = (0..3)
            .map(|_| match registry.admit(None, 10) {
                Admission::Within(p) => p,
                Admission::OverShare(..) => unreachable!(),
            })
            .collect();
        let _busy = places[0].activity.begin_request();
        assert!(registry.evict_one());
        assert!(!places[0].activity.evicted.load(Ordering::Acquire), "a busy connection is never evicted");
        assert_eq!(places.iter().filter(|p| p.activity.evicted.load(Ordering::Acquire)).count(), 1);
        assert!(registry.evict_one());
        assert!(!registry.evict_one(), "nothing idle is left");
    }

    #[test]
    fn the_connection_limit_fits_the_descriptors() {
        assert_eq!(connection_budget(1024, None), (448, None));
        assert_eq!(connection_budget(1_048_576, None), (8192, None));
        assert_eq!(connection_budget(20_000, Some(100)), (100, None));
        assert_eq!(connection_budget(1024, Some(5000)), (448, Some(5000)));
    }
}
