//! The proxy's front door: a request is served only when it is addressed to capit on loopback by
//! a loopback name, and does not come from a web page the user has not allowed.
//!
//! Invariants: any other `Host` (or HTTP/2 `:authority`) is answered 421, so a page in the
//! user's browser that rebinds its own domain to 127.0.0.1 reaches nothing. A request carrying
//! a browser's `Origin`, or `Sec-Fetch-Site: cross-site` or `same-site` (a page on another
//! localhost port is "same-site"), is refused 403 unless its origin was allowed with
//! `--allow-origin`; an allowed origin gets CORS headers and its preflights answered.

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};

use super::body::{ProxyBody, full};
use super::errors::ProxyError;

/// What the front door knows: the bound address and the origins the user allowed.
#[derive(Clone, Debug)]
pub struct Edge {
    listen: std::net::SocketAddr,
    allowed_origins: Vec<String>,
}

/// Checks an `--allow-origin` value: `scheme://host[:port]`, as browsers send it, and returns it
/// in the lowercase form requests are compared in.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let origin = text.trim().to_ascii_lowercase();
    let bad = || format!("--allow-origin {text:?} must be an origin such as https://app.example.com or http://localhost:3000");
    let (scheme, rest) = origin.split_once("://").ok_or_else(bad)?;
    let host_ok = !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !matches!(scheme, "http" | "https") || !host_ok {
        return Err(bad());
    }
    Ok(origin)
}

impl Edge {
    pub fn new(listen: std::net::SocketAddr, allowed_origins: Vec<String>) -> Edge {
        Edge { listen, allowed_origins }
    }

    /// Decides whether a request may be served. `Ok(Some(origin))` means a page of an allowed
    /// origin: serve it and add CORS headers.
    pub fn check<B>(&self, req: &Request<B>) -> Result<Option<HeaderValue>, ProxyError> {
        let authority = req.uri().authority().map(|a| a.as_str());
        let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or("\u{fffd}"));
        if authority.is_none() && host.is_none() {
            return Err(self.misdirected("(none)"));
        }
        for name in [authority, host].into_iter().flatten() {
            if !self.host_allowed(name) {
                return Err(self.misdirected(name));
            }
        }
        let origin = req.headers().get(header::ORIGIN);
        if let Some(origin) = origin {
            let text = origin.to_str().unwrap_or("").to_ascii_lowercase();
            if self.allowed_origins.contains(&text) {
                return Ok(Some(origin.clone()));
            }
            return Err(from_a_page(&format!("Origin: {}", String::from_utf8_lossy(origin.as_bytes()))));
        }
        let site = req.headers().get("sec-fetch-site").map(|v| v.as_bytes().to_ascii_lowercase());
        if let Some(site) = site.filter(|s| s == b"cross-site" || s == b"same-site") {
            return Err(from_a_page(&format!("Sec-Fetch-Site: {}", String::from_utf8_lossy(&site))));
        }
        Ok(None)
    }

    /// True for `127.0.0.1`, `localhost` and `[::1]` (and the address capit is bound to), each
    /// bare or with capit's own port.
    fn host_allowed(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        let (host, port) = match name.rsplit_once(':') {
            // An IPv6 literal's own colons are inside its brackets.
            Some((host, port)) if !port.contains(']') => (host, Some(port)),
            _ => (name.as_str(), None),
        };
        if port.is_some_and(|p| p.parse::<u16>().ok() != Some(self.listen.port())) {
            return false;
        }
        let bound = match self.listen.ip() {
            std::net::IpAddr::V4(ip) => ip.to_string(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        };
        matches!(host, "127.0.0.1" | "localhost" | "[::1]") || host == bound
    }

    fn misdirected(&self, name: &str) -> ProxyError {
        let port = self.listen.port();
        ProxyError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "capit_misdirected",
            format!(
                "capit: this proxy answers only to 127.0.0.1:{port}, localhost:{port} or [::1]:{port}, not to Host {name:?} (a web page may be rebinding its name to this machine)"
            ),
        )
    }
}

fn from_a_page(what: &str) -> ProxyError {
    ProxyError::new(
        StatusCode::FORBIDDEN,
        "capit_browser_refused",
        format!("capit: requests from web pages are refused ({what}); to allow one origin, start capitd with --allow-origin ORIGIN"),
    )
}

/// The answer to an allowed origin's CORS preflight.
pub fn preflight(origin: &HeaderValue, request: &HeaderMap) -> Response<ProxyBody> {
    let mut response = Response::new(full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS).filter(|v| is_token_list(v.as_bytes())) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    // Chrome's Private Network Access asks before a public page may reach loopback.
    if request.get("access-control-request-private-network").is_some_and(|v| v.as_bytes() == b"true") {
        headers.insert("access-control-allow-private-network", HeaderValue::from_static("true"));
    }
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    add_cors(&mut response, origin);
    response
}

/// Lets an allowed origin's page read the response.
pub fn add_cors(response: &mut Response<ProxyBody>, origin: &HeaderValue) {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("*"));
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

/// True for a comma-separated list of header names, the only thing a preflight may echo back.
fn is_token_list(value: &[u8]) -> bool {
    value.iter().all(|b| b.is_ascii_alphanumeric() || b"-_, ".contains(b))
}

/// Whether a method is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge() -> Edge {
        Edge::new("127.0.0.1:8787".parse().unwrap(), vec!["https://app.example".into()])
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut builder = Request::builder().uri("/openai/v1/models");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[track_caller]
    fn status(headers: &[(&str, &str)]) -> u16 {
        match edge().check(&req(headers)) {
            Ok(_) => 200,
            Err(e) => e.status.as_u16(),
        }
    }

    #[test]
    fn loopback_names_with_our_port_or_none_are_served() {
        for host in ["127.0.0.1:8787", "localhost:8787", "LocalHost:8787", "[::1]:8787", "127.0.0.1", "localhost", "[::1]"] {
            assert_eq!(status(&[("host", host)]), 200, "{host}");
        }
    }

    #[test]
    fn other_hosts_are_misdirected() {
        for host in
            ["evil.example:8787", "127.0.0.1:8788", "localhost.:8787", "127.0.0.2:8787", "[::2]:8787", "localhost:", "", "0.0.0.0:8787"]
        {
            assert_eq!(status(&[("host", host)]), 421, "{host}");
        }
        assert_eq!(status(&[]), 421, "no Host at all");
        let absolute =
            Request::builder().uri("http://evil.example:8787/openai/v1/models").header("host", "localhost:8787").body(()).unwrap();
        assert_eq!(edge().check(&absolute).unwrap_err().status, 421, "an absolute-form target is checked too");
        let bound = Edge::new("127.0.0.2:9000".parse().unwrap(), vec![]);
        assert!(bound.check(&Request::builder().uri("/").header("host", "127.0.0.2:9000").body(()).unwrap()).is_ok());
    }

    #[test]
    fn pages_are_refused_unless_their_origin_is_allowed() {
        let host = ("host", "127.0.0.1:8787");
        assert_eq!(status(&[host, ("origin", "http://localhost:3000")]), 403);
        assert_eq!(status(&[host, ("origin", "null")]), 403);
        assert_eq!(status(&[host, ("sec-fetch-site", "cross-site")]), 403);
        assert_eq!(status(&[host, ("sec-fetch-site", "same-site")]), 403);
        assert_eq!(status(&[host, ("sec-fetch-site", "none")]), 200);
        assert_eq!(status(&[host, ("origin", "https://app.example")]), 200);
        assert_eq!(status(&[host, ("origin", "https://APP.example"), ("sec-fetch-site", "cross-site")]), 200);
        assert_eq!(status(&[("host", "evil.example"), ("origin", "https://app.example")]), 421, "the Host is checked first");
    }

    #[test]
    fn allowed_origins_are_checked_at_start() {
        assert_eq!(parse_origin("https://App.Example").unwrap(), "https://app.example");
        assert_eq!(parse_origin("http://localhost:3000").unwrap(), "http://localhost:3000");
        assert!(parse_origin("app.example").is_err());
        assert!(parse_origin("https://app.example/path").is_err());
        assert!(parse_origin("null").is_err());
        assert!(parse_origin("*").is_err());
    }
}
