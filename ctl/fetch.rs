//! Fetches one document over HTTP(S) for `capitctl price update`: a GET that follows a few
//! redirects, with TLS through rustls (ring, the Mozilla roots compiled in), bounded in size
//! and time. capitctl fetches, not the daemon, so that capitd never reaches out to a URL a
//! command line names; the daemon only gets the text.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// LiteLLM's price list, which `price update` reads by default.
pub const LITELLM_PRICES: &str = "https://raw.githubusercontent.com/BerriAI/litellm/main/model_prices_and_context_window.json";

/// Larger than any price list (LiteLLM's is a few MB): a bound, not a guess at the size.
const MAX_BYTES: usize = 64 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(120);
const MAX_REDIRECTS: usize = 5;

/// The body of `url` as text; an error for anything but a 200 with UTF-8 text.
pub async fn text(url: &str) -> anyhow::Result<String> {
    tokio::time::timeout(TIMEOUT, fetch(url)).await.with_context(|| format!("fetching {url}: no answer within {} s", TIMEOUT.as_secs()))?
}

async fn fetch(url: &str) -> anyhow::Result<String> {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(15)));
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().wrap_connector(http);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut current: http::Uri = url.parse().with_context(|| format!("{url:?} is not a URL"))?;
    if !matches!(current.scheme_str(), Some("http" | "https")) {
        bail!("{url:?} is not an http or https URL");
    }
    for _ in 0..=MAX_REDIRECTS {
        let request = http::Request::get(current.clone())
            .header(http::header::USER_AGENT, concat!("capitctl/", env!("CARGO_PKG_VERSION")))
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .context("building the request")?;
        let response = client.request(request).await.with_context(|| format!("fetching {current}"))?;
        let status = response.status();
        if status.is_redirection() {
            let location = response.headers().get(http::header::LOCATION).and_then(|v| v.to_str().ok());
            let Some(location) = location else { bail!("fetching {current}: {status} without a Location") };
            current = join(&current, location).with_context(|| format!("fetching {current}: bad redirect {location:?}"))?;
            continue;
        }
        if status != http::StatusCode::OK {
            bail!("fetching {current}: the server answered {status}");
        }
        let body = Limited::new(response.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading {current}: {e}"))?
            .to_bytes();
        return String::from_utf8(body.to_vec()).with_context(|| format!("{current} is not UTF-8 text"));
    }
    bail!("fetching {url}: more than {MAX_REDIRECTS} redirects")
}

/// A redirect's target, absolute or relative to the URL that gave it.
fn join(base: &http::Uri, location: &str) -> anyhow::Result<http::Uri> {
    let uri: http::Uri = location.parse()?;
    if uri.scheme().is_some() {
        return Ok(uri);
    }
    let authority = base.authority().context("no host")?;
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    Ok(http::Uri::builder().scheme(base.scheme_str().unwrap_or("https")).authority(authority.as_str()).path_and_query(path).build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_url_that_gave_them() {
        let base: http::Uri = "https://example.org/a/b.json?x=1".parse().unwrap();
        assert_eq!(join(&base, "/c.json").unwrap().to_string(), "https://example.org/c.json");
        assert_eq!(join(&base, "c.json").unwrap().to_string(), "https://example.org/a/c.json");
        assert_eq!(join(&base, "http://other/d").unwrap().to_string(), "http://other/d");
    }
}
