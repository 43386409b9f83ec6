//! The HTTP proxy on loopback: authenticate the grant, choose the upstream, rewrite the
//! request, forward it, observe the reply as it streams back, settle its cost. The only module
//! that knows hyper.
//!
//! Invariants: a refused request never reaches the upstream; no client credential is ever
//! forwarded; a billable path that is not metered is refused (see `providers::route`).

mod body;
mod conns;
mod count;
mod edge;
mod errors;
mod openrouter;
pub mod outbound;
mod peer;
mod request;
mod requests;

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
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::log_throttle::LogThrottle;
use crate::providers::{Endpoint, ErrorFormat, MeteredApi, Provider, ProviderKind};
use crate::state::WaitPolicy;
use crate::state::{AuthFailure, GrantSlot, State, StateError};
use crate::usage::{BodyFormat, ResponseMeter};
pub use body::BodyLimits;
use body::{GatedBody, MeteredBody, Pricing, ProxyBody, Settlement};
pub use conns::ConnLimits;
pub use edge::parse_origin;
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
    /// How long, and how many, requests may wait per grant for holds in flight to settle.
    pub wait: WaitPolicy,
    /// Timeouts and connection limits.
    pub limits: ConnLimits,
    /// Web origins whose pages may call the proxy (`--allow-origin`), lowercase.
    pub allowed_origins: Vec<String>,
}

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, GatedBody>;

struct Proxy {
    state: Arc<State>,
    /// Shared by every exchange (an `Arc`, so that handing it to one costs one count).
    client: Arc<UpstreamClient>,
    edge: edge::Edge,
    config: ProxyConfig,
    /// Upstream exchanges and settlements, which outlive their client's connection.
    settlements: TaskTracker,
    /// OpenRouter's own model prices, fetched when first needed and refreshed.
    openrouter: openrouter::ModelPrices,
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
    let local = listener.local_addr()?;
    let fd_limit = conns::raise_fd_limit();
    let (max_connections, lowered) = conns::connection_budget(fd_limit, config.limits.max_connections);
    if let Some(asked) = lowered {
        tracing::warn!(asked, max_connections, fd_limit, "--max-connections is more than the open-file limit allows; lowered");
    }
    let per_user = config.limits.max_per_user.unwrap_or(max_connections / 2).clamp(1, max_connections);
    tracing::info!(
        max_connections,
        per_user,
        fd_limit,
        header_timeout_s = config.limits.header_timeout.as_secs(),
        idle_timeout_s = config.limits.idle_timeout.as_secs(),
        "proxy limits"
    );
    let proxy = Arc::new(Proxy {
        state,
        client: Arc::new(client),
        edge: edge::Edge::new(local, config.allowed_origins.clone()),
        config: config.clone(),
        settlements: TaskTracker::new(),
        openrouter: openrouter::ModelPrices::default(),
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Connection timeouts are the watchdog's (`conns`), the same for HTTP/1 and HTTP/2.
    builder.http1().header_read_timeout(None);
    let builder = Arc::new(builder);
    let registry = Arc::new(conns::Registry::default());
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let tasks = TaskTracker::new();
    let full_log = LogThrottle::new(Duration::from_secs(10));
    let accept_log = LogThrottle::new(Duration::from_secs(10));
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    loop {
        let permit = match connections.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Full: make room by closing the longest-idle connection, else wait for one to end.
                if !registry.evict_one()
                    && let Some(held) = full_log.allow()
                {
                    tracing::warn!(
                        max_connections,
                        waited_before = held,
                        "every proxy connection is busy; new ones wait (see --max-connections)"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    permit = connections.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_FIRST;
                    accepted
                }
                Err(e) => {
                    drop(permit);
                    if !is_resource_exhaustion(&e) {
                        tracing::debug!(error = %e, "a proxy connection failed as it was accepted");
                        continue;
                    }
                    // Out of descriptors: free one, and wait rather than spin on the error.
                    registry.evict_one();
                    if let Some(held) = accept_log.allow() {
                        tracing::warn!(error = %e, failures = held + 1, fd_limit, "accepting proxy connections fails; closing idle ones and backing off");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_LONGEST);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection =
            Connection { proxy: proxy.clone(), builder: builder.clone(), registry: registry.clone(), per_user, shutdown: shutdown.clone() };
        tasks.spawn(async move {
            connection.run(stream, local, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(config.grace, tasks.wait()).await.is_err() {
        tracing::warn!("open proxy connections did not finish within {:?}; closing them", config.grace);
    }
    proxy.settlements.close();
    let settle_bound = config.body_limits.drain + Duration::from_secs(5);
    if tokio::time::timeout(settle_bound, proxy.settlements.wait()).await.is_err() {
        tracing::warn!("some abandoned replies were still being metered at shutdown");
    }
    Ok(())
}

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_LONGEST: Duration = Duration::from_secs(1);

/// Errors of `accept` that say the process or system is out of something, not that one
/// connection failed: retrying at once would spin.
fn is_resource_exhaustion(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// One accepted connection and what it needs to be served and timed out.
struct Connection {
    proxy: Arc<Proxy>,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    registry: Arc<conns::Registry>,
    per_user: usize,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, stream: tokio::net::TcpStream, local: SocketAddr, peer: SocketAddr) {
        // One netlink round trip: who owns the other end.
        let user = peer::peer_uid(local, peer);
        let (place, over_share) = match self.registry.admit(user, self.per_user) {
            conns::Admission::Within(place) => (place, None),
            conns::Admission::OverShare(place, open) => {
                if let Some(held) = SHARE_LOG.allow() {
                    tracing::warn!(
                        uid = user,
                        open,
                        share = self.per_user,
                        refused_before = held,
                        "a user is over its connection share; refusing its new connections"
                    );
                }
                (place, Some(open))
            }
        };
        let activity = place.activity.clone();
        let limits = self.proxy.config.limits;
        let proxy = self.proxy.clone();
        let watched = activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            let in_flight = watched.begin_request();
            async move { Ok::<_, Infallible>(proxy.handle(req, over_share, in_flight).await) }
        });
        let conn = self.builder.serve_connection(TokioIo::new(conns::Watched::new(stream, activity.clone())), service);
        tokio::pin!(conn);
        let stopping = loop {
            let deadline = activity.deadline(&limits);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = activity.changed() => {}
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(far_future).into()), if deadline.is_some() => {
                    if activity.deadline(&limits).is_some_and(|d| d <= std::time::Instant::now()) {
                        break false;
                    }
                }
                _ = self.shutdown.cancelled() => break true,
            }
        };
        conn.as_mut().graceful_shutdown();
        if stopping {
            // Open requests finish; `serve` bounds the wait by the grace period.
            let _ = conn.await;
        } else {
            // Idle or mid-head: nothing is lost by closing at once if it does not close itself.
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
        drop(place);
    }
}

fn far_future() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_secs(86_400)
}

static SHARE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(10));

/// A request's first path segment, its provider.
struct Target {
    provider: Provider,
    /// The path after `/<provider>/`, without the query.
    rest: String,
    query: Option<String>,
}

impl Proxy {
    async fn handle(self: Arc<Self>, req: Request<Incoming>, over_share: Option<usize>, in_flight: conns::InFlight) -> Response<ProxyBody> {
        let span = tracing::debug_span!("request", method = %req.method(), provider = tracing::field::Empty, grant = tracing::field::Empty);
        let http1 = req.version() <= http::Version::HTTP_11;
        let idle_timeout = self.config.limits.idle_timeout;
        let response = async move {
            let format = self.error_format(req.uri());
            let refuse = |error: ProxyError| {
                tracing::debug!(status = error.status.as_u16(), code = error.code, "refused");
                error.into_response(format)
            };
            // The front door first: a page rebinding a name to loopback learns nothing here.
            let origin = match self.edge.check(&req) {
                Ok(origin) => origin,
                Err(error) => return refuse(error),
            };
            if let Some(open) = over_share {
                let mut response = refuse(over_share_error(open));
                response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                return response;
            }
            if let Some(origin) = &origin
                && edge::is_preflight(req.method(), req.headers())
            {
                return edge::preflight(origin, req.headers());
            }
            let mut response = match self.route(req).await {
                Ok(response) => response,
                Err((format, error)) => {
                    tracing::debug!(status = error.status.as_u16(), code = error.code, "refused");
                    error.into_response(format)
                }
            };
            if let Some(origin) = &origin {
                edge::add_cors(&mut response, origin);
            }
            response
        }
        .instrument(span)
        .await;
        let (mut head, body) = response.into_parts();
        if http1 && !head.headers.contains_key(http::header::CONNECTION) {
            // Tells clients that honour it (Node's) to stop reusing a connection before capit closes it.
            if let Ok(value) = http::HeaderValue::from_str(&format!("timeout={}", idle_timeout.as_secs())) {
                head.headers.insert("keep-alive", value);
            }
        }
        Response::from_parts(head, BodyExt::boxed(conns::Guarded::new(body, in_flight)))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, (ErrorFormat, ProxyError)> {
        if req.uri().path().starts_with("/capit/") {
            // capit's own endpoints (access requests), answered here and never forwarded.
            return Ok(requests::handle(&self.state, req).await);
        }
        let target = self.target(req.uri()).map_err(|e| (self.error_format(req.uri()), e))?;
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
        let upstream = self.state.upstream_for(slot, &target.provider.name).map_err(state_error)?;
        match endpoint {
            Endpoint::Free => {
                self.state.admit_free(slot, self.state.clock().now_seconds()).map_err(refusal_error)?;
                self.forward_free(req, &target, &upstream).await
            }
            // Nothing billable goes upstream while its cost could not be recorded.
            Endpoint::Metered(_) if !self.state.store().writable() => Err(ledger_unavailable()),
            Endpoint::Metered(api) => {
                self.state.check_api(slot, api).map_err(refusal_error)?;
                self.forward_metered(req, target, upstream, slot.clone(), api).await
            }
            Endpoint::Local => Ok(local_ack()),
        }
    }

    /// The error format of the provider a path names, before the path is known to be sound.
    fn error_format(&self, uri: &Uri) -> ErrorFormat {
        let first = uri.path().trim_start_matches('/').split('/').next().unwrap_or("");
        self.state.provider(first).map_or(ErrorFormat::OpenAi, |p| p.kind.error_format())
    }

    /// The provider a path names and the rest of it, decoded and normalised (a path that cannot
    /// be is refused), so that what the allowlist matches is what goes upstream.
    fn target(&self, uri: &Uri) -> Result<Target, ProxyError> {
        let path = crate::request_path::normalize(uri.path())
            .map_err(|e| ProxyError::new(StatusCode::FORBIDDEN, "capit_bad_path", format!("capit: the request path is refused: {e}")))?;
        let (name, rest) = match path.segments().split_first() {
            Some((name, rest)) => (name.as_str(), rest.join("/")),
            None => ("", String::new()),
        };
        let provider = self.state.provider(name).ok_or_else(|| {
            let known: Vec<String> = self.state.list_providers().into_iter().map(|(p, _)| p.name).collect();
            ProxyError::new(
                StatusCode::NOT_FOUND,
                "capit_unknown_provider",
                format!("capit: unknown provider {name:?} in the path; use one of: {}", known.join(", ")),
            )
        })?;
        Ok(Target { provider, rest, query: uri.query().map(str::to_string) })
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
        let path_model = crate::providers::gemini_model(&target.rest);
        let fields = crate::request_fields::read(api, &body, path_model).map_err(body_error)?;
        tracing::Span::current().record("grant", slot.id.0);
        let model = fields.model.clone();
        let request = MeteredRequest { parts, body, fields, target, upstream, slot, api };
        self.admit_and_forward(request).await.map_err(|e| e.for_model(&model))
    }

    /// Prices a read request, holds the most it can cost (counting its input exactly when the
    /// bound from its bytes does not fit), sends it upstream once its hold is durable, and
    /// meters the reply.
    async fn admit_and_forward(&self, request: MeteredRequest) -> Result<Response<ProxyBody>, ProxyError> {
        let MeteredRequest { parts, body, fields, target, upstream, slot, api } = request;
        self.state.precheck(&slot, &fields.model, self.state.clock().now_seconds()).map_err(refusal_error)?;
        let arrival = self.state.arrive(&slot);
        let pricing = self.pricing(&upstream, &fields.model).await?;
        let uri = self.upstream_uri(&upstream.provider, &target)?;
        let fit = slot.fit();
        let mut demand = crate::admission::demand_for(pricing.price(), &fields, None, fit);
        if pricing.price().is_some() && !self.state.would_admit_whole(&slot, &demand) {
            // Near the cap: the provider's free count makes the input exact.
            let counted = count::count_input(&self.client, &upstream, api, &body, &fields.model, &parts.headers, &target.rest).await;
            if let Some(counted) = counted {
                demand = crate::admission::demand_for(pricing.price(), &fields, Some(counted), fit);
            }
        }
        let (mut reservation, hold) = self.state.admit(&slot, &fields.model, &demand, self.config.wait).await.map_err(refusal_error)?;
        drop(arrival);
        let body = if hold.fitted { request::set_max_output(api, &body, hold.output_tokens).map_err(body_error)? } else { body };
        let (body, injected_usage) = request::ask_for_stream_usage(api, body, &fields).map_err(body_error)?;
        let gated = GatedBody::new(body, reservation.take_gate());
        let progress = gated.progress();
        let upstream_request = upstream_request(Method::POST, uri, &parts.headers, &upstream, gated)?;
        let settlement = Settlement {
            state: self.state.clone(),
            reservation,
            api,
            request_model: fields.model.clone(),
            pricing,
            request_bytes: fields.input.total(),
            http_status: 0,
            held_output_tokens: hold.output_tokens,
            may_true_up: !fields.input_may_grow,
        };
        let exchange = Exchange {
            client: self.client.clone(),
            timeout: self.config.upstream_timeout,
            provider: upstream.provider.clone(),
            limits: self.config.body_limits,
            tracker: self.settlements.clone(),
            api,
            json_array: target.rest.ends_with(":streamGenerateContent"),
            injected_usage,
        };
        // A client that leaves before the reply's head does not stop the exchange: it goes on on
        // its own and the reply is read and settled all the same (`Detached`).
        let tracker = self.settlements.clone();
        let mut response = Detached::new(Box::pin(exchange.run(upstream_request, progress, settlement)), tracker).await?;
        if hold.fitted {
            response.headers_mut().insert("x-capit-max-output-tokens", http::HeaderValue::from(hold.output_tokens));
        }
        Ok(response)
    }

    /// How the request's cost is established: the provider's price table row, OpenRouter's own
    /// list (which it reports its cost against), or nothing for a provider priced at zero. A
    /// model with no price from any source is refused: it could not be bounded.
    async fn pricing(&self, upstream: &crate::state::Upstream, model: &str) -> Result<Pricing, ProxyError> {
        if upstream.provider.price_zero {
            return Ok(Pricing::Zero);
        }
        let local = || self.state.price(model);
        if upstream.provider.kind == ProviderKind::OpenRouter {
            let listed = self.openrouter.price(&self.client, upstream, model).await;
            if let Some(price) = listed.or_else(local) {
                return Ok(Pricing::Reported(price));
            }
        } else if let Some(price) = local() {
            return Ok(Pricing::Tokens(price));
        }
        let source = if upstream.provider.kind == ProviderKind::OpenRouter {
            " (neither OpenRouter's model list nor capit's table has it)"
        } else {
            ""
        };
        Err(ProxyError::new(
            StatusCode::BAD_REQUEST,
            "capit_unknown_price",
            format!(
                "capit: no price is known for model {model:?}{source}, so it cannot be metered; fetch current prices with `capitctl price update`, set one with `capitctl price set {model} --input USD_PER_MTOK --output USD_PER_MTOK`, or load a price file with `capitctl price import FILE`"
            ),
        ))
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
        let within = self.config.limits.body_timeout;
        let Ok(collected) = tokio::time::timeout(within, Limited::new(body, limit).collect()).await else {
            return Err(ProxyError::new(
                StatusCode::REQUEST_TIMEOUT,
                "capit_body_timeout",
                format!("capit: the request body did not arrive within {} s (--body-timeout)", within.as_secs()),
            ));
        };
        match collected {
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
        let request = upstream_request(method, uri, client_headers, upstream, body)?;
        let timeout = self.config.upstream_timeout;
        match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(unreachable_error(&upstream.provider, &e)),
            Err(_) => Err(timeout_error(&upstream.provider, timeout)),
        }
    }
}

/// The upstream exchange, polled where the client's request is (no hand-off to another task);
/// dropped unfinished, because the client left, it is spawned to finish on its own, so that the
/// reply is still read and settled.
struct Detached {
    exchange: Option<ExchangeFuture>,
    tracker: TaskTracker,
}

type ExchangeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send>>;

impl Detached {
    fn new(exchange: ExchangeFuture, tracker: TaskTracker) -> Detached {
        Detached { exchange: Some(exchange), tracker }
    }
}

impl std::future::Future for Detached {
    type Output = Result<Response<ProxyBody>, ProxyError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let Some(exchange) = self.exchange.as_mut() else {
            return std::task::Poll::Pending;
        };
        let outcome = std::task::ready!(exchange.as_mut().poll(cx));
        self.exchange = None;
        std::task::Poll::Ready(outcome)
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        if let Some(exchange) = self.exchange.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            tracing::debug!("the client left before the reply's head; metering it all the same");
            // The reply's metered body settles when it is dropped (reading the rest first).
            self.tracker.spawn(async move { drop(exchange.await) });
        }
    }
}

/// A billable request whose body has been read.
struct MeteredRequest {
    parts: http::request::Parts,
    body: Bytes,
    fields: crate::request_fields::RequestFields,
    target: Target,
    upstream: crate::state::Upstream,
    slot: Arc<GrantSlot>,
    api: MeteredApi,
}

/// One metered request's trip upstream and back, run apart from the client's connection.
struct Exchange {
    client: Arc<UpstreamClient>,
    timeout: Duration,
    provider: Provider,
    limits: BodyLimits,
    tracker: TaskTracker,
    api: MeteredApi,
    /// A Gemini stream asked for without `alt=sse`: one JSON array sent piece by piece.
    json_array: bool,
    /// The proxy asked for the stream's usage; the usage-only chunk is hidden from the client.
    injected_usage: bool,
}

impl Exchange {
    /// Sends the request and returns the reply with its body metered. Once the body has gone
    /// upstream, nothing is unmetered: a reply with an error status is recorded at what it
    /// reports, and no reply at all (a timeout, a reset, a closed connection) is charged at the
    /// request's hold. A request whose body never left is released.
    async fn run(
        self,
        request: Request<GatedBody>,
        progress: Arc<body::GateProgress>,
        mut settlement: Settlement,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let error = match tokio::time::timeout(self.timeout, self.client.request(request)).await {
            Ok(Ok(response)) => {
                let (head, incoming) = response.into_parts();
                settlement.http_status = head.status.as_u16();
                return Ok(self.metered(head, incoming, settlement));
            }
            Ok(Err(e)) if progress.hold_unrecorded() => {
                tracing::debug!(error = %error_chain(&e), "a request's hold could not be recorded; it was not sent");
                ledger_unavailable()
            }
            Ok(Err(e)) => unreachable_error(&self.provider, &e),
            Err(_) => timeout_error(&self.provider, self.timeout),
        };
        if progress.body_sent() {
            drop(settlement.settle_interrupted(format!("no reply: {}", error.message.trim_start_matches("capit: "))));
        }
        Err(error)
    }

    fn metered(&self, head: http::response::Parts, incoming: Incoming, settlement: Settlement) -> Response<ProxyBody> {
        let is_sse = head
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
        let format = match (is_sse, self.json_array && head.status.is_success()) {
            (true, _) => BodyFormat::Sse,
            (false, true) => BodyFormat::JsonArray,
            (false, false) => BodyFormat::Json,
        };
        let hide = is_sse && self.injected_usage;
        let encoding = head.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        // A stream with a hold is forwarded in whole events, so that it can be cut cleanly.
        let can_cut = !settlement.reservation.amount().is_zero();
        let meter = ResponseMeter::new(self.api, format, hide).with_whole_events(can_cut).with_content_encoding(encoding);
        let body = MeteredBody::new(incoming, meter, settlement, self.limits, self.tracker.clone());
        let mut out = Response::new(body.boxed());
        *out.status_mut() = head.status;
        // No content-length: the client's end of the reply comes after the settlement, so that
        // its next request is checked against this one's cost.
        *out.headers_mut() = request::client_headers(&head.headers, true);
        out
    }
}

/// The request to send upstream: the client's headers less its credentials, with the master key.
fn upstream_request(
    method: Method,
    uri: Uri,
    client_headers: &http::HeaderMap,
    upstream: &crate::state::Upstream,
    body: GatedBody,
) -> Result<Request<GatedBody>, ProxyError> {
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
    builder
        .body(body)
        .map_err(|e| ProxyError::new(StatusCode::BAD_REQUEST, "capit_bad_request", format!("capit: the request cannot be forwarded: {e}")))
}

fn unreachable_error(provider: &Provider, error: &dyn std::error::Error) -> ProxyError {
    ProxyError::new(
        StatusCode::BAD_GATEWAY,
        "capit_upstream_unreachable",
        format!("capit: could not reach {} at {}: {}", provider.name, provider.base_url, error_chain(error)),
    )
}

fn timeout_error(provider: &Provider, timeout: Duration) -> ProxyError {
    ProxyError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "capit_upstream_timeout",
        format!("capit: {} at {} did not answer within {} s", provider.name, provider.base_url, timeout.as_secs()),
    )
}

/// The reply to a call the proxy answers itself.
fn local_ack() -> Response<ProxyBody> {
    let mut response = Response::new(body::full(Bytes::from_static(b"{}")));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
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

fn over_share_error(open: usize) -> ProxyError {
    let mut error = ProxyError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "capit_too_many_connections",
        format!("capit: this user already has {open} connections open to capit, its share (--max-connections-per-user); close idle ones"),
    );
    error.retry_after = Some(1);
    error
}

/// The ledger cannot be written (a full disk): metered requests wait for it, and SDKs retry.
fn ledger_unavailable() -> ProxyError {
    let mut error = ProxyError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "capit_ledger_unwritable",
        "capit cannot write its ledger (disk full?), so it refuses metered requests until it can; they resume by themselves",
    );
    error.retry_after = Some(5);
    error
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
        Refusal::ApiNotAllowed { .. } => (StatusCode::FORBIDDEN, "capit_api_not_allowed"),
        Refusal::Exhausted { .. } | Refusal::WouldExceed { .. } | Refusal::RequestsUsed { .. } | Refusal::TokensUsed { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota")
        }
        Refusal::RateLimited { .. } | Refusal::TooManyInFlight { .. } | Refusal::Busy { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded")
        }
        Refusal::Team { unreachable: true, .. } => (StatusCode::SERVICE_UNAVAILABLE, "capit_team_unreachable"),
        Refusal::Team { .. } => (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota"),
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
        BodyError::Unmeterable(message) => ProxyError::new(StatusCode::BAD_REQUEST, "capit_unmeterable", message),
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
