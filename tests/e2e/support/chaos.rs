//! A chaos upstream for the soak: OpenAI Chat Completions (JSON, and SSE with usage) on
//! 127.0.0.1:0 that, per request and at random (seeded), answers normally, stalls before its
//! head or mid-stream, resets the connection, closes it mid-stream, fails with a 5xx and an error
//! body, or sends garbage. It records every request it saw (its body received in full) with what
//! it did and what it billed, as a provider would bill it: the tokens of what it sent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What the upstream did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    Normal,
    /// Sends nothing for longer than the proxy waits for a head, then answers.
    StallBeforeHead,
    /// Sends the head and one content event, then nothing for longer than the proxy waits.
    StallMidStream,
    /// Resets the connection (RST) without a reply.
    Reset,
    /// Sends the head and some content, then closes the connection.
    CloseMidStream,
    /// A 500, 502 or 503 with an OpenAI error body.
    ServerError,
    /// A 200 whose body is not the API's (HTML, broken JSON, broken SSE).
    Garbage,
}

const ALL: [Behaviour; 7] = [
    Behaviour::Normal,
    Behaviour::StallBeforeHead,
    Behaviour::StallMidStream,
    Behaviour::Reset,
    Behaviour::CloseMidStream,
    Behaviour::ServerError,
    Behaviour::Garbage,
];

/// One request the upstream saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub behaviour: Behaviour,
    pub stream: bool,
    /// What the upstream billed for it: the tokens of what it generated.
    pub billed: Decimal,
}

/// Prices the upstream bills at, USD per million tokens.
#[derive(Clone, Copy, Debug)]
pub struct ChaosPrice {
    pub input: Decimal,
    pub output: Decimal,
}

const PROMPT_TOKENS: u64 = 20;
/// Words of content, one token each, one event each when streaming.
const WORDS: [&str; 8] = ["The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "dog."];

struct Inner {
    seen: Mutex<Vec<Seen>>,
    seed: AtomicU64,
    price: ChaosPrice,
    /// How long a stall lasts: longer than the proxy's `--upstream-timeout`.
    stall: Duration,
}

pub struct Chaos {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Chaos {
    pub fn start(seed: u64, price: ChaosPrice, stall: Duration) -> Chaos {
        let inner = Arc::new(Inner { seen: Mutex::new(Vec::new()), seed: AtomicU64::new(seed | 1), price, stall });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel();
        let served = inner.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(serve(served, addr_tx, stop_rx));
        });
        Chaos { addr: addr_rx.recv().unwrap(), inner, stop: Some(stop), thread: Some(thread) }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().unwrap().clone()
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Inner {
    fn random(&self) -> u64 {
        // xorshift64*, shared by every connection: the run is random but reproducible in mix.
        let mut x = self.seed.load(Ordering::Relaxed);
        loop {
            let mut next = x;
            next ^= next >> 12;
            next ^= next << 25;
            next ^= next >> 27;
            match self.seed.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next.wrapping_mul(0x2545_F491_4F6C_DD1D),
                Err(now) => x = now,
            }
        }
    }

    fn bill(&self, output_tokens: u64) -> Decimal {
        let million = Decimal::from(1_000_000);
        (Decimal::from(PROMPT_TOKENS) * self.price.input + Decimal::from(output_tokens) * self.price.output) / million
    }

    fn record(&self, behaviour: Behaviour, stream: bool, billed: Decimal) {
        self.seen.lock().unwrap().push(Seen { behaviour, stream, billed });
    }
}

async fn serve(inner: Arc<Inner>, addr_tx: std::sync::mpsc::Sender<SocketAddr>, mut stop: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    addr_tx.send(listener.local_addr().unwrap()).unwrap();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
        };
        let _ = stream.set_nodelay(true);
        // The raw descriptor, to turn a close into a reset (SO_LINGER 0) for `Reset`.
        let fd = stream.as_raw_fd();
        let inner = inner.clone();
        let service = hyper::service::service_fn(move |req| {
            let inner = inner.clone();
            async move { answer(inner, req, fd).await }
        });
        let builder = builder.clone();
        connections.spawn(async move {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
    // Stopping closes every connection the proxy still holds to it.
    connections.shutdown().await;
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn chunk(word: &str, finish: Option<&str>) -> String {
    let event = json!({"id": "chatcmpl-chaos", "object": "chat.completion.chunk", "created": 1, "model": "soak-model",
        "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish}], "usage": null});
    format!("data: {event}\n\n")
}

fn usage_chunk(output: u64) -> String {
    let event = json!({"id": "chatcmpl-chaos", "object": "chat.completion.chunk", "created": 1, "model": "soak-model", "choices": [],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": output, "total_tokens": PROMPT_TOKENS + output}});
    format!("data: {event}\n\n")
}

fn json_reply() -> Response<Body> {
    let text: String = WORDS.concat();
    let value = json!({"id": "chatcmpl-chaos", "object": "chat.completion", "created": 1, "model": "soak-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": WORDS.len(), "total_tokens": PROMPT_TOKENS + WORDS.len() as u64}});
    Response::builder().header("content-type", "application/json").body(full(value.to_string())).unwrap()
}

/// A stream whose events are written by a task, so that it can stall or break part way.
fn sse(events: Vec<String>, then: Ending) -> Response<Body> {
    streamed("text/event-stream", events, then)
}

fn streamed(content_type: &str, events: Vec<String>, then: Ending) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    tokio::spawn(async move {
        for event in events {
            if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
        }
        match then {
            Ending::Done => {}
            Ending::Stall(d) => {
                tokio::time::sleep(d).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from("data: [DONE]\n\n")))).await;
            }
            Ending::Break => {
                let _ = tx.send(Err("the chaos upstream closed the stream".into())).await;
            }
        }
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder().header("content-type", content_type).body(BodyExt::boxed(body)).unwrap()
}

enum Ending {
    Done,
    Stall(Duration),
    Break,
}

async fn answer(inner: Arc<Inner>, req: Request<Incoming>, fd: i32) -> Result<Response<Body>, std::io::Error> {
    if req.uri().path() != "/v1/chat/completions" {
        return Ok(Response::builder().status(404).body(full("not here")).unwrap());
    }
    // A request the upstream never received whole was never seen, and never billed.
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Err(std::io::Error::other("the request body did not arrive"));
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let stream = request["stream"] == true;
    let roll = inner.random();
    let mut behaviour = ALL[(roll % ALL.len() as u64) as usize];
    if behaviour == Behaviour::StallMidStream && !stream {
        behaviour = Behaviour::StallBeforeHead;
    }
    let sent_words = 1 + (roll >> 8) as usize % (WORDS.len() - 1);
    let full_events = || {
        let mut events: Vec<String> = WORDS.iter().enumerate().map(|(i, w)| chunk(w, (i + 1 == WORDS.len()).then_some("stop"))).collect();
        events.push(usage_chunk(WORDS.len() as u64));
        events.push("data: [DONE]\n\n".to_string());
        events
    };
    let billed_full = inner.bill(WORDS.len() as u64);
    match behaviour {
        Behaviour::Normal => {
            inner.record(behaviour, stream, billed_full);
            Ok(if stream { sse(full_events(), Ending::Done) } else { json_reply() })
        }
        Behaviour::StallBeforeHead => {
            // The provider generates and bills while the proxy has stopped waiting.
            inner.record(behaviour, stream, billed_full);
            tokio::time::sleep(inner.stall).await;
            Ok(if stream { sse(full_events(), Ending::Done) } else { json_reply() })
        }
        Behaviour::StallMidStream => {
            inner.record(behaviour, stream, inner.bill(1));
            Ok(sse(vec![chunk(WORDS[0], None)], Ending::Stall(inner.stall)))
        }
        Behaviour::CloseMidStream => {
            inner.record(behaviour, stream, inner.bill(sent_words as u64));
            if stream {
                Ok(sse(WORDS[..sent_words].iter().map(|w| chunk(w, None)).collect(), Ending::Break))
            } else {
                let part =
                    r#"{"id": "chatcmpl-chaos", "object": "chat.completion", "choices": [{"index": 0, "message": {"content": "The quick"#;
                Ok(streamed("application/json", vec![part.to_string()], Ending::Break))
            }
        }
        Behaviour::Reset => {
            inner.record(behaviour, stream, Decimal::ZERO);
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt on this connection's own socket, still open while it is served.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            Err(std::io::Error::other("reset"))
        }
        Behaviour::ServerError => {
            inner.record(behaviour, stream, Decimal::ZERO);
            let status = [500, 502, 503][(roll >> 16) as usize % 3];
            let error = json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}});
            Ok(Response::builder().status(status).header("content-type", "application/json").body(full(error.to_string())).unwrap())
        }
        Behaviour::Garbage => {
            inner.record(behaviour, stream, Decimal::ZERO);
            let reply = match (roll >> 24) % 3 {
                0 => Response::builder().header("content-type", "text/html").body(full("<html><body>502 Bad Gateway</body></html>")),
                1 => Response::builder()
                    .header("content-type", "application/json")
                    .body(full(r#"{"id": "chatcmpl-chaos", "choices": [{"mess"#)),
                _ => Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(full("data: {\"choices\": [{\"delta\": \ndata: nonsense\n\n")),
            };
            Ok(reply.unwrap())
        }
    }
}
