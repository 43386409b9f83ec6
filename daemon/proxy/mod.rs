//! The HTTP proxy on loopback: authenticate the grant, choose the upstream, rewrite the
//! request, forward it, observe the reply as it streams back, settle its cost. The only module
//! that knows hyper.
//!
//! Invariants: a refused request never reaches the upstream; no client credential is ever
//! forwarded; a billable path that is not metered is refused (see `providers::route`).

mod body;
mod errors;
mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::providers::{Endpoint, ErrorFormat, MeteredApi, Provider, ProviderKind};
use crate::state::{AuthFailure, GrantSlot, State, StateError};
use crate::usage::{BodyFormat, ResponseMeter};
pub use body::BodyLimits;
use body::{GatedBody, MeteredBody, ProxyBody, Settlement};
use errors::ProxyError;
use request::BodyError;

/// The proxy's settings, from the daemon's config.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// How long to wait for an upstream's response headers (504 after it).
    pub upstream_timeout: Duration,
    pub body_limits: BodyLimits,
    /// How long open connections may take to finish at shutdown.
    pub grace: Duration,
    /// Extra root certificates (PEM) trusted for upstream TLS, besides the Mozilla roots: for a
    /// company gateway with a private CA.
    pub upstream_ca: Option<std::path::PathBuf>,
}

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, GatedBody>;

struct Proxy {
    state: Arc<State>,
    client: UpstreamClient,
    config: ProxyConfig,
    /// Settlements that outlive their connection (abandoned replies still being read).
    settlements: TaskTracker,
}

/// Builds the upstream client: TLS through rustls with the ring provider and the Mozilla roots
/// compiled in (no system store needed) plus any `--upstream-ca` roots, plain HTTP allowed for
/// local servers, and HTTP/2 where the server offers it through ALPN.
pub fn upstream_client(extra_roots: Option<&std::path::Path>) -> Result<UpstreamClient, std::io::Error> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_roots {
        let bad = |e: rustls::pki_types::pem::Error| std::io::Error::other(format!("{}: {e}", path.display()));
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(bad)? {
            roots.add(cert.map_err(bad)?).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(std::io::Error::other(format!("{}: no PEM certificates in it", path.display())));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    let https =
        hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().enable_http2().wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https))
}

/// Serves the proxy on `listener` until `shutdown` fires, then lets open requests finish (for
/// at most the grace period) and waits for their settlements.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    client: UpstreamClient,
    config: ProxyConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let proxy = Arc::new(Proxy { state, client, config: config.clone(), settlements: TaskTracker::new() });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(tokio::sync::Semaphore::new(4096));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a proxy connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned());
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(config.grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("open proxy connections did not finish within {:?}; closing them", config.grace);
    }
    proxy.settlements.close();
    let settle_bound = config.body_limits.drain + Duration::from_secs(5);
    if tokio::time::timeout(settle_bound, proxy.settlements.wait()).await.is_err() {
        tracing::warn!("some abandoned replies were still being metered at shutdown");
    }
    Ok(())
}

/// A request's first path segment, its provider.
struct Target {
    provider: Provider,
    /// The path after `/<provider>/`, without the query.
    rest: String,
    query: Option<String>,
}

impl Proxy {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ProxyBody> {
        let span = tracing::debug_span!("request", method = %req.method(), provider = tracing::field::Empty, grant = tracing::field::Empty);
        async move {
            match self.route(req).await {
                Ok(response) => response,
                Err((format, error)) => {
                    tracing::debug!(status = error.status.as_u16(), code = error.code, "refused");
                    error.into_response(format)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, (ErrorFormat, ProxyError)> {
        let target = self.target(req.uri()).map_err(|e| (ErrorFormat::OpenAi, e))?;
        let format = target.provider.kind.error_format();
        tracing::Span::current().record("provider", target.provider.name.as_str());
        let fail = |e: ProxyError| (format, e);

        let endpoint = crate::providers::route(target.provider.kind, req.method(), &target.rest);
        if endpoint == Some(Endpoint::Local) {
            // Claude Code's telemetry batch: acknowledged here, never sent anywhere.
            return Ok(local_ack());
        }
        let presented = request::presented_key(req.headers(), req.uri().query());
        let slot = self.state.authenticate(presented.as_deref(), &target.provider.name).map_err(|e| fail(auth_error(e)))?;
        self.serve_grant(req, target, endpoint, &slot).await.map_err(|e| {
            self.state.note_refusal(&slot, e.model.as_deref(), e.reason, &e.message);
            fail(e)
        })
    }

    /// Everything after the grant is known; an error here is counted as one of its refusals.
    async fn serve_grant(
        &self,
        req: Request<Incoming>,
        target: Target,
        endpoint: Option<Endpoint>,
        slot: &Arc<GrantSlot>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let endpoint = endpoint.ok_or_else(|| {
            ProxyError::new(
                StatusCode::FORBIDDEN,
                "capit_path_not_metered",
                format!("capit: {} /{}/{} is not an API capit meters, so it is refused", req.method(), target.provider.name, target.rest),
            )
        })?;
        let upstream = self.state.upstream(&target.provider.name).map_err(state_error)?;
        match endpoint {
            Endpoint::Free => {
                self.state.admit_free(slot, self.state.clock().now_seconds()).map_err(refusal_error)?;
                self.forward_free(req, &target, &upstream).await
            }
            Endpoint::Metered(api) => self.forward_metered(req, target, upstream, slot.clone(), api).await,
            Endpoint::Local => Ok(local_ack()),
        }
    }

    fn target(&self, uri: &Uri) -> Result<Target, ProxyError> {
        let path = uri.path().trim_start_matches('/');
        let (name, rest) = path.split_once('/').unwrap_or((path, ""));
        let provider = self.state.provider(name).ok_or_else(|| {
            let known: Vec<String> = self.state.list_providers().into_iter().map(|(p, _)| p.name).collect();
            ProxyError::new(
                StatusCode::NOT_FOUND,
                "capit_unknown_provider",
                format!("capit: unknown provider {name:?} in the path; use one of: {}", known.join(", ")),
            )
        })?;
        Ok(Target { provider, rest: rest.to_string(), query: uri.query().map(str::to_string) })
    }

    fn upstream_uri(&self, provider: &Provider, target: &Target) -> Result<Uri, ProxyError> {
        let mut uri = format!("{}/{}", provider.base_url, target.rest);
        if let Some(q) = request::scrub_query(target.query.as_deref()) {
            uri.push('?');
            uri.push_str(&q);
        }
        uri.parse()
            .map_err(|_| ProxyError::new(StatusCode::BAD_REQUEST, "capit_bad_path", "capit: the request path is not a valid URL path"))
    }

    async fn forward_free(
        &self,
        req: Request<Incoming>,
        target: &Target,
        upstream: &crate::state::Upstream,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, _body) = req.into_parts();
        let uri = self.upstream_uri(&upstream.provider, target)?;
        let response = self.send(parts.method, uri, &parts.headers, upstream, GatedBody::new(Bytes::new(), None)).await?;
        let (head, body) = response.into_parts();
        let mut out = Response::new(body.map_err(|e| Box::new(e) as body::BoxError).boxed());
        *out.status_mut() = head.status;
        *out.headers_mut() = request::client_headers(&head.headers, false);
        Ok(out)
    }

    async fn forward_metered(
        &self,
        req: Request<Incoming>,
        target: Target,
        upstream: crate::state::Upstream,
        slot: Arc<GrantSlot>,
        api: MeteredApi,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let body = self.read_body(&parts.headers, body).await?;
        let request_bytes = body.len() as u64;
        let path_model = crate::providers::gemini_model(&target.rest);
        let chat = request::prepare(api, body, path_model).map_err(body_error)?;
        tracing::Span::current().record("grant", slot.id.0);
        let model = chat.model.clone();
        self.forward_prepared(parts, chat, request_bytes, target, upstream, slot, api).await.map_err(|e| e.for_model(&model))
    }

    /// Admits a parsed request against its grant, forwards it and meters the reply.
    #[allow(clippy::too_many_arguments)]
    async fn forward_prepared(
        &self,
        parts: http::request::Parts,
        chat: request::Prepared,
        request_bytes: u64,
        target: Target,
        upstream: crate::state::Upstream,
        slot: Arc<GrantSlot>,
        api: MeteredApi,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.state.precheck(&slot, &chat.model, self.state.clock().now_seconds()).map_err(refusal_error)?;
        let reports_cost = upstream.provider.kind == ProviderKind::OpenRouter;
        let price = self.state.price(&chat.model).map(|(_, price)| price);
        if !upstream.provider.price_zero && !reports_cost && price.is_none() {
            return Err(ProxyError::new(
                StatusCode::BAD_REQUEST,
                "capit_unknown_price",
                format!(
                    "capit: no price is known for model {:?}, so it cannot be metered; set one with: capitctl price set {} --input USD_PER_MTOK --output USD_PER_MTOK",
                    chat.model, chat.model
                ),
            ));
        }
        let priced = price.as_ref().filter(|_| !upstream.provider.price_zero);
        let mut chat = chat;
        let mut fitted = None;
        let now_ms = self.state.clock().now_millis();
        let mut reservation = match self.state.admit(&slot, &chat.model, now_ms, reservation_bound(priced, &chat, request_bytes)) {
            Ok(reservation) => reservation,
            Err(refusal) => {
                // Fit: as much output as what is left has room for, if that is worth sending.
                let tokens = match (refusal.room_left(), priced) {
                    (Some(room), Some(price)) if slot.grant().limits.fit => {
                        let input = request_input_tokens(Some(price), &chat, request_bytes);
                        crate::pricing::output_that_fits(price, input, room)
                            .filter(|t| *t >= crate::grants::MIN_FIT_OUTPUT_TOKENS && chat.max_output_tokens.is_none_or(|m| *t < m))
                    }
                    _ => None,
                };
                let Some(tokens) = tokens else {
                    return Err(refusal_error(refusal));
                };
                chat.body = request::set_max_output(api, &chat.body, tokens).map_err(body_error)?;
                chat.max_output_tokens = Some(tokens);
                fitted = Some(tokens);
                self.state.admit(&slot, &chat.model, now_ms, reservation_bound(priced, &chat, request_bytes)).map_err(refusal_error)?
            }
        };
        let durable = self.state.make_durable(&mut reservation, &chat.model, api.as_str());
        let uri = self.upstream_uri(&upstream.provider, &target)?;
        let response = self.send(Method::POST, uri, &parts.headers, &upstream, GatedBody::new(chat.body, durable)).await?;
        let (head, incoming) = response.into_parts();
        let settlement = Settlement {
            state: self.state.clone(),
            reservation,
            api,
            request_model: chat.model,
            price_zero: upstream.provider.price_zero,
            trust_reported_cost: reports_cost,
            request_bytes,
            http_status: head.status.as_u16(),
            price: price.clone().filter(|_| !upstream.provider.price_zero && !reports_cost),
        };
        if !head.status.is_success() {
            // The upstream refused: nothing was generated. Record it at zero and pass it on.
            drop(settlement.settle_upstream_error());
            let mut out = Response::new(incoming.map_err(|e| Box::new(e) as body::BoxError).boxed());
            *out.status_mut() = head.status;
            *out.headers_mut() = request::client_headers(&head.headers, false);
            return Ok(out);
        }
        let is_sse = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        let format = match (is_sse, target.rest.ends_with(":streamGenerateContent")) {
            (true, _) => BodyFormat::Sse,
            (false, true) => BodyFormat::JsonArray,
            (false, false) => BodyFormat::Json,
        };
        let hide = is_sse && chat.injected_usage;
        let encoding = head.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        // A stream with a hold is forwarded in whole events, so that it can be cut cleanly.
        let can_cut = !settlement.reservation.amount().is_zero();
        let meter = ResponseMeter::new(api, format, hide).with_whole_events(can_cut).with_content_encoding(encoding);
        let body = MeteredBody::new(incoming, meter, settlement, self.config.body_limits, self.settlements.clone());
        let mut out = Response::new(body.boxed());
        *out.status_mut() = head.status;
        // No content-length: the client's end of the reply comes after the settlement, so that
        // its next request is checked against this one's cost.
        *out.headers_mut() = request::client_headers(&head.headers, true);
        if let Some(tokens) = fitted {
            out.headers_mut().insert("x-capit-max-output-tokens", http::HeaderValue::from(tokens));
        }
        Ok(out)
    }

    async fn read_body(&self, headers: &http::HeaderMap, body: Incoming) -> Result<Bytes, ProxyError> {
        let limit = self.config.max_body_bytes;
        let too_large = || {
            ProxyError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("capit: the request body is larger than the {} MiB capit accepts", limit / (1024 * 1024)),
            )
        };
        let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(too_large()),
            Err(e) => {
                Err(ProxyError::new(StatusCode::BAD_REQUEST, "capit_body_read", format!("capit: reading the request body failed: {e}")))
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        uri: Uri,
        client_headers: &http::HeaderMap,
        upstream: &crate::state::Upstream,
        body: GatedBody,
    ) -> Result<Response<Incoming>, ProxyError> {
        let headers = request::upstream_headers(client_headers, upstream.provider.kind.auth_style(), &upstream.key).map_err(|_| {
            ProxyError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "capit_bad_master_key",
                format!(
                    "capit: the stored {} key cannot be sent as a header; replace it with: capitctl key add {}",
                    upstream.provider.name, upstream.provider.name
                ),
            )
        })?;
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(h) = builder.headers_mut() {
            *h = headers;
        }
        let request = builder.body(body).map_err(|e| {
            ProxyError::new(StatusCode::BAD_REQUEST, "capit_bad_request", format!("capit: the request cannot be forwarded: {e}"))
        })?;
        let timeout = self.config.upstream_timeout;
        let name = &upstream.provider.name;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(ProxyError::new(
                StatusCode::BAD_GATEWAY,
                "capit_upstream_unreachable",
                format!("capit: could not reach {name} at {}: {}", upstream.provider.base_url, error_chain(&e)),
            )),
            Err(_) => Err(ProxyError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "capit_upstream_timeout",
                format!("capit: {name} at {} did not answer within {} s", upstream.provider.base_url, timeout.as_secs()),
            )),
        }
    }
}

/// A request's most possible cost. Input: a token is at least one byte of text, so the body's
/// size plus the provider's hidden prompt bounds it, capped by the context window; content given
/// by reference (an image URL, a file id) is bounded by the context window alone. Output: the
/// request's own limit, else the model's largest output. See ARCHITECTURE.md.
/// With no price (a provider priced at zero, or one that reports its own cost) the cost bound
/// is zero and only the token bound counts.
fn reservation_bound(price: Option<&crate::pricing::Price>, request: &request::Prepared, request_bytes: u64) -> crate::state::Bound {
    /// For models whose table entry lacks it (user-set prices): generous, never small.
    const DEFAULT_MAX_OUTPUT: u64 = 128_000;
    let input = request_input_tokens(price, request, request_bytes);
    let output = request.max_output_tokens.or(price.and_then(|p| p.max_output_tokens)).unwrap_or(DEFAULT_MAX_OUTPUT);
    crate::state::Bound {
        cost: price.map_or(rust_decimal::Decimal::ZERO, |p| crate::pricing::bound(p, input, output)),
        tokens: input.saturating_add(output),
    }
}

/// The most input tokens a request can have (see [`reservation_bound`]).
fn request_input_tokens(price: Option<&crate::pricing::Price>, request: &request::Prepared, request_bytes: u64) -> u64 {
    /// For models whose table entry lacks it (user-set prices): generous, never small.
    const DEFAULT_CONTEXT: u64 = 2_000_000;
    let context = price.and_then(|p| p.max_input_tokens).unwrap_or(DEFAULT_CONTEXT);
    if request.external_input { context } else { request_bytes.saturating_add(crate::pricing::HIDDEN_PROMPT_ALLOWANCE).min(context) }
}

/// The reply to a call the proxy answers itself.
fn local_ack() -> Response<ProxyBody> {
    let mut response = Response::new(body::full(Bytes::from_static(b"{}")));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

fn auth_error(failure: AuthFailure) -> ProxyError {
    let message = match failure {
        AuthFailure::Missing => "capit: no key was presented; send the capit virtual key as a Bearer token or x-api-key".to_string(),
        AuthFailure::Unknown => "capit: the key presented is not a valid capit key (unknown, revoked or rotated)".to_string(),
        AuthFailure::WrongProvider { grant, provider } => {
            return ProxyError::new(
                StatusCode::FORBIDDEN,
                "capit_wrong_provider",
                format!("capit: grant {grant:?} is for provider {provider:?}; use http://127.0.0.1:PORT/{provider}/..."),
            );
        }
    };
    ProxyError::new(StatusCode::UNAUTHORIZED, "invalid_api_key", message)
}

fn refusal_error(refusal: crate::grants::Refusal) -> ProxyError {
    use crate::grants::Refusal;
    let (status, code) = match &refusal {
        Refusal::Revoked { .. } => (StatusCode::UNAUTHORIZED, "capit_grant_revoked"),
        Refusal::Expired { .. } => (StatusCode::UNAUTHORIZED, "capit_grant_expired"),
        Refusal::ModelNotAllowed { .. } => (StatusCode::FORBIDDEN, "capit_model_not_allowed"),
        Refusal::Exhausted { .. } | Refusal::WouldExceed { .. } | Refusal::RequestsUsed { .. } | Refusal::TokensUsed { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota")
        }
        Refusal::RateLimited { .. } | Refusal::TooManyInFlight { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
    };
    let mut error = ProxyError::new(status, code, refusal.to_string());
    error.retry_after = refusal.retry_after();
    error.reason = refusal.reason();
    error
}

fn state_error(error: StateError) -> ProxyError {
    match error {
        StateError::NoKey(provider) => ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "capit_no_master_key",
            format!("capit: no master key is stored for {provider}; the owner can add one with: capitctl key add {provider}"),
        ),
        other => ProxyError::new(StatusCode::INTERNAL_SERVER_ERROR, "capit_internal", format!("capit: {other}")),
    }
}

fn body_error(error: BodyError) -> ProxyError {
    match error {
        BodyError::MissingModel => ProxyError::new(
            StatusCode::BAD_REQUEST,
            "missing_model",
            "capit: the request body has no \"model\"; you must provide a model parameter",
        ),
        BodyError::Malformed(detail) => ProxyError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("capit: the request body is not valid JSON for this API: {detail}"),
        ),
    }
}

/// The address the proxy may bind: loopback only.
pub fn check_listen_addr(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "refusing to listen on {addr}: the proxy serves only loopback addresses (127.0.0.0/8 or ::1), so that no other machine can spend a grant"
        ))
    }
}
