//! A fake OpenAI upstream on 127.0.0.1:0 that speaks the real Chat Completions wire format
//! (JSON, and SSE with and without `include_usage`), records every request it receives, and
//! bills each completion it generates at its own copy of the prices, the way the real
//! provider's invoice would.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// How the fake answers; tests change it between requests.
#[derive(Clone, Debug)]
pub struct Script {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    /// The model the reply names; `None` echoes the request's.
    pub reply_model: Option<String>,
    /// A non-200 status answers with an OpenAI error body and bills nothing.
    pub status: u16,
    /// The text generated, sent as one content chunk per word when streaming.
    pub text: String,
    pub chunk_delay: Duration,
    /// Write every SSE byte as its own frame.
    pub byte_by_byte: bool,
    /// Break the connection after the content, before any usage (a cut stream).
    pub cut_before_usage: bool,
    /// After the first event, wait until the test calls [`Fake::release`].
    pub hold_after_first_event: bool,
    /// Wait this long before sending the response head.
    pub head_delay: Duration,
    /// Send an error event after the first content chunk (HTTP status already 200).
    pub error_event: bool,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            prompt_tokens: 12,
            cached_tokens: 0,
            completion_tokens: 3,
            reasoning_tokens: 0,
            reply_model: None,
            status: 200,
            text: "Hello from the fake".into(),
            chunk_delay: Duration::ZERO,
            byte_by_byte: false,
            cut_before_usage: false,
            hold_after_first_event: false,
            head_delay: Duration::ZERO,
            error_event: false,
        }
    }
}

/// Prices the fake bills with, USD per million tokens: input, cached input, output.
#[derive(Clone, Copy, Debug)]
pub struct FakePrice {
    pub input: Decimal,
    pub cached_input: Decimal,
    pub output: Decimal,
}

#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }
}

struct Inner {
    script: Mutex<Script>,
    prices: Mutex<HashMap<String, FakePrice>>,
    received: Mutex<Vec<Received>>,
    bill: Mutex<Decimal>,
    billed_requests: AtomicUsize,
    finished_streams: AtomicUsize,
    release: Notify,
}

pub struct Fake {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    /// Starts a fake OpenAI on its own thread and runtime.
    pub fn openai() -> Fake {
        let inner = Arc::new(Inner {
            script: Mutex::new(Script::default()),
            prices: Mutex::new(HashMap::new()),
            received: Mutex::new(Vec::new()),
            bill: Mutex::new(Decimal::ZERO),
            billed_requests: AtomicUsize::new(0),
            finished_streams: AtomicUsize::new(0),
            release: Notify::new(),
        });
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel();
        let served = inner.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(serve(served, addr_tx, stop_rx));
        });
        let addr = addr_rx.recv().unwrap();
        Fake { addr, inner, stop: Some(stop), thread: Some(thread) }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.inner.script.lock().unwrap());
    }

    pub fn set_price(&self, model: &str, input: &str, cached_input: &str, output: &str) {
        let p = FakePrice { input: input.parse().unwrap(), cached_input: cached_input.parse().unwrap(), output: output.parse().unwrap() };
        self.inner.prices.lock().unwrap().insert(model.to_string(), p);
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.received.lock().unwrap().clone()
    }

    pub fn bill(&self) -> Decimal {
        *self.inner.bill.lock().unwrap()
    }

    pub fn billed_requests(&self) -> usize {
        self.inner.billed_requests.load(Ordering::SeqCst)
    }

    /// Streams whose last byte was written.
    pub fn finished_streams(&self) -> usize {
        self.inner.finished_streams.load(Ordering::SeqCst)
    }

    /// Lets a stream held after its first event go on.
    pub fn release(&self) {
        self.inner.release.notify_waiters();
        self.inner.release.notify_one();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(inner: Arc<Inner>, addr_tx: std::sync::mpsc::Sender<SocketAddr>, mut stop: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    addr_tx.send(listener.local_addr().unwrap()).unwrap();
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
        };
        // Real servers (Go's net, nginx) disable Nagle; without it a pooled connection stalls
        // on delayed ACKs between the response head and the first event.
        let _ = stream.set_nodelay(true);
        let inner = inner.clone();
        let service = hyper::service::service_fn(move |req| {
            let inner = inner.clone();
            async move { Ok::<_, Infallible>(handle(inner, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn json_response(status: u16, value: Value) -> Response<Body> {
    Response::builder().status(status).header("content-type", "application/json").body(full(value.to_string())).unwrap()
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let received = Received {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    inner.received.lock().unwrap().push(received);
    let script = inner.script.lock().unwrap().clone();
    if !script.head_delay.is_zero() {
        tokio::time::sleep(script.head_delay).await;
    }
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/v1/models") => json_response(200, json!({"object":"list","data":[{"id":"gpt-5","object":"model","created":1754000000,"owned_by":"system"}]})),
        ("POST", "/v1/chat/completions") => chat(inner, script, &body),
        _ => json_response(404, json!({"error":{"message":"Unknown request URL","type":"invalid_request_error","param":null,"code":"unknown_url"}})),
    }
}

fn chat(inner: Arc<Inner>, script: Script, body: &Bytes) -> Response<Body> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return json_response(400, json!({"error":{"message":"We could not parse the JSON body of your request.","type":"invalid_request_error","param":null,"code":null}})),
    };
    if script.status != 200 {
        return json_response(script.status, json!({"error":{"message":"The fake refuses this request","type":"invalid_request_error","param":null,"code":"fake_refusal"}}));
    }
    let model = script.reply_model.clone().unwrap_or_else(|| request["model"].as_str().unwrap_or("unknown").to_string());
    let usage = json!({
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": script.completion_tokens,
        "total_tokens": script.prompt_tokens + script.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": script.reasoning_tokens, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    });
    // The provider bills what it generates, whether or not the client ever sees the usage.
    bill(&inner, &model, &script);
    let stream = request["stream"].as_bool().unwrap_or(false);
    if !stream {
        return json_response(200, json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1760000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": script.text, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage, "service_tier": "default", "system_fingerprint": "fp_fake",
        }));
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let chunk = |delta: Value, finish: Value, usage: Value| {
        let choices = if delta.is_null() { json!([]) } else { json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]) };
        let mut c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1760000000, "model": model, "system_fingerprint": "fp_fake", "choices": choices});
        if include_usage {
            c["usage"] = usage;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null, Value::Null)];
    for (i, word) in script.text.split(' ').enumerate() {
        let piece = if i == 0 { word.to_string() } else { format!(" {word}") };
        events.push(chunk(json!({"content": piece}), Value::Null, Value::Null));
        if i == 0 && script.error_event {
            events.push("data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n".to_string());
        }
    }
    events.push(chunk(json!({}), json!("stop"), Value::Null));
    let content_events = events.len();
    if include_usage {
        events.push(chunk(Value::Null, Value::Null, usage));
    }
    events.push("data: [DONE]\n\n".to_string());

    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    tokio::spawn(async move {
        for (i, event) in events.into_iter().enumerate() {
            if script.cut_before_usage && i == content_events {
                let _ = tx.send(Err("the fake cut the stream".into())).await;
                return;
            }
            if i > 0 && !script.chunk_delay.is_zero() {
                tokio::time::sleep(script.chunk_delay).await;
            }
            if script.byte_by_byte {
                for byte in event.into_bytes() {
                    if tx.send(Ok(Frame::data(Bytes::from(vec![byte])))).await.is_err() {
                        return;
                    }
                }
            } else if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
            if i == 0 && script.hold_after_first_event {
                inner.release.notified().await;
            }
        }
        inner.finished_streams.fetch_add(1, Ordering::SeqCst);
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    Response::builder().status(200).header("content-type", "text/event-stream; charset=utf-8").body(body).unwrap()
}

/// The provider's invoice line: uncached input, cached input and output at the fake's prices.
fn bill(inner: &Inner, model: &str, script: &Script) {
    let prices = inner.prices.lock().unwrap();
    let price = prices
        .get(model)
        .or_else(|| prices.iter().filter(|(name, _)| model.starts_with(name.as_str())).max_by_key(|(name, _)| name.len()).map(|(_, p)| p))
        .unwrap_or_else(|| panic!("the fake has no price for {model}"));
    let million = Decimal::from(1_000_000);
    let uncached = Decimal::from(script.prompt_tokens - script.cached_tokens);
    let cost = (uncached * price.input + Decimal::from(script.cached_tokens) * price.cached_input
        + Decimal::from(script.completion_tokens) * price.output)
        / million;
    *inner.bill.lock().unwrap() += cost;
    inner.billed_requests.fetch_add(1, Ordering::SeqCst);
}
