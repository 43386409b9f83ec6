//! A fake upstream on 127.0.0.1:0 that speaks the real wire formats of OpenAI (Chat
//! Completions with and without `include_usage`, Responses, embeddings), OpenRouter (`usage.cost`),
//! Anthropic Messages and Gemini (`alt=sse` and the JSON-array stream), records every request
//! it receives, and bills each reply it generates at its own copy of the prices, the way the
//! real provider's invoice would. Each API lives at its real path, so one fake serves any
//! provider pointed at it.

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
use tokio::sync::{mpsc, oneshot};

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
    /// Anthropic cache writes by TTL; `cache_split` sends the `cache_creation` object.
    pub cache_write_5m: u64,
    pub cache_write_1h: u64,
    pub cache_split: bool,
    /// Anthropic server-side web searches, billed per search.
    pub web_searches: u64,
    /// Report `usage.cost` (OpenRouter) and bill exactly that.
    pub report_cost: Option<&'static str>,
    /// What the fake really charges when it reports a cost that is not one (text, negative,
    /// huge); without it the reported figure is the charge.
    pub billed_cost: Option<&'static str>,
    /// Report (and bill) the cost of the reply's tokens at the prices of the model list, as
    /// OpenRouter does.
    pub report_listed_cost: bool,
    /// Chat usage fields written as this JSON text, for counts that are not counts (`"100"`,
    /// `1e30`, `-5`); the bill is still the script's own counts.
    pub raw_completion_tokens: Option<&'static str>,
    /// End SSE lines with `\r\n` (as Gemini and Vertex may).
    pub crlf: bool,
    /// Gzip the reply whatever the request's Accept-Encoding said.
    pub gzip: bool,
    /// Generate past the request's max output tokens (as no real upstream does); otherwise the
    /// output is `completion_tokens` at most the request's limit.
    pub ignore_max_tokens: bool,
    /// Generate exactly the most output the request allows.
    pub output_at_limit: bool,
    /// Fail after the request's body arrived, as a real upstream can.
    pub failure: Option<Failure>,
}

/// How the fake fails once it has read a request (and, but for the error status, billed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Bill the request, then wait this long before the reply's head.
    Stall(Duration),
    /// Bill the request, then close the connection without a reply.
    Reset,
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
            cache_write_5m: 0,
            cache_write_1h: 0,
            cache_split: false,
            web_searches: 0,
            report_cost: None,
            billed_cost: None,
            report_listed_cost: false,
            raw_completion_tokens: None,
            crlf: false,
            gzip: false,
            ignore_max_tokens: false,
            output_at_limit: false,
            failure: None,
        }
    }
}

/// Prices the fake bills with, USD per million tokens (and per 1,000 web searches).
#[derive(Clone, Copy, Debug, Default)]
pub struct FakePrice {
    pub input: Decimal,
    pub cached_input: Decimal,
    pub cache_write_5m: Decimal,
    pub cache_write_1h: Decimal,
    pub output: Decimal,
    pub web_search_per_1k: Decimal,
}

#[derive(Clone, Debug)]
pub struct Received {
    /// HTTP/1.1 or HTTP/2, as negotiated.
    pub version: http::Version,
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
    /// OpenRouter's model list: id → (USD per prompt token, per completion token), as text.
    listed_models: Mutex<Vec<(String, String, String)>>,
    prices: Mutex<HashMap<String, FakePrice>>,
    received: Mutex<Vec<Received>>,
    bill: Mutex<Decimal>,
    billed_requests: AtomicUsize,
    finished_streams: AtomicUsize,
    /// Held streams wait for a permit; `release` opens the gate for good.
    release: tokio::sync::Semaphore,
    openrouter: super::openrouter::OpenRouter,
}

pub struct Fake {
    pub addr: SocketAddr,
    tls: bool,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    /// Starts a fake on its own thread and runtime, serving plain HTTP/1.1 and h2c.
    pub fn openai() -> Fake {
        Fake::start(None)
    }

    /// Starts a fake that serves TLS with ALPN (h2 and http/1.1), with a certificate for
    /// 127.0.0.1 issued by a fresh test CA; returns the fake and the CA certificate as PEM.
    pub fn tls() -> (Fake, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "capit test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        let cert = params.signed_by(&server_key, &ca).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let fake = Fake::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))));
        (fake, ca.pem())
    }

    fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Fake {
        let inner = Arc::new(Inner {
            script: Mutex::new(Script::default()),
            listed_models: Mutex::new(Vec::new()),
            prices: Mutex::new(HashMap::new()),
            received: Mutex::new(Vec::new()),
            bill: Mutex::new(Decimal::ZERO),
            billed_requests: AtomicUsize::new(0),
            finished_streams: AtomicUsize::new(0),
            release: tokio::sync::Semaphore::new(0),
            openrouter: Default::default(),
        });
        let is_tls = tls.is_some();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel();
        let served = inner.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(serve(served, tls, addr_tx, stop_rx));
        });
        let addr = addr_rx.recv().unwrap();
        Fake { addr, tls: is_tls, inner, stop: Some(stop), thread: Some(thread) }
    }

    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.inner.script.lock().unwrap());
    }

    pub fn set_price(&self, model: &str, input: &str, cached_input: &str, output: &str) {
        let p = FakePrice {
            input: input.parse().unwrap(),
            cached_input: cached_input.parse().unwrap(),
            output: output.parse().unwrap(),
            ..FakePrice::default()
        };
        self.set_full_price(model, p);
    }

    pub fn set_full_price(&self, model: &str, price: FakePrice) {
        self.inner.prices.lock().unwrap().insert(model.to_string(), price);
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

    /// Lists a model in the OpenRouter-shaped model list with prices per token (as OpenRouter
    /// writes them: decimal text, USD per token).
    pub fn list_model(&self, id: &str, prompt_per_token: &str, completion_per_token: &str) {
        self.inner.listed_models.lock().unwrap().push((id.to_string(), prompt_per_token.to_string(), completion_per_token.to_string()));
    }

    /// OpenRouter's key management, served by this fake (see `openrouter`).
    pub fn openrouter(&self) -> &super::openrouter::OpenRouter {
        &self.inner.openrouter
    }

    /// Lets every stream held after its first event go on, now and from now on.
    pub fn release(&self) {
        self.inner.release.add_permits(tokio::sync::Semaphore::MAX_PERMITS / 2);
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

async fn serve(
    inner: Arc<Inner>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    addr_tx: std::sync::mpsc::Sender<SocketAddr>,
    mut stop: oneshot::Receiver<()>,
) {
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
            async move { handle(inner, req).await }
        });
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else { return };
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn json_response(status: u16, value: Value) -> Response<Body> {
    Response::builder().status(status).header("content-type", "application/json").body(full(value.to_string())).unwrap()
}

/// Answers one request the way its script says; `Err` closes the connection with no reply.
async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, std::io::Error> {
    let failure = inner.script.lock().unwrap().failure;
    let response = answer(inner, req).await;
    match failure {
        None => Ok(response),
        // The reply (and its bill) is made; it just never comes, or comes too late.
        Some(Failure::Stall(wait)) => {
            tokio::time::sleep(wait).await;
            Ok(response)
        }
        Some(Failure::Reset) => Err(std::io::Error::other("the fake reset the connection")),
    }
}

async fn answer(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let received = Received {
        version: parts.version,
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    inner.received.lock().unwrap().push(received);
    let script = inner.script.lock().unwrap().clone();
    if let Some((status, value)) = inner.openrouter.serve(&parts, &body, &script) {
        return json_response(status, value);
    }
    if !script.head_delay.is_zero() {
        tokio::time::sleep(script.head_delay).await;
    }
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let gemini = path.strip_prefix("/v1beta/models/").or_else(|| path.strip_prefix("/v1/models/")).and_then(|r| r.split_once(':'));
    match (parts.method.as_str(), path.as_str(), gemini) {
        ("GET", "/v1/models", _) if !inner.listed_models.lock().unwrap().is_empty() => {
            let models: Vec<Value> = inner
                .listed_models
                .lock()
                .unwrap()
                .iter()
                .map(|(id, prompt, completion)| {
                    json!({
                        "id": id, "name": id, "context_length": 200000,
                        "pricing": {"prompt": prompt, "completion": completion, "request": "0", "image": "0", "web_search": "0", "internal_reasoning": "0"},
                        "top_provider": {"context_length": 200000, "max_completion_tokens": 32000, "is_moderated": false},
                    })
                })
                .collect();
            json_response(200, json!({"data": models}))
        }
        ("GET", "/v1/models", _) => {
            json_response(200, json!({"object":"list","data":[{"id":"gpt-5","object":"model","created":1754000000,"owned_by":"system"}]}))
        }
        ("GET", "/v1beta/models", _) => {
            json_response(200, json!({"models":[{"name":"models/gemini-2.5-flash","inputTokenLimit":1048576,"outputTokenLimit":65536}]}))
        }
        ("POST", "/v1/chat/completions", _) => chat(inner, script, &body),
        ("POST", "/v1/responses", _) => responses(inner, script, &body),
        ("POST", "/v1/embeddings", _) => embeddings(inner, script, &body),
        ("POST", "/v1/messages", _) => anthropic(inner, script, &body),
        // The free counts give the whole input the reply would bill (Anthropic's disjoint parts
        // summed; OpenAI's and Gemini's cached tokens are inside the prompt count).
        ("POST", "/v1/messages/count_tokens", _) => json_response(
            200,
            json!({"input_tokens": script.prompt_tokens + script.cached_tokens + script.cache_write_5m + script.cache_write_1h}),
        ),
        ("POST", "/v1/responses/input_tokens", _) => {
            json_response(200, json!({"object": "response.input_tokens", "input_tokens": script.prompt_tokens}))
        }
        ("POST", _, Some((model, "generateContent"))) => gemini_generate(inner, script, model, &body, false, false),
        ("POST", _, Some((model, "streamGenerateContent"))) => {
            gemini_generate(inner, script, model, &body, true, query.contains("alt=sse"))
        }
        ("POST", _, Some((_, "countTokens"))) => json_response(200, json!({"totalTokens": script.prompt_tokens})),
        _ => json_response(
            404,
            json!({"error":{"message":"Unknown request URL","type":"invalid_request_error","param":null,"code":"unknown_url"}}),
        ),
    }
}

fn parse_request(body: &Bytes) -> Option<Value> {
    serde_json::from_slice(body).ok()
}

/// The script as a real upstream follows it for one request: no more output than the request's
/// own limit (unless the script says to ignore it), or exactly that limit. Where reasoning is
/// counted inside the output (all but Gemini), it stays within it.
fn within_limit(mut script: Script, max_output: Option<u64>) -> Script {
    let reasoning_apart = script.reasoning_tokens > script.completion_tokens;
    if let Some(max) = max_output {
        if script.output_at_limit {
            script.completion_tokens = max;
        } else if !script.ignore_max_tokens {
            script.completion_tokens = script.completion_tokens.min(max);
        }
        if !reasoning_apart {
            script.reasoning_tokens = script.reasoning_tokens.min(script.completion_tokens);
        }
    }
    script
}

fn bad_json() -> Response<Body> {
    json_response(
        400,
        json!({"error":{"message":"We could not parse the JSON body of your request.","type":"invalid_request_error","param":null,"code":null}}),
    )
}

/// Sends `events` as a streamed reply: paced, byte by byte, held or cut as the script says.
/// `cut_at` is the index of the first event the cut withholds (the usage events).
fn stream_reply(inner: Arc<Inner>, script: Script, content_type: &'static str, events: Vec<String>, cut_at: usize) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let gzip = script.gzip;
    tokio::spawn(async move {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for (i, event) in events.into_iter().enumerate() {
            if script.cut_before_usage && i == cut_at {
                let _ = tx.send(Err("the fake cut the stream".into())).await;
                return;
            }
            if i > 0 && !script.chunk_delay.is_zero() {
                tokio::time::sleep(script.chunk_delay).await;
            }
            let event = if script.crlf { event.replace('\n', "\r\n") } else { event };
            let event = if gzip {
                use std::io::Write;
                encoder.write_all(event.as_bytes()).unwrap();
                encoder.flush().unwrap();
                std::mem::take(encoder.get_mut())
            } else {
                event.into_bytes()
            };
            if script.byte_by_byte {
                for byte in event {
                    if tx.send(Ok(Frame::data(Bytes::from(vec![byte])))).await.is_err() {
                        return;
                    }
                }
            } else if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                return;
            }
            if i == 0
                && script.hold_after_first_event
                && let Ok(permit) = inner.release.acquire().await
            {
                permit.forget();
            }
        }
        if gzip {
            let _ = tx.send(Ok(Frame::data(Bytes::from(encoder.finish().unwrap())))).await;
        }
        inner.finished_streams.fetch_add(1, Ordering::SeqCst);
    });
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let mut response = Response::builder().status(200).header("content-type", content_type);
    if gzip {
        response = response.header("content-encoding", "gzip");
    }
    response.body(body).unwrap()
}

fn sse(name: Option<&str>, data: &Value) -> String {
    match name {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

fn words(text: &str) -> Vec<String> {
    text.split(' ').enumerate().map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") }).collect()
}

/// OpenAI Responses API: JSON, or named SSE events ending in `response.completed`.
fn responses(inner: Arc<Inner>, script: Script, body: &Bytes) -> Response<Body> {
    let Some(request) = parse_request(body) else { return bad_json() };
    let script = within_limit(script, request["max_output_tokens"].as_u64());
    let model = script.reply_model.clone().unwrap_or_else(|| request["model"].as_str().unwrap_or("unknown").to_string());
    let usage = json!({
        "input_tokens": script.prompt_tokens,
        "input_tokens_details": {"cached_tokens": script.cached_tokens},
        "output_tokens": script.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": script.reasoning_tokens},
        "total_tokens": script.prompt_tokens + script.completion_tokens,
    });
    bill_openai(&inner, &model, &script);
    let output = json!([{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":script.text,"annotations":[]}]}]);
    let response = |status: &str, output: Value, usage: Value| json!({"id":"resp_fake","object":"response","created_at":1760000000,"status":status,"model":model,"output":output,"usage":usage});
    if !request["stream"].as_bool().unwrap_or(false) {
        return json_response(200, response("completed", output, usage));
    }
    let mut seq = 0;
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        sse(Some(kind), &data)
    };
    let empty_item = json!({"type":"message","id":"msg_1","status":"in_progress","role":"assistant","content":[]});
    let part = |text: &str| json!({"type":"output_text","text":text,"annotations":[]});
    let mut events = vec![
        event("response.created", json!({"response": response("in_progress", json!([]), Value::Null)})),
        event("response.in_progress", json!({"response": response("in_progress", json!([]), Value::Null)})),
        event("response.output_item.added", json!({"output_index":0,"item":empty_item})),
        event("response.content_part.added", json!({"item_id":"msg_1","output_index":0,"content_index":0,"part":part("")})),
    ];
    for piece in words(&script.text) {
        events.push(event(
            "response.output_text.delta",
            json!({"item_id":"msg_1","output_index":0,"content_index":0,"delta":piece,"logprobs":[]}),
        ));
    }
    events.push(event(
        "response.output_text.done",
        json!({"item_id":"msg_1","output_index":0,"content_index":0,"text":script.text,"logprobs":[]}),
    ));
    events
        .push(event("response.content_part.done", json!({"item_id":"msg_1","output_index":0,"content_index":0,"part":part(&script.text)})));
    events.push(event("response.output_item.done", json!({"output_index":0,"item":output[0].clone()})));
    let cut_at = events.len();
    events.push(event("response.completed", json!({"response": response("completed", output, usage)})));
    stream_reply(inner, script, "text/event-stream; charset=utf-8", events, cut_at)
}

fn embeddings(inner: Arc<Inner>, script: Script, body: &Bytes) -> Response<Body> {
    let Some(request) = parse_request(body) else { return bad_json() };
    let model = request["model"].as_str().unwrap_or("unknown").to_string();
    let billed = Script { cached_tokens: 0, completion_tokens: 0, ..script.clone() };
    bill_openai(&inner, &model, &billed);
    json_response(
        200,
        json!({"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0123,-0.0456]}],"model":model,"usage":{"prompt_tokens":script.prompt_tokens,"total_tokens":script.prompt_tokens}}),
    )
}

/// Anthropic Messages: JSON, or the named event sequence from `message_start` to `message_stop`.
fn anthropic(inner: Arc<Inner>, script: Script, body: &Bytes) -> Response<Body> {
    let Some(request) = parse_request(body) else {
        return json_response(400, json!({"type":"error","error":{"type":"invalid_request_error","message":"invalid JSON"}}));
    };
    if script.status != 200 {
        return json_response(
            script.status,
            json!({"type":"error","error":{"type":"invalid_request_error","message":"The fake refuses this request"},"request_id":"req_fake"}),
        );
    }
    let script = within_limit(script, request["max_tokens"].as_u64());
    let model = script.reply_model.clone().unwrap_or_else(|| request["model"].as_str().unwrap_or("unknown").to_string());
    let mut usage = json!({
        "input_tokens": script.prompt_tokens,
        "cache_creation_input_tokens": script.cache_write_5m + script.cache_write_1h,
        "cache_read_input_tokens": script.cached_tokens,
        "output_tokens": script.completion_tokens,
        "server_tool_use": {"web_search_requests": script.web_searches, "web_fetch_requests": 0},
        "service_tier": "standard",
    });
    if script.cache_split {
        usage["cache_creation"] =
            json!({"ephemeral_5m_input_tokens": script.cache_write_5m, "ephemeral_1h_input_tokens": script.cache_write_1h});
    }
    bill(&inner, &model, |p| {
        let per_million = Decimal::from(script.prompt_tokens) * p.input
            + Decimal::from(script.cache_write_5m) * p.cache_write_5m
            + Decimal::from(script.cache_write_1h) * p.cache_write_1h
            + Decimal::from(script.cached_tokens) * p.cached_input
            + Decimal::from(script.completion_tokens) * p.output;
        per_million / Decimal::from(1_000_000) + Decimal::from(script.web_searches) * p.web_search_per_1k / Decimal::from(1000)
    });
    let message = |content: Value, stop: Value, usage: Value| json!({"id":"msg_fake","type":"message","role":"assistant","model":model,"content":content,"stop_reason":stop,"stop_sequence":null,"usage":usage});
    if !request["stream"].as_bool().unwrap_or(false) {
        return json_response(200, message(json!([{"type":"text","text":script.text}]), json!("end_turn"), usage));
    }
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![
        sse(Some("message_start"), &json!({"type":"message_start","message": message(json!([]), Value::Null, start_usage)})),
        sse(Some("content_block_start"), &json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})),
        sse(Some("ping"), &json!({"type":"ping"})),
    ];
    for (i, piece) in words(&script.text).into_iter().enumerate() {
        events.push(sse(
            Some("content_block_delta"),
            &json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":piece}}),
        ));
        if i == 0 && script.error_event {
            events.push(sse(Some("error"), &json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}})));
        }
    }
    events.push(sse(Some("content_block_stop"), &json!({"type":"content_block_stop","index":0})));
    let cut_at = events.len();
    // A running count first, then the final cumulative one: deltas replace, never add.
    events.push(sse(
        Some("message_delta"),
        &json!({"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens": script.completion_tokens / 2}}),
    ));
    events.push(sse(Some("message_delta"), &json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens": script.completion_tokens, "server_tool_use": {"web_search_requests": script.web_searches}}})));
    events.push(sse(Some("message_stop"), &json!({"type":"message_stop"})));
    stream_reply(inner, script, "text/event-stream; charset=utf-8", events, cut_at)
}

/// Gemini: a JSON reply, or a stream of replies with running `usageMetadata` totals, as SSE
/// (`alt=sse`) or as one JSON array sent element by element.
/// The smallest value that satisfies a Gemini response schema (OpenAPI subset or JSON Schema):
/// what a request for `responseMimeType: application/json` gets, as the real API answers
/// structured-output requests (Gemini CLI's model router sends one before every prompt).
fn schema_instance(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    match schema["type"].as_str().map(str::to_ascii_lowercase).as_deref() {
        Some("object") => {
            let properties = schema["properties"].as_object().cloned().unwrap_or_default();
            Value::Object(properties.iter().map(|(k, v)| (k.clone(), schema_instance(v))).collect())
        }
        Some("array") => json!([]),
        Some("integer") | Some("number") => json!(schema["minimum"].as_i64().unwrap_or(1)),
        Some("boolean") => json!(false),
        _ => json!("Hello from the fake"),
    }
}

fn gemini_generate(inner: Arc<Inner>, script: Script, model: &str, body: &Bytes, stream: bool, sse_mode: bool) -> Response<Body> {
    let config = parse_request(body).map(|r| r["generationConfig"].clone()).unwrap_or(Value::Null);
    let script = within_limit(script, config["maxOutputTokens"].as_u64());
    let schema = config.get("responseJsonSchema").or(config.get("responseSchema")).filter(|s| !s.is_null());
    let script = match (config["responseMimeType"].as_str(), schema) {
        (Some("application/json"), Some(schema)) => Script { text: schema_instance(schema).to_string(), ..script },
        _ => script,
    };
    if script.status != 200 {
        return json_response(
            script.status,
            json!({"error":{"code":script.status,"message":"The fake refuses this request","status":"INVALID_ARGUMENT"}}),
        );
    }
    let version = script.reply_model.clone().unwrap_or_else(|| model.to_string());
    let meta = json!({
        "promptTokenCount": script.prompt_tokens,
        "cachedContentTokenCount": script.cached_tokens,
        "candidatesTokenCount": script.completion_tokens,
        "thoughtsTokenCount": script.reasoning_tokens,
        "totalTokenCount": script.prompt_tokens + script.completion_tokens + script.reasoning_tokens,
    });
    // Thoughts are billed as output, on top of the candidates.
    let billed = Script { completion_tokens: script.completion_tokens + script.reasoning_tokens, ..script.clone() };
    bill_openai(&inner, &version, &billed);
    let reply = |text: &str, finish: Option<&str>, meta: Value| {
        let mut candidate = json!({"content":{"role":"model","parts":[{"text":text}]},"index":0});
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(finish);
        }
        json!({"candidates":[candidate],"usageMetadata":meta,"modelVersion":version,"responseId":"fake"})
    };
    if !stream {
        return json_response(200, reply(&script.text, Some("STOP"), meta));
    }
    let pieces = words(&script.text);
    let early = json!({"promptTokenCount": script.prompt_tokens, "totalTokenCount": script.prompt_tokens});
    let mut replies: Vec<Value> = pieces[..pieces.len() - 1].iter().map(|p| reply(p, None, early.clone())).collect();
    let cut_at = replies.len();
    replies.push(reply(&pieces[pieces.len() - 1], Some("STOP"), meta));
    let events: Vec<String> = if sse_mode {
        replies.iter().map(|r| sse(None, r)).collect()
    } else {
        let last = replies.len() - 1;
        replies
            .iter()
            .enumerate()
            .map(|(i, r)| match i {
                0 => format!("[{r}"),
                _ if i == last => format!(",\r\n{r}]"),
                _ => format!(",\r\n{r}"),
            })
            .collect()
    };
    let content_type = if sse_mode { "text/event-stream" } else { "application/json; charset=UTF-8" };
    stream_reply(inner, script, content_type, events, cut_at)
}

fn chat(inner: Arc<Inner>, script: Script, body: &Bytes) -> Response<Body> {
    let Some(request) = parse_request(body) else { return bad_json() };
    let script = within_limit(script, request["max_completion_tokens"].as_u64().or(request["max_tokens"].as_u64()));
    if script.status != 200 {
        return json_response(
            script.status,
            json!({"error":{"message":"The fake refuses this request","type":"invalid_request_error","param":null,"code":"fake_refusal"}}),
        );
    }
    let model = script.reply_model.clone().unwrap_or_else(|| request["model"].as_str().unwrap_or("unknown").to_string());
    let mut usage = json!({
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": script.completion_tokens,
        "total_tokens": script.prompt_tokens + script.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": script.reasoning_tokens, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    });
    if let Some(raw) = script.raw_completion_tokens {
        usage["completion_tokens"] = serde_json::from_str(raw).unwrap();
    }
    // The provider bills what it generates, whether or not the client ever sees the usage.
    match script.report_cost {
        _ if script.report_listed_cost => {
            // OpenRouter: the reply's tokens at the prices its model list gives.
            let listed = inner.listed_models.lock().unwrap().iter().find(|(id, _, _)| *id == model).cloned();
            let (_, prompt, completion) = listed.unwrap_or_else(|| panic!("the fake does not list {model}"));
            let per_token = |text: &str| text.parse::<Decimal>().unwrap();
            let cost =
                Decimal::from(script.prompt_tokens) * per_token(&prompt) + Decimal::from(script.completion_tokens) * per_token(&completion);
            usage["cost"] = serde_json::from_str(&cost.normalize().to_string()).unwrap();
            add_to_bill(&inner, cost);
        }
        Some(cost) => {
            // OpenRouter: the cost it reports is what it charges (unless the report is garbage).
            usage["cost"] = serde_json::from_str(cost).unwrap();
            usage["cost_details"] = json!({"upstream_inference_cost": null});
            add_to_bill(&inner, script.billed_cost.unwrap_or(cost).parse().unwrap());
        }
        None if script.billed_cost.is_some() => add_to_bill(&inner, script.billed_cost.unwrap().parse().unwrap()),
        None => bill_openai(&inner, &model, &script),
    }
    if !request["stream"].as_bool().unwrap_or(false) {
        let reply = json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1760000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": script.text, "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
            "usage": usage, "service_tier": "default", "system_fingerprint": "fp_fake",
        });
        if script.gzip {
            use std::io::Write;
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(reply.to_string().as_bytes()).unwrap();
            let body = full(encoder.finish().unwrap());
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(body)
                .unwrap();
        }
        return json_response(200, reply);
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool().unwrap_or(false);
    let chunk = |delta: Value, finish: Value, usage: Value| {
        let choices =
            if delta.is_null() { json!([]) } else { json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]) };
        let mut c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1760000000, "model": model, "system_fingerprint": "fp_fake", "choices": choices});
        if include_usage {
            c["usage"] = usage;
        }
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null, Value::Null)];
    for (i, piece) in words(&script.text).into_iter().enumerate() {
        events.push(chunk(json!({"content": piece}), Value::Null, Value::Null));
        if i == 0 && script.error_event {
            events.push("data: {\"error\":{\"message\":\"The server had an error while processing your request.\",\"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n".to_string());
        }
    }
    events.push(chunk(json!({}), json!("stop"), Value::Null));
    let cut_at = events.len();
    if include_usage {
        events.push(chunk(Value::Null, Value::Null, usage));
    }
    events.push("data: [DONE]\n\n".to_string());
    stream_reply(inner, script, "text/event-stream; charset=utf-8", events, cut_at)
}

/// The OpenAI-shaped invoice line: uncached input, cached input and output at the fake's prices.
fn bill_openai(inner: &Inner, model: &str, script: &Script) {
    bill(inner, model, |p| {
        let uncached = Decimal::from(script.prompt_tokens - script.cached_tokens);
        (uncached * p.input + Decimal::from(script.cached_tokens) * p.cached_input + Decimal::from(script.completion_tokens) * p.output)
            / Decimal::from(1_000_000)
    });
}

/// Adds one invoice line, priced by `cost` at the model's fake price.
fn bill(inner: &Inner, model: &str, cost: impl FnOnce(&FakePrice) -> Decimal) {
    let prices = inner.prices.lock().unwrap();
    let price = prices
        .get(model)
        .or_else(|| prices.iter().filter(|(name, _)| model.starts_with(name.as_str())).max_by_key(|(name, _)| name.len()).map(|(_, p)| p))
        .copied()
        .unwrap_or_else(|| panic!("the fake has no price for {model}"));
    drop(prices);
    add_to_bill(inner, cost(&price));
}

fn add_to_bill(inner: &Inner, amount: Decimal) {
    *inner.bill.lock().unwrap() += amount;
    inner.billed_requests.fetch_add(1, Ordering::SeqCst);
}
